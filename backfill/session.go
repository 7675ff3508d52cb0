package backfill

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// Leases die with their holder. A range lease is a row (owner, token,
// lease_until) renewed by every chunk, and besides it a session-level
// advisory lock held by the process on a connection of its own for as
// long as it holds the range. A process killed -9 closes that connection
// and its locks go with it, so the next claim takes the range at once
// instead of after LeaseTTL. The lease row still expires: a holder whose
// session lingers (a half-open connection the server has not noticed, a
// process stuck but alive) loses its ranges after LeaseTTL as before. A
// range is free when its lease expired or its lock can be taken.
//
// The lock only says who may claim; fencing is unchanged: a claim bumps the
// range's token under the range row's lock, and every chunk's transaction
// checks the token, so a worker presumed dead (its lock lost with a broken
// connection while it still runs) cannot commit over its successor.
type session struct {
	b      *Backfiller
	job    string
	mu     sync.Mutex
	conn   *pgx.Conn
	held   map[int]bool
	broken bool
}

func newSession(b *Backfiller, job string) *session {
	return &session{b: b, job: job, held: map[int]bool{}}
}

func (s *session) lockKey(id int) string {
	return lockPrefix(s.b.schema, s.job) + strconv.Itoa(id)
}

// lockPrefix starts the lock keys of a job's ranges; the range id ends them.
func lockPrefix(schema, job string) string {
	return "dimmer.backfill.range/" + schema + "/" + job + "/"
}

// connLocked returns the session's connection, opening it (again) when
// needed. A new connection holds none of the old one's locks.
func (s *session) connLocked(ctx context.Context) (*pgx.Conn, error) {
	if s.conn != nil && !s.broken && !s.conn.IsClosed() {
		return s.conn, nil
	}
	if s.conn != nil {
		s.closeConn(ctx)
		s.conn = nil
		clear(s.held)
	}
	c, err := pgx.ConnectConfig(ctx, s.b.pool.Config().ConnConfig.Copy())
	if err != nil {
		return nil, fmt.Errorf("backfill: %s: open the lease session: %w", s.job, err)
	}
	s.conn, s.broken = c, false
	return c, nil
}

// preconnect opens the connection ahead of the first claim.
func (s *session) preconnect(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.connLocked(ctx); err != nil {
		s.b.logger.Warn("backfill: lease session", "job", s.job, "err", err)
	}
}

// tryLock takes range id's lock unless another session holds it, or a
// worker of this process does (the lock is re-entrant per session, so the
// process's own holdings are kept here): ours reports the latter, a range
// this process's other worker is copying, which no claim may take whatever
// its lease row says (its claim may not have committed yet).
func (s *session) tryLock(ctx context.Context, id int) (got, ours bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.held[id] {
		return false, true, nil
	}
	c, err := s.connLocked(ctx)
	if err != nil {
		return false, false, err
	}
	if err := c.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtextextended($1, 0))`, s.lockKey(id)).Scan(&got); err != nil {
		s.broken = true
		return false, false, fmt.Errorf("backfill: %s: lock range %d: %w", s.job, id, err)
	}
	if got {
		s.held[id] = true
	}
	return got, false, nil
}

// unlock lets range id's lock go (the range is done, released or lost).
func (s *session) unlock(ctx context.Context, id int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.held[id] {
		return
	}
	delete(s.held, id)
	if s.conn == nil || s.broken {
		return
	}
	uctx, cancel := detached(ctx)
	defer cancel()
	if _, err := s.conn.Exec(uctx, `SELECT pg_advisory_unlock(hashtextextended($1, 0))`, s.lockKey(id)); err != nil {
		s.broken = true
		s.b.logger.Warn("backfill: unlock range", "job", s.job, "range", id, "err", err)
	}
}

// close ends the session and with it every lock it holds.
func (s *session) close(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		s.closeConn(ctx)
		s.conn = nil
	}
	clear(s.held)
}

// closeConn closes the session's connection, within cleanupTimeout
// whatever ctx's state.
func (s *session) closeConn(ctx context.Context) {
	cctx, cancel := detached(ctx)
	defer cancel()
	_ = s.conn.Close(cctx)
}

// cleanupTimeout bounds what is still done after ctx ended (a rollback,
// an unlock, a lease release): a database that does not answer would
// otherwise hold Run for ever after its ctx. What is not done then is
// done by the session's end (its locks) or the lease's expiry.
const cleanupTimeout = 2 * time.Second

// detached is ctx without its cancellation, bounded by cleanupTimeout.
func detached(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
}

// rollback ends tx, also after ctx ended, within cleanupTimeout.
func rollback(ctx context.Context, tx pgx.Tx) {
	rctx, cancel := detached(ctx)
	defer cancel()
	_ = tx.Rollback(rctx)
}
