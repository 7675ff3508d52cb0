package streams_test

import (
	"context"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/streams"
)

// memRepairs keeps repairs in memory, for the example only: a service
// uses [streams.NewOutboxRepairLog], so a repair survives a crash.
type memRepairs struct{ n int64 }

func (m *memRepairs) Record(context.Context, streams.Repair) error { m.n++; return nil }
func (m *memRepairs) Pending(context.Context) (int64, error)       { return m.n, nil }

// A service produces through a streams.Producer: old acknowledges (the
// caller's result), and the copy goes to new off the caller's path.
func ExampleProducer() {
	oldC, _ := kfake.NewCluster(kfake.SeedTopics(3, "orders"))
	defer oldC.Close()
	newC, _ := kfake.NewCluster(kfake.SeedTopics(3, "orders"))
	defer newC.Close()
	ctx := context.Background()

	stage := flags.StageFunc(func(context.Context, string, string) (flags.Stage, error) { return flags.DualWrite, nil })
	p, err := streams.NewProducer("orders_to_new_cluster", "orders", stage,
		[]kgo.Opt{kgo.SeedBrokers(oldC.ListenAddrs()...)},
		[]kgo.Opt{kgo.SeedBrokers(newC.ListenAddrs()...)},
		streams.WithRepairLog(&memRepairs{}))
	if err != nil {
		panic(err)
	}
	for i := range 3 {
		o, err := p.Produce(ctx, &kgo.Record{Key: []byte("customer-7"), Value: fmt.Appendf(nil, "order %d", i)})
		if err != nil {
			panic(err)
		}
		fmt.Println("acknowledged by", o.Side)
	}
	_ = p.Close(ctx)
	fmt.Printf("copied to new: %d, repairs: %d\n", p.Stats().Copied, p.Stats().Repairs)
	// Output:
	// acknowledged by old
	// acknowledged by old
	// acknowledged by old
	// copied to new: 3, repairs: 0
}

// A consumer group follows the stage: on old until live, then on new from
// exactly the next record it had not processed. The mirror fills new for
// producers that were not changed.
func ExampleConsumer() {
	oldC, _ := kfake.NewCluster(kfake.SeedTopics(1, "orders"))
	defer oldC.Close()
	newC, _ := kfake.NewCluster(kfake.SeedTopics(1, "orders"))
	defer newC.Close()
	oldOpts := []kgo.Opt{kgo.SeedBrokers(oldC.ListenAddrs()...)}
	newOpts := []kgo.Opt{kgo.SeedBrokers(newC.ListenAddrs()...)}
	ctx, cancel := context.WithCancel(context.Background())

	prod, _ := kgo.NewClient(append(oldOpts, kgo.DefaultProduceTopic("orders"))...)
	defer prod.Close()
	produce := func(from, to int) {
		for i := from; i < to; i++ {
			prod.ProduceSync(ctx, &kgo.Record{Value: fmt.Appendf(nil, "order %d", i)})
		}
	}
	produce(0, 3)
	mirror, _ := streams.NewMirror(streams.MirrorConfig{Topic: "orders", Old: oldOpts, New: newOpts})
	go mirror.Run(ctx)

	stage := newStage(flags.Shadow)
	processed := make(chan string)
	c, err := streams.NewConsumer(streams.ConsumerConfig{
		Migration: "orders_to_new_cluster", Topic: "orders", Group: "billing",
		Old: oldOpts, New: newOpts, Source: stage,
		Handler: func(_ context.Context, r *kgo.Record) error {
			side := "old"
			if _, err := streams.OriginOf(r, flags.Old); err == nil && len(r.Headers) > 0 {
				side = "new" // a copy: it carries its origin
			}
			processed <- fmt.Sprintf("%s from %s", r.Value, side)
			return nil
		},
	})
	if err != nil {
		panic(err)
	}
	defer c.Close()
	done := make(chan error)
	go func() { done <- c.Run(ctx) }()
	for range 3 {
		fmt.Println(<-processed)
	}
	stage.set(flags.Live) // consumers first
	for c.Stats().Cutovers < 1 {
		time.Sleep(10 * time.Millisecond)
	}
	produce(3, 6) // still to old: the mirror copies them
	for range 3 {
		fmt.Println(<-processed)
	}
	cancel()
	<-done
	fmt.Println("moves:", c.Stats().Cutovers)
	// Output:
	// order 0 from old
	// order 1 from old
	// order 2 from old
	// order 3 from new
	// order 4 from new
	// order 5 from new
	// moves: 1
}
