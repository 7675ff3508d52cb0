package main

import (
	"io"
	"net/url"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"
)

// Passwords never reach the CLI's output. Two layers keep them out:
//
//   - maskDSN masks every password position of the connection strings
//     pgx and go-redis accept wherever they are echoed: URL userinfo
//     (postgres://u:pw@, redis://:pw@), password= and sslpassword= in a
//     URL query or a keyword DSN (host=... password=...), quoted or not.
//   - a redactor learns the passwords given to this run (arguments and
//     DIMMER_* / PG* environment variables) and replaces them in every
//     byte written to stdout and stderr, so a password a client library
//     quotes in an unexpected shape is caught too.
//
// A URL's userinfo ends at the last '@' of its authority (as Go's and
// libpq's parsers read it), so the mask runs to the last '@' of the word,
// over-masking a query that holds one rather than showing a password that
// does. An unquoted keyword value may carry backslash escapes.
var (
	userinfoPW = regexp.MustCompile(`(://[^:/@\s]*:)(\S*)@`)
	keywordPW  = regexp.MustCompile(`(?i)(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|(?:\\.|[^\s&'"\\])+)`)
	// argPW is userinfo in an argument that is one URL, which may hold a
	// space or a character a parser stops at (#, /, ?) where it should
	// have been percent-encoded: the parser's error quotes what it read.
	argPW = regexp.MustCompile(`(?i)^[a-z][a-z0-9+.-]*://[^:/@\s]*:(.*)@[^@]*$`)
	// brokerPW is user:password@host:port without a scheme, as a Kafka
	// broker list given credentials reads.
	brokerPW = regexp.MustCompile(`((?:^|[\s,"'=])[^\s:/@,"'=]+:)([^\s@,/]+)@`)
	// urlStops are where a URL parser cuts a userinfo that holds them
	// (pgx takes the host from the first '@').
	urlStops = regexp.MustCompile(`[\s#/?@]+`)
	// backslash is an escaped character of a keyword value.
	backslash = regexp.MustCompile(`\\(.)`)
)

const masked = "***"

// maskDSN masks the passwords of connection strings inside s.
func maskDSN(s string) string {
	s = userinfoPW.ReplaceAllString(s, "${1}"+masked+"@")
	s = brokerPW.ReplaceAllString(s, "${1}"+masked+"@")
	return keywordPW.ReplaceAllString(s, "${1}"+masked)
}

