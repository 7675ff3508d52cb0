// Package chaos injects faults for dimmer's tests and game days: on real TCP
// links to Postgres, Redis and Kafka ([Link]), on the store functions a
// service hands to dualwrite and shadowread ([Injector], [Wrap]), and on a
// schedule ([Scenario]).
//
// It is a module of its own (github.com/dimmer-dev/dimmer/chaos), tied to
// dimmer by the repository's go.work: its dependencies (toxiproxy, with
// prometheus and zerolog behind it) never reach what a service importing
// dualwrite or shadowread compiles.
//
// # Links
//
// [NewLink] starts a TCP proxy on 127.0.0.1 in front of one server. Clients
// reach the server through it, either by a rewritten URL ([ThroughLink],
// [UpstreamOf]) or through their dial seam ([Link.Dial] fits
// pgconn.Config.DialFunc, redis.Options.Dialer and kgo.Dialer; use it for
// Kafka, whose brokers advertise their own addresses). Faults are switched
// while traffic flows and apply to open connections as well as new ones:
//
//	link, _ := chaos.NewLink(ctx, "127.0.0.1:6379")
//	opts.Dialer = link.Dial
//	link.SetLatency(50*time.Millisecond, 10*time.Millisecond) // slow
//	link.Blackhole(true)  // accepted, never answered: reads hang
//	link.Refuse(true)     // down: connections closed, new ones refused
//	link.Reset()          // every open connection dropped, like a restart
//	link.ResetPeer(true)  // each request answered by a TCP reset
//	link.Timeout(time.Second) // data stops, the connection closes after 1s
//	link.LimitBandwidth(64)   // 64 KB/s each way
//	link.Heal()
//
// A link embeds Shopify's toxiproxy (github.com/Shopify/toxiproxy/v2) in the
// process rather than wrapping each client's dialer: one mechanism serves
// every protocol, faults reach connections that are already open (a wrapped
// dialer only sees new ones unless it re-implements a proxy), and
// toxiproxy's toxics (latency with jitter, bandwidth, timeout, reset_peer)
// are well tried. No toxiproxy server or HTTP API runs: the proxy and its
// toxics are driven directly. The embedded proxy logs through zerolog; its
// logger is discarded and zerolog's global level is raised to Info once,
// because one toxic logs at Trace level through the global logger.
//
// Client settings matter under a blackhole: a client without a read
// deadline waits for ever. go-redis bounds a command by ReadTimeout (3s)
// unless Options.ContextTimeoutEnabled makes it honour the context; pgx
// honours the context but has no read timeout of its own.
//
// # Injectors
//
// An [Injector] makes calls fail ([Injector.FailRate], with an
// [*InjectedError] matching [ErrInjected] and, optionally, an error of the
// store's own), run late ([Injector.SetLatency]), hang until their context
// ends ([Injector.HangRate]) or panic ([Injector.PanicRate]). [Wrap] puts
// one in front of any func(ctx, In) (Out, error), the shape of dualwrite's
// and shadowread's user functions. [WithSeed] makes which calls fail
// reproducible.
//
// # Scenarios
//
// A [Scenario] runs named steps at offsets from its start (a game day: "at
// 0s baseline, at 30s cut Redis, at 90s heal"), one after the other, against
// a [Clock] (the wall clock unless [WithClock]), reporting each
// [StepResult]. [Scenario.Stop] cancels the rest and waits.
//
// # What the module's tests prove
//
// On the real servers, each test in its own schema or key prefix: flag
// providers (pgflags, redisflags) behind a cut link keep serving their last
// stage, report STALE with an event and resync on healing; dual writes whose
// new side loses its Postgres connections give callers no error and turn
// every missed write into a repair that converges on replay; shadow reads
// whose Redis side is blackholed leave the caller's results and latency
// alone; an outbox relay killed mid-batch (its Postgres link blackholed
// after the broker acknowledged a batch, then its Run cancelled and its
// connections reset) loses nothing: a second relay takes its buckets over,
// each key's messages reach Kafka in commit order, and only the killed
// batches repeat; an outbox relay behind a blackholed Kafka link keeps the
// messages committed meanwhile, dead-letters none of them in an outage
// shorter than its attempts allow, and delivers them all in order once the
// link heals.
//
// A finding those tests pin down: franz-go's idempotent producer (the
// defaults, kafkasink.ClientOptions) never fails a record it has sent
// without an answer, so kafkasink's Publish stops waiting at the relay's
// PublishTimeout instead: failed attempts are counted and retried, the
// relay keeps its leases, and the records left with the client are
// delivered once Kafka is back (repeats, never reorders). With
// kgo.AllowIdempotentProduceCancellation and a short
// kgo.RequestTimeoutOverhead the client gives such records up itself and
// the repeats mostly vanish.
package chaos
