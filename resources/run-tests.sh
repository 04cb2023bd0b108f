#!/usr/bin/env bash
# run-tests.sh - the project's test command: make sure the guest artifacts exist (cached
# builds, see resources/README.md), then run every test tier with cargo:
#   unit tests (no KVM), tiny-guest tests (KVM, seconds), Linux guest tests (minutes).
# Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

HEARTH_GUEST_KERNEL=$(resources/build-guest-kernel.sh | tail -n1)
HEARTH_STOCK_KERNEL=$(resources/fetch-stock-kernel.sh | tail -n1)
export HEARTH_GUEST_KERNEL HEARTH_STOCK_KERNEL
echo "run-tests: minimal kernel $HEARTH_GUEST_KERNEL" >&2
echo "run-tests: stock kernel   $HEARTH_STOCK_KERNEL" >&2

cargo test --all-targets "$@"
