#!/usr/bin/env bash
# Makes sure kcat (librdkafka's command-line client, Debian package kcat) is
# installed, then runs the command given. The streams tests read what dimmer
# produced with kcat, an independent client, to check wire compatibility.
# Without kcat those tests skip, except under CI=true where they fail.
set -euo pipefail

say() { echo "dimmer: $*" >&2; }

if ! command -v kcat >/dev/null; then
	if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
		say "installing kcat with apt-get"
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq >/dev/null
		apt-get install -y -qq kcat >/dev/null
	elif [[ ${CI:-} == true ]]; then
		say "kcat is missing: install the Debian package 'kcat'"
		exit 1
	else
		say "kcat is missing (Debian package 'kcat'): the streams tests that use it will skip"
	fi
fi

if [[ $# -gt 0 ]]; then
	exec "$@"
fi
