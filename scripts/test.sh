#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests that start the real binary between real
# clients (rustls, curl, openssl s_client) and a real upstream, after the formatting and lint
# checks. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
# rustfmt and clippy come with the toolchain here; a toolchain component cannot be fetched
# where they are missing, so they are skipped then, loudly.
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --check; else echo "rustfmt not installed: format check skipped" >&2; fi
if cargo clippy --version >/dev/null 2>&1; then
    cargo clippy --locked --all-targets -- -D warnings
else
    echo "clippy not installed: lint check skipped" >&2
fi
cargo test --locked --all-targets "$@"
# A fuzzing smoke run: every target in fuzz/ builds, replays its seeds and fuzzes for a few
# seconds; a crash or a broken invariant fails like a test (README.md, Fuzzing).
scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
