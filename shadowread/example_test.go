package shadowread_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/dimmer-dev/dimmer/flags"
	"github.com/dimmer-dev/dimmer/shadowread"
)

// Customer is read from a table being migrated (old) to its new shape (new).
type Customer struct {
	ID        string
	Email     string
	Plan      string
	UpdatedAt time.Time // each store stamps its own: not part of the data
}

// Example reads through a Reader in shadow: the caller gets old's row at
// old's speed, while new's row is read in the background and compared,
// ignoring UpdatedAt. The differences become a mismatch report; it names
// only the differing fields unless the service opts into values, as here,
// with its own redaction of e-mail addresses.
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
	// A fixed name, dropped first in case a killed run left it behind.
	const setup = `DROP SCHEMA IF EXISTS dimmer_example_shadowread CASCADE;
CREATE SCHEMA dimmer_example_shadowread;
CREATE TABLE dimmer_example_shadowread.customers_old (id text PRIMARY KEY, email text, plan text, updated_at timestamptz DEFAULT now());
CREATE TABLE dimmer_example_shadowread.customers_new (id text PRIMARY KEY, email text, plan text, updated_at timestamptz DEFAULT now());
INSERT INTO dimmer_example_shadowread.customers_old (id, email, plan) VALUES ('c1', 'ann@example.com', 'pro');
INSERT INTO dimmer_example_shadowread.customers_new (id, email, plan) VALUES ('c1', 'ann@example.org', 'free');`
	if _, err := pool.Exec(ctx, setup); err != nil {
		fmt.Println(err)
		return
	}
	defer pool.Exec(context.Background(), `DROP SCHEMA IF EXISTS dimmer_example_shadowread CASCADE`)

	read := func(table string) shadowread.Func[string, Customer] {
		return func(ctx context.Context, id string) (Customer, error) {
			var c Customer
			err := pool.QueryRow(ctx, `SELECT id, email, plan, updated_at FROM dimmer_example_shadowread.`+table+` WHERE id = $1`, id).
				Scan(&c.ID, &c.Email, &c.Plan, &c.UpdatedAt)
			return c, err
		}
	}
	// In a service the stage comes from the flag: flags.NewSource(client, flags.Off).
	stage := shadowread.StageFunc(func(context.Context, string, string) (flags.Stage, error) { return flags.Shadow, nil })
	reports := make(chan shadowread.Report, 1)
	r, err := shadowread.New("customers_v2", stage, read("customers_old"), read("customers_new"),
		func(id string) string { return id },
		shadowread.WithComparator(shadowread.DeepCompare[Customer](shadowread.IgnorePaths("UpdatedAt"))),
		shadowread.WithReports(shadowread.ReportSinkFunc(func(_ context.Context, rep shadowread.Report) { reports <- rep }),
			time.Second, nil),
		shadowread.WithReportValues(redactEmails))
	if err != nil {
		fmt.Println(err)
		return
	}
	defer r.Close()

	c, err := r.Read(ctx, "c1")
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("served:", c.Plan)
	rep := <-reports
	fmt.Printf("mismatch on %s (lasting %v): %s\n", rep.Key, rep.Lasting, rep.Diff)
	// Output:
	// served: pro
	// mismatch on c1 (lasting true): Email: <redacted> != <redacted>; Plan: pro != free
}

// redactEmails masks e-mail addresses in a report's values: reports leave
// the service (logs, tickets), so personal data is masked first.
func redactEmails(d shadowread.Difference) shadowread.Difference {
	if d.Path == "Email" || strings.Contains(d.Served, "@") || strings.Contains(d.Shadow, "@") {
		d.Served, d.Shadow = "<redacted>", "<redacted>"
	}
	return d
}
