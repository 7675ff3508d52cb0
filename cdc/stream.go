package cdc

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
)

// errBusy: another reader holds the slot (it is active); a standby waits.
var errBusy = errors.New("cdc: slot is active for another reader")

// replicationConnect opens a logical replication connection (a WAL sender
// bound to the database of connString).
func replicationConnect(ctx context.Context, connString string, params ...string) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(connString)
	if err != nil {
		return nil, fmt.Errorf("cdc: parse connection string: %w", err)
	}
	cfg.RuntimeParams["replication"] = "database"
	for i := 0; i+1 < len(params); i += 2 {
		cfg.RuntimeParams[params[i]] = params[i+1]
	}
	if cfg.RuntimeParams["application_name"] == "" {
		cfg.RuntimeParams["application_name"] = "dimmer-cdc"
	}
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("cdc: open replication connection: %w", err)
	}
	return conn, nil
}

// startStreaming starts pgoutput decoding of slot at its confirmed
// position. It maps a missing slot to [ErrNoSlot] and a slot in use to
// errBusy.
func startStreaming(ctx context.Context, conn *pgconn.PgConn, slot, publication string, messages bool) error {
	return startDecoding(ctx, conn, slot, publication, messages, false)
}

// startDecoding is startStreaming, with inProgress asking pgoutput
// (protocol 2, PostgreSQL 14+) to stream large transactions while they
// run.
func startDecoding(ctx context.Context, conn *pgconn.PgConn, slot, publication string, messages, inProgress bool, extra ...string) error {
	args := []string{"proto_version '1'", "publication_names '" + strings.ReplaceAll(publication, "'", "''") + "'"}
	args = append(args, extra...)
	if inProgress {
		args[0] = "proto_version '2'"
		args = append(args, "streaming 'on'")
	}
	if messages {
		args = append(args, "messages 'true'")
	}
	err := pglogrepl.StartReplication(ctx, conn, slot, 0, pglogrepl.StartReplicationOptions{PluginArgs: args})
	if err == nil {
		return nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "42704":
			return fmt.Errorf("%w: %s (%s)", ErrNoSlot, slot, pgErr.Message)
		case "55006":
			return fmt.Errorf("%w: %s", errBusy, pgErr.Message)
		case "55000":
			if strings.Contains(pgErr.Message, "wal_level") {
				return fmt.Errorf("%w: %s", ErrWalLevel, pgErr.Message)
			}
		}
	}
	return fmt.Errorf("cdc: start streaming slot %s: %w", slot, err)
}
