#!/usr/bin/env bash
# fuzz.sh - run hearth's fuzz targets (fuzz/, cargo-fuzz + libFuzzer) for a while each.
#
#   resources/fuzz.sh [SECONDS_PER_TARGET [TARGET...]]
#
# SECONDS_PER_TARGET defaults to 60; TARGETs default to every target in fuzz/Cargo.toml
# (`cargo fuzz list`). Needs nightly Rust (`cargo +nightly`); installs cargo-fuzz with
# `cargo install cargo-fuzz --locked` when it is missing (a few minutes).
#
# For each target it copies the committed seeds fuzz/seeds/<target>/ into the working
# corpus fuzz/corpus/<target>/ (git-ignored; libFuzzer adds what it finds there, and later
# runs start from it), runs `cargo +nightly fuzz run <target> corpus/<target> --
# -max_total_time=N` (AddressSanitizer, debug assertions and overflow checks on), and
# prints the number of executions and whether it crashed. Each run's full libFuzzer output
# is in fuzz/logs/<target>.log; crashing inputs go to fuzz/artifacts/<target>/ and are
# replayed with `cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>` (from
# fuzz/).
#
# Exit status: 0 when no target crashed (panic, sanitizer report, leak, timeout, OOM);
# 1 when one did; 2 for usage errors. Build output goes to fuzz/target, never the main
# target directory. FUZZ_VERBOSE=1 also shows libFuzzer's output as it runs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET [TARGET...]]" >&2
    exit 2
fi
shift $(($# > 0 ? 1 : 0))

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: installing the nightly toolchain" >&2
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (a few minutes)" >&2
    cargo install cargo-fuzz --locked
fi

if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

echo "fuzz: building ${targets[*]}" >&2
for target in "${targets[@]}"; do
    cargo +nightly fuzz build "$target"
done

mkdir -p logs
declare -A runs result
failed=0
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    if [[ -d seeds/$target ]]; then
        cp -n seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
    fi
    log="logs/$target.log"
    echo "fuzz: $target for ${seconds}s ($(find "corpus/$target" -type f | wc -l) inputs in corpus/$target)" >&2
    status=0
    # -timeout: an input running for 10 s is a hang worth reporting.
    args=(-max_total_time="$seconds" -timeout=10 -print_final_stats=1)
    if [[ ${FUZZ_VERBOSE:-0} == 1 ]]; then
        cargo +nightly fuzz run "$target" "corpus/$target" -- "${args[@]}" 2>&1 |
            tee "$log" || status=$?
    else
        cargo +nightly fuzz run "$target" "corpus/$target" -- "${args[@]}" >"$log" 2>&1 ||
            status=$?
    fi
    # libFuzzer ends a clean run with "Done N runs in T second(s)"; stat::number_of_executed_units
    # (from -print_final_stats) is there on crashes too.
    count=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n1)
    if [[ -z $count ]]; then
        count=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n1)
    fi
    runs[$target]=${count:-?}
    crash_files=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log")
    if ((status != 0)) || [[ -n $crash_files ]] || grep -q '^==[0-9]*==ERROR' "$log"; then
        failed=1
        result[$target]="CRASH (exit $status) ${crash_files:-see $log}"
        echo "fuzz: $target FAILED; the end of $log:" >&2
        tail -n 40 "$log" >&2
    else
        result[$target]="no crashes"
    fi
done

echo
printf '%-26s %14s  %s\n' target executions result
for target in "${targets[@]}"; do
    printf '%-26s %14s  %s\n' "$target" "${runs[$target]}" "${result[$target]}"
done
exit "$failed"
