#!/usr/bin/env bash
# Speed benchmark for regcache (issue 2, "Speed"): regcache side by side with the CNCF
# registry in proxy mode (the "peer") and nginx, in one run, printed as a table of figures
# and ratios against the targets.
#
#   bash scripts/bench.sh            # from the repo root; about one minute after the build
#
# What it does: builds regcache (release); starts docker-registry as the UPSTREAM and seeds
# it with skopeo (bench/big:v1 with one 64 MiB random layer, bench/small:v1 tiny); starts a
# fresh PEER (docker-registry with `proxy.remoteurl` = upstream) and REGCACHE on the
# upstream; then measures
#   - 20 concurrent cold GETs of the 64 MiB blob: upstream GETs/bytes (from the upstream's
#     access log) for regcache and for the peer, every body's sha256, regcache's peak RSS;
#   - warm blob GET MB/s for regcache, the peer and nginx (sendfile, same file), measured
#     the same way: one curl process, sequential GETs on one keep-alive connection;
#   - warm tag-manifest GETs/s with wrk -t2 -c32 -d10s for regcache and the peer, plus the
#     upstream requests each run caused (regcache shares one in-flight HEAD per tag);
#   - the miss path's speed: one client GETs a fresh (cold) 64 MiB blob straight from the
#     upstream docker-registry, through regcache and through the peer, in rotating order,
#     BENCH_COLD_ROUNDS times with a new blob each round; medians and ratios to direct.
#   - the cost of metrics and the access log (issue 14): regcache as above (metrics on,
#     one access-log line per request written to its log file) against a second regcache
#     with both off ("bare"), warm blob MB/s and tag-manifest GETs/s, in alternating runs.
# Exit status: 0 whether targets are met or not (this is a report); non-zero only when
# something broke (a server did not start, a body had the wrong digest, requests failed).
#
# Knobs (env): BENCH_KEEP=1 keeps the work dir; BENCH_WARM_ROUNDS (default 4) x
# BENCH_WARM_PER_ROUND (default 5) measured warm blob GETs per server; BENCH_WRK_SECS
# (default 10); BENCH_COLD_ROUNDS (default 7) single cold GETs per server;
# BENCH_OBS_ROUNDS (default 5) alternating wrk runs of BENCH_OBS_SECS
# (default 4) per instrumentation setting (on a busy machine, many short runs: 15 x 3);
# BENCH_OBS_BLOB_ROUNDS (default 12) interleaved rounds of warm blob GETs for the same
# comparison (a 64 MiB GET takes ~16 ms: single rounds swing by 10%);
# BENCH_SKIP_BUILD=1 uses the existing target/release/regcache.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
HELPER="$REPO/scripts/bench_helper.py"

WARM_ROUNDS=${BENCH_WARM_ROUNDS:-4}
WARM_PER_ROUND=${BENCH_WARM_PER_ROUND:-5}
WARM_RUNS=$((WARM_ROUNDS * WARM_PER_ROUND))
WRK_SECS=${BENCH_WRK_SECS:-10}
OBS_ROUNDS=${BENCH_OBS_ROUNDS:-5}
OBS_BLOB_ROUNDS=${BENCH_OBS_BLOB_ROUNDS:-12}
OBS_BLOB_RUNS=$((OBS_BLOB_ROUNDS * WARM_PER_ROUND))
OBS_SECS=${BENCH_OBS_SECS:-4}
COLD_CLIENTS=20
COLD_ROUNDS=${BENCH_COLD_ROUNDS:-7}
STARTUP_DEADLINE_SECS=30
START_ATTEMPTS=3
MANIFEST_ACCEPT='application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json'

# Loopback only: no proxies; the servers read these prefixes as config overrides.
unset http_proxy https_proxy all_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY RUST_LOG || true
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(REGISTRY|REGCACHE)_' || true)

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}

for tool in cargo docker-registry skopeo wrk nginx curl python3; do
  command -v "$tool" >/dev/null || die "\`$tool\` is not on PATH (see .ci/run for how to install it)"
done

# ----- processes we start, ended by PID on exit -----------------------------------------
PIDS=()
WORK=""
cleanup() {
  local rc=$?
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n $WORK && -d $WORK ]]; then
    if [[ ${BENCH_KEEP:-0} == 1 || $rc -ne 0 ]]; then
      rm -rf "$WORK"/cold-*/body-* # up to 20 x 64 MiB; the logs are what a failure needs
      log "work dir kept: $WORK"
    else
      rm -rf "$WORK"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

forget_pid() { # removes $1 from PIDS after it was ended and reaped
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  forget_pid "$1"
}

# ----- build ------------------------------------------------------------------------------
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
  log "cargo build --release"
  cargo build --release --quiet || die "cargo build --release"
fi
REGCACHE_BIN="$REPO/target/release/regcache"
[[ -x $REGCACHE_BIN ]] || die "$REGCACHE_BIN missing"

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/regcache-bench.XXXXXX")
log "work dir $WORK"

