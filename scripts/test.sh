#!/usr/bin/env bash
# go vet and go test -race for every module given.
set -euo pipefail
: "${TEST_TIMEOUT:=12m}"
for m in "$@"; do
	echo "== $m: go vet"
	(cd "$m" && go vet ./...)
done
for m in "$@"; do
	echo "== $m: go test -race"
	(cd "$m" && go test -race -count=1 -timeout "$TEST_TIMEOUT" ./...)
done
