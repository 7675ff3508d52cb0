package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl/scram"

	"github.com/dimmer-dev/dimmer/outbox"
)

// testCA makes a CA and a certificate it signs for 127.0.0.1: the server's
// TLS config, and the CA's PEM written to a file.
func testCA(t *testing.T) (*tls.Config, string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "dimmer test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	ca, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca, &key.PublicKey, caKey)
	require.NoError(t, err)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	require.NoError(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o600))
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{leafDER}, PrivateKey: key}}}, caFile
}

func secretFile(t *testing.T, content string) string {
	t.Helper()
	f := filepath.Join(t.TempDir(), "password")
	require.NoError(t, os.WriteFile(f, []byte(content), 0o600))
	return f
}

// TestOutboxRelaySecuredKafka: the relay publishes to a cluster that takes
// only TLS with SASL/SCRAM; a wrong password fails within --timeout and is
// never printed, and the failure says it is the credentials.
func TestOutboxRelaySecuredKafka(t *testing.T) {
	t.Parallel()
	const user, password = "relay", "kafka-S3cret-pw"
	serverTLS, caFile := testCA(t)
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.TLS(serverTLS), kfake.EnableSASL(),
		kfake.Superuser("SCRAM-SHA-512", user, password), kfake.SeedTopics(2, "orders"))
	require.NoError(t, err)
	t.Cleanup(cluster.Close)
	seeds := strings.Join(cluster.ListenAddrs(), ",")
	pool, ob, db := installOutbox(t, 4)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i := range 10 {
		_, err := ob.EnqueuePool(ctx, pool, outbox.Message{Topic: "orders", Key: fmt.Sprint("k", i%3), Payload: []byte(fmt.Sprint(i))})
		require.NoError(t, err)
	}
	relay := func(ctx context.Context, pwFile string, extra ...string) result {
		var out, errOut bytes.Buffer
		code := run(ctx, append(append([]string{"outbox", "relay", "--timeout", "2s", "--poll", "50ms", "--brokers", seeds,
			"--tls-ca", caFile, "--sasl", "SCRAM-SHA-512", "--sasl-user", user, "--sasl-password-file", pwFile}, db...), extra...), &out, &errOut)
		return result{code, out.String(), errOut.String()}
	}

	// A wrong password: refused before the relay starts, within --timeout.
	start := time.Now()
	r := relay(ctx, secretFile(t, "not-the-Password\n"))
	assert.Equal(t, exitError, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	assert.Less(t, time.Since(start), 15*time.Second)
	assert.Contains(t, r.stderr, `check the user and password of --sasl scram-sha-512 (user "relay")`)
	assert.NotContains(t, r.stdout+r.stderr, "not-the-Password")
	assert.Equal(t, 10, int(pendingRows(t, pool, ob)), "nothing published or lost")

	// The right one (with the line break a secret store writes): every
	// message is published, over TLS.
	sig, stop := context.WithCancel(ctx)
	exited := make(chan result, 1)
	go func() { exited <- relay(sig, secretFile(t, password+"\n"), "--id", "secured") }()
	require.Eventually(t, func() bool { return pendingRows(t, pool, ob) == 0 }, 30*time.Second, 20*time.Millisecond)
	stop()
	r = <-exited
	require.Equal(t, exitOK, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	assert.NotContains(t, r.stdout+r.stderr, password)

	consumer, err := kgo.NewClient(kgo.SeedBrokers(cluster.ListenAddrs()...), kgo.DialTLSConfig(clientTLS(t, caFile)),
		kgo.SASL(scram.Auth{User: user, Pass: password}.AsSha512Mechanism()),
		kgo.ConsumeTopics("orders"), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	require.NoError(t, err)
	defer consumer.Close()
	got := 0
	for got < 10 {
		fs := consumer.PollFetches(ctx)
		require.NoError(t, ctx.Err(), "consumed %d of 10", got)
		got += fs.NumRecords()
	}
	assert.Equal(t, 10, got)
}

func clientTLS(t *testing.T, caFile string) *tls.Config {
	pemBytes, err := os.ReadFile(caFile)
	require.NoError(t, err)
	roots := x509.NewCertPool()
	require.True(t, roots.AppendCertsFromPEM(pemBytes))
	return &tls.Config{RootCAs: roots}
}

// TestStreamSecuredClusters: each side takes its own security settings: a
// TLS-only old cluster and a SASL/PLAIN new one.
func TestStreamSecuredClusters(t *testing.T) {
	t.Parallel()
	serverTLS, caFile := testCA(t)
	old, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.TLS(serverTLS), kfake.SeedTopics(2, "events"))
	require.NoError(t, err)
	t.Cleanup(old.Close)
	const password = "plain-Pw-new-side"
	nw, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.EnableSASL(), kfake.Superuser("PLAIN", "mover", password), kfake.SeedTopics(2, "events"))
	require.NoError(t, err)
	t.Cleanup(nw.Close)
	brokers := []string{"--old-brokers", strings.Join(old.ListenAddrs(), ","), "--new-brokers", strings.Join(nw.ListenAddrs(), ","), "--timeout", "2s"}
	pwFile := secretFile(t, password)

	r := dimmer(t, nil, append([]string{"stream", "status", "events", "--old-tls-ca", caFile,
		"--new-sasl", "plain", "--new-sasl-user", "mover", "--new-sasl-password-file", pwFile}, brokers...)...)
	require.Equal(t, exitOK, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	assert.Contains(t, r.stdout, "PARTITION")

	// TLS without the CA that signed the broker: refused by the
	// verification, within --timeout.
	start := time.Now()
	r = dimmer(t, nil, append([]string{"stream", "status", "events", "--old-tls",
		"--new-sasl", "plain", "--new-sasl-user", "mover", "--new-sasl-password-file", pwFile}, brokers...)...)
	assert.Equal(t, exitError, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	assert.Contains(t, r.stderr, "certificate")
	assert.Less(t, time.Since(start), 15*time.Second)

	// SASL to the TLS cluster without TLS: the client says TLS is
	// missing, and the credentials are not blamed.
	r = dimmer(t, nil, append([]string{"stream", "status", "events", "--old-sasl", "plain", "--old-sasl-user", "mover", "--old-sasl-password-file", pwFile,
		"--new-sasl", "plain", "--new-sasl-user", "mover", "--new-sasl-password-file", pwFile}, brokers...)...)
	assert.Equal(t, exitError, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	assert.Contains(t, r.stderr, "is TLS missing?")
	assert.NotContains(t, r.stderr, "check the user and password")
}

// TestKafkaAuthUsage: every wrong combination is bad usage naming the
// flag, before anything is dialled.
func TestKafkaAuthUsage(t *testing.T) {
	t.Parallel()
	_, _, db := installOutbox(t, 2)
	notPEM := secretFile(t, "not a certificate")
	pw := secretFile(t, "pw-in-a-file")
	for name, tc := range map[string]struct {
		args []string
		want string
	}{
		"unknown mechanism":     {[]string{"--sasl", "gssapi", "--sasl-user", "u", "--sasl-password-file", pw}, `--sasl "gssapi": unknown mechanism`},
		"no user":               {[]string{"--sasl", "plain", "--sasl-password-file", pw}, "--sasl plain needs --sasl-user"},
		"no password":           {[]string{"--sasl", "scram-sha-256", "--sasl-user", "u"}, "needs a password: --sasl-password-file FILE or DIMMER_KAFKA_SASL_PASSWORD"},
		"missing password file": {[]string{"--sasl", "plain", "--sasl-user", "u", "--sasl-password-file", "/nonexistent/pw"}, "--sasl-password-file: the file cannot be read: no such file or directory"},
		"empty password file":   {[]string{"--sasl", "plain", "--sasl-user", "u", "--sasl-password-file", secretFile(t, "\n")}, "the file is empty"},
		"user, no mechanism":    {[]string{"--sasl-user", "u"}, "without --sasl: name the mechanism"},
		"missing CA file":       {[]string{"--tls-ca", "/nonexistent/ca.pem"}, "--tls-ca: open /nonexistent/ca.pem"},
		"CA file not PEM":       {[]string{"--tls-ca", notPEM}, "no PEM certificate in the file"},
		"CA without TLS":        {[]string{"--tls=false", "--tls-ca", notPEM}, "--tls=false with --tls-ca"},
	} {
		t.Run(name, func(t *testing.T) {
			r := dimmer(t, nil, append(append([]string{"outbox", "relay", "--brokers", "127.0.0.1:9"}, db...), tc.args...)...)
			assert.Equal(t, exitUsage, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
			assert.Contains(t, r.stderr, tc.want)
			// A password put where its file's path goes is not echoed.
			assert.NotContains(t, r.stderr, "/nonexistent/pw")
		})
	}
	r := dimmer(t, nil, "stream", "status", "events", "--old-brokers", "127.0.0.1:9", "--new-brokers", "127.0.0.1:9",
		"--new-sasl", "scram-sha-256", "--new-sasl-user", "u")
	assert.Equal(t, exitUsage, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	assert.Contains(t, r.stderr, "--new-sasl scram-sha-256 needs a password: --new-sasl-password-file FILE or DIMMER_KAFKA_SASL_PASSWORD_NEW")
}

// TestKafkaAuthFromEnvironment: a platform team configures the relay by
// environment; the password variable's value never reaches the output,
// and a malformed DIMMER_KAFKA_TLS is bad usage.
func TestKafkaAuthFromEnvironment(t *testing.T) {
	const password = "env-Only-pw-42"
	cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.EnableSASL(), kfake.Superuser("SCRAM-SHA-256", "envuser", password))
	require.NoError(t, err)
	t.Cleanup(cluster.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	t.Setenv("DIMMER_KAFKA_BROKERS", strings.Join(cluster.ListenAddrs(), ","))
	t.Setenv("DIMMER_KAFKA_SASL", "scram-sha-256")
	t.Setenv("DIMMER_KAFKA_SASL_USER", "envuser")
	t.Setenv("DIMMER_KAFKA_SASL_PASSWORD", password)
	t.Setenv("DIMMER_KAFKA_BROKERS_NEW", strings.Join(cluster.ListenAddrs(), ","))
	t.Setenv("DIMMER_KAFKA_SASL_NEW", "scram-sha-256")
	t.Setenv("DIMMER_KAFKA_SASL_USER_NEW", "envuser")
	t.Setenv("DIMMER_KAFKA_SASL_PASSWORD_NEW", password)
	adm, err := kgo.NewClient(kgo.SeedBrokers(cluster.ListenAddrs()...), kgo.SASL(scram.Auth{User: "envuser", Pass: password}.AsSha256Mechanism()))
	require.NoError(t, err)
	defer adm.Close()
	_, err = kadm.NewClient(adm).CreateTopic(ctx, 1, 1, nil, "envtopic")
	require.NoError(t, err)

	r := dimmer(t, nil, "stream", "status", "envtopic", "--timeout", "2s")
	require.Equal(t, exitOK, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)

	// A wrong password from the environment: the failure names the side
	// and the user, never the password it was given.
	t.Setenv("DIMMER_KAFKA_SASL_PASSWORD_NEW", "Wrong-"+password)
	r = dimmer(t, nil, "stream", "status", "envtopic", "--timeout", "2s")
	assert.Equal(t, exitError, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	assert.NotContains(t, r.stdout+r.stderr, "Wrong-"+password)
	assert.Contains(t, r.stderr, `--new-sasl scram-sha-256 (user "envuser")`, r.stderr)
	assert.NotContains(t, r.stderr, "--old-sasl", "the old cluster's credentials worked: only the failing side is named")

	t.Setenv("DIMMER_KAFKA_SASL_PASSWORD_NEW", password)
	t.Setenv("DIMMER_KAFKA_TLS", "yes please")
	r = dimmer(t, nil, "stream", "status", "envtopic")
	assert.Equal(t, exitUsage, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
	assert.Contains(t, r.stderr, `DIMMER_KAFKA_TLS="yes please": want true or false`)
	// The flag given on the command line overrides the variable.
	r = dimmer(t, nil, "stream", "status", "envtopic", "--old-tls=false", "--timeout", "2s")
	assert.Equal(t, exitOK, r.code, "stdout: %s\nstderr: %s", r.stdout, r.stderr)
}
