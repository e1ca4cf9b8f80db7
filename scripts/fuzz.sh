#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ and runs each for SECONDS (default 60), one after another,
# one process each. Prints executions, coverage and corpus size per target; exits non-zero if
# any target crashed or broke an invariant, leaving the reproducer under fuzz/artifacts/TARGET/
# (replay it with `cargo fuzz run -s none TARGET FILE`).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# libFuzzer on stable Rust: cargo-fuzz with `-s none` passes only stable rustc flags (no
# sanitizer, which would need nightly); debug assertions and overflow checks stay on. The
# corpus each run grows goes to fuzz/corpus/TARGET (not committed); fuzz/seeds/TARGET is the
# committed seed corpus, read but never written.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --version 0.13.2 --locked
fi

cd fuzz
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
# FUZZ_CODEGEN_UNITS: 16 builds faster (for a short run, as CI's), 1 runs faster (the default).
build=(-s none --codegen-units "${FUZZ_CODEGEN_UNITS:-1}")
if [ ${#targets[@]} -eq 1 ]; then cargo fuzz build "${build[@]}" "${targets[0]}"; else cargo fuzz build "${build[@]}"; fi

# Per target: the longest input (files and certificates need more than the default 4 KiB).
max_len() {
    case $1 in
        tls_files) echo 16384 ;;
        h1_chunked) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

failed=()
summary=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target" "seeds/$target"
    log="artifacts/$target/run.log"
    dict=()
    [ -f "dict/$target.dict" ] && dict=("-dict=dict/$target.dict")
    echo "== $target: ${seconds}s" >&2
    status=0
    cargo fuzz run "${build[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$target")" -timeout=10 -rss_limit_mb=4096 \
        -print_final_stats=1 "${dict[@]}" >"$log" 2>&1 || status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    # The last status line libFuzzer printed: "#N ... cov: C ft: F corp: N/SIZE ...".
    last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$last")
    line=$(printf '%-18s execs %-10s cov %-6s ft %-6s corpus %s' "$target" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        line="$line  FAILED (exit $status)"
        grep -E 'panicked at|Test unit written to|SUMMARY|ERROR' "$log" | head -n 8 >&2 || true
    fi
    echo "$line" >&2
    summary+=("$line")
done

echo >&2
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found a problem in: ${failed[*]} (logs and reproducers under fuzz/artifacts/)" >&2
    exit 1
fi
