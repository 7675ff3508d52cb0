// Package workpool is the bounded worker pool behind dualwrite's async
// secondary writes and shadowread's shadow reads: a fixed number of workers,
// a fixed queue, and a submit that never blocks the caller. When the queue is
// full the task is refused (shed) and the caller decides what shedding means
// (a repair record, a counted skipped comparison). Shutdown stops intake,
// drains what was queued and waits for every worker.
//
// Three shapes: [New] hands a task to a worker at once; [NewBatched] hands
// queued tasks out every interval so the submitter never wakes a thread
// (shadowread: the caller's latency comes first); [NewKeyed] runs the tasks
// of one key in order on one worker (dualwrite: a key's secondary writes
// must not overtake each other).
package workpool

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
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

	// Batched hand-off (NewBatched): submitters append to pending and
	// never wake a goroutine while the dispatcher is armed.
	every   time.Duration
	limit   int
	pmu     sync.Mutex
	pending []func()
	waiting int // pending plus those the dispatcher holds
	workers int
	busy    atomic.Int64 // workers running a task
	armed   bool
	bell    chan struct{}
	quit    chan struct{}
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
		if p.every > 0 {
			// Leaving the waiting room and becoming busy is one step for
			// enqueue's capacity check, which holds pmu: counted apart,
			// a task that already runs would still take a queue slot.
			p.pmu.Lock()
			p.waiting--
			p.busy.Add(1)
			p.pmu.Unlock()
		} else {
			p.busy.Add(1)
		}
		task()
		p.busy.Add(-1)
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
	if p.every > 0 {
		return p.enqueue(task), nil
	}
	select {
	case p.tasks <- task:
		return true, nil
	default:
		return false, nil
	}
}

// Len is the number of queued tasks not yet picked up by a worker.
func (p *Pool) Len() int {
	if p.every > 0 {
		p.pmu.Lock()
		defer p.pmu.Unlock()
		return p.waiting
	}
	return len(p.tasks)
}

// Shutdown stops intake, lets the workers finish every queued task and waits
// for them until ctx ends. It is safe to call more than once; a later call
// waits again.
func (p *Pool) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	if !p.closed {
		p.closed = true
		if p.every > 0 {
			close(p.quit) // the dispatcher hands out what is pending, then closes tasks
		} else {
			close(p.tasks)
		}
	}
	p.mu.Unlock()
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("workpool: shutdown: %d tasks still queued: %w", p.Len(), ctx.Err())
	}
}

// NewBatched is New with a batched hand-off, for callers whose latency
// matters more than how soon the task starts. A plain submit to an idle
// worker readies it at once, and on a small machine the caller pays for
// that: waking another OS thread (a futex call) and competing for a core
// with the very I/O it is about to wait on. Here a submit only appends to a
// list under a mutex; a dispatcher goroutine hands the list to the workers
// every interval (tasks start up to one interval late). While tasks keep
// coming the dispatcher stays armed and submitters wake nothing; after an
// interval without tasks it sleeps, and the next submit wakes it once.
// As in New, a submit is accepted while a worker is idle or fewer than
// queue tasks wait.
func NewBatched(workers, queue int, every time.Duration) (*Pool, error) {
	if every <= 0 {
		return nil, fmt.Errorf("workpool.NewBatched: interval must be positive, got %s", every)
	}
	if workers < 1 {
		return nil, fmt.Errorf("workpool.NewBatched: workers must be at least 1, got %d", workers)
	}
	if queue < 0 {
		return nil, fmt.Errorf("workpool.NewBatched: queue must not be negative, got %d", queue)
	}
	// Unbuffered: the only waiting room is pending, so queue is the bound.
	p := &Pool{tasks: make(chan func()), done: make(chan struct{}), every: every, limit: queue, workers: workers,
		bell: make(chan struct{}, 1), quit: make(chan struct{})}
	p.wg.Add(workers + 1)
	for range workers {
		go p.work()
	}
	go p.dispatch()
	go func() { p.wg.Wait(); close(p.done) }()
	return p, nil
}

// enqueue appends task to pending; false when pending is full (shed).
func (p *Pool) enqueue(task func()) bool {
	p.pmu.Lock()
	// As in New, a task is accepted when a worker is idle or the queue has
	// room: here both wait for the next hand-out.
	if p.waiting >= p.limit+p.workers-int(p.busy.Load()) {
		p.pmu.Unlock()
		return false
	}
	p.waiting++
	p.pending = append(p.pending, task)
	ring := !p.armed
	p.armed = true
	p.pmu.Unlock()
	if ring {
		select {
		case p.bell <- struct{}{}:
		default:
		}
	}
	return true
}

func (p *Pool) dispatch() {
	defer p.wg.Done()
	defer close(p.tasks)
	t := time.NewTimer(p.every)
	t.Stop()
	for {
		select {
		case <-p.bell:
		case <-p.quit:
			p.handOut(p.take())
			return
		}
		for {
			t.Reset(p.every)
			select {
			case <-t.C:
			case <-p.quit:
				t.Stop()
				p.handOut(p.take())
				return
			}
			batch := p.take()
			if len(batch) == 0 {
				break // disarmed by take
			}
			p.handOut(batch)
		}
	}
}

// take empties pending; when it was already empty it disarms, so the next
// submit rings the bell.
func (p *Pool) take() []func() {
	p.pmu.Lock()
	defer p.pmu.Unlock()
	batch := p.pending
	p.pending = nil
	if len(batch) == 0 {
		p.armed = false
	}
	return batch
}

func (p *Pool) handOut(batch []func()) {
	for _, task := range batch {
		p.tasks <- task // the worker that takes it leaves the waiting room
	}
}
