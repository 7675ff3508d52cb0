#!/usr/bin/env bash
# Runs every benchmark of every module given, then prints one BENCH line per
# goal (written by internal/benchgoal) with its verdict.
set -euo pipefail
root=$(pwd)
out=$(mktemp /tmp/dimmer-bench.XXXXXX)
trap 'rm -f "$out"' EXIT
export DIMMER_BENCH_GOALS=$out
for m in "$@"; do
	echo "== $m: go test -bench"
	(cd "$m" && go test -run '^$' -bench . -benchtime "${BENCHTIME:-1x}" -timeout 30m ./...)
done
echo
go run "$root/internal/cmd/benchreport" "$out"
