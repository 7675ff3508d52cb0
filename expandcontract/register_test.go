package expandcontract_test

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/expandcontract"
	"github.com/dimmer-dev/dimmer/flags/flagstest"
)

// TestRegisterTogether: a fleet of instances starting at once registers the
// same new plan concurrently; every one succeeds and it is recorded once.
// Once expand has run, a definition whose expand differs is still refused,
// also when it races identical ones.
func TestRegisterTogether(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := flagstest.Context(t)
	e.exec(t, `CREATE TABLE fleet_items (id bigint PRIMARY KEY, label text)`)
	reg := e.registry(t)
	plan, err := expandcontract.RenameColumn("fleet-items-title", "fleet_items", "id", "label", "title", "text")
	require.NoError(t, err)
	changed := plan
	changed.Expand = []expandcontract.Step{{Name: "add-columns", SQL: `ALTER TABLE fleet_items ADD COLUMN IF NOT EXISTS title varchar(20)`}}

	register := func(plans ...expandcontract.Plan) []error {
		start := make(chan struct{})
		errs := make([]error, len(plans))
		var wg sync.WaitGroup
		for i, p := range plans {
			wg.Go(func() {
				<-start
				errs[i] = reg.Register(ctx, "instance", p)
			})
		}
		close(start)
		wg.Wait()
		return errs
	}
	for round := range 3 {
		name := plan.Name + "-" + string(rune('a'+round))
		same := plan
		same.Name, same.Migration = name, name
		for i, err := range register(same, same, same, same, same, same, same, same) {
			assert.NoError(t, err, "round %d, instance %d", round, i)
		}
		audit, err := reg.Audit(ctx, name, 0)
		require.NoError(t, err)
		assert.Len(t, audit, 1, "round %d: registered once", round)
	}

	require.NoError(t, reg.Register(ctx, "deploy", plan))
	_, err = reg.Expand(ctx, plan.Name, expandcontract.Request{Actor: "deploy"})
	require.NoError(t, err)
	errs := register(plan, changed, plan, changed, plan, changed, plan, changed)
	for i, err := range errs {
		if i%2 == 0 {
			assert.NoError(t, err, "instance %d registers the same plan", i)
		} else {
			assert.ErrorIs(t, err, expandcontract.ErrPlanChanged, "instance %d registers a changed expand", i)
		}
	}
	stored, err := reg.Plan(ctx, plan.Name)
	require.NoError(t, err)
	assert.Equal(t, plan, stored)
}
