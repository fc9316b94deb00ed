#!/usr/bin/env bash
# Scale benchmark for expiry and deletion (issue 3, "Scale"): seeds N cached entries, all
# due, then starts regcache on them and measures start-up time, expiry + deletion
# throughput and peak RSS, printed as a table against the targets.
#
#   bash scripts/bench_expiry.sh [N]        # from anywhere; N defaults to 1000000
#
# What "N cached entries" means: N rows of tags + repo_manifests + repo_blobs, the rows
# expiry works on. They form a consistent cache of small images (scripts/bench_expiry.py
# seed): per image one tag -> one manifest linked in its repository -> a config blob and
# one layer blob, both linked in the repository, named by the manifest (manifest_refs),
# and stored as real files whose sha256 is their digest. So 4 entries per image (with the
# default BENCH_LAYERS=1): N = 1 M is 250,000 tags, 250,000 manifest links, 500,000 blob links, 250,000 manifests and
# 500,000 blobs (rows and files), in 1,000 repositories of upstream "bench".
#
# Steps: cargo build --release; the server is started once on an empty data dir to create
# the schema and stopped (SIGTERM); the seeder inserts everything in one transaction with
# every entry already due (last use + ttl in the past) and the applied settings matching
# the config (so start-up reschedules nothing); `regcache fsck --dry-run` is timed on the
# seeded dir (the reconciliation the server also runs at start-up, alone); the server is
# started BENCH_STARTUPS times and stopped as soon as it answers (start-up alone; nothing
# expires that early, checked); then it is started once more and measured:
#   - start-up: exec -> first `GET /v2/` answering 200 (curl every 10 ms);
#   - expiry: exec -> no entries, no pending deletes, no blob or manifest rows left (read-
#     only SQLite probes every 0.5 s, full counts every 5 s), split into the DB part
#     (until the last entry is expired) and the deletion tail; the store is checked empty
#     at the end;
#   - peak RSS: VmRSS sampled every 50 ms, and VmHWM at the end.
# The server runs with the default storage settings: the start-up reconciliation (listing
# every stored object) runs in the background beside expiry, and reconcile_grace = 1h
# leaves the freshly written seed files alone. reconcile_interval = "0": start-up only.
# Caches are warm (the seeder just wrote everything; `sync` has flushed it, so the run does
# not pay for the seeder's writeback); this is a best case for the disk.
#
# Exit status: 0 whether targets are met or not (this is a report; a run that does not drain
# within BENCH_TIMEOUT reports its progress so far as MISS); non-zero only when something
# broke (the server did not start or died, files were left behind after every row went).
#
# Knobs (env): BENCH_KEEP=1 keeps the work dir; BENCH_SKIP_BUILD=1; BENCH_FSCK=0 skips the
# standalone fsck timing; BENCH_STARTUPS (default 3) extra start-up-only trials;
# BENCH_TIMEOUT (default 600) bounds the expiry wait, in seconds;
# BENCH_POLL (default 0.5) the SQLite poll interval; BENCH_LAYERS (default 1) layer blobs
# per image; BENCH_BIN to measure another regcache binary (e.g. a worktree's build).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
HELPER="$REPO/scripts/bench_expiry.py"

N=${1:-1000000}
[[ $N =~ ^[0-9]+$ ]] || {
  echo "usage: $0 [N]" >&2
  exit 2
}
TIMEOUT=${BENCH_TIMEOUT:-600}
POLL=${BENCH_POLL:-0.5}
LAYERS=${BENCH_LAYERS:-1}
TTL_SECS=3600
STARTUP_DEADLINE_SECS=60

unset http_proxy https_proxy all_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY RUST_LOG || true
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^REGCACHE_' || true)

log() { printf '[bench-expiry %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}

for tool in cargo curl python3; do
  command -v "$tool" >/dev/null || die "\`$tool\` is not on PATH"
done

# ----- processes we start, ended by PID on exit --------------------------------------------
PIDS=()
WORK=""
cleanup() {
  local rc=$? pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n $WORK && -d $WORK ]]; then
    if [[ ${BENCH_KEEP:-0} == 1 || $rc -ne 0 ]]; then
      log "work dir kept: $WORK"
    else
      log "removing work dir $WORK"
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

