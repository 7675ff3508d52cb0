package redisflags_test

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/open-feature/go-sdk/openfeature"
	"github.com/redis/go-redis/v9"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/flags/redisflags"
)

// Set a stage with a 5 % canary through the store, serve it through
// OpenFeature and evaluate it per entity with a flags.Source.
func Example_provider() {
	ctx := context.Background()
	url := os.Getenv("DIMMER_REDIS_URL")
	if url == "" {
		url = "redis://127.0.0.1:6379/0"
	}
	opts, err := redis.ParseURL(url)
	if err != nil {
		fmt.Println(err)
		return
	}
	client := redis.NewClient(opts)
	defer client.Close()
	prefix := "dimmer:example:" + strconv.Itoa(os.Getpid()) + ":" // a real service keeps the default, "dimmer:"
	defer func() {
		keys, _ := client.Keys(ctx, prefix+"*").Result()
		if len(keys) > 0 {
			client.Del(ctx, keys...)
		}
	}()

	store, err := redisflags.NewStore(client, redisflags.WithPrefix(prefix))
	if err != nil {
		fmt.Println(err)
		return
	}
	// Operators (the controller, the dimmer CLI) write through the store.
	cur, _ := store.Load(ctx, "orders")
	next := cur
	next.Stage = flags.Shadow
	next.Rollout = &flags.Rollout{Stage: flags.Live, Percent: 5}
	st, err := store.Swap(ctx, cur.Revision, next, flags.AuditEntry{
		Actor: "alice", From: cur.Stage.String(), To: "shadow", Reason: "new side backfilled and verified"})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("stored:", st, "revision", st.Revision)

	// Services read through OpenFeature.
	provider, err := redisflags.NewProvider(client, redisflags.WithPrefix(prefix))
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := openfeature.SetProviderAndWait(provider); err != nil {
		fmt.Println(err)
		return
	}
	defer openfeature.Shutdown()
	source, err := flags.NewSource(openfeature.NewDefaultClient(), flags.Off)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, key := range []string{"customer-1", "customer-13"} {
		stage, err := source.Stage(ctx, "orders", key)
		fmt.Println(key, stage, "reads from", stage.Reads(), err)
	}

	// A flip reaches the provider through pub/sub.
	next = st
	next.Stage, next.Rollout = flags.Live, nil
	if _, err := store.Swap(ctx, st.Revision, next, flags.AuditEntry{Actor: "alice", From: "shadow", To: "live"}); err != nil {
		fmt.Println(err)
		return
	}
	for deadline := time.Now().Add(5 * time.Second); provider.Revisions()["orders"] < 2 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	stage, err := source.Stage(ctx, "orders", "customer-1")
	fmt.Println("after the flip:", stage, err)
	// Output:
	// stored: shadow (live 5%) revision 1
	// customer-1 shadow reads from old <nil>
	// customer-13 live reads from new <nil>
	// after the flip: live <nil>
}
