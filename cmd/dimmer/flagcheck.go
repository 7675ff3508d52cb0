package main

import (
	"errors"
	"regexp"
	"strings"

	"github.com/spf13/cobra"

	"github.com/dimmer-dev/dimmer/backfill"
	"github.com/dimmer-dev/dimmer/outbox"
)

// fieldFlags maps the config fields a command's flags set to those flags.
// The libraries own the rules for their configs; the CLI only translates
// a refusal into the words its user typed.
type fieldFlags map[string]string

// noZero refuses a flag given as zero where the config reads zero as "use
// the default": a user who types --max-attempts 0 means something (never
// give up, perhaps), and silently getting 10 is not it.
func noZero(cmd *cobra.Command, names ...string) error {
	for _, name := range names {
		f := cmd.Flags().Lookup(name)
		if f == nil || !f.Changed {
			continue
		}
		if v := f.Value.String(); v == "0" || v == "0s" {
			return usagef("--%s %s: must be positive (leave the flag out for its default)", name, v)
		}
	}
	return nil
}

// explain turns a library's refusal of a config field some flag set into
// bad usage naming that flag; any other error is returned as it is.
func (m fieldFlags) explain(err error) error {
	field, reason, ok := refusedField(err)
	if !ok {
		return err
	}
	flag, ok := m[field]
	if !ok {
		return err
	}
	for f, fl := range m {
		reason = fieldWord(f).ReplaceAllLiteralString(reason, "--"+fl)
	}
	return usagef("--%s: %s", flag, reason)
}

// refusedField reads the field and reason of the libraries' config errors.
func refusedField(err error) (field, reason string, ok bool) {
	var oe *outbox.FieldError
	var be *backfill.FieldError
	switch {
	case errors.As(err, &oe) && errors.Is(err, outbox.ErrInvalidConfig):
		return oe.Field, oe.Reason, true
	case errors.As(err, &be):
		return be.Field, be.Reason, true
	}
	return "", "", false
}

// fieldWord matches a field name as a whole word, with or without its
// struct's prefix ("LeaseTTL" in "must be below LeaseTTL/2").
func fieldWord(field string) *regexp.Regexp {
	name := field[strings.LastIndexByte(field, '.')+1:]
	return regexp.MustCompile(`\b(` + regexp.QuoteMeta(field) + `|` + regexp.QuoteMeta(name) + `)\b`)
}
