package shadowread

import (
	"fmt"
	"math"
	"reflect"
	"regexp"
	"strconv"
	"strings"
)

// Difference is one field that differs, by path from the result's root:
// "Name", "Items[2].Price", `Tags["env"]`; "" is the root itself.
type Difference struct {
	Path   string `json:"path"`
	Served string `json:"served"`
	Shadow string `json:"shadow"`
}

// Diff is a comparison's result; empty means equal.
type Diff []Difference

// Paths lists the paths that differ.
func (d Diff) Paths() []string {
	out := make([]string, len(d))
	for i, x := range d {
		out[i] = x.Path
	}
	return out
}

func (d Diff) String() string {
	var b strings.Builder
	for i, x := range d {
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s: %s != %s", pathOrRoot(x.Path), x.Served, x.Shadow)
	}
	return b.String()
}

func pathOrRoot(p string) string {
	if p == "" {
		return "(root)"
	}
	return p
}

// Comparator compares the served result with the shadow one.
type Comparator[Out any] func(served, shadow Out) Diff

// CompareOption tunes [DeepCompare].
type CompareOption func(*differ) error

// IgnorePaths skips the fields whose path matches one of the patterns, and
// everything below them. "*" matches one path element name or index:
// "UpdatedAt", "Items[*].ETag", "Meta.*".
func IgnorePaths(patterns ...string) CompareOption {
	return func(d *differ) error {
		for _, p := range patterns {
			if p == "" {
				return fmt.Errorf("IgnorePaths: empty pattern")
			}
			re := "^" + strings.ReplaceAll(regexp.QuoteMeta(p), `\*`, `[^.\[\]]*`) + "$"
			rx, err := regexp.Compile(re)
			if err != nil {
				return fmt.Errorf("IgnorePaths: pattern %q: %w", p, err)
			}
			d.ignore = append(d.ignore, rx)
		}
		return nil
	}
}

// Normalize maps every value of type T (at any depth) before comparing, e.g.
// truncating times to the precision both stores keep, lower-casing emails,
// sorting a slice whose order neither store promises.
func Normalize[T any](f func(T) T) CompareOption {
	return func(d *differ) error {
		if f == nil {
			return fmt.Errorf("Normalize: function is nil")
		}
		t := reflect.TypeFor[T]()
		d.norm[t] = func(v reflect.Value) reflect.Value {
			return reflect.ValueOf(f(v.Interface().(T)))
		}
		return nil
	}
}

// EquateEmpty treats a nil slice or map as equal to an empty one (stores
// rarely agree on which they return).
func EquateEmpty() CompareOption {
	return func(d *differ) error { d.equateEmpty = true; return nil }
}

// FloatTolerance treats floats within tol of each other as equal.
func FloatTolerance(tol float64) CompareOption {
	return func(d *differ) error {
		if tol < 0 || math.IsNaN(tol) {
			return fmt.Errorf("FloatTolerance: tolerance must be a non-negative number, got %v", tol)
		}
		d.tol = tol
		return nil
	}
}

// MaxDifferences bounds the differences one comparison lists (default 32).
func MaxDifferences(n int) CompareOption {
	return func(d *differ) error {
		if n < 1 {
			return fmt.Errorf("MaxDifferences: must be at least 1, got %d", n)
		}
		d.max = n
		return nil
	}
}

// DeepCompare returns the default comparator: a structural walk of both
// values that lists each differing leaf by path. Types with an
// Equal(T) bool method (time.Time and the like) are compared with it;
// unexported fields are compared too. It panics on an invalid option, as a
// regexp.MustCompile does: options are fixed at start-up; use
// [NewDeepCompare] to get the error instead.
func DeepCompare[Out any](opts ...CompareOption) Comparator[Out] {
	c, err := NewDeepCompare[Out](opts...)
	if err != nil {
		panic(err)
	}
	return c
}

// NewDeepCompare is [DeepCompare] returning an invalid option's error.
func NewDeepCompare[Out any](opts ...CompareOption) (Comparator[Out], error) {
	d := &differ{norm: map[reflect.Type]func(reflect.Value) reflect.Value{}, max: 32}
	for _, o := range opts {
		if err := o(d); err != nil {
			return nil, fmt.Errorf("shadowread.DeepCompare: %w", err)
		}
	}
	return func(served, shadow Out) Diff {
		var out Diff
		d.walk(&out, "", reflect.ValueOf(&served).Elem(), reflect.ValueOf(&shadow).Elem(), 0)
		return out
	}, nil
}

type differ struct {
	ignore      []*regexp.Regexp
	norm        map[reflect.Type]func(reflect.Value) reflect.Value
	equateEmpty bool
	tol         float64
	max         int
}

const maxDepth = 64

