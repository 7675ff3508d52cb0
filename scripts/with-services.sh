#!/usr/bin/env bash
# Runs a command with PostgreSQL and Redis reachable at DIMMER_POSTGRES_URL and
# DIMMER_REDIS_URL. Servers that already answer are used as they are; otherwise
# throwaway servers are started from the installed binaries in a temporary
# directory on free ports (installing postgresql/redis-server with apt-get when
# running as root) and stopped when the command ends.
set -euo pipefail

: "${DIMMER_POSTGRES_URL:=postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}"
: "${DIMMER_REDIS_URL:=redis://127.0.0.1:6379/0}"

say() { echo "dimmer: $*" >&2; }

# host_port URL DEFAULT_PORT prints "host port" for a postgres:// or redis:// URL.
host_port() {
	local rest=${1#*://}
	rest=${rest#*@}
	rest=${rest%%[/?]*}
	local host=${rest%%:*} port=$2
	[[ $rest == *:* ]] && port=${rest##*:}
	[[ -z $host ]] && host=127.0.0.1
	echo "$host $port"
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

apt_install() {
	if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
		say "$1 is not running and its binaries are missing: install the Debian package(s) '$2' (or set $3 to a running server)"
		exit 1
	fi
	say "installing $2 with apt-get"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null
	# shellcheck disable=SC2086
	apt-get install -y -qq $2 >/dev/null
}

TMP_ROOT=""
PG_DATA=""
PG_CTL=""
PG_USER=""
REDIS_PIDFILE=""
cleanup() {
	local rc=$?
	if [[ -n $PG_DATA ]]; then
		run_as_pg "$PG_CTL" -D "$PG_DATA" -m immediate stop >/dev/null 2>&1 || true
	fi
	if [[ -n $REDIS_PIDFILE && -f $REDIS_PIDFILE ]]; then
		kill "$(cat "$REDIS_PIDFILE")" 2>/dev/null || true
	fi
	[[ -n $TMP_ROOT ]] && rm -rf "$TMP_ROOT"
	exit $rc
}
trap cleanup EXIT INT TERM

tmp_root() {
	if [[ -z $TMP_ROOT ]]; then
		TMP_ROOT=$(mktemp -d /tmp/dimmer-services.XXXXXX)
		chmod 755 "$TMP_ROOT"
	fi
}

run_as_pg() {
	if [[ -n $PG_USER ]]; then
		runuser -u "$PG_USER" -- "$@"
	else
		"$@"
	fi
}

find_pg_bin() {
	local d
	for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
		[[ -x $d/initdb && -x $d/pg_ctl ]] && { echo "$d"; return; }
	done
	if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
		dirname "$(command -v pg_ctl)"
	fi
}

start_postgres() {
	local bin
	bin=$(find_pg_bin)
	if [[ -z $bin ]]; then
		apt_install PostgreSQL postgresql DIMMER_POSTGRES_URL
		bin=$(find_pg_bin)
		[[ -n $bin ]] || { say "postgresql installed but initdb/pg_ctl not found"; exit 1; }
	fi
	tmp_root
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
	run_as_pg "$PG_CTL" -D "$PG_DATA" -l "$PG_DATA/server.log" -w -t 60 \
		-o "-p $port -k $PG_DATA -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400" \
		start >/dev/null || { cat "$PG_DATA/server.log" >&2; say "postgres failed to start"; exit 1; }
	DIMMER_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres?sslmode=disable"
	say "started a throwaway PostgreSQL on 127.0.0.1:$port"
}

start_redis() {
	if ! command -v redis-server >/dev/null; then
		apt_install Redis redis-server DIMMER_REDIS_URL
	fi
	tmp_root
	local port
	port=$(free_port)
	mkdir -p "$TMP_ROOT/redis"
	REDIS_PIDFILE=$TMP_ROOT/redis/redis.pid
	redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
		--daemonize yes --pidfile "$REDIS_PIDFILE" --dir "$TMP_ROOT/redis" \
		--logfile "$TMP_ROOT/redis/redis.log" >/dev/null
	for _ in $(seq 1 100); do
		answers 127.0.0.1 "$port" && break
		sleep 0.1
	done
	answers 127.0.0.1 "$port" || { say "redis-server failed to start"; exit 1; }
	DIMMER_REDIS_URL="redis://127.0.0.1:$port/0"
	say "started a throwaway Redis on 127.0.0.1:$port"
}

read -r pg_host pg_port <<<"$(host_port "$DIMMER_POSTGRES_URL" 5432)"
answers "$pg_host" "$pg_port" || start_postgres
read -r redis_host redis_port <<<"$(host_port "$DIMMER_REDIS_URL" 6379)"
answers "$redis_host" "$redis_port" || start_redis

export DIMMER_POSTGRES_URL DIMMER_REDIS_URL
"$@"
