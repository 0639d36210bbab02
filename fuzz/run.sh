#!/usr/bin/env bash
# Runs every cargo-fuzz target of this crate for FUZZ_SECONDS (default 60) each, starting from
# the checked-in seeds (fuzz/seeds/TARGET, never modified: new inputs go to a scratch corpus).
# Exits non-zero on the first crash, panic, leak, timeout or allocation-bound violation; the
# failing input is left in fuzz/artifacts/TARGET/ (reproduce: cargo fuzz run TARGET FILE).
#
# Needs cargo-fuzz (installed here if missing) and libFuzzer's sanitizer flags; on a stable
# toolchain RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass them (see /work/shared/testbed-notes.md).
set -euo pipefail
cd "$(dirname "$0")"

secs=${FUZZ_SECONDS:-60}
case "$secs" in
'' | *[!0-9]*)
	echo "fuzz/run.sh: FUZZ_SECONDS must be a whole number of seconds, got '$secs'" >&2
	exit 2
	;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "fuzz/run.sh: installing cargo-fuzz" >&2
	cargo install cargo-fuzz --locked || cargo install cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

targets=$(cargo fuzz list)
cargo fuzz build
for t in $targets; do
	mkdir -p "$scratch/$t"
	echo "fuzz/run.sh: $t for ${secs}s" >&2
	if ! cargo fuzz run "$t" "$scratch/$t" "seeds/$t" -- \
		-max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1; then
		echo "fuzz/run.sh: $t FAILED; input in fuzz/artifacts/$t/ (cargo fuzz fmt $t FILE shows it)" >&2
		exit 1
	fi
done
echo "fuzz/run.sh: all targets ran ${secs}s without a finding" >&2