func (d *differ) walk(out *Diff, path string, a, b reflect.Value, depth int) {
	if len(*out) >= d.max {
		return
	}
	for _, rx := range d.ignore {
		if rx.MatchString(path) {
			return
		}
	}
	if !a.IsValid() || !b.IsValid() {
		if a.IsValid() != b.IsValid() {
			d.add(out, path, a, b)
		}
		return
	}
	if a.Type() != b.Type() {
		d.add(out, path, a, b)
		return
	}
	if depth > maxDepth {
		// Deeper than any sane record: a cycle. Stop rather than loop.
		return
	}
	if f, ok := d.norm[a.Type()]; ok && a.CanInterface() {
		a, b = f(a), f(b)
	}
	if eq, ok := equalMethod(a, b); ok {
		if !eq {
			d.add(out, path, a, b)
		}
		return
	}
	switch a.Kind() {
	case reflect.Pointer, reflect.Interface:
		if a.IsNil() || b.IsNil() {
			if a.IsNil() != b.IsNil() {
				d.add(out, path, a, b)
			}
			return
		}
		if a.Kind() == reflect.Pointer && a.Pointer() == b.Pointer() {
			return
		}
		d.walk(out, path, a.Elem(), b.Elem(), depth+1)
	case reflect.Struct:
		t := a.Type()
		for i := range t.NumField() {
			d.walk(out, join(path, t.Field(i).Name), a.Field(i), b.Field(i), depth+1)
		}
	case reflect.Slice, reflect.Array:
		if a.Kind() == reflect.Slice && a.IsNil() != b.IsNil() && !(d.equateEmpty && a.Len() == 0 && b.Len() == 0) {
			d.add(out, path, a, b)
			return
		}
		n := max(a.Len(), b.Len())
		for i := range n {
			p := path + "[" + strconv.Itoa(i) + "]"
			switch {
			case i >= a.Len():
				d.add(out, p, reflect.Value{}, b.Index(i))
			case i >= b.Len():
				d.add(out, p, a.Index(i), reflect.Value{})
			default:
				d.walk(out, p, a.Index(i), b.Index(i), depth+1)
			}
		}
	case reflect.Map:
		if a.IsNil() != b.IsNil() && !(d.equateEmpty && a.Len() == 0 && b.Len() == 0) {
			d.add(out, path, a, b)
			return
		}
		for _, k := range a.MapKeys() {
			p := path + "[" + fmt.Sprintf("%#v", k) + "]"
			if bv := b.MapIndex(k); bv.IsValid() {
				d.walk(out, p, a.MapIndex(k), bv, depth+1)
			} else {
				d.add(out, p, a.MapIndex(k), reflect.Value{})
			}
		}
		for _, k := range b.MapKeys() {
			if !a.MapIndex(k).IsValid() {
				d.add(out, path+"["+fmt.Sprintf("%#v", k)+"]", reflect.Value{}, b.MapIndex(k))
			}
		}
	case reflect.Float32, reflect.Float64:
		x, y := a.Float(), b.Float()
		if !(x == y || (math.IsNaN(x) && math.IsNaN(y)) || math.Abs(x-y) <= d.tol) {
			d.add(out, path, a, b)
		}
	case reflect.Complex64, reflect.Complex128:
		if a.Complex() != b.Complex() {
			d.add(out, path, a, b)
		}
	case reflect.Bool:
		if a.Bool() != b.Bool() {
			d.add(out, path, a, b)
		}
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		if a.Int() != b.Int() {
			d.add(out, path, a, b)
		}
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		if a.Uint() != b.Uint() {
			d.add(out, path, a, b)
		}
	case reflect.String:
		if a.String() != b.String() {
			d.add(out, path, a, b)
		}
	default:
		// Funcs, channels and unsafe pointers carry no data to compare.
	}
}

// equalMethod uses a type's own Equal(T) bool, the way time.Time wants to be
// compared (== would compare its location pointer and monotonic reading).
func equalMethod(a, b reflect.Value) (equal, ok bool) {
	if !a.CanInterface() {
		return false, false
	}
	m := a.MethodByName("Equal")
	if !m.IsValid() {
		return false, false
	}
	mt := m.Type()
	if mt.NumIn() != 1 || mt.NumOut() != 1 || mt.Out(0).Kind() != reflect.Bool || mt.In(0) != a.Type() {
		return false, false
	}
	if a.Kind() == reflect.Pointer && (a.IsNil() || b.IsNil()) {
		return a.IsNil() == b.IsNil(), true
	}
	return m.Call([]reflect.Value{b})[0].Bool(), true
}

func join(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}

func (d *differ) add(out *Diff, path string, a, b reflect.Value) {
	*out = append(*out, Difference{Path: path, Served: show(a), Shadow: show(b)})
}

const maxShown = 200

func show(v reflect.Value) string {
	if !v.IsValid() {
		return "<missing>"
	}
	var s string
	if v.CanInterface() {
		s = fmt.Sprintf("%+v", v.Interface())
	} else {
		s = fmt.Sprintf("%+v", v)
	}
	if len(s) > maxShown {
		s = s[:maxShown] + "…"
	}
	return s
}