# ----- starting servers ---------------------------------------------------------------
# alive PID: running and not a zombie (`kill -0` succeeds on an exited, unreaped child).
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# wait_ready URL PID LOG: polls GET URL until 2xx; fails if PID exits or the deadline passes.
# Returns 2 when the server died of a port clash (the caller retries on another port).
wait_ready() {
  local url=$1 pid=$2 logfile=$3
  local deadline=$((SECONDS + STARTUP_DEADLINE_SECS))
  while ! curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
    if ! alive "$pid"; then
      wait "$pid" 2>/dev/null || true
      forget_pid "$pid"
      if grep -qi 'address already in use' "$logfile"; then return 2; fi
      log "server exited before answering $url; log $logfile:"
      tail -n 30 "$logfile" >&2
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "no answer from $url within ${STARTUP_DEADLINE_SECS}s; log $logfile:"
      tail -n 30 "$logfile" >&2
      return 1
    fi
    sleep 0.02 # polling interval, not a wait for readiness
  done
}

# start_registry NAME [REMOTE_URL] -> sets REG_PORT, REG_PID, REG_LOG, REG_DIR
start_registry() {
  local name=$1 remote=${2:-} attempt rc
  REG_DIR="$WORK/$name"
  mkdir -p "$REG_DIR/storage"
  REG_LOG="$REG_DIR/log"
  for ((attempt = 1; attempt <= START_ATTEMPTS; attempt++)); do
    REG_PORT=$(python3 "$HELPER" free-port)
    # Access log on for the upstream only: its lines are what we count. The peer logs
    # nothing per request, like regcache at level warn.
    cat >"$REG_DIR/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: $([[ -z $remote ]] && echo false || echo true)
storage:
  filesystem:
    rootdirectory: $REG_DIR/storage
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$REG_PORT
  secret: regcache-bench-not-a-secret
$([[ -n $remote ]] && printf 'proxy:\n  remoteurl: %s\n' "$remote")
EOF
    docker-registry serve "$REG_DIR/config.yml" >"$REG_LOG" 2>&1 </dev/null &
    REG_PID=$!
    PIDS+=("$REG_PID")
    rc=0
    wait_ready "http://127.0.0.1:$REG_PORT/v2/" "$REG_PID" "$REG_LOG" || rc=$?
    case $rc in
      0) return 0 ;;
      2) log "$name: port $REG_PORT taken, retrying" ;;
      *) die "docker-registry ($name) did not start" ;;
    esac
  done
  die "docker-registry ($name) found no free port"
}

# start_regcache [NAME [LOG_AND_METRICS_TOML]] -> sets RC_PORT, RC_PID, RC_LOG, RC_DIR.
# Default: metrics on (the default) and the access log written at info to the log file.
start_regcache() {
  local attempt rc name=${1:-regcache}
  local observe=${2:-$'[log]\nlevel = "warn,regcache::access=info"'}
  RC_DIR="$WORK/$name"
  mkdir -p "$RC_DIR/data"
  RC_LOG="$RC_DIR/log"
  for ((attempt = 1; attempt <= START_ATTEMPTS; attempt++)); do
    RC_PORT=$(python3 "$HELPER" free-port)
    cat >"$RC_DIR/config.toml" <<EOF
[server]
listen = "127.0.0.1:$RC_PORT"
data_dir = "$RC_DIR/data"

# Not "bench": regcache routes /v2/<upstream-name>/<repo>/... by that prefix, so an
# upstream named like the repos' namespace would swallow it (bench/big -> big).
[[upstream]]
name = "origin"
url = "http://127.0.0.1:$UP_PORT"
default = true

$observe
EOF
    "$REGCACHE_BIN" serve --config "$RC_DIR/config.toml" >"$RC_LOG" 2>&1 </dev/null &
    RC_PID=$!
    PIDS+=("$RC_PID")
    rc=0
    wait_ready "http://127.0.0.1:$RC_PORT/v2/" "$RC_PID" "$RC_LOG" || rc=$?
    case $rc in
      0) return 0 ;;
      2) log "regcache: port $RC_PORT taken, retrying" ;;
      *) die "regcache did not start" ;;
    esac
  done
  die "regcache found no free port"
}

