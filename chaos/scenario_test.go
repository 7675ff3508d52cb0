package chaos_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/chaos"
)

// manualClock moves only when the test says so.
type manualClock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []waiter
	waiting chan struct{} // signalled whenever someone starts waiting
}

type waiter struct {
	at time.Time
	ch chan time.Time
}

func newManualClock() *manualClock {
	return &manualClock{now: time.Unix(1_700_000_000, 0), waiting: make(chan struct{}, 64)}
}

func (c *manualClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *manualClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	c.waiters = append(c.waiters, waiter{c.now.Add(d), ch})
	c.waiting <- struct{}{}
	return ch
}

func (c *manualClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if !w.at.After(c.now) {
			w.ch <- c.now
		} else {
			kept = append(kept, w)
		}
	}
	c.waiters = kept
}

func TestScenarioRunsStepsAtTheirOffsets(t *testing.T) {
	t.Parallel()
	clock := newManualClock()
	var mu sync.Mutex
	var log []string
	step := func(name string) func(context.Context) error {
		return func(context.Context) error {
			mu.Lock()
			log = append(log, name)
			mu.Unlock()
			return nil
		}
	}
	boom := errors.New("boom")
	stepped := make(chan chaos.StepResult, 8)
	sc, err := chaos.NewScenario("game day", []chaos.Step{
		chaos.At(10*time.Second, "heal", step("heal")),
		chaos.At(0, "baseline", step("baseline")),
		chaos.At(5*time.Second, "cut link", step("cut")),
		chaos.At(5*time.Second, "flip flag", func(context.Context) error { return boom }),
	}, chaos.WithClock(clock), chaos.OnStep(func(r chaos.StepResult) { stepped <- r }))
	require.NoError(t, err)
	require.NoError(t, sc.Start(context.Background()))
	require.ErrorContains(t, sc.Start(context.Background()), "already started")

	r := <-stepped
	assert.Equal(t, "baseline", r.Name, "offset 0 runs at once")
	<-clock.waiting
	clock.Advance(4 * time.Second)
	select {
	case r := <-stepped:
		t.Fatalf("step %s ran before its offset", r.Name)
	case <-time.After(20 * time.Millisecond):
	}
	clock.Advance(time.Second)
	assert.Equal(t, "cut link", (<-stepped).Name)
	r = <-stepped
	assert.Equal(t, "flip flag", r.Name, "equal offsets keep their given order")
	require.ErrorIs(t, r.Err, boom)
	assert.Equal(t, 5*time.Second, r.Ran)
	<-clock.waiting
	clock.Advance(5 * time.Second)

	results, err := sc.Wait(context.Background())
	require.ErrorIs(t, err, boom, "a failed step is reported, and the schedule went on")
	require.ErrorContains(t, err, "step flip flag: boom")
	require.Len(t, results, 4)
	assert.Equal(t, "heal", results[3].Name)
	assert.Equal(t, 10*time.Second, results[3].Ran)
	assert.Equal(t, []string{"baseline", "cut", "heal"}, log)
}

func TestScenarioStopSkipsTheRest(t *testing.T) {
	t.Parallel()
	ran := make(chan string, 4)
	sc, err := chaos.NewScenario("stop", []chaos.Step{
		chaos.At(0, "first", func(context.Context) error { ran <- "first"; return nil }),
		chaos.At(time.Hour, "never", func(context.Context) error { ran <- "never"; return nil }),
	})
	require.NoError(t, err)
	require.NoError(t, sc.Start(context.Background()))
	assert.Equal(t, "first", <-ran)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, sc.Stop(ctx))
	results, err := sc.Wait(ctx)
	require.ErrorIs(t, err, context.Canceled)
	require.Len(t, results, 2)
	assert.NoError(t, results[0].Err)
	assert.ErrorIs(t, results[1].Err, context.Canceled)
	assert.Empty(t, ran, "the stopped step never ran")
}

func TestScenarioRecoversAPanickingStep(t *testing.T) {
	t.Parallel()
	sc, err := chaos.NewScenario("panic", []chaos.Step{
		chaos.At(0, "bad", func(context.Context) error { panic("oops") }),
		chaos.At(time.Millisecond, "good", func(context.Context) error { return nil }),
	})
	require.NoError(t, err)
	require.NoError(t, sc.Start(context.Background()))
	results, err := sc.Wait(context.Background())
	require.ErrorContains(t, err, "step bad panicked: oops")
	require.Len(t, results, 2)
	assert.NoError(t, results[1].Err)
}

func TestScenarioValidates(t *testing.T) {
	t.Parallel()
	nop := func(context.Context) error { return nil }
	_, err := chaos.NewScenario("", []chaos.Step{chaos.At(0, "a", nop)})
	require.ErrorContains(t, err, "name is empty")
	_, err = chaos.NewScenario("s", nil)
	require.ErrorContains(t, err, "scenario s: no steps")
	_, err = chaos.NewScenario("s", []chaos.Step{chaos.At(0, "", nop)})
	require.ErrorContains(t, err, "step 0 has no name")
	_, err = chaos.NewScenario("s", []chaos.Step{chaos.At(0, "a", nil)})
	require.ErrorContains(t, err, "step 0 (a) has no action")
	_, err = chaos.NewScenario("s", []chaos.Step{chaos.At(-time.Second, "a", nop)})
	require.ErrorContains(t, err, "negative offset -1s")
	sc, err := chaos.NewScenario("s", []chaos.Step{chaos.At(0, "a", nop)})
	require.NoError(t, err)
	_, err = sc.Wait(context.Background())
	require.ErrorContains(t, err, "not started")
	require.NoError(t, sc.Stop(context.Background()), "stopping an unstarted scenario is a no-op")
}
