package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/dimmertest"
)

func TestMaskDSN(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"postgres://u:pw1234@h:5432/db":                           "postgres://u:***@h:5432/db",
		"postgresql://u@h/db?sslmode=disable&password=pw1234":     "postgresql://u@h/db?sslmode=disable&password=***",
		"postgres://u@h/db?sslpassword=pw1234":                    "postgres://u@h/db?sslpassword=***",
		"host=h user=u password=pw1234 dbname=d":                  "host=h user=u password=*** dbname=d",
		"host=h password = 'p w\\'1234' dbname=d":                 "host=h password = *** dbname=d",
		"redis://:pw1234@127.0.0.1:6379/0":                        "redis://:***@127.0.0.1:6379/0",
		"rediss://default:pw1234@127.0.0.1:6379/0?dial_timeout=1": "rediss://default:***@127.0.0.1:6379/0?dial_timeout=1",
		"redis://127.0.0.1:6379/0?password=pw1234":                "redis://127.0.0.1:6379/0?password=***",
		"postgres://u@h/db":                                       "postgres://u@h/db",
		"postgres://u:pw12@34@h:5432/db":                          "postgres://u:***@h:5432/db",
		"user:pw1234@127.0.0.1:9092, 127.0.0.1:9093":              "user:***@127.0.0.1:9092, 127.0.0.1:9093",
		"a:9092,user:pw1234@b:9092":                               "a:9092,user:***@b:9092",
		"host=h password=pw12\\ 34 dbname=d":                      "host=h password=*** dbname=d",
		"host=h password=pw12\\'34 dbname=d":                      "host=h password=*** dbname=d",
	} {
		assert.Equal(t, want, maskDSN(in), in)
		assert.NotContains(t, maskDSN("error: cannot reach `"+in+"` now"), "pw1234")
	}
	r := newRedactor([]string{"--store", "postgres://u:S%40cret99@h/db"}, []string{"PGPASSWORD=fromenv1", "DIMMER_DB=host=h password=kv-secret"})
	assert.Equal(t, "a *** b *** c *** d ***", r.String("a S%40cret99 b S@cret99 c fromenv1 d kv-secret"))
	// pgx takes the host from the first '@' of a password holding one
	// (and would look it up, so this is not run as a command).
	r = newRedactor([]string{"--db", "postgres://u:Sup3r@S3cretPw@127.0.0.1:1/db"}, nil)
	assert.Equal(t, "lookup ***@127.0.0.1: no such host", r.String("lookup S3cretPw@127.0.0.1: no such host"))
	// A Kafka SASL password is a whole variable's value; one read from a
	// file is learnt when read. The file's name is no secret.
	file := filepath.Join(t.TempDir(), "kafka")
	require.NoError(t, os.WriteFile(file, []byte("from-a-file"), 0o600))
	r = newRedactor(nil, []string{"DIMMER_KAFKA_SASL_PASSWORD=kafka-pw-1", "DIMMER_KAFKA_SASL_PASSWORD_NEW=kafka-pw-2",
		"DIMMER_KAFKA_SASL_PASSWORD_FILE=" + file})
	r.learn("from-a-file")
	assert.Equal(t, "*** *** *** "+file, r.String("kafka-pw-1 kafka-pw-2 from-a-file "+file))
	// A password is masked where it stands whole, not inside a longer
	// word, where the mask would spell it out ("***word").
	r = newRedactor(nil, nil)
	r.learn("pass", "p w@:x", "#tok#")
	assert.Equal(t, "check the user and password; it was ***, or ***.", r.String("check the user and password; it was pass, or p w@:x."))
	assert.Equal(t, "u:***@host passpass ***. a***b", r.String("u:pass@host passpass pass. a#tok#b"),
		"a side of the password that is no letter or digit is a boundary itself")
	assert.Equal(t, `"***\t*** x"`, r.String(`"pass\tpass x"`), "a quoted control character ends a word")

	// The forms found where a password still showed:
	for _, tc := range []struct {
		args, env []string
		out       string
	}{
		// --flag=value, and a scheme in capitals, each with a space the
		// URL parser quotes back;
		{args: []string{"--store=redis://:Cut S3cretPw@127.0.0.1:6379/0"}, out: `parse "redis://:Cut S3cretPw@127.0.0.1:6379/0"`},
		{args: []string{"--store", "REDIS://:Cut S3cretPw@127.0.0.1:6379/0"}, out: `--store "REDIS://:Cut S3cretPw@127.0.0.1:6379/0"`},
		{env: []string{"DIMMER_STORE=Postgres://u:Cut S3cretPw@127.0.0.1/db"}, out: `(default "Postgres://u:Cut S3cretPw@127.0.0.1/db")`},
		// an argument echoed cut short, mid-password;
		{args: []string{"postgres://u:Cut0S3cretPwAndMore@h/db"}, out: `unknown command "postgres://u:Cut0S3cretPwAn..." for "dimmer"`},
		{args: []string{"postgres://u:Cut0S3cretPwAndMore@h/db"}, out: `invalid name "postgres://u:Cut0S3cr… (40 bytes)"`},
		// what pgx leaves of a keyword value it masked up to a space;
		{args: []string{`host=h password=Cut\ S3cretPw port=x`}, out: "cannot parse `host=h password=xxxxx S3cretPw port=x`"},
		{args: []string{"host=h password='Cut S3cretPw"}, out: "cannot parse `host=h password=xxxxx S3cretPw`"},
		// a password set in the variable meant for its file's name.
		{env: []string{"DIMMER_KAFKA_SASL_PASSWORD_FILE=Cut0S3cretPw"}, out: `(default "Cut0S3cretPw")`},
	} {
		got := newRedactor(tc.args, tc.env).String(tc.out)
		assert.NotContains(t, got, "S3cr", "%v %v: %s", tc.args, tc.env, got)
		assert.Contains(t, got, masked, "%v %v", tc.args, tc.env)
	}
	r = newRedactor([]string{"postgres://u:Cut0S3cretPwAndMore@h/db"}, nil)
	assert.Equal(t, "waiting... done... Cut... ***...", r.String("waiting... done... Cut... Cut0S3cr..."),
		"a cut short of minSecret, or text that only ends like one, is left")
}

