package chaos_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/dimmer-dev/dimmer/chaos"
)

// Put a link between a Redis client and the server, then cut it and heal it
// while the client runs.
func ExampleLink() {
	ctx := context.Background()
	url := os.Getenv("DIMMER_REDIS_URL")
	if url == "" {
		url = "redis://127.0.0.1:6379/0"
	}
	upstream, err := chaos.UpstreamOf(url)
	if err != nil {
		fmt.Println(err)
		return
	}
	link, err := chaos.NewLink(ctx, upstream)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer link.Close()

	opts, err := redis.ParseURL(url)
	if err != nil {
		fmt.Println(err)
		return
	}
	opts.Dialer = link.Dial           // every connection goes through the link
	opts.ContextTimeoutEnabled = true // so a hung read ends with ctx
	opts.MaxRetries = -1
	client := redis.NewClient(opts)
	defer client.Close()

	fmt.Println("healthy:", client.Ping(ctx).Err())

	_ = link.Blackhole(true)
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	err = client.Ping(short).Err()
	cancel()
	fmt.Println("blackholed, PING failed:", err != nil, link.Faults())

	_ = link.Heal()
	for range 50 { // the blackholed connection is dropped on healing; the next one works
		if err = client.Ping(ctx).Err(); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	fmt.Println("healed:", err)
	// Output:
	// healthy: <nil>
	// blackholed, PING failed: true [blackhole]
	// healed: <nil>
}

// Wrap a store function so a test (or a game day) decides how it fails.
func ExampleWrap() {
	loadUser := func(ctx context.Context, id string) (string, error) { return "user " + id, nil }

	inj, err := chaos.NewInjector("users-redis", chaos.WithSeed(7))
	if err != nil {
		fmt.Println(err)
		return
	}
	load := chaos.Wrap(inj, loadUser) // hand this to dualwrite.New or shadowread.New

	ctx := context.Background()
	u, err := load(ctx, "42")
	fmt.Println(u, err)

	_ = inj.FailRate(1, redis.ErrClosed) // the store is down
	_, err = load(ctx, "42")
	fmt.Println(errors.Is(err, chaos.ErrInjected), errors.Is(err, redis.ErrClosed))

	inj.Heal()
	_ = inj.FailRate(0.25, nil) // a quarter of the calls fail, the same ones on every run
	failed := 0
	for range 1000 {
		if _, err := load(ctx, "42"); err != nil {
			failed++
		}
	}
	fmt.Println(failed > 200 && failed < 300, inj.Stats().Calls)
	// Output:
	// user 42 <nil>
	// true true
	// true 1002
}

// A game day on a schedule: faults switched at offsets from the start.
func ExampleScenario() {
	inj, _ := chaos.NewInjector("orders-new")
	sc, err := chaos.NewScenario("new store flaps", []chaos.Step{
		chaos.At(0, "baseline", func(context.Context) error { return nil }),
		chaos.At(20*time.Millisecond, "slow new store", func(context.Context) error {
			return inj.SetLatency(50*time.Millisecond, 0)
		}),
		chaos.At(40*time.Millisecond, "new store down", func(context.Context) error {
			return inj.FailRate(1, nil)
		}),
		chaos.At(60*time.Millisecond, "heal", func(context.Context) error { inj.Heal(); return nil }),
	}, chaos.OnStep(func(r chaos.StepResult) { fmt.Println("step", r.Name, r.Err) }))
	if err != nil {
		fmt.Println(err)
		return
	}
	ctx := context.Background()
	if err := sc.Start(ctx); err != nil {
		fmt.Println(err)
		return
	}
	defer sc.Stop(ctx)
	results, err := sc.Wait(ctx)
	fmt.Println(len(results), "steps", err)
	// Output:
	// step baseline <nil>
	// step slow new store <nil>
	// step new store down <nil>
	// step heal <nil>
	// 4 steps <nil>
}
