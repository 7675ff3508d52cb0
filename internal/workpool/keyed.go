package workpool

import (
	"context"
	"fmt"
	"sync"

	"github.com/cespare/xxhash/v2"
)

// Keyed runs tasks on a fixed set of workers like [Pool], but a task's key
// decides its worker, so the tasks of one key run one at a time in the
// order they were submitted (dualwrite's async secondary writes: a later
// write of a key must never land before an earlier one). The price is
// head-of-line blocking: a slow task holds back the keys that share its
// worker, so tasks should be bounded by a timeout.
type Keyed struct {
	mu     sync.RWMutex // guards closed against a send on a closed channel
	closed bool
	shards []chan func()
	wg     sync.WaitGroup
	done   chan struct{}
}

// NewKeyed starts workers goroutines, each with its own queue of
// queue/workers pending tasks (rounded up; 0 queue means a task is taken
// only by an idle worker).
func NewKeyed(workers, queue int) (*Keyed, error) {
	if workers < 1 {
		return nil, fmt.Errorf("workpool.NewKeyed: workers must be at least 1, got %d", workers)
	}
	if queue < 0 {
		return nil, fmt.Errorf("workpool.NewKeyed: queue must not be negative, got %d", queue)
	}
	k := &Keyed{shards: make([]chan func(), workers), done: make(chan struct{})}
	per := (queue + workers - 1) / workers
	k.wg.Add(workers)
	for i := range k.shards {
		k.shards[i] = make(chan func(), per)
		go k.work(k.shards[i])
	}
	go func() { k.wg.Wait(); close(k.done) }()
	return k, nil
}

func (k *Keyed) work(tasks chan func()) {
	defer k.wg.Done()
	for task := range tasks {
		task()
	}
}

// TrySubmit queues task behind the earlier tasks of key without blocking.
// It returns ErrClosed after Shutdown and false when key's queue is full
// (the task was shed).
func (k *Keyed) TrySubmit(key string, task func()) (bool, error) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	if k.closed {
		return false, ErrClosed
	}
	select {
	case k.shards[xxhash.Sum64String(key)%uint64(len(k.shards))] <- task:
		return true, nil
	default:
		return false, nil
	}
}

// Len is the number of queued tasks not yet picked up by a worker.
func (k *Keyed) Len() int {
	n := 0
	for _, s := range k.shards {
		n += len(s)
	}
	return n
}

// Shutdown stops intake, lets the workers finish every queued task and waits
// for them until ctx ends. It is safe to call more than once.
func (k *Keyed) Shutdown(ctx context.Context) error {
	k.mu.Lock()
	if !k.closed {
		k.closed = true
		for _, s := range k.shards {
			close(s)
		}
	}
	k.mu.Unlock()
	select {
	case <-k.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("workpool: shutdown: %d tasks still queued: %w", k.Len(), ctx.Err())
	}
}
