package flags

import "time"

// Op is the kind of operation an [Observation] describes.
type Op uint8

const (
	Read Op = iota + 1
	Write
)

func (o Op) String() string {
	switch o {
	case Read:
		return "read"
	case Write:
		return "write"
	}
	return "unknown"
}

// Observation is one call to one side of a migration, as dualwrite and
// shadowread report it to an [Observer] (the [Watchdog], metrics, tests).
//
// Report exactly one Observation per side call. The call of the compared
// (shadow) side carries the comparison's verdict in the same Observation
// (Compared, Mismatch, Lasting); a shadow call that failed has Err set and
// Compared unset unless its error was compared under the error policy.
type Observation struct {
	Migration string
	Stage     Stage
	Op        Op
	Side      Side
	// Latency of the side's own call.
	Latency time.Duration
	// Err: the side's call failed (timeouts and recovered panics included).
	Err bool
	// Compared: this call's result was compared with the served one.
	// Mismatch and Lasting are meaningful only then: Mismatch is the first
	// comparison's verdict, Lasting whether it still differed after the
	// re-read (a transient mismatch is Mismatch && !Lasting). Without a
	// re-read, Lasting equals Mismatch.
	Compared bool
	Mismatch bool
	Lasting  bool
}

// Observer receives observations. Implementations must be safe for
// concurrent use and must not block: they run on the operation's path.
type Observer interface {
	Observe(Observation)
}

// ObserverFunc adapts a function to [Observer].
type ObserverFunc func(Observation)

// Observe calls f(o).
func (f ObserverFunc) Observe(o Observation) { f(o) }

// Observers fans one observation out to several observers.
type Observers []Observer

// Observe calls every observer in turn.
func (os Observers) Observe(o Observation) {
	for _, ob := range os {
		ob.Observe(o)
	}
}
