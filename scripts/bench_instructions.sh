#!/usr/bin/env bash
# What metrics and the access log cost a warm tag-manifest GET, in user-space
# instructions counted by callgrind (issue 14, "Speed"): unlike GETs/s, the count hardly
# moves with other load on the machine, so it shows where the cost is and whether a
# change moved it. The throughput ratio itself is measured by scripts/bench.sh.
#
#   bash scripts/bench_instructions.sh     # from the repo root; a few minutes after the build
#
# What it does: builds regcache (release); starts docker-registry as the upstream, seeds
# it with skopeo (bench/small:v1); then for each setting — bare (metrics and access log
# off), metrics only, access log only, both (the default) — runs regcache under
# `valgrind --tool=callgrind` twice: once with no request after the first, once with
# BENCH_INSTR_REQUESTS (default 2000) warm tag-manifest GETs (`ab -k -c4`), and prints
# the difference per request and its ratio to bare.
# Needs: valgrind, ab (apache2-utils), docker-registry, skopeo, curl, python3.
# Knobs (env): BENCH_INSTR_REQUESTS; BENCH_SKIP_BUILD=1 uses target/release/regcache.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
HELPER="$PWD/scripts/bench_helper.py"
REGCACHE_BIN="$PWD/target/release/regcache"
REQUESTS=${BENCH_INSTR_REQUESTS:-2000}
ACCEPT='application/vnd.oci.image.manifest.v1+json'

unset http_proxy https_proxy all_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY RUST_LOG || true
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(REGISTRY|REGCACHE)_' || true)

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}
for tool in valgrind ab docker-registry skopeo curl python3; do
  command -v "$tool" >/dev/null || die "\`$tool\` is not on PATH (apt-get install valgrind apache2-utils ...)"
done

PIDS=()
WORK=$(mktemp -d /tmp/regcache-instr.XXXXXX)
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# wait_for URL PID SECONDS: polls until URL answers (the server may run under valgrind).
wait_for() {
  local url=$1 pid=$2 deadline=$((SECONDS + $3))
  until curl -fsS -o /dev/null --max-time 5 "$url" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || die "the server behind $url exited"
    ((SECONDS < deadline)) || die "no answer from $url"
    sleep 0.1 # polling interval
  done
}

if [[ ${BENCH_SKIP_BUILD:-} != 1 ]]; then
  log "building regcache (release)"
  cargo build --release --quiet
fi

UP_PORT=$(python3 "$HELPER" free-port)
cat >"$WORK/upstream.yml" <<EOF
version: 0.1
storage: {filesystem: {rootdirectory: $WORK/upstream}}
http: {addr: 127.0.0.1:$UP_PORT}
log: {level: error}
EOF
docker-registry serve "$WORK/upstream.yml" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
wait_for "http://127.0.0.1:$UP_PORT/v2/" "${PIDS[-1]}" 30
python3 "$HELPER" seed-layout "$WORK/oci" >/dev/null
skopeo --insecure-policy copy --dest-tls-verify=false --quiet \
  "oci:$WORK/oci:small" "docker://127.0.0.1:$UP_PORT/bench/small:v1"

# count NAME LOG_AND_METRICS_TOML N -> instructions of a run with N requests after the first
count() {
  local name=$1 observe=$2 n=$3 port dir pid out
  dir="$WORK/$name-$n"
  mkdir -p "$dir/data"
  port=$(python3 "$HELPER" free-port)
  cat >"$dir/config.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
data_dir = "$dir/data"

[[upstream]]
name = "origin"
url = "http://127.0.0.1:$UP_PORT"
default = true

$observe
EOF
  out="$dir/callgrind.out"
  valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$REGCACHE_BIN" serve --config "$dir/config.toml" >"$dir/log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_for "http://127.0.0.1:$port/v2/" "$pid" 120
  curl -fsS -o /dev/null -H "Accept: $ACCEPT" "http://127.0.0.1:$port/v2/bench/small/manifests/v1"
  if ((n > 0)); then
    ab -q -k -n "$n" -c 4 -H "Accept: $ACCEPT" \
      "http://127.0.0.1:$port/v2/bench/small/manifests/v1" >"$dir/ab.txt"
    grep -q '^Failed requests: *0$' "$dir/ab.txt" || die "$name: requests failed: $(cat "$dir/ab.txt")"
  fi
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

declare -A PER
SETTINGS=(bare metrics access both)
declare -A OBSERVE=(
  [bare]=$'[log]\nlevel = "warn"\naccess = false\n\n[metrics]\nenabled = false'
  [metrics]=$'[log]\nlevel = "warn"\naccess = false'
  [access]=$'[log]\nlevel = "warn,regcache::access=info"\n\n[metrics]\nenabled = false'
  [both]=$'[log]\nlevel = "warn,regcache::access=info"'
)
for name in "${SETTINGS[@]}"; do
  log "$name: two runs under callgrind"
  idle=$(count "$name" "${OBSERVE[$name]}" 0)
  busy=$(count "$name" "${OBSERVE[$name]}" "$REQUESTS")
  PER[$name]=$(((busy - idle) / REQUESTS))
done

echo
echo "user-space instructions per warm tag-manifest GET (callgrind, $REQUESTS requests, ab -k -c4)"
printf '%-36s %12s %8s\n' "setting" "instr/GET" "vs bare"
for name in "${SETTINGS[@]}"; do
  printf '%-36s %12s %8s\n' "$name" "${PER[$name]}" \
    "$(python3 -c "print('%+.1f%%' % ((${PER[$name]} / ${PER[bare]} - 1) * 100))")"
done
echo "(user space only: the kernel's work — sockets, thread wake-ups, the log file's writes —"
echo " is not counted; scripts/bench.sh measures the whole process's CPU per GET.)"
