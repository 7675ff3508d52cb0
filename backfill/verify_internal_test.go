package backfill

import (
	"math/big"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgtype"
	"github.com/stretchr/testify/assert"
)

// Versions as pgx decodes them: bigint, int, numeric (with a negative and
// a positive exponent), timestamps; anything else is not comparable, so a
// key judged by it counts as differing.
func TestVersionOrder(t *testing.T) {
	num := func(i int64, exp int32) pgtype.Numeric {
		return pgtype.Numeric{Int: big.NewInt(i), Exp: exp, Valid: true}
	}
	now := time.Now()
	for _, c := range []struct {
		a, b    any
		atLeast bool
		same    bool
	}{
		{int64(5), int64(4), true, false},
		{int64(4), int64(5), false, false},
		{int32(7), int64(7), true, true},
		{num(15, -1), int64(1), true, false}, // 1.5 >= 1
		{num(15, -1), int64(2), false, false},
		{num(2, 1), int64(20), true, true}, // 2e1
		{num(199, -2), num(2, 0), false, false},
		{now.Add(time.Microsecond), now, true, false},
		{now, now.Add(time.Microsecond), false, false},
		{now, int64(1), false, false},
		{"b", "a", false, false},
		{pgtype.Numeric{NaN: true, Valid: true}, int64(1), false, false},
		{nil, int64(1), false, false},
	} {
		assert.Equal(t, c.atLeast, versionAtLeast(c.a, c.b), "%v >= %v", c.a, c.b)
		assert.Equal(t, c.same, sameVersion(c.a, c.b), "%v == %v", c.a, c.b)
	}
	assert.True(t, sameVersion(nil, nil))
	assert.True(t, sameVersion("a", "a"))
}