# ----- build ---------------------------------------------------------------------------------
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
  log "cargo build --release"
  cargo build --release --quiet || die "cargo build --release"
fi
BIN=${BENCH_BIN:-$REPO/target/release/regcache}
[[ -x $BIN ]] || die "$BIN missing"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/regcache-bench-expiry.XXXXXX")
DATA="$WORK/data"
CONFIG="$WORK/config.toml"
log "work dir $WORK"

write_config() { # write_config PORT
  cat >"$CONFIG" <<EOF
[server]
listen = "127.0.0.1:$1"
data_dir = "$DATA"

[storage]
backend = "filesystem"
reconcile_interval = "0"

[[upstream]]
name = "bench"
url = "http://127.0.0.1:9"
default = true
ttl = "${TTL_SECS}s"

[log]
level = "info,regcache::scheduler::reconcile=debug"
EOF
}

# start_server LOG -> SRV_PID, SRV_PORT, SRV_T0 (exec time), SRV_READY (seconds to 200).
# Returns 2 when the port was taken (the caller retries).
start_server() {
  local logfile=$1 deadline
  SRV_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  write_config "$SRV_PORT"
  SRV_T0=$(date +%s.%N)
  "$BIN" serve --config "$CONFIG" >"$logfile" 2>&1 </dev/null &
  SRV_PID=$!
  PIDS+=("$SRV_PID")
  if [[ -n ${ON_EXEC:-} ]]; then "$ON_EXEC"; fi
  deadline=$((SECONDS + STARTUP_DEADLINE_SECS))
  until curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$SRV_PORT/v2/" 2>/dev/null; do
    if ! kill -0 "$SRV_PID" 2>/dev/null; then
      wait "$SRV_PID" 2>/dev/null || true
      forget_pid "$SRV_PID"
      grep -qi 'address already in use' "$logfile" && return 2
      tail -n 30 "$logfile" >&2
      die "regcache exited before answering /v2/ (log $logfile)"
    fi
    ((SECONDS < deadline)) || {
      tail -n 30 "$logfile" >&2
      die "regcache did not answer /v2/ within ${STARTUP_DEADLINE_SECS}s"
    }
    sleep 0.01 # polling interval
  done
  SRV_READY=$(python3 -c "import time; print('%.3f' % (time.time() - $SRV_T0))")
}

start_server_retrying() {
  local attempt rc
  for attempt in 1 2 3; do
    rc=0
    start_server "$1" || rc=$?
    [[ $rc == 0 ]] && return 0
    log "port $SRV_PORT taken, retrying"
  done
  die "no free port"
}

stop_server() { # SIGTERM by PID, wait; sets SRV_STOP_SECS
  local t
  t=$(date +%s.%N)
  kill -TERM "$SRV_PID" 2>/dev/null || true
  wait "$SRV_PID" 2>/dev/null || true
  forget_pid "$SRV_PID"
  SRV_STOP_SECS=$(python3 -c "import time; print('%.2f' % (time.time() - $t))")
}

# ----- 1. schema: the server creates it on an empty data dir ---------------------------------
mkdir -p "$DATA"
log "creating the schema: starting regcache once on the empty data dir"
start_server_retrying "$WORK/schema.log"
stop_server
log "  empty start-up: ${SRV_READY}s to /v2/ 200; stopped in ${SRV_STOP_SECS}s"
EMPTY_READY=$SRV_READY

