#!/usr/bin/env bash
# Runs a command with a headless-capable Chromium on the PATH for the
# console's browser tests (module ./console/browsertest), installing the
# Debian package chromium with apt-get when running as root. DIMMER_CHROMIUM
# is exported with the binary's path. Without a browser the command still
# runs (the browser tests skip), except under CI=true, where it fails.
set -euo pipefail

say() { echo "dimmer: $*" >&2; }

find_chromium() {
	local c
	for c in "${DIMMER_CHROMIUM:-}" chromium chromium-browser google-chrome; do
		[[ -n $c ]] && command -v "$c" >/dev/null && { command -v "$c"; return; }
	done
}

bin=$(find_chromium || true)
if [[ -z $bin && $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
	say "installing chromium with apt-get"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null
	apt-get install -y -qq chromium >/dev/null
	bin=$(find_chromium || true)
fi
if [[ -z $bin ]]; then
	if [[ ${CI:-} == true ]]; then
		say "chromium is missing and could not be installed (CI=true makes this a failure): install the Debian package 'chromium'"
		exit 1
	fi
	say "chromium is missing: the console's browser tests will skip (install the Debian package 'chromium')"
else
	export DIMMER_CHROMIUM=$bin
fi
exec "$@"