start_nginx() {
  local attempt rc
  NG_DIR="$WORK/nginx"
  mkdir -p "$NG_DIR/tmp"
  NG_LOG="$NG_DIR/error.log"
  for ((attempt = 1; attempt <= START_ATTEMPTS; attempt++)); do
    NG_PORT=$(python3 "$HELPER" free-port)
    cat >"$NG_DIR/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
$([[ $(id -u) == 0 ]] && echo "user root;")
pid $NG_DIR/nginx.pid;
error_log $NG_LOG warn;
events { worker_connections 256; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  client_body_temp_path $NG_DIR/tmp/body;
  proxy_temp_path $NG_DIR/tmp/proxy;
  fastcgi_temp_path $NG_DIR/tmp/fastcgi;
  uwsgi_temp_path $NG_DIR/tmp/uwsgi;
  scgi_temp_path $NG_DIR/tmp/scgi;
  default_type application/octet-stream;
  server {
    listen 127.0.0.1:$NG_PORT;
    root $OCI_DIR;
  }
}
EOF
    # master_process off: the PID we hold is the one serving, so ending it ends nginx.
    nginx -p "$NG_DIR" -e "$NG_LOG" -c "$NG_DIR/nginx.conf" >"$NG_DIR/stdout" 2>&1 </dev/null &
    NG_PID=$!
    PIDS+=("$NG_PID")
    rc=0
    wait_ready "http://127.0.0.1:$NG_PORT/oci-layout" "$NG_PID" "$NG_LOG" || rc=$?
    case $rc in
      0) return 0 ;;
      2) log "nginx: port $NG_PORT taken, retrying" ;;
      *) die "nginx did not start" ;;
    esac
  done
  die "nginx found no free port"
}

# ----- measuring helpers ----------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # utime+stime of PID in clock ticks
  local stat
  stat=$(<"/proc/$1/stat")
  stat=${stat##*) }
  # shellcheck disable=SC2086
  set -- $stat
  echo $((${12} + ${13}))
}
ticks_to_secs() { python3 -c "print('%.2f' % ($1 / $CLK_TCK))"; }
log_size() { stat -c %s "$1"; }

# settle_log LOG: distribution writes an access-log line after the response ends; after a
# phase, wait (bounded) until the upstream log stops growing before counting.
settle_log() {
  local before after deadline=$((SECONDS + 5))
  before=$(log_size "$1")
  while ((SECONDS < deadline)); do
    sleep 0.2
    after=$(log_size "$1")
    [[ $after == "$before" ]] && return 0
    before=$after
  done
}

# cold_fetch NAME BASE_URL OUT_VAR_PREFIX: 20 concurrent GETs of the big blob, all started
# before any is waited for; verifies every body. Sets ${prefix}_GETS/_BYTES/_HEADS/_SECS.
cold_fetch() {
  local name=$1 base=$2 prefix=$3 i start end rc=0 offset counts
  local dir="$WORK/cold-$name"
  mkdir -p "$dir"
  offset=$(log_size "$UP_LOG")
  local pids=()
  start=$(date +%s.%N)
  for ((i = 1; i <= COLD_CLIENTS; i++)); do
    curl -fsS --max-time 180 -o "$dir/body-$i" "$base/v2/bench/big/blobs/$BIG_DIGEST" 2>"$dir/err-$i" &
    pids+=($!)
    PIDS+=($!)
  done
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      rc=1
      log "$name: cold GET #$((i + 1)) failed: $(cat "$dir/err-$((i + 1))")"
    fi
    forget_pid "${pids[$i]}"
  done
  end=$(date +%s.%N)
  ((rc == 0)) || die "$name: cold fetch failed"
  python3 "$HELPER" verify "${BIG_DIGEST#sha256:}" "$dir"/body-* >&2 || die "$name: cold fetch returned a wrong body"
  rm -rf "$dir"
  settle_log "$UP_LOG"
  read -r counts < <(python3 "$HELPER" count-log "$UP_LOG" "$offset" "^/v2/bench/big/blobs/$BIG_DIGEST\$")
  read -r "${prefix}_GETS" "${prefix}_BYTES" "${prefix}_HEADS" _ <<<"$counts"
  printf -v "${prefix}_SECS" '%.2f' "$(python3 -c "print($end - $start)")"
}

# warm_round NAME URL PID: one curl process, one keep-alive connection, 1 warm-up GET then
# WARM_PER_ROUND measured GETs one after another; appends `size secs` lines to
# warm-NAME.txt and the server's CPU ticks to ${NAME}_TICKS.
warm_round() {
  local name=$1 url=$2 pid=$3 args=() i t0 out
  out="$WORK/warm-$name.round"
  for ((i = 0; i < 1 + WARM_PER_ROUND; i++)); do args+=(-o /dev/null "$url"); done
  t0=$(cpu_ticks "$pid")
  curl -fsS --http1.1 --max-time 300 -w '%{size_download} %{time_total}\n' "${args[@]}" \
    >"$out" || die "$name: warm blob GETs failed"
  printf -v "${name}_TICKS" '%d' $((${name}_TICKS + $(cpu_ticks "$pid") - t0))
  if awk -v want="$BIG_SIZE" '$1 != want {bad = 1} END {exit !bad}' "$out"; then
    die "$name: a warm GET returned a size other than $BIG_SIZE: $(tr '\n' ' ' <"$out")"
  fi
  tail -n "$WARM_PER_ROUND" "$out" >>"$WORK/warm-$name.txt"
}

