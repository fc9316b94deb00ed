#!/usr/bin/env bash
# TLS benchmark for regcache (issue 13, "Speed"): a warm 64 MiB blob GET over HTTPS from
# regcache against nginx serving the same file over HTTPS (same certificate, TLS 1.2/1.3,
# one worker), in one run; target >= 0.7x nginx. scripts/bench_tls.py does the work.
#
#   bash scripts/bench_tls.sh     # from the repo root
#
# Knobs (env): BENCH_SKIP_BUILD=1 uses the existing target/release/regcache;
# BENCH_TLS_ROUNDS (default 6) x BENCH_TLS_PER_ROUND (default 5) measured GETs per server.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
unset http_proxy https_proxy all_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY RUST_LOG || true
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(REGISTRY|REGCACHE)_' || true)
for tool in cargo docker-registry skopeo curl nginx openssl python3; do
  command -v "$tool" >/dev/null || { echo "\`$tool\` is not on PATH (see .ci/run)" >&2; exit 1; }
done
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
  cargo build --release --quiet
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/regcache-tls.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "regcache TLS benchmark — $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo '+dirty'), $(nproc) cores, loopback, MB = 10^6 bytes"
python3 "$REPO/scripts/bench_tls.py" "$WORK" "$REPO/target/release/regcache"
echo "load average before / after: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg)"
