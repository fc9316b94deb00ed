#!/usr/bin/env bash
# Authentication cost benchmark (issue 13, "Speed"): warm tag-manifest GETs through a
# regcache whose clients log in with Basic credentials checked by bcrypt, against the same
# GETs through a regcache without [auth], in one run, printed with their ratio (target:
# >= 0.5x). bcrypt costs 50-250 ms by design, so the target holds only if a login is
# verified once and then cached, not once per request.
#
#   bash scripts/bench_auth.sh          # from the repo root; about a minute after the build
#
# What it does: builds regcache (release); starts docker-registry as the UPSTREAM and seeds
# bench/small:v1 with skopeo; starts regcache OPEN (no [auth]) and regcache AUTH
# (htpasswd_file with one user hashed by `htpasswd -B -C $BENCH_BCRYPT_COST`, a rule
# giving it pull on everything, auth logged at debug so each bcrypt check leaves a
# "login verified" line), both on the upstream; times a first login (bcrypt) and a second
# one (cached) with curl; then runs wrk -t2 -c32 for BENCH_WRK_SECS seconds on each,
# twice, interleaved (OPEN, AUTH, OPEN, AUTH), and prints requests/s, latency, the ratio
# of the sums, and how many bcrypt checks AUTH ran during its wrk runs (expected 0).
# Exit status: 0 whether the target is met or not (this is a report); non-zero only when
# something broke (a server did not start, requests failed or were refused).
#
# Knobs (env): BENCH_WRK_SECS (default 10), BENCH_BCRYPT_COST (default 10),
# BENCH_SKIP_BUILD=1 uses the existing target/release/regcache, BENCH_KEEP=1 keeps the
# work dir.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
HELPER="$REPO/scripts/bench_helper.py"

WRK_SECS=${BENCH_WRK_SECS:-10}
BCRYPT_COST=${BENCH_BCRYPT_COST:-10}
STARTUP_DEADLINE_SECS=30
START_ATTEMPTS=3
MANIFEST_ACCEPT='application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json'
BENCH_USER=bench
BENCH_PASSWORD=bench-password-not-a-secret

# Loopback only: no proxies; the servers read these prefixes as config overrides.
unset http_proxy https_proxy all_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY RUST_LOG || true
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(REGISTRY|REGCACHE)_' || true)

log() { printf '[bench-auth %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}

for tool in cargo docker-registry skopeo wrk curl python3 htpasswd; do
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

forget_pid() {
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# ----- build ------------------------------------------------------------------------------
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
  log "cargo build --release"
  cargo build --release --quiet || die "cargo build --release"
fi
REGCACHE_BIN="$REPO/target/release/regcache"
[[ -x $REGCACHE_BIN ]] || die "$REGCACHE_BIN missing"

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/regcache-bench-auth.XXXXXX")
log "work dir $WORK"

# ----- starting servers ---------------------------------------------------------------
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# wait_ready URL PID LOG [CURL_ARGS...]: polls GET URL until 2xx; fails if PID exits or the
# deadline passes. Returns 2 when the server died of a port clash (the caller retries).
wait_ready() {
  local url=$1 pid=$2 logfile=$3
  shift 3
  local deadline=$((SECONDS + STARTUP_DEADLINE_SECS))
  while ! curl -fsS -o /dev/null --max-time 2 "$@" "$url" 2>/dev/null; do
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

start_upstream() {
  local attempt rc dir="$WORK/upstream"
  mkdir -p "$dir/storage"
  UP_LOG="$dir/log"
  for ((attempt = 1; attempt <= START_ATTEMPTS; attempt++)); do
    UP_PORT=$(python3 "$HELPER" free-port)
    cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
  cache:
    blobdescriptor: inmemory
http:
  addr: 127.0.0.1:$UP_PORT
  secret: regcache-bench-not-a-secret
EOF
    docker-registry serve "$dir/config.yml" >"$UP_LOG" 2>&1 </dev/null &
    UP_PID=$!
    PIDS+=("$UP_PID")
    rc=0
    wait_ready "http://127.0.0.1:$UP_PORT/v2/" "$UP_PID" "$UP_LOG" || rc=$?
    case $rc in
      0) return 0 ;;
      2) log "upstream: port $UP_PORT taken, retrying" ;;
      *) die "docker-registry did not start" ;;
    esac
  done
  die "docker-registry found no free port"
}