// secretsIn returns the passwords written in s, raw and decoded.
func secretsIn(s string) []string {
	var out []string
	add := func(v string) {
		v = strings.Trim(v, "'")
		if v == "" || v == masked {
			return
		}
		out = append(out, v)
		if d, err := url.PathUnescape(v); err == nil && d != v {
			out = append(out, d)
		}
		if d, err := url.QueryUnescape(v); err == nil && d != v {
			out = append(out, d)
		}
		if u := strings.ReplaceAll(v, `\'`, `'`); u != v {
			out = append(out, strings.ReplaceAll(u, `\\`, `\`))
		}
	}
	for _, m := range userinfoPW.FindAllStringSubmatch(s, -1) {
		add(m[2])
	}
	if m := argPW.FindStringSubmatch(s); m != nil {
		add(m[1])
		for _, piece := range urlStops.Split(m[1], -1) {
			add(piece)
		}
	}
	for _, m := range keywordPW.FindAllStringSubmatch(s, -1) {
		add(m[2])
		// pgx masks a value up to its first escaped space or an
		// unterminated quote's first space and quotes the rest, so each
		// piece is a secret of its own.
		v := strings.Trim(m[2], "'")
		unescaped := backslash.ReplaceAllString(v, "$1")
		add(unescaped)
		for _, piece := range strings.Fields(unescaped) {
			add(piece)
		}
	}
	for _, m := range brokerPW.FindAllStringSubmatch(s, -1) {
		add(m[2])
	}
	return out
}

// minSecret: shorter values are masked where they stand in a connection
// string but not hunted in free text, where they would mangle everything.
const minSecret = 4

// redactor replaces known passwords in text.
type redactor struct {
	mu      sync.RWMutex
	secrets []string
}

// newRedactor learns the passwords in args and in the environment
// variables dimmer and libpq read.
func newRedactor(args []string, environ []string) *redactor {
	var all []string
	for _, a := range args {
		all = append(all, secretsIn(a)...)
		if name, v, ok := strings.Cut(a, "="); ok && strings.HasPrefix(name, "-") {
			all = append(all, secretsIn(v)...) // --store=URL
		}
	}
	for _, kv := range environ {
		k, v, _ := strings.Cut(kv, "=")
		name := strings.TrimSuffix(k, "_NEW")
		switch {
		case k == "PGPASSWORD" || k == "REDIS_PASSWORD",
			strings.HasPrefix(k, "DIMMER_") && strings.HasSuffix(name, "_PASSWORD"):
			all = append(all, v)
		case strings.HasPrefix(k, "DIMMER_") && strings.HasSuffix(name, "_PASSWORD_FILE"):
			// A file's name is no secret; a value that names no file
			// is most likely the password, set in the wrong variable.
			if _, err := os.Stat(v); err != nil {
				all = append(all, v)
			}
		case strings.HasPrefix(k, "DIMMER_") || strings.HasPrefix(k, "PG") || strings.HasPrefix(k, "REDIS"):
			all = append(all, secretsIn(v)...)
		}
	}
	r := &redactor{}
	r.learn(all...)
	return r
}

// learn adds passwords read on the way, such as one from a file.
func (r *redactor) learn(secrets ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range secrets {
		if len(s) >= minSecret && !slices.Contains(r.secrets, s) {
			r.secrets = append(r.secrets, s)
		}
	}
	// Longest first, so a password containing another is masked whole.
	sort.Slice(r.secrets, func(i, j int) bool { return len(r.secrets[i]) > len(r.secrets[j]) })
}

// String masks connection strings and every known password in s.
func (r *redactor) String(s string) string {
	s = maskDSN(s)
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, sec := range r.secrets {
		if strings.Contains(s, sec) {
			s = replaceWhole(s, sec)
		}
	}
	return r.maskCut(s)
}

// cutMarks end an argument echoed cut short (flags.Echo, oneLine).
var cutMarks = []string{"…", "..."}

// maskCut masks the start of a password that an echo cut short: the
// password is not in the text whole, so String's search misses it.
func (r *redactor) maskCut(s string) string {
	for _, mark := range cutMarks {
		for at := 0; ; {
			i := strings.Index(s[at:], mark)
			if i < 0 {
				break
			}
			i += at
			longest := 0
			for _, sec := range r.secrets {
				for k := len(sec) - 1; k > longest && k >= minSecret; k-- {
					if strings.HasSuffix(s[:i], sec[:k]) {
						longest = k
					}
				}
			}
			if longest > 0 {
				s = s[:i-longest] + masked + s[i:]
				i += len(masked) - longest
			}
			at = i + len(mark)
		}
	}
	return s
}

// replaceWhole masks each occurrence of sec that is not part of a longer
// word: a password "pass" masked inside "password" ("***word") or "kafka"
// in "kafka 127.0.0.1" would show the password to anyone who knows the
// message. A side of sec that is not a letter or digit is a boundary
// already.
func replaceWhole(s, sec string) string {
	first, _ := utf8.DecodeRuneInString(sec)
	last, _ := utf8.DecodeLastRuneInString(sec)
	var b strings.Builder
	from := 0 // s[:from] is written
	for at := 0; ; {
		i := strings.Index(s[at:], sec)
		if i < 0 {
			b.WriteString(s[from:])
			return b.String()
		}
		i += at
		end := i + len(sec)
		before, _ := utf8.DecodeLastRuneInString(s[:i])
		after, _ := utf8.DecodeRuneInString(s[end:])
		if i >= 2 && s[i-2] == '\\' && strings.IndexByte("abfnrtv", s[i-1]) >= 0 {
			before = ' ' // a quoted control character ("\tpw") ends a word
		}
		if (i > 0 && isWordRune(first) && isWordRune(before)) || (end < len(s) && isWordRune(last) && isWordRune(after)) {
			at = i + 1 // part of a longer word: look further on
			continue
		}
		b.WriteString(s[from:i])
		b.WriteString(masked)
		from, at = end, end
	}
}

func isWordRune(r rune) bool { return unicode.IsLetter(r) || unicode.IsDigit(r) }

// writer wraps w so nothing written through it carries a known password.
func (r *redactor) writer(w io.Writer) io.Writer { return &redactWriter{w: w, r: r} }

type redactWriter struct {
	w io.Writer
	r *redactor
}

func (rw *redactWriter) Write(p []byte) (int, error) {
	if _, err := io.WriteString(rw.w, rw.r.String(string(p))); err != nil {
		return 0, err
	}
	return len(p), nil
}

// environ is the process environment (a variable so tests can pass their own).
var environ = os.Environ
