package shadowtest_test

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/shadowread"
	"github.com/dimmer-dev/dimmer/shadowread/shadowtest"
)

type Customer struct {
	ID, Plan string
}

// printingT stands in for the *testing.T of a real test, so that the
// example can show the failure Strict reports.
type printingT struct{ testing.TB }

func (printingT) Helper()                           {}
func (printingT) Errorf(format string, args ...any) { fmt.Printf("FAIL: "+format+"\n", args...) }

// Example reads two customers through a strict reader in shadow: the one
// both tables agree on passes, the other fails the test with the path that
// differs. In a test, pass t itself: shadowtest.Strict(t).
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	url := os.Getenv("DIMMER_POSTGRES_URL")
	if url == "" {
		url = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	}
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Close()
	schema := fmt.Sprintf("dimmer_example_shadowtest_%d", time.Now().UnixNano())
	defer pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+schema+" CASCADE")
	setup := `CREATE SCHEMA ` + schema + `;
CREATE TABLE ` + schema + `.customers_old (id text PRIMARY KEY, plan text);
CREATE TABLE ` + schema + `.customers_new (id text PRIMARY KEY, plan text);
INSERT INTO ` + schema + `.customers_old VALUES ('c1', 'pro'), ('c2', 'pro');
INSERT INTO ` + schema + `.customers_new VALUES ('c1', 'pro'), ('c2', 'free');`
	if _, err := pool.Exec(ctx, setup); err != nil {
		fmt.Println(err)
		return
	}
	read := func(table string) shadowread.Func[string, Customer] {
		return func(ctx context.Context, id string) (Customer, error) {
			var c Customer
			err := pool.QueryRow(ctx, `SELECT id, plan FROM `+schema+`.`+table+` WHERE id = $1`, id).Scan(&c.ID, &c.Plan)
			return c, err
		}
	}
	stage := shadowread.StageFunc(func(context.Context, string, string) (flags.Stage, error) { return flags.Shadow, nil })
	var t testing.TB = printingT{}
	r, err := shadowread.New("customers_v2", stage, read("customers_old"), read("customers_new"),
		func(id string) string { return id }, shadowtest.Strict(t)...)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer r.Close()
	for _, id := range []string{"c1", "c2"} {
		c, err := r.Read(ctx, id)
		if err != nil {
			fmt.Println(err)
			return
		}
		fmt.Println("served", c.ID, c.Plan)
	}
	// Output:
	// served c1 pro
	// FAIL: shadowread: customers_v2 key "c2" (stage shadow): new side differs from old side: Plan: pro != free
	// served c2 pro
}