# warm_stats NAME PREFIX -> ${prefix}_MBPS (median per GET), _AGG (bytes / time), _CPU
warm_stats() {
  local name=$1 prefix=$2 stats ticks_var="${1}_TICKS"
  read -r stats < <(python3 "$HELPER" transfer-stats <"$WORK/warm-$name.txt")
  read -r "${prefix}_MBPS" "${prefix}_AGG" _ <<<"$stats"
  printf -v "${prefix}_CPU" '%s' "$(ticks_to_secs "${!ticks_var}")"
}

# check_manifest NAME BASE: one GET of the small tag; the digest header must match.
check_manifest() {
  local name=$1 base=$2 digest
  digest=$(curl -fsS --max-time 30 -D - -o /dev/null -H "Accept: $MANIFEST_ACCEPT" \
    "$base/v2/bench/small/manifests/v1" | tr -d '\r' |
    awk 'tolower($1) == "docker-content-digest:" {print $2}') || die "$name: GET small manifest failed"
  [[ $digest == "$SMALL_DIGEST" ]] || die "$name: small manifest digest $digest, expected $SMALL_DIGEST"
}

# wrk_manifests NAME BASE PREFIX -> ${prefix}_RPS, _UP_HEADS, _UP_GETS, _REQS
wrk_manifests() {
  local name=$1 base=$2 prefix=$3 offset counts non2xx
  local out="$WORK/wrk-$name.txt"
  offset=$(log_size "$UP_LOG")
  wrk -t2 -c32 -d"${WRK_SECS}s" --latency -H "Accept: $MANIFEST_ACCEPT" \
    "$base/v2/bench/small/manifests/v1" >"$out" 2>&1 || die "$name: wrk failed: $(cat "$out")"
  settle_log "$UP_LOG"
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
  if [[ -n $non2xx ]]; then
    cat "$out" >&2
    die "$name: $non2xx manifest requests answered non-2xx"
  fi
  printf -v "${prefix}_RPS" '%.0f' "$(awk '/^Requests\/sec:/ {print $2}' "$out")"
  printf -v "${prefix}_REQS" '%s' "$(awk '/requests in/ {print $1}' "$out")"
  printf -v "${prefix}_P50" '%s' "$(awk '$1 == "50%" {print $2}' "$out")"
  printf -v "${prefix}_P99" '%s' "$(awk '$1 == "99%" {print $2}' "$out")"
  grep -q 'Socket errors' "$out" && log "$name: wrk $(grep 'Socket errors' "$out")"
  read -r counts < <(python3 "$HELPER" count-log "$UP_LOG" "$offset" '^/v2/bench/small/manifests/')
  read -r "${prefix}_UP_GETS" _ "${prefix}_UP_HEADS" _ <<<"$counts"
}

