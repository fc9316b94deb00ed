#!/usr/bin/env bash
# Pressure benchmark for regcache (issue 11, point 3): clients that hold connections.
#
#   bash scripts/bench_pressure.sh      # from the repo root; about 3 minutes after the build
#
# With 1 500 clients stalled mid-download of a 64 MiB blob, then 2 000 slow-header
# connections, then 3 000 idle keep-alive ones (each phase's connections held through the
# later phases), a fresh client's `GET /v2/`, tag-manifest GET and blob HEAD must each
# answer in under 1 s throughout, and the slow-header connections must be closed by the
# server within `server.header_timeout` (30 s, the default). The same load is put on the
# CNCF registry in proxy mode (docker-registry with `proxy.remoteurl`, as scripts/bench.sh
# starts it) in the same run, after regcache, on the same upstream. scripts/bench_pressure.py
# does the work and prints max and p99 latency per phase, failed probes, the server's open
# file descriptors and RSS, and when the slow-header connections were closed.
#
# Exit status: 0 whether targets are met or not (this is a report); non-zero only when
# something broke. Knobs (env): BENCH_SKIP_BUILD=1 uses the existing
# target/release/regcache; BENCH_KEEP=1 keeps the work dir; BENCH_STALLED, BENCH_SLOW_HEADER,
# BENCH_IDLE (connection counts); BENCH_HOLD_SECS (default 15, how long a phase holds).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
# regcache's default; the script checks the slow-header connections against it.
HEADER_TIMEOUT_SECS=30

unset http_proxy https_proxy all_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY RUST_LOG || true
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(REGISTRY|REGCACHE)_' || true)

log() { printf '[pressure %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
for tool in cargo docker-registry skopeo curl python3; do
  command -v "$tool" >/dev/null || { log "\`$tool\` is not on PATH (see .ci/run)"; exit 1; }
done

# 6 500 held connections plus probes on the client side: raise the soft open-file limit
# to the hard one (servers raise their own: regcache at start-up, Go by default).
ulimit -n "$(ulimit -Hn)"
log "open-file limit $(ulimit -n)"

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
  log "cargo build --release"
  cargo build --release --quiet
fi
BIN="$REPO/target/release/regcache"
[[ -x $BIN ]] || { log "$BIN missing"; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/regcache-pressure.XXXXXX")
cleanup() {
  local rc=$?
  if [[ ${BENCH_KEEP:-0} == 1 || $rc -ne 0 ]]; then
    rm -rf "$WORK/oci" "$WORK"/*/storage "$WORK/regcache/data"
    log "work dir kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "regcache pressure benchmark — $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo '+dirty'), $(nproc) cores, loopback"
python3 "$REPO/scripts/bench_pressure.py" "$WORK" "$BIN" "$HEADER_TIMEOUT_SECS"
echo "load average before / after: $LOAD_BEFORE / $(cut -d' ' -f1-3 /proc/loadavg)"
