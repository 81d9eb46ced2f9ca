#!/usr/bin/env bash
# Runs the loom models (DESIGN §2.1: the lock and queue invariants) and checks
# that every model really ran: a build without `--cfg loom` compiles the
# `#![cfg(loom)]` test files to nothing and "passes" with 0 tests.
#
# Usage: loom-tests/run.sh   (from anywhere; called by .ci/run)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

# Every `#[test]` function in tests/*.rs is one model that must pass.
expected=$(awk '
    /^[[:space:]]*#\[test\]/ { pending = 1; next }
    pending && /^[[:space:]]*(pub[[:space:]]+)?fn[[:space:]]/ { count++; pending = 0; next }
    pending && /^[[:space:]]*(#|\/\/)/ { next }
    pending { pending = 0 }
    END { print count + 0 }
' tests/*.rs)
if [ "$expected" -eq 0 ]; then
    echo "loom-tests: found no #[test] functions in tests/*.rs" >&2
    exit 1
fi

log=$(mktemp "${TMPDIR:-/tmp}/epochflight-loom.XXXXXX")
trap 'rm -f "$log"' EXIT

export RUSTFLAGS="--cfg loom"
export LOOM_MAX_PREEMPTIONS=3
echo "loom-tests: RUSTFLAGS=\"$RUSTFLAGS\" LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS cargo test --release"
start=$SECONDS
status=0
cargo test --release -- --nocapture 2>&1 | tee "$log" || status=$?
elapsed=$((SECONDS - start))

passed=$(sed -n 's/^test result: .* \([0-9][0-9]*\) passed;.*/\1/p' "$log" |
    awk '{ sum += $1 } END { print sum + 0 }')

echo "loom-tests: $passed of $expected models passed in ${elapsed}s"
if [ "$status" -ne 0 ]; then
    echo "loom-tests: cargo test failed (exit $status)" >&2
    exit "$status"
fi
if [ "$passed" -lt "$expected" ]; then
    echo "loom-tests: only $passed models passed, expected $expected (did a model not run?)" >&2
    exit 1
fi