# ----- 1. upstream, seeded ------------------------------------------------------------------
OCI_DIR="$WORK/oci"
log "generating the OCI layout (64 MiB random layer + tiny image)"
read -r BIG_DIGEST BIG_PATH SMALL_DIGEST < <(python3 "$HELPER" seed-layout "$OCI_DIR")
BIG_SIZE=$(stat -c %s "$BIG_PATH")
BIG_REL=${BIG_PATH#"$OCI_DIR"}

start_registry upstream
UP_PORT=$REG_PORT UP_PID=$REG_PID UP_LOG=$REG_LOG
UP_URL="http://127.0.0.1:$UP_PORT"
log "upstream docker-registry on :$UP_PORT (pid $UP_PID)"
for tag in big small; do
  skopeo --insecure-policy copy --preserve-digests --dest-tls-verify=false --quiet \
    "oci:$OCI_DIR:$tag" "docker://127.0.0.1:$UP_PORT/bench/$tag:v1" >"$WORK/skopeo-$tag.log" 2>&1 ||
    { cat "$WORK/skopeo-$tag.log" >&2; die "skopeo push of bench/$tag:v1"; }
done
check_manifest upstream "$UP_URL"

# ----- 2. peer and regcache -------------------------------------------------------------------
start_registry peer "$UP_URL"
PEER_PORT=$REG_PORT PEER_PID=$REG_PID
PEER_URL="http://127.0.0.1:$PEER_PORT"
log "peer docker-registry (proxy) on :$PEER_PORT (pid $PEER_PID)"
start_regcache
RC_URL="http://127.0.0.1:$RC_PORT"
log "regcache on :$RC_PORT (pid $RC_PID)"

# ----- 3. cold fetches ----------------------------------------------------------------------
log "cold: $COLD_CLIENTS concurrent GETs of the 64 MiB blob from regcache"
# Peak RSS two ways: VmHWM reset just before (clear_refs 5), and VmRSS sampled every 10 ms.
HWM_RESET=0
echo 5 >"/proc/$RC_PID/clear_refs" 2>/dev/null && HWM_RESET=1
RC_RSS_BEFORE_KIB=$(awk '/^VmRSS:/ {print $2}' "/proc/$RC_PID/status")
python3 "$HELPER" sample-rss "$RC_PID" "$WORK/rss-peak" &
SAMPLER_PID=$!
PIDS+=("$SAMPLER_PID")
cpu0=$(cpu_ticks "$RC_PID")
cold_fetch regcache "$RC_URL" RC_COLD
RC_COLD_CPU=$(ticks_to_secs $(($(cpu_ticks "$RC_PID") - cpu0)))
stop_pid "$SAMPLER_PID"
RC_RSS_SAMPLED_KIB=$(cat "$WORK/rss-peak" 2>/dev/null || echo 0)
RC_HWM_KIB=$(awk '/^VmHWM:/ {print $2}' "/proc/$RC_PID/status")
if ((HWM_RESET)); then RC_PEAK_KIB=$RC_HWM_KIB; else RC_PEAK_KIB=$RC_RSS_SAMPLED_KIB; fi
((RC_RSS_SAMPLED_KIB > RC_PEAK_KIB)) && RC_PEAK_KIB=$RC_RSS_SAMPLED_KIB

log "cold: $COLD_CLIENTS concurrent GETs of the 64 MiB blob from the (fresh) peer"
cpu0=$(cpu_ticks "$PEER_PID")
cold_fetch peer "$PEER_URL" PEER_COLD
PEER_COLD_CPU=$(ticks_to_secs $(($(cpu_ticks "$PEER_PID") - cpu0)))

# ----- 3b. one client, one cold 64 MiB blob: direct, regcache, peer ---------------------------
# seed_cold_blob: uploads a fresh random blob of BIG_SIZE to the upstream as bench/cold (the
# registry's monolithic upload: POST, then PUT with the digest); prints its digest.
seed_cold_blob() {
  local f="$WORK/cold-blob" digest loc sep
  head -c "$BIG_SIZE" /dev/urandom >"$f"
  digest=sha256:$(sha256sum "$f" | cut -d' ' -f1)
  loc=$(curl -fsS -X POST -D - -o /dev/null "$UP_URL/v2/bench/cold/blobs/uploads/" | tr -d '\r' |
    awk 'tolower($1) == "location:" {print $2}') || die "starting an upload of a cold blob"
  [[ $loc == http* ]] || loc="$UP_URL$loc"
  if [[ $loc == *\?* ]]; then sep='&'; else sep='?'; fi
  curl -fsS -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$f" -o /dev/null \
    "$loc${sep}digest=$digest" || die "uploading a cold blob"
  rm -f "$f"
  echo "$digest"
}

# cold_get NAME URL: one GET to /dev/null; appends its seconds to cold1-NAME.txt. The body's
# size is checked here; its digest is checked by regcache (or the 20-client fetch above).
cold_get() {
  local out
  out=$(curl -fsS --max-time 120 -o /dev/null -w '%{size_download} %{time_total}' "$2") ||
    die "$1: cold GET $2 failed"
  [[ ${out% *} == "$BIG_SIZE" ]] || die "$1: cold GET returned ${out% *} bytes, expected $BIG_SIZE"
  echo "${out#* }" >>"$WORK/cold1-$1.txt"
}

log "cold, one client: $COLD_ROUNDS rounds of a fresh 64 MiB blob, direct / regcache / peer"
for ((round = 0; round < COLD_ROUNDS; round++)); do
  digest=$(seed_cold_blob)
  targets=(direct regcache peer)
  for ((i = 0; i < 3; i++)); do # rotating order: no server always goes first
    case ${targets[$(((round + i) % 3))]} in
      direct) cold_get direct "$UP_URL/v2/bench/cold/blobs/$digest" ;;
      regcache) cold_get regcache "$RC_URL/v2/bench/cold/blobs/$digest" ;;
      peer) cold_get peer "$PEER_URL/v2/bench/cold/blobs/$digest" ;;
    esac
  done
done
median_file() { python3 -c "import statistics, sys; print('%.3f' % statistics.median(float(l) for l in open(sys.argv[1])))" "$1"; }
COLD1_DIRECT=$(median_file "$WORK/cold1-direct.txt")
COLD1_RC=$(median_file "$WORK/cold1-regcache.txt")
COLD1_PEER=$(median_file "$WORK/cold1-peer.txt")
COLD1_ALL_DIRECT=$(paste -sd' ' "$WORK/cold1-direct.txt")
COLD1_ALL_RC=$(paste -sd' ' "$WORK/cold1-regcache.txt")
COLD1_ALL_PEER=$(paste -sd' ' "$WORK/cold1-peer.txt")

