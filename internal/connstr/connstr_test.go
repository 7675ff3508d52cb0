package connstr_test

import (
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/internal/connstr"
)

// Every form in which a parser quoted a password back: pgx stops masking a
// keyword value at an escaped or quoted space; net/url quotes a URL whole.
func TestParseErrorQuotesNoPassword(t *testing.T) {
	for _, s := range []string{
		`host=127.0.0.1 password=Cut\ S3cretPw port=notaport`,
		`host=127.0.0.1 user=postgres password='Cut S3cretPw`,
		`postgres://u:Cut S3cretPw@127.0.0.1:5432/db`,
		`postgres://u:Cut0S3cretPw@127.0.0.1:notaport/db`,
	} {
		_, err := pgconn.ParseConfig(s)
		require.Error(t, err, s)
		got := connstr.ParseError(err).Error()
		assert.NotContains(t, got, "S3cretPw", s)
		assert.NotEmpty(t, got)
	}
	_, err := redis.ParseURL("redis://:Cut S3cretPw@127.0.0.1:6379/0")
	require.Error(t, err)
	assert.NotContains(t, connstr.ParseError(err).Error(), "S3cretPw")
	assert.Contains(t, connstr.ParseError(err).Error(), "invalid userinfo", "the reason stays")
}

func TestWhere(t *testing.T) {
	for in, want := range map[string]string{
		"postgres://u:pw@127.0.0.1:5432/db?password=x": "postgres://127.0.0.1:5432",
		"redis://:pw@127.0.0.1:6379/0":                 "redis://127.0.0.1:6379",
		"host=127.0.0.1 password=pw":                   "the connection string",
		"redis://:p w@127.0.0.1:6379/0":                "the connection string",
	} {
		assert.Equal(t, want, connstr.Where(in), in)
	}
}
