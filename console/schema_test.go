package console_test

import (
	"log/slog"
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/console"
	"github.com/dimmer-dev/dimmer/expandcontract"
)

func TestSchemaPlansOfTheMigration(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	walk(t, e)
	_, err := e.pool.Exec(ctx(t), `CREATE TABLE users (id bigint PRIMARY KEY, fullname text NOT NULL)`)
	require.NoError(t, err)
	plan, err := expandcontract.RenameColumn("users-display-name", "users", "id", "fullname", "display_name", "text")
	require.NoError(t, err)
	plan.Migration = "orders"
	other, err := expandcontract.RenameColumn("users-nick", "users", "id", "fullname", "nick", "text")
	require.NoError(t, err)
	reg, err := expandcontract.NewRegistry(e.pool, expandcontract.WithSchema(e.store.Schema()), expandcontract.WithLogger(slog.New(slog.DiscardHandler)))
	require.NoError(t, err)
	require.NoError(t, reg.Install(ctx(t)))
	require.NoError(t, reg.Register(ctx(t), "orders-service", plan))
	require.NoError(t, reg.Register(ctx(t), "orders-service", other))
	_, err = reg.Expand(ctx(t), plan.Name, expandcontract.Request{Actor: "deploy", Reason: "rename"})
	require.NoError(t, err)

	srv, err := console.New(e.ctrl, e.store, token, console.WithSchemaPlans(reg), console.WithLogger(quiet))
	require.NoError(t, err)
	e.http = httptest.NewServer(srv)
	t.Cleanup(e.http.Close)

	m := migrationData(t, e)
	require.Len(t, m.Plans, 1, "only the plan naming orders")
	p := m.Plans[0]
	assert.Equal(t, "users-display-name", p.Name)
	assert.Equal(t, "expanded", p.Stage)
	assert.Empty(t, p.Running)
	require.NotEmpty(t, p.Steps)
	states := map[string]string{}
	for _, s := range p.Steps {
		states[s.Phase] = s.State
	}
	assert.Equal(t, "applied", states["expand"])
	assert.Equal(t, "not run", states["contract"])
	page := e.do(t, nil, "GET", "/m/orders?part=live", nil, true, nil)
	assert.Contains(t, page.body, `<span class="schemastage">expanded</span>`)
}