# start_regcache NAME EXTRA_TOML [CURL_ARGS...] -> ${NAME}_PORT, ${NAME}_PID, ${NAME}_LOG
start_regcache() {
  local name=$1 extra=$2 attempt rc port pid
  shift 2
  local dir="$WORK/$name"
  mkdir -p "$dir/data"
  local logfile="$dir/log"
  for ((attempt = 1; attempt <= START_ATTEMPTS; attempt++)); do
    port=$(python3 "$HELPER" free-port)
    cat >"$dir/config.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
data_dir = "$dir/data"

[[upstream]]
name = "origin"
url = "http://127.0.0.1:$UP_PORT"
default = true

$extra
EOF
    "$REGCACHE_BIN" serve --config "$dir/config.toml" >"$logfile" 2>&1 </dev/null &
    pid=$!
    PIDS+=("$pid")
    rc=0
    wait_ready "http://127.0.0.1:$port/v2/" "$pid" "$logfile" "$@" || rc=$?
    case $rc in
      0)
        printf -v "${name}_PORT" '%s' "$port"
        printf -v "${name}_PID" '%s' "$pid"
        printf -v "${name}_LOG" '%s' "$logfile"
        return 0
        ;;
      2) log "$name: port $port taken, retrying" ;;
      *) die "regcache ($name) did not start" ;;
    esac
  done
  die "regcache ($name) found no free port"
}

# ----- 1. upstream, seeded ------------------------------------------------------------------
OCI_DIR="$WORK/oci"
log "generating the OCI layout"
# bench.sh's layout; only its small image is pushed.
read -r _ _ SMALL_DIGEST < <(python3 "$HELPER" seed-layout "$OCI_DIR")
start_upstream
log "upstream docker-registry on :$UP_PORT (pid $UP_PID)"
skopeo --insecure-policy copy --preserve-digests --dest-tls-verify=false --quiet \
  "oci:$OCI_DIR:small" "docker://127.0.0.1:$UP_PORT/bench/small:v1" >"$WORK/skopeo.log" 2>&1 ||
  { cat "$WORK/skopeo.log" >&2; die "skopeo push of bench/small:v1"; }

# ----- 2. the two regcaches -------------------------------------------------------------------
htpasswd -cbB -C "$BCRYPT_COST" "$WORK/htpasswd" "$BENCH_USER" "$BENCH_PASSWORD" 2>/dev/null ||
  die "htpasswd -B"
start_regcache OPEN '[log]
level = "warn"'
start_regcache AUTH "[log]
level = \"warn,regcache::auth=debug\"

[auth]
htpasswd_file = \"$WORK/htpasswd\"

