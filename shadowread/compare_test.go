package shadowread_test

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimmer-dev/dimmer/shadowread"
)

type item struct {
	SKU   string
	Price float64
	ETag  string
}

type order struct {
	ID        string
	Items     []item
	Tags      map[string]string
	Placed    time.Time
	Note      *string
	UpdatedAt time.Time
	internal  int
}

func TestDeepCompareReportsFieldPaths(t *testing.T) {
	t.Parallel()
	now := time.Now()
	note := "x"
	a := order{ID: "o1", Items: []item{{"a", 1, "e1"}, {"b", 2, "e2"}}, Tags: map[string]string{"env": "prod"},
		Placed: now, Note: &note, internal: 1}
	b := a
	b.Items = []item{{"a", 1, "e1"}, {"b", 2.5, "e2"}, {"c", 3, "e3"}}
	b.Tags = map[string]string{"env": "dev", "new": "1"}
	b.Placed = now.In(time.FixedZone("x", 3600)) // same instant, other zone
	b.Note = nil
	b.internal = 2
	diff := shadowread.DeepCompare[order]()(a, b)
	assert.ElementsMatch(t, []string{"Items[1].Price", "Items[2]", `Tags["env"]`, `Tags["new"]`, "Note", "internal"}, diff.Paths())
	assert.Contains(t, diff.String(), "Items[1].Price: 2 != 2.5")
	assert.Empty(t, shadowread.DeepCompare[order]()(a, a))
}

func TestDeepCompareIgnoreAndNormalise(t *testing.T) {
	t.Parallel()
	a := order{ID: "O1", Items: []item{{"a", 1.0000001, "e1"}}, UpdatedAt: time.Unix(100, 0), Placed: time.Unix(5, 123456789)}
	b := order{ID: "o1", Items: []item{{"a", 1, "other"}}, Tags: map[string]string{}, UpdatedAt: time.Unix(200, 0), Placed: time.Unix(5, 123456000)}
	cmp := shadowread.DeepCompare[order](
		shadowread.IgnorePaths("UpdatedAt", "Items[*].ETag"),
		shadowread.Normalize(strings.ToLower),
		shadowread.Normalize(func(t time.Time) time.Time { return t.Truncate(time.Microsecond) }),
		shadowread.EquateEmpty(),
		shadowread.FloatTolerance(1e-6),
	)
	assert.Empty(t, cmp(a, b))
	b.Items[0].SKU = "B"
	assert.Equal(t, []string{"Items[0].SKU"}, cmp(a, b).Paths())

	_, err := shadowread.NewDeepCompare[order](shadowread.FloatTolerance(-1))
	require.ErrorContains(t, err, "FloatTolerance")
	assert.Panics(t, func() { shadowread.DeepCompare[order](shadowread.IgnorePaths("")) })
}

func TestDeepCompareLimitsDifferences(t *testing.T) {
	t.Parallel()
	a := make([]int, 100)
	b := make([]int, 100)
	for i := range b {
		b[i] = i + 1
	}
	assert.Len(t, shadowread.DeepCompare[[]int](shadowread.MaxDifferences(5))(a, b), 5)
}
