// Package connstr keeps connection strings, and the passwords in them, out
// of the messages that describe them.
//
// pgx masks a password in the connection string its parse errors quote,
// but only up to an escaped space or an unterminated quote's first space,
// and net/url quotes a URL it cannot parse whole. A message that needs to
// say where a server is says [Where]; one that says why a string does not
// parse says [ParseError].
package connstr

import (
	"errors"
	"net/url"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// Where names the server a connection string points at, without its user,
// password, database or options: scheme://host for a URL, and "the
// connection string" for anything else (a keyword DSN holds its password
// anywhere).
func Where(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return "the connection string"
	}
	return u.Scheme + "://" + u.Host
}

// ParseError returns err, a failure to parse a connection string, with the
// string it quotes taken out.
func ParseError(err error) error {
	var pe *pgconn.ParseConfigError
	if errors.As(err, &pe) {
		// "cannot parse `<the string, partly masked>`: <why>"
		msg := pe.Error()
		if i := strings.LastIndex(msg, "`: "); i >= 0 {
			return errors.New("cannot parse the connection string: " + msg[i+len("`: "):])
		}
		return errors.New("cannot parse the connection string")
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}
