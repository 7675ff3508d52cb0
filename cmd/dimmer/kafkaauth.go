package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"
)

// kafkaAuth is how the CLI reaches a secured Kafka cluster: TLS, and SASL
// with a user and a password. The password is read from a file or an
// environment variable, never from the command line, where every user of
// the machine could read it (ps, shell history).
type kafkaAuth struct {
	flagPrefix string // "" for the relay's cluster; "old-" or "new-" for a stream's
	envSuffix  string // "" or "_NEW", after the DIMMER_KAFKA_* names

	tls          bool
	tlsCA        string
	sasl         string
	user         string
	passwordFile string
	envErr       error // a DIMMER_KAFKA_TLS that does not parse, unless --tls is given
	flags        *pflag.FlagSet
	learn        func(...string) // tells the redactor a password read from a file
}

// register adds the flags, each defaulting to its DIMMER_KAFKA_* variable.
func (a *kafkaAuth) register(f *pflag.FlagSet, red *redactor, flagPrefix, envSuffix, cluster string) {
	a.flagPrefix, a.envSuffix, a.learn, a.flags = flagPrefix, envSuffix, red.learn, f
	if v := os.Getenv(a.env("TLS")); v != "" {
		on, err := strconv.ParseBool(v)
		if err != nil {
			a.envErr = usagef("%s=%q: want true or false", a.env("TLS"), v)
		}
		a.tls = on
	}
	f.BoolVar(&a.tls, a.flag("tls"), a.tls, fmt.Sprintf("reach the %s over TLS, verified against the system's roots (env %s)", cluster, a.env("TLS")))
	f.StringVar(&a.tlsCA, a.flag("tls-ca"), os.Getenv(a.env("TLS_CA")), fmt.Sprintf("PEM file of the CAs that sign the %s's certificates; implies --%s (env %s)", cluster, a.flag("tls"), a.env("TLS_CA")))
	f.StringVar(&a.sasl, a.flag("sasl"), os.Getenv(a.env("SASL")), fmt.Sprintf("SASL mechanism of the %s: plain, scram-sha-256 or scram-sha-512 (env %s)", cluster, a.env("SASL")))
	f.StringVar(&a.user, a.flag("sasl-user"), os.Getenv(a.env("SASL_USER")), fmt.Sprintf("SASL user of the %s (env %s)", cluster, a.env("SASL_USER")))
	f.StringVar(&a.passwordFile, a.flag("sasl-password-file"), os.Getenv(a.env("SASL_PASSWORD_FILE")), fmt.Sprintf("file holding the SASL password of the %s (env %s; or the password itself in %s)", cluster, a.env("SASL_PASSWORD_FILE"), a.env("SASL_PASSWORD")))
}

func (a *kafkaAuth) flag(name string) string { return a.flagPrefix + name }
func (a *kafkaAuth) env(name string) string  { return "DIMMER_KAFKA_" + name + a.envSuffix }

// opts returns the client options of the flags given, or bad usage naming
// the flag that is wrong. A password is never quoted.
func (a *kafkaAuth) opts() ([]kgo.Opt, error) {
	explicitTLS := a.flags != nil && a.flags.Changed(a.flag("tls"))
	if a.envErr != nil && !explicitTLS {
		return nil, a.envErr
	}
	if explicitTLS && !a.tls && a.tlsCA != "" {
		return nil, usagef("--%s=false with --%s: a CA file is for TLS; drop one of them", a.flag("tls"), a.flag("tls-ca"))
	}
	var out []kgo.Opt
	if a.tls || a.tlsCA != "" {
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if a.tlsCA != "" {
			pem, err := os.ReadFile(a.tlsCA)
			if err != nil {
				return nil, usagef("--%s: %v", a.flag("tls-ca"), err)
			}
			cfg.RootCAs = x509.NewCertPool()
			if !cfg.RootCAs.AppendCertsFromPEM(pem) {
				return nil, usagef("--%s %s: no PEM certificate in the file", a.flag("tls-ca"), a.tlsCA)
			}
		}
		out = append(out, kgo.DialTLSConfig(cfg))
	}
	mech, err := a.mechanism()
	if err != nil {
		return nil, err
	}
	if mech != nil {
		out = append(out, kgo.SASL(mech))
	}
	return out, nil
}