# ----- 2. seed ---------------------------------------------------------------------------------
log "seeding $N entries (files under $DATA/store, rows in $DATA/regcache.db)"
seed_start=$SECONDS
SEED_LINE=$(python3 "$HELPER" seed "$DATA" "$N" --layers "$LAYERS" --ttl "$TTL_SECS") || die "seeding"
eval "$SEED_LINE"
SEED_SECS=$((SECONDS - seed_start))
# The seeder's writes (the DB and every blob file) reach the disk now, not during the
# measured run: cached blobs are written long before they expire, and unlinking files whose
# writeback is still under way measured the seeder's I/O (the deletion tail took 11-14 s
# instead of 2-4 s).
sync_start=$SECONDS
sync
SYNC_SECS=$((SECONDS - sync_start))
FILES_BEFORE=$(python3 "$HELPER" count-files "$DATA/store")
[[ $FILES_BEFORE == "$SEED_FILES" ]] || die "seeded $SEED_FILES files, found $FILES_BEFORE"
log "seeded in ${SEED_SECS}s: $SEED_ENTRIES entries = $SEED_TAGS tags + $SEED_MANIFEST_LINKS manifest links" \
  "+ $SEED_BLOB_LINKS blob links ($SEED_IMAGES images in $SEED_REPOS repositories); $SEED_MANIFESTS manifests;" \
  "$SEED_BLOBS blobs = $SEED_FILES files ($SEED_FILE_BYTES bytes); DB $((SEED_DB_BYTES / 1048576)) MiB;" \
  "flushed to disk (sync) in ${SYNC_SECS}s"

# ----- 3. the start-up reconciliation, alone -------------------------------------------------
FSCK_SECS="-" FSCK_RSS_MIB="-"
if [[ ${BENCH_FSCK:-1} == 1 ]]; then
  if [[ -x /usr/bin/time ]]; then
    log "timing \`regcache fsck --dry-run\` (the start-up reconciliation, without the server)"
    /usr/bin/time -f '%e %M' -o "$WORK/fsck.time" "$BIN" fsck --dry-run --config "$CONFIG" \
      >"$WORK/fsck.out" 2>"$WORK/fsck.err" || die "fsck --dry-run: $(tail -n 5 "$WORK/fsck.err")"
    read -r FSCK_SECS fsck_kib <"$WORK/fsck.time"
    FSCK_RSS_MIB=$(python3 -c "print('%.1f' % ($fsck_kib / 1024))")
    log "  fsck --dry-run: ${FSCK_SECS}s, peak RSS ${FSCK_RSS_MIB} MiB; $(tr '\n' ' ' <"$WORK/fsck.out" | tr -s ' ')"
  else
    log "no /usr/bin/time: skipping the standalone fsck timing"
  fi
fi

# ----- 4. start-up alone, repeated ----------------------------------------------------------
# Each trial is stopped as soon as /v2/ answers: the expiry loop's first pass comes 1 s
# after start, so nothing expires (checked).
STARTUP_TRIALS=()
for ((trial = 1; trial <= ${BENCH_STARTUPS:-3}; trial++)); do
  start_server_retrying "$WORK/startup-$trial.log"
  stop_server
  STARTUP_TRIALS+=("$SRV_READY")