# ----- 4. warm blob GETs ----------------------------------------------------------------------
start_nginx
log "nginx on :$NG_PORT (pid $NG_PID)"
log "warm blob: $WARM_ROUNDS interleaved rounds of $WARM_PER_ROUND sequential GETs per server"
regcache_TICKS=0 peer_TICKS=0 nginx_TICKS=0
# Interleaved rounds, so a burst of other load on the machine hits every server alike.
for ((round = 1; round <= WARM_ROUNDS; round++)); do
  warm_round regcache "$RC_URL/v2/bench/big/blobs/$BIG_DIGEST" "$RC_PID"
  warm_round peer "$PEER_URL/v2/bench/big/blobs/$BIG_DIGEST" "$PEER_PID"
  warm_round nginx "http://127.0.0.1:$NG_PORT$BIG_REL" "$NG_PID"
done
warm_stats regcache RC_WARM
warm_stats peer PEER_WARM
warm_stats nginx NG_WARM
stop_pid "$NG_PID"

# ----- 5. warm tag manifests ------------------------------------------------------------------
for target in regcache peer; do
  if [[ $target == regcache ]]; then base=$RC_URL; else base=$PEER_URL; fi
  check_manifest "$target" "$base" # also warms the tag
done
log "manifests: wrk -t2 -c32 -d${WRK_SECS}s on regcache"
cpu0=$(cpu_ticks "$RC_PID") up0=$(cpu_ticks "$UP_PID")
wrk_manifests regcache "$RC_URL" RC_MF
RC_MF_CPU=$(ticks_to_secs $(($(cpu_ticks "$RC_PID") - cpu0)))
RC_MF_UP_CPU=$(ticks_to_secs $(($(cpu_ticks "$UP_PID") - up0)))
log "manifests: wrk -t2 -c32 -d${WRK_SECS}s on the peer"
cpu0=$(cpu_ticks "$PEER_PID") up0=$(cpu_ticks "$UP_PID")
wrk_manifests peer "$PEER_URL" PEER_MF
PEER_MF_CPU=$(ticks_to_secs $(($(cpu_ticks "$PEER_PID") - cpu0)))
PEER_MF_UP_CPU=$(ticks_to_secs $(($(cpu_ticks "$UP_PID") - up0)))

alive "$RC_PID" || die "regcache exited during the benchmark"
if grep -qiE 'panic|ERROR' "$RC_LOG"; then
  log "regcache logged errors:"
  grep -iE 'panic|ERROR' "$RC_LOG" | head -n 20 >&2
fi

# ----- 5b. cost of metrics and the access log ----------------------------------------------
RC_MAIN_PORT=$RC_PORT RC_MAIN_PID=$RC_PID RC_MAIN_LOG=$RC_LOG
start_regcache bare $'[log]\nlevel = "warn"\naccess = false\n\n[metrics]\nenabled = false'
BARE_URL="http://127.0.0.1:$RC_PORT" BARE_PID=$RC_PID
RC_PORT=$RC_MAIN_PORT RC_PID=$RC_MAIN_PID RC_LOG=$RC_MAIN_LOG
log "bare regcache (metrics and access log off) on ${BARE_URL##*:} (pid $BARE_PID)"
curl -fsS --max-time 180 -o /dev/null "$BARE_URL/v2/bench/big/blobs/$BIG_DIGEST" || die "bare: cold blob GET"
check_manifest bare "$BARE_URL"
log "instrumentation: $OBS_BLOB_ROUNDS interleaved warm blob rounds, with and without"
rm -f "$WORK/warm-regcache.txt" "$WORK/warm-bare.txt"
regcache_TICKS=0 bare_TICKS=0
for ((round = 1; round <= OBS_BLOB_ROUNDS; round++)); do
  warm_round regcache "$RC_URL/v2/bench/big/blobs/$BIG_DIGEST" "$RC_PID"
  warm_round bare "$BARE_URL/v2/bench/big/blobs/$BIG_DIGEST" "$BARE_PID"
done
warm_stats regcache OBS_WITH_WARM
warm_stats bare OBS_BARE_WARM
log "instrumentation: $OBS_ROUNDS alternating wrk runs of ${OBS_SECS}s, with and without"
# Besides GETs/s (which other load on the machine moves a lot from run to run), the
# server's CPU time per request: what the instrumentation adds, less disturbed by others.
OBS_WITH_RUNS=() OBS_BARE_RUNS=()
OBS_WITH_TICKS=0 OBS_BARE_TICKS=0 OBS_WITH_REQS=0 OBS_BARE_REQS=0
WRK_SECS_MAIN=$WRK_SECS WRK_SECS=$OBS_SECS
for ((round = 1; round <= OBS_ROUNDS; round++)); do
  cpu0=$(cpu_ticks "$RC_PID")
  wrk_manifests regcache "$RC_URL" OBS_WITH_MF
  OBS_WITH_TICKS=$((OBS_WITH_TICKS + $(cpu_ticks "$RC_PID") - cpu0))
  OBS_WITH_REQS=$((OBS_WITH_REQS + OBS_WITH_MF_REQS))
  OBS_WITH_RUNS+=("$OBS_WITH_MF_RPS")
  cpu0=$(cpu_ticks "$BARE_PID")
  wrk_manifests bare "$BARE_URL" OBS_BARE_MF
  OBS_BARE_TICKS=$((OBS_BARE_TICKS + $(cpu_ticks "$BARE_PID") - cpu0))
  OBS_BARE_REQS=$((OBS_BARE_REQS + OBS_BARE_MF_REQS))
  OBS_BARE_RUNS+=("$OBS_BARE_MF_RPS")