// A battery of failing (and some succeeding) commands, each given a known
// password in one of the forms pgx and go-redis accept: the password appears
// in no output, whatever the command, the error or the help.
func TestCLINoSecretInOutput(t *testing.T) {
	const secret = "Sup3rS3cretPw"
	const encoded = "Pa%40ss0rdX" // decodes to Pa@ss0rdX
	_, schema := dimmertest.Schema(t)
	_, prefix := dimmertest.Redis(t)
	goodPG := "postgres://postgres:" + secret + "@127.0.0.1:5432/postgres"
	if u := dimmertest.PostgresURL(); !strings.Contains(u, "@") {
		goodPG = strings.Replace(u, "://", "://postgres:"+secret+"@", 1)
	}
	valid := []string{"--store", goodPG, "--schema", schema}
	battery := [][]string{
		{"--store", "host=127.0.0.1 port=1 user=u password=" + secret + " dbname=d connect_timeout=2", "stage", "get", "orders"},
		{"--store", "host=127.0.0.1 password=" + secret + " sslmode=bogus", "stage", "get", "orders"},
		{"--store", "host=127.0.0.1 port=1 password='" + secret + "' connect_timeout=2", "status"},
		{"--store", "postgres://u@127.0.0.1:1/db?password=" + secret + "&connect_timeout=2", "stage", "get", "orders"},
		{"--store", "postgres://u:" + secret + "@127.0.0.1:1/db?connect_timeout=2", "stage", "get", "orders"},
		{"--store", "postgres://u:" + encoded + "@127.0.0.1:1/db?connect_timeout=2", "stage", "get", "orders"},
		{"--store", "postgres://u:" + secret + "@127.0.0.1:5432/db?sslmode=bogus", "stage", "get", "orders"},
		{"--store", "postgres://u:" + secret + "@[::1", "stage", "get", "orders"},
		{"--store", "redis://:" + secret + "@127.0.0.1:1/0", "stage", "get", "orders"},
		{"--store", "redis://default:" + secret + "@127.0.0.1:6379/0", "--prefix", prefix, "stage", "get", "orders"},
		{"--store", "redis://u:" + secret + "@127.0.0.1:6379/notadb", "stage", "get", "orders"},
		// Characters a URL must percent-encode: the parsers' errors quote
		// the URL up to where they stopped.
		{"--store", "redis://:" + secret + "#x@127.0.0.1:6379/0", "stage", "get", "orders"},
		{"--store", "redis://:" + secret + "/x@127.0.0.1:6379/0", "stage", "get", "orders"},
		{"--store", "redis://:" + secret + "?x@127.0.0.1:6379/0", "stage", "get", "orders"},
		{"--store", "redis://:" + secret + " x@127.0.0.1:6379/0", "stage", "get", "orders"},
		{"--store", "postgres://u:" + secret + "#x@127.0.0.1:1/db", "stage", "get", "orders"},
		{"--store", "postgres://u:" + secret + " x@127.0.0.1:1/db", "stage", "get", "orders"},
		{"backfill", "status", "--db", "host=127.0.0.1 port=1 password=Sup3r\\ S3cretPw connect_timeout=2"},
		{"--store", "mysql://u:" + secret + "@127.0.0.1/db", "stage", "get", "orders"},
		{"outbox", "status", "--db", "postgres://u:" + secret + "@127.0.0.1:1/db?connect_timeout=2"},
		{"stream", "status", "orders", "--old-brokers", "user:" + secret + "@127.0.0.1:1", "--new-brokers", "127.0.0.1:1"},
		{"outbox", "relay", "--brokers", "127.0.0.1:1,user:" + secret + "@127.0.0.1:1", "--db", goodPG, "--schema", schema},
		{"schema", "status", "--db", "host=127.0.0.1 port=1 password=" + secret + " connect_timeout=2"},
		{"backfill", "status", "--db", "postgresql://u:" + secret + "@127.0.0.1:1/db?connect_timeout=2"},
		{"outbox", "relay", "--publisher", "redis", "--redis", "redis://:" + secret + "@127.0.0.1:1", "--db", goodPG, "--schema", schema},
		{"frobnicate", "postgres://u:" + secret + "@h/db"},
		// --flag=value, a scheme in capitals, an argument echoed cut
		// short, and what pgx leaves of a keyword value it masked;
		{"--store=redis://:" + secret + " x@127.0.0.1:6379/0", "stage", "get", "orders"},
		{"--store", "REDIS://:" + secret + " x@127.0.0.1:6379/0", "stage", "get", "orders"},
		{"--store", "Postgres://u:" + secret + " x@127.0.0.1:1/db", "stage", "get", "orders"},
		{"postgres://postgres:" + secret + strings.Repeat("a", 83) + "@127.0.0.1:5432/test", "status"},
		{"--store", goodPG, "stage", "get", "postgres://postgres:" + secret + strings.Repeat("a", 40) + "@h/db"},
		{"--store", "host=127.0.0.1 password=Sup3r\\ " + secret + " port=notaport", "stage", "get", "orders"},
		{"--store", "host=127.0.0.1 user=postgres password='Sup3r " + secret, "stage", "get", "orders"},
		{"stage", "get", "password=" + secret},
		append(append([]string{}, valid...), "status"),
		append(append([]string{"--actor", "ops postgres://a:" + secret + "@h/db"}, valid...),
			"stage", "set", "orders", "dualwrite", "--force", "--reason", "rotated password="+secret),
		append(append([]string{}, valid...), "audit", "orders"),
		append(append([]string{}, valid...), "status", "orders"),
	}
	check := func(args []string, r result) {
		t.Helper()
		for _, s := range []string{secret, encoded, "Pa@ss0rdX", "S3cretPw"} {
			assert.NotContains(t, r.stdout, s, "%q: stdout", args)
			assert.NotContains(t, r.stderr, s, "%q: stderr", args)
		}
	}
	for _, args := range battery {
		r := dimmer(t, nil, args...)
		check(args, r)
	}
	r := dimmer(t, nil, append(append([]string{}, valid...), "audit", "orders")...)
	require.Equal(t, exitOK, r.code, r.stderr)
	assert.Contains(t, r.stdout, "by ops postgres://a:***@h/db: rotated password=***", "the audit shows the masked actor and reason")

	// Defaults taken from the environment are shown by every --help.
	t.Setenv("DIMMER_STORE", "postgres://u:"+secret+"@127.0.0.1:1/db")
	t.Setenv("DIMMER_OUTBOX_DB", "host=127.0.0.1 password="+secret)
	t.Setenv("DIMMER_REDIS_URL", "REDIS://:"+secret+" x@127.0.0.1:1")
	t.Setenv("DIMMER_KAFKA_SASL_PASSWORD_FILE", secret) // the password, in the variable for its file
	t.Setenv("DIMMER_KAFKA_BROKERS", "user:"+secret+"@127.0.0.1:1")
	for _, args := range [][]string{{"--help"}, {"stage", "set", "--help"}, {"outbox", "--help"}, {"outbox", "relay", "--help"}, {"schema", "--help"}, {"backfill", "--help"}, {"stream", "--help"}, {"stage", "get", "orders"}} {
		r := dimmer(t, nil, args...)
		check(args, r)
		if args[len(args)-1] == "--help" {
			assert.Equal(t, exitOK, r.code, "%v", args)
		}
	}
	r = dimmer(t, nil, "--help")
	assert.Contains(t, r.stdout, "postgres://u:***@127.0.0.1:1/db")
}