done
if ((${#STARTUP_TRIALS[@]} > 0)); then
  left=$(python3 "$HELPER" count-entries "$DATA/regcache.db")
  [[ $left == "$SEED_ENTRIES" ]] || die "a start-up trial expired entries ($left of $SEED_ENTRIES left)"
  STARTUP_MEDIAN=$(printf '%s\n' "${STARTUP_TRIALS[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  log "start-up trials (exec -> /v2/ 200): ${STARTUP_TRIALS[*]} s"
else
  STARTUP_MEDIAN="-"
fi

# ----- 5. the measured run ----------------------------------------------------------------------
READY_FILE="$WORK/ready"
WATCH_OUT="$WORK/watch.env"
start_watcher() { # called right after exec: RSS is sampled from the first moment
  python3 "$HELPER" watch --pid "$SRV_PID" --db "$DATA/regcache.db" --t0 "$SRV_T0" \
    --ready-file "$READY_FILE" --out "$WATCH_OUT" --entries "$SEED_ENTRIES" --blobs "$SEED_BLOBS" --tags "$SEED_TAGS" \
    --poll "$POLL" --timeout "$TIMEOUT" &
  WATCH_PID=$!
  PIDS+=("$WATCH_PID")
}
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
log "starting regcache on $SEED_ENTRIES due entries (load average $LOAD_BEFORE)"
ON_EXEC=start_watcher start_server_retrying "$WORK/server.log"
touch "$READY_FILE"
log "  answered /v2/ after ${SRV_READY}s (pid $SRV_PID, port $SRV_PORT); waiting for expiry and deletion"
wait "$WATCH_PID" || die "the watcher failed"
forget_pid "$WATCH_PID"
# shellcheck disable=SC1090
source "$WATCH_OUT"
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
FILES_AFTER=$(python3 "$HELPER" count-files "$DATA/store")
kill -0 "$SRV_PID" 2>/dev/null || die "regcache exited during the run (log $WORK/server.log)"
stop_server
case $W_REASON in
  done) [[ $FILES_AFTER == 0 ]] || die "$FILES_AFTER blob files left in the store after every row went" ;;
  timeout) log "NOT DRAINED within ${TIMEOUT}s (BENCH_TIMEOUT): reporting progress so far" ;;
  *) die "watcher stopped: $W_REASON" ;;
esac

strip_ansi() { sed 's/\x1b\[[0-9;]*m//g' "$@"; }
WARNINGS=$(strip_ansi "$WORK/server.log" | grep -cE ' WARN | ERROR |panicked' || true)
if ((WARNINGS > 0)); then
  log "regcache logged $WARNINGS warnings/errors; first ones:"
  strip_ansi "$WORK/server.log" | grep -E ' WARN | ERROR |panicked' | head -n 10 >&2
fi
RECONCILE_LINE=$(strip_ansi "$WORK/server.log" | grep -m1 -E 'reconciliation (found|repaired|failed)' |
  sed -E 's/^[^ ]+ +//' || true)

# ----- 6. report -------------------------------------------------------------------------------
calc() { python3 -c "print($1)"; }
verdict() { if python3 -c "import sys; sys.exit(0 if ($1) else 1)"; then echo PASS; else echo MISS; fi; }

# Expiry starts with the first batch's commit: the first tags gone (0.5 s probes).
EXPIRY_START=${W_FIRST_EXPIRED:-${W_FIRST_QUEUED:-$SRV_READY}}
LEFT=$((W_LAST_TAGS + W_LAST_MANIFEST_LINKS + W_LAST_BLOB_LINKS))
EXPIRED=$((SEED_ENTRIES - LEFT))
DELETED=$((SEED_BLOBS - W_LAST_BLOBS))
if [[ $W_REASON == done ]]; then
  TOTAL=$W_ALL_DONE
  TOTAL_OK=$(verdict "$TOTAL < 60")
  RATE=$(calc "'%.0f' % ($SEED_ENTRIES / $TOTAL)")
  RATE_LABEL="entries/s (N / total)" RATE_OK=$(verdict "$RATE > $SEED_ENTRIES / 60")
  DB_PART=$W_ENTRIES_DONE
  DB_RATE=$(calc "'%.0f' % ($SEED_ENTRIES / max($W_ENTRIES_DONE - $EXPIRY_START, 1e-9))")
  TAIL=$(calc "'%.1f' % ($W_ALL_DONE - $W_ENTRIES_DONE)")
  DEL_RATE=$(calc "'%.0f' % ($SEED_FILES / max($W_ALL_DONE - $EXPIRY_START, 1e-9))")
  PROGRESS=""
else
  TOTAL=">$W_END" TOTAL_OK=MISS
  RATE=$(calc "'%.0f' % ($EXPIRED / $W_END)")
  RATE_LABEL="entries/s so far (expired / elapsed)" RATE_OK=MISS
  DB_PART=${W_ENTRIES_DONE:->$W_END}
  DB_RATE=$(calc "'%.0f' % ($EXPIRED / max($W_END - $EXPIRY_START, 1e-9))")
  TAIL="-"
  DEL_RATE=$(calc "'%.0f' % ($DELETED / max($W_END - $EXPIRY_START, 1e-9))")
  PROGRESS="NOT DRAINED after ${W_END}s: $EXPIRED of $SEED_ENTRIES entries expired, $DELETED of $SEED_BLOBS blobs deleted, $W_LAST_PENDING deletes pending (rates below are so far)"
fi
PEAK_KIB=$((W_HWM_KIB > W_PEAK_RSS_KIB ? W_HWM_KIB : W_PEAK_RSS_KIB))
PEAK_MIB=$(calc "'%.1f' % ($PEAK_KIB / 1024)")
READY_RSS_MIB=$(calc "'%.1f' % ($W_RSS_READY_KIB / 1024)")

row() { printf '%-60s %12s %10s %6s\n' "$@"; }
echo
echo "regcache expiry benchmark — $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD -- src schema Cargo.toml 2>/dev/null || echo '+dirty')," \
  "$(nproc) cores, filesystem backend${BENCH_BIN:+, binary $BIN}"
echo "seeded: $SEED_ENTRIES entries = $SEED_TAGS tags + $SEED_MANIFEST_LINKS manifest links + $SEED_BLOB_LINKS blob links" \
  "($SEED_IMAGES images, $SEED_REPOS repos); $SEED_MANIFESTS manifests; $SEED_BLOBS blobs = $SEED_FILES files;" \
  "DB $((SEED_DB_BYTES / 1048576)) MiB; seeding took ${SEED_SECS}s, then sync ${SYNC_SECS}s"
echo "load average (1/5/15 min) before the run: $LOAD_BEFORE; after: $LOAD_AFTER (other work on the machine skews timings)"
[[ -z $PROGRESS ]] || echo "$PROGRESS"
echo
row "metric" "value" "target" "result"
row "------------------------------------------------------------" "------------" "----------" "------"
row "start-up: exec -> GET /v2/ 200, s ($SEED_ENTRIES entries)" "$SRV_READY" "< 1" "$(verdict "$SRV_READY < 1")"
row "  median of ${#STARTUP_TRIALS[@]} more start-ups (${STARTUP_TRIALS[*]}), s" "$STARTUP_MEDIAN" "< 1" \
  "$([[ $STARTUP_MEDIAN == - ]] && echo - || verdict "$STARTUP_MEDIAN < 1")"
row "expiry: exec -> all $SEED_ENTRIES entries expired and deleted, s" "$TOTAL" "< 60" "$TOTAL_OK"
row "  $RATE_LABEL" "$RATE" "> $((SEED_ENTRIES / 60))" "$RATE_OK"
row "  DB part: exec -> last entry expired, s" "$DB_PART" "" ""
row "    entries/s (first batch -> last entry expired)" "$DB_RATE" "" ""
row "  deletion tail: last entry expired -> store empty, s" "$TAIL" "" ""
row "    objects deleted/s (first batch -> store empty)" "$DEL_RATE" "" ""
row "peak RSS (VmHWM; 50 ms samples: $(calc "'%.1f' % ($W_PEAK_RSS_KIB / 1024)") at ${W_PEAK_RSS_AT}s), MiB" "$PEAK_MIB" "< 100" "$(verdict "$PEAK_MIB < 100")"
row "  RSS when /v2/ first answered, MiB" "$READY_RSS_MIB" "" ""
row "server CPU s during the run (user+sys)" "$W_CPU_SECS" "" ""
row "start-up on an empty data dir, s" "$EMPTY_READY" "" ""
row "fsck --dry-run alone (= the start-up reconciliation), s" "$FSCK_SECS" "" ""
row "  its peak RSS, MiB" "$FSCK_RSS_MIB" "" ""
row "shutdown after the run (SIGTERM -> exit), s" "$SRV_STOP_SECS" "" ""
echo
echo "milestones (s after exec): first entries expired ${W_FIRST_EXPIRED:--}, first delete queued ${W_FIRST_QUEUED:--}, first blob deleted ${W_FIRST_DELETED:--} (5 s counts)," \
  "entries done ${W_ENTRIES_DONE:--}, all done ${W_ALL_DONE:--}; watcher: $W_POLLS probes every ${POLL}s, $W_COUNTS full counts, ${W_READ_SECS}s reading"
echo "server log: $WARNINGS warnings/errors; ${RECONCILE_LINE:-no reconciliation line logged}" | cut -c1-300