done
WRK_SECS=$WRK_SECS_MAIN
us_per_req() { python3 -c "print('%.1f' % ($1 / $CLK_TCK * 1e6 / $2 if $2 else float('nan')))"; }
OBS_WITH_US=$(us_per_req "$OBS_WITH_TICKS" "$OBS_WITH_REQS")
OBS_BARE_US=$(us_per_req "$OBS_BARE_TICKS" "$OBS_BARE_REQS")
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
OBS_WITH_RPS=$(median "${OBS_WITH_RUNS[@]}")
OBS_BARE_RPS=$(median "${OBS_BARE_RUNS[@]}")
# Each on-run against the off-run right after it: load from elsewhere hits both alike.
OBS_PAIRED=()
for i in "${!OBS_WITH_RUNS[@]}"; do
  OBS_PAIRED+=("$(python3 -c "print('%.3f' % (${OBS_WITH_RUNS[$i]} / ${OBS_BARE_RUNS[$i]}))")")
done
OBS_PAIRED_MEDIAN=$(median "${OBS_PAIRED[@]}")
ACCESS_LINES=$(grep -c 'regcache::access' "$RC_LOG" || true)
alive "$BARE_PID" || die "bare regcache exited during the benchmark"

# ----- 6. report --------------------------------------------------------------------------
verdict() { # verdict EXPR -> PASS/MISS
  if python3 -c "import sys; sys.exit(0 if ($1) else 1)"; then echo PASS; else echo MISS; fi
}
ratio() { python3 -c "print('%.2f' % ($1 / $2 if $2 else float('nan')))"; }
mib() { python3 -c "print('%.1f' % ($1 / 1048576))"; }

WARM_RATIO=$(ratio "$RC_WARM_MBPS" "$NG_WARM_MBPS")
MF_RATIO=$(ratio "$RC_MF_RPS" "$PEER_MF_RPS")
RC_PEAK_MIB=$(python3 -c "print('%.1f' % ($RC_PEAK_KIB / 1024))")

echo
echo "regcache benchmark — $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo '+dirty'), $(nproc) cores, loopback, MB = 10^6 bytes"
echo "upstream: docker-registry 2.8; peer: docker-registry in proxy mode; nginx: sendfile, 1 worker"
echo "load average before / after the run: $LOAD_AT_START / $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"
echo
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "metric" "regcache" "peer" "nginx" "ratio" "target" "result"
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "--------------------------------------------" "--------" "--------" "--------" "------" "------" "------"
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "warm blob GET 64 MiB, MB/s (median of $WARM_RUNS)" \
  "$RC_WARM_MBPS" "$PEER_WARM_MBPS" "$NG_WARM_MBPS" "${WARM_RATIO}x" ">=0.85x" "$(verdict "$WARM_RATIO >= 0.85")"
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "  (aggregate: total bytes / total time)" \
  "$RC_WARM_AGG" "$PEER_WARM_AGG" "$NG_WARM_AGG" "" "" ""
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "warm tag manifest GETs/s (wrk -t2 -c32 ${WRK_SECS}s)" \
  "$RC_MF_RPS" "$PEER_MF_RPS" "-" "${MF_RATIO}x" ">=3x" "$(verdict "$MF_RATIO >= 3")"
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "  latency p50 / p99" \
  "$RC_MF_P50" "$PEER_MF_P50" "" "" "" ""
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "" "$RC_MF_P99" "$PEER_MF_P99" "" "" "" ""
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "  upstream HEADs / GETs during the wrk run" \
  "$RC_MF_UP_HEADS/$RC_MF_UP_GETS" "$PEER_MF_UP_HEADS/$PEER_MF_UP_GETS" "" "" "" ""
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "  client requests served in the wrk run" \
  "$RC_MF_REQS" "$PEER_MF_REQS" "" "" "" ""
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "cold: upstream blob GETs for $COLD_CLIENTS concurrent" \
  "$RC_COLD_GETS" "$PEER_COLD_GETS" "-" "" "1" "$(verdict "$RC_COLD_GETS == 1")"
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "cold: upstream blob bytes, MiB" \
  "$(mib "$RC_COLD_BYTES")" "$(mib "$PEER_COLD_BYTES")" "-" "" "" ""
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "cold: upstream blob HEADs" \
  "$RC_COLD_HEADS" "$PEER_COLD_HEADS" "-" "" "" ""
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "cold: wall time for all $COLD_CLIENTS, s" \
  "$RC_COLD_SECS" "$PEER_COLD_SECS" "-" "" "" ""
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "regcache peak RSS during cold fetch, MiB" \
  "$RC_PEAK_MIB" "" "" "" "<=64" "$(verdict "$RC_PEAK_MIB <= 64")"
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "server CPU s: $COLD_CLIENTS cold blob GETs" \
  "$RC_COLD_CPU" "$PEER_COLD_CPU" "-" "" "" ""
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "server CPU s: $((WARM_RUNS + WARM_ROUNDS)) warm blob GETs" \
  "$RC_WARM_CPU" "$PEER_WARM_CPU" "$NG_WARM_CPU" "" "" ""
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "server CPU s: wrk manifest run" \
  "$RC_MF_CPU" "$PEER_MF_CPU" "-" "" "" ""
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "upstream CPU s: wrk manifest run" \
  "$RC_MF_UP_CPU" "$PEER_MF_UP_CPU" "-" "" "" ""
