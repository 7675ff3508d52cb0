#!/usr/bin/env bash
# Runs a command with a PostgreSQL whose wal_level is logical reachable at
# DIMMER_LOGICAL_POSTGRES_URL, for change data capture (package cdc). The
# server at DIMMER_POSTGRES_URL is used when its wal_level is already
# logical and it has replication slots to spare; otherwise a throwaway
# server is started with wal_level=logical from the installed binaries (the
# way scripts/with-services.sh starts its throwaway servers) and stopped
# when the command ends. Either way the script says which one it uses.
set -euo pipefail

: "${DIMMER_POSTGRES_URL:=postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}"

say() { echo "dimmer: $*" >&2; }

find_pg_bin() {
	local d
	for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
		[[ -x $d/initdb && -x $d/pg_ctl ]] && { echo "$d"; return; }
	done
	if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
		dirname "$(command -v pg_ctl)"
	fi
}

answers() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

free_port() {
	local p
	for _ in $(seq 1 50); do
		p=$((20000 + RANDOM % 30000))
		answers 127.0.0.1 "$p" || { echo "$p"; return; }
	done
	say "no free port found"; exit 1
}

# psql_bin prints a psql to query with (the server's own, when psql is not
# on the PATH).
psql_bin() {
	if command -v psql >/dev/null; then
		command -v psql
		return
	fi
	local bin
	bin=$(find_pg_bin)
	[[ -n $bin && -x $bin/psql ]] && echo "$bin/psql"
}

# logical_ready URL succeeds when the server at URL has wal_level=logical and
# a replication slot and WAL sender to spare.
logical_ready() {
	local psql out
	psql=$(psql_bin) || return 1
	[[ -n $psql ]] || return 1
	out=$(PGCONNECT_TIMEOUT=3 "$psql" "$1" -XAtqc \
		"SELECT current_setting('wal_level') = 'logical'
		    AND current_setting('max_replication_slots')::int > (SELECT count(*) FROM pg_replication_slots)
		    AND current_setting('max_wal_senders')::int > 0" 2>/dev/null) || return 1
	[[ $out == t ]]
}

# redact prints URL without its password.
redact() { sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#' <<<"$1"; }

PG_DATA=""
PG_CTL=""
PG_USER=""
TMP_ROOT=""
cleanup() {
	local rc=$?
	if [[ -n $PG_DATA ]]; then
		run_as_pg "$PG_CTL" -D "$PG_DATA" -m immediate stop >/dev/null 2>&1 || true
	fi
	[[ -n $TMP_ROOT ]] && rm -rf "$TMP_ROOT"
	exit $rc
}
trap cleanup EXIT INT TERM

run_as_pg() {
	if [[ -n $PG_USER ]]; then
		runuser -u "$PG_USER" -- "$@"
	else
		"$@"
	fi
}

start_logical_postgres() {
	local bin
	bin=$(find_pg_bin)
	if [[ -z $bin ]]; then
		say "no PostgreSQL binaries (initdb, pg_ctl) to start a server with wal_level=logical: install the Debian package 'postgresql' or set DIMMER_LOGICAL_POSTGRES_URL"
		exit 1
	fi
	TMP_ROOT=$(mktemp -d /tmp/dimmer-logical-pg.XXXXXX)
	chmod 755 "$TMP_ROOT"
	PG_CTL=$bin/pg_ctl
	PG_DATA=$TMP_ROOT/pg
	mkdir -p "$PG_DATA"
	if [[ $(id -u) -eq 0 ]]; then
		# initdb refuses to run as root.
		PG_USER=postgres
		id -u "$PG_USER" >/dev/null 2>&1 || useradd --system --no-create-home "$PG_USER"
		chown "$PG_USER" "$PG_DATA"
	fi
	local port
	port=$(free_port)
	run_as_pg "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 >"$TMP_ROOT/initdb.log" 2>&1 ||
		{ cat "$TMP_ROOT/initdb.log" >&2; say "initdb failed"; exit 1; }
	# synchronous_commit stays on: a WAL sender only sends flushed WAL, and
	# with asynchronous commit a change would wait for the WAL writer (up to
	# wal_writer_delay) before any slot could see it. fsync=off keeps the
	# flush itself cheap.
	run_as_pg "$PG_CTL" -D "$PG_DATA" -l "$PG_DATA/server.log" -w -t 60 \
		-o "-p $port -k $PG_DATA -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=300 -c wal_level=logical -c max_replication_slots=100 -c max_wal_senders=100" \
		start >/dev/null || { cat "$PG_DATA/server.log" >&2; say "postgres (wal_level=logical) failed to start"; exit 1; }
	DIMMER_LOGICAL_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable"
	say "started a throwaway PostgreSQL with wal_level=logical on 127.0.0.1:$port for change data capture"
}

if [[ -n ${DIMMER_LOGICAL_POSTGRES_URL:-} ]]; then
	say "change data capture uses DIMMER_LOGICAL_POSTGRES_URL ($(redact "$DIMMER_LOGICAL_POSTGRES_URL")) as given"
elif logical_ready "$DIMMER_POSTGRES_URL"; then
	DIMMER_LOGICAL_POSTGRES_URL=$DIMMER_POSTGRES_URL
	say "change data capture uses the server at DIMMER_POSTGRES_URL ($(redact "$DIMMER_POSTGRES_URL")): its wal_level is logical"
else
	say "the server at DIMMER_POSTGRES_URL ($(redact "$DIMMER_POSTGRES_URL")) does not have wal_level=logical (or no free replication slot)"
	start_logical_postgres
fi

export DIMMER_LOGICAL_POSTGRES_URL
"$@"
