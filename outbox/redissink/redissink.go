package redissink

import (
	"context"
	"errors"

	"github.com/redis/go-redis/v9"

	"github.com/dimmer-dev/dimmer/outbox"
)

// Publisher is an [outbox.Publisher] over a go-redis client.
type Publisher struct {
	rdb    redis.UniversalClient
	prefix string
	maxLen int64
}

var _ outbox.Publisher = (*Publisher)(nil)

// Option configures a [Publisher].
type Option func(*Publisher) error

// WithStreamPrefix prefixes every stream name (e.g. "svc:").
func WithStreamPrefix(p string) Option {
	return func(s *Publisher) error { s.prefix = p; return nil }
}

// WithMaxLen trims each stream to about n entries (XADD MAXLEN ~ n).
func WithMaxLen(n int64) Option {
	return func(s *Publisher) error {
		if n <= 0 {
			return errors.New("redissink: WithMaxLen: must be positive")
		}
		s.maxLen = n
		return nil
	}
}

// New returns a publisher over rdb (the caller's; not closed here).
func New(rdb redis.UniversalClient, opts ...Option) (*Publisher, error) {
	if rdb == nil {
		return nil, errors.New("redissink: client is nil")
	}
	p := &Publisher{rdb: rdb}
	for _, o := range opts {
		if err := o(p); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// Stream returns the stream a topic is published to.
func (p *Publisher) Stream(topic string) string { return p.prefix + topic }

// Publish XADDs the batch in one pipeline.
func (p *Publisher) Publish(ctx context.Context, batch []outbox.Record) []error {
	results := make([]error, len(batch))
	pipe := p.rdb.Pipeline()
	cmds := make([]*redis.StringCmd, len(batch))
	for i, r := range batch {
		vals := make([]any, 0, 6+2*len(r.Headers))
		vals = append(vals, "id", r.ID.String(), "key", r.Key, "payload", r.Payload)
		for k, v := range r.Headers {
			vals = append(vals, "h:"+k, v)
		}
		args := &redis.XAddArgs{Stream: p.Stream(r.Topic), Values: vals}
		if p.maxLen > 0 {
			args.MaxLen, args.Approx = p.maxLen, true
		}
		cmds[i] = pipe.XAdd(ctx, args)
	}
	_, err := pipe.Exec(ctx)
	for i, c := range cmds {
		results[i] = c.Err()
		if results[i] == nil && err != nil && c.Val() == "" {
			results[i] = err
		}
	}
	return results
}
