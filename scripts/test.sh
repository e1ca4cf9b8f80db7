#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests that start the real binary between real
# clients (rustls, curl, openssl s_client) and a real upstream. This is what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo test --locked --all-targets "$@"
