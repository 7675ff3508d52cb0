package flags

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"time"

	"github.com/cespare/xxhash/v2"
)

// State is the stored value of a migration's stage flag: the stage served to
// every key, optionally a [Rollout] serving another stage to a share of keys,
// and bookkeeping the controller maintains.
//
// Both dimmer providers store exactly this document as JSON, so the stores
// carry one shape and a provider evaluates it without I/O.
type State struct {
	Migration string   `json:"migration"`
	Stage     Stage    `json:"stage"`
	Rollout   *Rollout `json:"rollout,omitempty"`
	// Revision increases by one with every applied change; 0 means the
	// migration was never set (it reads as off). Instances report the
	// revision they have applied to the fleet registry.
	Revision int64 `json:"revision"`
	// Epoch increases each time the migration goes back to off: from then on
	// the new side is stale and must be backfilled (and verified) again
	// before shadow. Backfill verifications record the epoch they verified.
	Epoch     int64     `json:"epoch"`
	UpdatedAt time.Time `json:"updated_at,omitzero"`
	UpdatedBy string    `json:"updated_by,omitempty"`
}

// Rollout serves Stage to Percent % of keys, chosen by [Bucket]; the other
// keys get the state's base stage.
type Rollout struct {
	Stage   Stage   `json:"stage"`
	Percent float64 `json:"percent"`
}

// BucketCount is the number of rollout buckets: a percentage has a resolution
// of 0.01 %.
const BucketCount = 10000

// Bucket is the documented sticky hash that places a targeting key in one of
// [BucketCount] buckets for a flag:
//
//	XXH64(seed 0) of the UTF-8 bytes of flagKey + "/" + targetingKey, modulo 10000
//
// It depends on nothing but the two strings, so every instance, process and
// language computes the same bucket, and growing a percentage only adds keys
// (a key served the rollout stage at 5 % is still served it at 10 %).
func Bucket(flagKey, targetingKey string) uint32 {
	var d xxhash.Digest
	d.Reset()
	_, _ = d.WriteString(flagKey)
	_, _ = d.WriteString("/")
	_, _ = d.WriteString(targetingKey)
	return uint32(d.Sum64() % BucketCount)
}

// threshold converts a percentage to a bucket count.
func (r Rollout) threshold() uint32 {
	return uint32(math.Round(r.Percent * BucketCount / 100))
}

// Validate checks the rollout's stage and percentage.
func (r Rollout) Validate() error {
	if !r.Stage.Valid() {
		return &UnknownStageError{Value: r.Stage.String()}
	}
	if math.IsNaN(r.Percent) || r.Percent <= 0 || r.Percent >= 100 {
		return fmt.Errorf("rollout percent %v: must be greater than 0 and less than 100", r.Percent)
	}
	return nil
}

// StageFor is the stage served to a targeting key. A key in the rollout's
// share gets the rollout stage; every other key, and the empty key (an
// operation with no entity), gets the base stage.
func (s *State) StageFor(targetingKey string) Stage {
	if s.Rollout == nil || targetingKey == "" {
		return s.Stage
	}
	if Bucket(s.Migration, targetingKey) < s.Rollout.threshold() {
		return s.Rollout.Stage
	}
	return s.Stage
}

// Served lists the distinct stages the state serves to some key.
func (s *State) Served() []Stage {
	if s.Rollout == nil || s.Rollout.Stage == s.Stage {
		return []Stage{s.Stage}
	}
	return []Stage{s.Stage, s.Rollout.Stage}
}

// String describes the state for people: "shadow" or "shadow (live 5%)".
func (s State) String() string {
	if s.Rollout == nil {
		return s.Stage.String()
	}
	return fmt.Sprintf("%s (%s %s%%)", s.Stage, s.Rollout.Stage, trimFloat(s.Rollout.Percent))
}

func trimFloat(f float64) string {
	return fmt.Sprintf("%g", math.Round(f*100)/100)
}

// Validate checks a state's name, stages and rollout.
func (s State) Validate() error {
	if err := ValidateName(s.Migration); err != nil {
		return err
	}
	if !s.Stage.Valid() {
		return &UnknownStageError{Value: s.Stage.String()}
	}
	if s.Rollout != nil {
		if err := s.Rollout.Validate(); err != nil {
			return fmt.Errorf("%s: %w", s.Migration, err)
		}
	}
	return nil
}

// Encode returns the JSON document the stores hold.
func (s State) Encode() ([]byte, error) {
	if err := s.Validate(); err != nil {
		return nil, err
	}
	return json.Marshal(s)
}

// DecodeState parses a stored document, rejecting unknown stages and bad
// rollouts with an error that names what is wrong.
func DecodeState(b []byte) (State, error) {
	// A missing or null stage would decode as the zero Stage, off: a
	// service in live would quietly read old again, so it is an error.
	var present struct {
		Stage json.RawMessage `json:"stage"`
	}
	if err := json.Unmarshal(b, &present); err != nil {
		return State{}, fmt.Errorf("decode stage flag document: %w", err)
	}
	if string(bytes.TrimSpace(b)) == "null" {
		return State{}, errors.New("decode stage flag document: the document is null")
	}
	if len(present.Stage) == 0 || string(present.Stage) == "null" {
		return State{}, errors.New(`decode stage flag document: it has no "stage"`)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return State{}, fmt.Errorf("decode stage flag document: %w", err)
	}
	if err := s.Validate(); err != nil {
		return State{}, fmt.Errorf("decode stage flag document: %w", err)
	}
	return s, nil
}

// DecodeStateOf parses the stored document of migration and checks it is
// that migration's own.
func DecodeStateOf(migration string, doc []byte) (State, error) {
	st, err := DecodeState(doc)
	if err != nil {
		return State{}, fmt.Errorf("flag %s: %w", migration, err)
	}
	if st.Migration != migration {
		return State{}, fmt.Errorf("flag %s: stored document names migration %q", migration, st.Migration)
	}
	return st, nil
}

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,99}$`)

// ValidateName checks a migration name: 1–100 characters of a–z, 0–9, '_',
// '.', '-', starting with a letter or digit. The name is also the flag key.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w %q: use 1-100 characters of a-z, 0-9, '_', '.', '-', starting with a letter or digit",
			ErrInvalidName, Echo(name))
	}
	return nil
}
