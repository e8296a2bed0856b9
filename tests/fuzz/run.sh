#!/usr/bin/env bash
# Fuzzes the request checks and rewriting for a bounded time (not run by CI).
#   tests/fuzz/run.sh            # 60 seconds
#   FUZZ_SECONDS=600 tests/fuzz/run.sh
# Needs the nightly toolchain (cargo fuzz builds with sanitizers); installs
# cargo-fuzz if it is missing. Crashes land in tests/fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-60}"
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
mkdir -p corpus/request
# Seeds: a few real request heads.
printf 'GET /api/status HTTP/1.1\r\nHost: localhost:8080\r\n\r\n' > corpus/request/get
printf 'POST /a/%%2e%%2e/b?x=1 HTTP/1.1\r\nHost: evil.example\r\nOrigin: https://evil.example\r\nConnection: close, X-Hop\r\nX-Hop: 1\r\nX-Proxy-Key: k\r\nContent-Length: 0\r\n\r\n' > corpus/request/hostile
printf 'GET http://localhost/x HTTP/1.1\r\nHost: localhost\r\nLocation: https://api.example.com/v1/next\r\n\r\n' > corpus/request/absolute
cargo +nightly fuzz run --fuzz-dir . request corpus/request -- -max_total_time="$seconds" -max_len=4096
