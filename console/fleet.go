package console

import (
	"context"
	"reflect"
	"sync"

	"github.com/dimmer-dev/dimmer/flags"
)

// ShareFleet returns fleet unchanged but for one thing: within one data
// request of the console, every reader of the registry (the console itself
// and the controller's guards, when the controller was built over the
// returned store) shares a single read. A migration page otherwise reads and
// decodes every instance once for itself and once per fleet guard of the
// next step (the barrier, health, canary): with fifty instances, most of the
// request. Outside a console request (an action, the CLI, a service) each
// call reads the registry afresh, so a transition is still judged on what
// the registry holds at that moment.
func ShareFleet(fleet flags.FleetStore) flags.FleetStore {
	if _, ok := fleet.(sharedFleet); ok {
		return fleet
	}
	return sharedFleet{fleet}
}

type sharedFleet struct{ flags.FleetStore }

var _ flags.FleetStore = sharedFleet{}

type fleetReadKey struct{}

// fleetReads are one request's reads, one per registry: a guard built over
// another registry than the console's still reads its own.
type fleetReads struct {
	mu    sync.Mutex
	reads map[flags.FleetStore]*fleetRead
}

type fleetRead struct {
	once  sync.Once
	insts []flags.Instance
	err   error
}

// withFleetRead marks ctx as one console request: a [ShareFleet] store
// reads the registry at most once under it.
func withFleetRead(ctx context.Context) context.Context {
	return context.WithValue(ctx, fleetReadKey{}, &fleetReads{reads: map[flags.FleetStore]*fleetRead{}})
}

func (f sharedFleet) Instances(ctx context.Context) ([]flags.Instance, error) {
	rs, _ := ctx.Value(fleetReadKey{}).(*fleetReads)
	if rs == nil || !reflect.TypeOf(f.FleetStore).Comparable() {
		return f.FleetStore.Instances(ctx)
	}
	rs.mu.Lock()
	r := rs.reads[f.FleetStore]
	if r == nil {
		r = &fleetRead{}
		rs.reads[f.FleetStore] = r
	}
	rs.mu.Unlock()
	r.once.Do(func() { r.insts, r.err = f.FleetStore.Instances(ctx) })
	// Readers may sort or trim their slice; the instances themselves are
	// only read.
	return append([]flags.Instance(nil), r.insts...), r.err
}