COLD1_RC_RATIO=$(ratio "$COLD1_RC" "$COLD1_DIRECT")
COLD1_PEER_RATIO=$(ratio "$COLD1_PEER" "$COLD1_DIRECT")
echo
echo "cold 64 MiB blob, one client, a fresh blob per round: median of $COLD_ROUNDS GETs, seconds"
printf '%-44s %10s %8s %8s %6s\n' "server" "seconds" "ratio" "target" "result"
printf '%-44s %10s %8s %8s %6s\n' "docker-registry (the upstream), direct" "$COLD1_DIRECT" "1.00x" "" ""
printf '%-44s %10s %8s %8s %6s\n' "regcache, cold" "$COLD1_RC" "${COLD1_RC_RATIO}x" "<=1.25x" \
  "$(verdict "$COLD1_RC_RATIO <= 1.25")"
printf '%-44s %10s %8s %8s %6s\n' "peer (docker-registry proxy), cold" "$COLD1_PEER" "${COLD1_PEER_RATIO}x" "" ""
echo "  every GET, s: direct $COLD1_ALL_DIRECT"
echo "                regcache $COLD1_ALL_RC"
echo "                peer $COLD1_ALL_PEER"
# Three decimals: the margin to the target is a few percent.
ratio3() { python3 -c "print('%.3f' % ($1 / $2 if $2 else float('nan')))"; }
OBS_WARM_RATIO=$(ratio3 "$OBS_WITH_WARM_MBPS" "$OBS_BARE_WARM_MBPS")
OBS_MF_RATIO=$(ratio3 "$OBS_WITH_RPS" "$OBS_BARE_RPS")
OBS_CPU_RATIO=$(ratio3 "$OBS_BARE_US" "$OBS_WITH_US")
echo
echo "metrics + access log (on: as above) against both off (bare), same run; target: on >= 0.95x off"
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "metric" "on" "off" "" "ratio" "target" "result"
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "warm blob GET 64 MiB, MB/s (median of $OBS_BLOB_RUNS)" \
  "$OBS_WITH_WARM_MBPS" "$OBS_BARE_WARM_MBPS" "" "${OBS_WARM_RATIO}x" ">=0.95x" "$(verdict "$OBS_WARM_RATIO >= 0.95")"
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "warm tag manifest GETs/s (median of ${OBS_ROUNDS}x${OBS_SECS}s)" \
  "$OBS_WITH_RPS" "$OBS_BARE_RPS" "" "${OBS_MF_RATIO}x" ">=0.95x" "$(verdict "$OBS_MF_RATIO >= 0.95")"
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "server CPU us per manifest GET (off/on)" \
  "$OBS_WITH_US" "$OBS_BARE_US" "" "${OBS_CPU_RATIO}x" ">=0.95x" "$(verdict "$OBS_CPU_RATIO >= 0.95")"
printf '%-44s %10s %10s %10s %8s %8s %6s\n' "  paired on/off runs, median" "" "" "" \
  "${OBS_PAIRED_MEDIAN}x" ">=0.95x" "$(verdict "$OBS_PAIRED_MEDIAN >= 0.95")"
printf '%-44s %10s\n' "  runs, on" "${OBS_WITH_RUNS[*]}"
printf '%-44s %10s\n' "  runs, off" "${OBS_BARE_RUNS[*]}"
printf '%-44s %10s\n' "access-log lines written (on)" "$ACCESS_LINES"
echo
echo "RSS: regcache before the cold fetch $((RC_RSS_BEFORE_KIB / 1024)) MiB; peak $(( RC_PEAK_KIB / 1024 )) MiB" \
  "(VmHWM after reset: $((RC_HWM_KIB / 1024)) MiB$( ((HWM_RESET)) || echo ', reset unavailable'); 10 ms samples: $((RC_RSS_SAMPLED_KIB / 1024)) MiB)"
