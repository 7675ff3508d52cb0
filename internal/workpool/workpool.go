// Package workpool is the bounded worker pool behind dualwrite's async
// secondary writes and shadowread's shadow reads: a fixed number of workers,
// a fixed queue, and a submit that never blocks the caller. When the queue is
// full the task is refused (shed) and the caller decides what shedding means
// (a repair record, a counted skipped comparison). Shutdown stops intake,
// drains what was queued and waits for every worker.
package workpool

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// ErrClosed: the pool is shut down and takes no more tasks.
var ErrClosed = errors.New("workpool: closed")

// Pool runs submitted tasks on a fixed set of goroutines.
type Pool struct {
	mu     sync.RWMutex // guards closed against a send on a closed channel
	closed bool
	tasks  chan func()
	wg     sync.WaitGroup
	done   chan struct{}
}

// New starts workers goroutines fed by a queue of queue pending tasks.
func New(workers, queue int) (*Pool, error) {
	if workers < 1 {
		return nil, fmt.Errorf("workpool.New: workers must be at least 1, got %d", workers)
	}
	if queue < 0 {
		return nil, fmt.Errorf("workpool.New: queue must not be negative, got %d", queue)
	}
	p := &Pool{tasks: make(chan func(), queue), done: make(chan struct{})}
	p.wg.Add(workers)
	for range workers {
		go p.work()
	}
	go func() { p.wg.Wait(); close(p.done) }()
	return p, nil
}

func (p *Pool) work() {
	defer p.wg.Done()
	for task := range p.tasks {
		task()
	}
}

// TrySubmit queues task without blocking. It returns ErrClosed after
// Shutdown and false when the queue is full (the task was shed). Tasks must
// recover their own panics: a panicking task would take the process down.
func (p *Pool) TrySubmit(task func()) (bool, error) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closed {
		return false, ErrClosed
	}
	select {
	case p.tasks <- task:
		return true, nil
	default:
		return false, nil
	}
}

// Len is the number of queued tasks not yet picked up by a worker.
func (p *Pool) Len() int { return len(p.tasks) }

// Shutdown stops intake, lets the workers finish every queued task and waits
// for them until ctx ends. It is safe to call more than once; a later call
// waits again.
func (p *Pool) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	if !p.closed {
		p.closed = true
		close(p.tasks)
	}
	p.mu.Unlock()
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("workpool: shutdown: %d tasks still queued: %w", len(p.tasks), ctx.Err())
	}
}