[[auth.rule]]
identities = [\"$BENCH_USER\"]
pull = [\"**\"]" -u "$BENCH_USER:$BENCH_PASSWORD"
log "regcache OPEN on :$OPEN_PORT (pid $OPEN_PID), AUTH on :$AUTH_PORT (pid $AUTH_PID)"
OPEN_URL="http://127.0.0.1:$OPEN_PORT"
AUTH_URL="http://127.0.0.1:$AUTH_PORT"
BASIC="Authorization: Basic $(printf '%s:%s' "$BENCH_USER" "$BENCH_PASSWORD" | base64 -w0)"

# The readiness probe logged in once already; restart the count from here.
verified() { grep -c 'login verified' "$AUTH_LOG" || true; }

# ----- 3. correctness and the cost of one login ----------------------------------------------
manifest_digest() { # BASE [CURL_ARGS...]
  local base=$1
  shift
  curl -fsS --max-time 30 -D - -o /dev/null -H "Accept: $MANIFEST_ACCEPT" "$@" \
    "$base/v2/bench/small/manifests/v1" | tr -d '\r' |
    awk 'tolower($1) == "docker-content-digest:" {print $2}'
}
[[ $(manifest_digest "$OPEN_URL") == "$SMALL_DIGEST" ]] || die "OPEN: wrong or no manifest"
[[ $(manifest_digest "$AUTH_URL" -H "$BASIC") == "$SMALL_DIGEST" ]] || die "AUTH: wrong or no manifest"
code=$(curl -s -o /dev/null -w '%{http_code}' "$AUTH_URL/v2/bench/small/manifests/v1")
[[ $code == 401 ]] || die "AUTH answered $code without a login, expected 401"

# A second user whose first login is timed: bcrypt, then the cache.
htpasswd -bB -C "$BCRYPT_COST" "$WORK/htpasswd" timed timed-password 2>/dev/null || die "htpasswd -B"
deadline=$((SECONDS + 10))
until grep -q 'identity files reloaded' "$AUTH_LOG"; do
  ((SECONDS < deadline)) || die "AUTH did not reload the htpasswd file"
  sleep 0.1 # polling interval for the reload log line
done
FIRST_MS=$(curl -fsS -o /dev/null -u timed:timed-password -w '%{time_total}' "$AUTH_URL/v2/" |
  python3 -c "import sys; print('%.1f' % (float(sys.stdin.read()) * 1000))")
CACHED_MS=$(curl -fsS -o /dev/null -u timed:timed-password -w '%{time_total}' "$AUTH_URL/v2/" |
  python3 -c "import sys; print('%.1f' % (float(sys.stdin.read()) * 1000))")

# ----- 4. wrk, interleaved -------------------------------------------------------------------
# wrk_run NAME BASE [HEADER] -> appends "rps p50 p99 requests" to $WORK/wrk-NAME.txt
wrk_run() {
  local name=$1 base=$2 header=${3:-}
  local out="$WORK/wrk-$name-$RANDOM.txt" args=()
  [[ -n $header ]] && args=(-H "$header")
  wrk -t2 -c32 -d"${WRK_SECS}s" --latency -H "Accept: $MANIFEST_ACCEPT" "${args[@]}" \
    "$base/v2/bench/small/manifests/v1" >"$out" 2>&1 || die "$name: wrk failed: $(cat "$out")"
  if grep -q 'Non-2xx or 3xx responses' "$out"; then
    cat "$out" >&2
    die "$name: some manifest requests were answered non-2xx"
  fi
  grep -q 'Socket errors' "$out" && log "$name: wrk $(grep 'Socket errors' "$out")"
  printf '%s %s %s %s\n' \
    "$(awk '/^Requests\/sec:/ {print $2}' "$out")" \
    "$(awk '$1 == "50%" {print $2}' "$out")" \
    "$(awk '$1 == "99%" {print $2}' "$out")" \
    "$(awk '/requests in/ {print $1}' "$out")" >>"$WORK/wrk-$name.txt"
}
# Adding the timed user reloaded the identity files, which empties the cache of verified
# logins: verify the wrk login once more before counting.
[[ $(manifest_digest "$AUTH_URL" -H "$BASIC") == "$SMALL_DIGEST" ]] || die "AUTH: wrong or no manifest after the reload"
CHECKS_BEFORE=$(verified)
for round in 1 2; do
  log "round $round: wrk -t2 -c32 -d${WRK_SECS}s on OPEN, then on AUTH with a Basic login"
  wrk_run open "$OPEN_URL"
  wrk_run auth "$AUTH_URL" "$BASIC"
done
CHECKS_DURING=$(($(verified) - CHECKS_BEFORE))
alive "$OPEN_PID" && alive "$AUTH_PID" || die "a regcache exited during the benchmark"

# ----- 5. report --------------------------------------------------------------------------
sum_col() { awk -v c="$2" '{s += $c} END {printf "%.0f", s}' "$1"; }
OPEN_RPS_SUM=$(sum_col "$WORK/wrk-open.txt" 1)
AUTH_RPS_SUM=$(sum_col "$WORK/wrk-auth.txt" 1)
RATIO=$(python3 -c "print('%.2f' % ($AUTH_RPS_SUM / $OPEN_RPS_SUM))")
VERDICT=$(python3 -c "print('PASS' if $RATIO >= 0.5 and $CHECKS_DURING == 0 else 'MISS')")
round_col() { sed -n "${2}p" "$1" | awk -v c="$3" '{print $c}'; }

echo
echo "regcache auth benchmark — $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo '+dirty'), $(nproc) cores, loopback"
echo "tag-manifest GETs (bench/small:v1, warm, revalidated upstream as configured by default), wrk -t2 -c32 ${WRK_SECS}s per run"
echo "AUTH: Basic login, bcrypt cost $BCRYPT_COST (htpasswd -B); OPEN: no [auth]"
echo "load average before / after the run: $LOAD_AT_START / $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews every figure)"
echo
printf '%-36s %12s %12s\n' "" "OPEN" "AUTH"
for r in 1 2; do
  printf '%-36s %12s %12s\n' "round $r: GETs/s" "$(round_col "$WORK/wrk-open.txt" $r 1)" "$(round_col "$WORK/wrk-auth.txt" $r 1)"
  printf '%-36s %12s %12s\n' "round $r: latency p50 / p99" \
    "$(round_col "$WORK/wrk-open.txt" $r 2)/$(round_col "$WORK/wrk-open.txt" $r 3)" \
    "$(round_col "$WORK/wrk-auth.txt" $r 2)/$(round_col "$WORK/wrk-auth.txt" $r 3)"
done
printf '%-36s %12s %12s\n' "requests served, both rounds" "$(sum_col "$WORK/wrk-open.txt" 4)" "$(sum_col "$WORK/wrk-auth.txt" 4)"
echo
echo "AUTH / OPEN GETs/s (sum of both rounds): ${RATIO}x   target >= 0.5x   $VERDICT"
echo "bcrypt checks AUTH ran during its wrk runs: $CHECKS_DURING (expected 0: the login was verified once, before)"
echo "one login: first request (bcrypt) ${FIRST_MS} ms, next request (cached) ${CACHED_MS} ms"