// mechanism returns the SASL mechanism asked for, nil for none.
func (a *kafkaAuth) mechanism() (sasl.Mechanism, error) {
	name := strings.ToLower(strings.TrimSpace(a.sasl))
	if name == "" {
		if a.user != "" || a.passwordFile != "" {
			return nil, usagef("--%s or --%s without --%s: name the mechanism (plain, scram-sha-256 or scram-sha-512)",
				a.flag("sasl-user"), a.flag("sasl-password-file"), a.flag("sasl"))
		}
		return nil, nil
	}
	switch name {
	case "plain", "scram-sha-256", "scram-sha-512":
	default:
		return nil, usagef("--%s %q: unknown mechanism; want plain, scram-sha-256 or scram-sha-512", a.flag("sasl"), a.sasl)
	}
	if a.user == "" {
		return nil, usagef("--%s %s needs --%s (or %s)", a.flag("sasl"), name, a.flag("sasl-user"), a.env("SASL_USER"))
	}
	password, err := a.password()
	if err != nil {
		return nil, err
	}
	switch name {
	case "plain":
		return plain.Auth{User: a.user, Pass: password}.AsMechanism(), nil
	case "scram-sha-256":
		return scram.Auth{User: a.user, Pass: password}.AsSha256Mechanism(), nil
	default:
		return scram.Auth{User: a.user, Pass: password}.AsSha512Mechanism(), nil
	}
}

// password reads the password file, else the password variable. A file's
// final line break is not part of the password (echo and most secret
// stores write one).
func (a *kafkaAuth) password() (string, error) {
	if a.passwordFile != "" {
		b, err := os.ReadFile(a.passwordFile)
		if err != nil {
			// Not the path: a password put where the path goes (the
			// variables differ by _FILE only) would be printed.
			var pe *os.PathError
			if errors.As(err, &pe) {
				err = pe.Err
			}
			return "", usagef("--%s: the file cannot be read: %v", a.flag("sasl-password-file"), err)
		}
		pw := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r")
		if pw == "" {
			return "", usagef("--%s %s: the file is empty", a.flag("sasl-password-file"), a.passwordFile)
		}
		a.learn(pw)
		return pw, nil
	}
	if pw := os.Getenv(a.env("SASL_PASSWORD")); pw != "" {
		return pw, nil
	}
	return "", usagef("--%s %s needs a password: --%s FILE or %s", a.flag("sasl"), strings.ToLower(a.sasl), a.flag("sasl-password-file"), a.env("SASL_PASSWORD"))
}

// pingKafka asks the cluster behind cl for an answer within timeout. One
// that gives none is "not reachable", as a mute database is; one that
// answers with a refusal is named with it and, given SASL credentials,
// what to check.
func pingKafka(ctx context.Context, cl *kgo.Client, timeout time.Duration, what string, auth *kafkaAuth) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	err := cl.Ping(ctx)
	if err == nil {
		return nil
	}
	var ne net.Error
	if ctx.Err() != nil || errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("%s: not reachable within --timeout %v: %w", what, timeout, saslHint(err, auth))
	}
	return fmt.Errorf("%s: %w", what, saslHint(err, auth))
}

// saslHint says which credentials to check when a cluster given SASL
// credentials ended the connection. A broker answers
// SASL_AUTHENTICATION_FAILED and closes it; some close it without an
// answer, which reads as an EOF that would otherwise look like a network
// fault. Where the client already named a likelier cause (TLS or SASL
// missing on one end), its word stands alone.
func saslHint(err error, auths ...*kafkaAuth) error {
	var diagnosed *kgo.ErrFirstReadEOF
	if err == nil || errors.As(err, &diagnosed) ||
		!(errors.Is(err, kerr.SaslAuthenticationFailed) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
		return err
	}
	var who []string
	for _, a := range auths {
		if a.sasl != "" {
			who = append(who, fmt.Sprintf("--%s %s (user %q)", a.flag("sasl"), strings.ToLower(a.sasl), a.user))
		}
	}
	if len(who) == 0 {
		return err
	}
	return fmt.Errorf("%w (a cluster ends the connection when it refuses SASL credentials or takes no SASL: check the user and password of %s, and that the cluster uses SASL)",
		err, strings.Join(who, ", "))
}
