#!/usr/bin/env bash
# Bundle benchmark (issue 12, "Speed and memory"): `regcache export` and `regcache import`
# of the fixture set (fixtures/oci/sample: an index of two images and a single image)
# plus a 1 GiB image, side by side with `tar -cf` / `tar -xf` of the same bytes on the
# same disk and with `skopeo sync` of the same images into a directory, all in one run;
# printed as a table of figures and ratios against the targets, with peak RSS.
#
#   bash scripts/bench_bundle.sh          # from the repo root; a few minutes after the build
#
# Steps: cargo build --release; docker-registry is the upstream, seeded with skopeo
# (bench/multi:v1, bench/single:v1 from the fixture layout, bench/big:v1 with one 1 GiB
# layer); regcache (release) fills its cache by skopeo pulling every image through it,
# and is stopped. Then BENCH_ROUNDS rounds (default 3), the median of each reported:
#   - export: `regcache export --all -o bundle.tar` against `tar -cf` of the store's blob
#     files (the same bytes; neither fsyncs);
#   - import: `regcache import bundle.tar` into an empty data dir (every blob hashed,
#     committed, every image linked; no fsync, the default `storage.fsync = false`)
#     against `tar -xf bundle.tar` into an empty directory;
#   - `skopeo sync --src docker --dest dir` of the three repositories from the upstream
#     into an empty directory, the way such a bundle is made without regcache; and, for
#     information, `skopeo sync --src dir --dest docker` of that directory into an empty
#     docker-registry, the way it is loaded at the other end.
# Peak RSS (GNU time: the kernel's high-water mark of the process) of export and import for the fixture set
# alone and with the 1 GiB image shows memory does not grow with the bundle. One `.tar.zst`
# export and import are timed for information (no target).
# Page caches are warm for every contender alike (everything was just written). The
# load average is printed: other processes on the machine share its cores.
#
# Exit status: 0 whether targets are met or not (this is a report); non-zero only when
# something broke. Knobs (env): BENCH_KEEP=1 keeps the work dir; BENCH_SKIP_BUILD=1;
# BENCH_ROUNDS (default 3); BENCH_BIG_MIB (default 1024).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
HELPER="$REPO/scripts/bench_helper.py"
BHELPER="$REPO/scripts/bench_bundle.py"
ROUNDS=${BENCH_ROUNDS:-3}
BIG_MIB=${BENCH_BIG_MIB:-1024}
STARTUP_DEADLINE_SECS=30

unset http_proxy https_proxy all_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY RUST_LOG || true
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(REGISTRY|REGCACHE)_' || true)

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}

for tool in cargo docker-registry skopeo tar curl python3; do
  command -v "$tool" >/dev/null || die "\`$tool\` is not on PATH (see .ci/run for how to install it)"
done
[[ -x /usr/bin/time ]] || die "GNU time is missing (apt-get install -y time): it measures peak RSS"

PIDS=()
WORK=""
cleanup() {
  local rc=$? pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n $WORK && -d $WORK ]]; then
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
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

stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

wait_ready() { # URL PID LOG
  local deadline=$((SECONDS + STARTUP_DEADLINE_SECS))
  while ! curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; do
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$3" >&2; return 1; }
    ((SECONDS < deadline)) || { tail -n 20 "$3" >&2; return 1; }
    sleep 0.02 # polling interval
  done
}

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
  log "cargo build --release"
  cargo build --release --quiet || die "cargo build --release"
fi
BIN="$REPO/target/release/regcache"
[[ -x $BIN ]] || die "$BIN missing"

LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/regcache-bench-bundle.XXXXXX")
log "work dir $WORK (load average $LOAD_AT_START)"

# ----- registries -----------------------------------------------------------------------
start_registry() { # NAME -> sets REG_PORT, REG_PID; storage in $WORK/NAME/storage
  local dir="$WORK/$1"
  mkdir -p "$dir"
  REG_PORT=$(python3 "$HELPER" free-port)
  cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$REG_PORT
  secret: regcache-bench-not-a-secret
EOF
  docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 </dev/null &
  REG_PID=$!
  PIDS+=("$REG_PID")
  wait_ready "http://127.0.0.1:$REG_PORT/v2/" "$REG_PID" "$dir/log" || die "docker-registry ($1) did not start"
}

# The upstream, seeded.
start_registry registry
UP="127.0.0.1:$REG_PORT"

log "seeding: the fixture set and a $BIG_MIB MiB image"
python3 "$BHELPER" seed-big "$WORK/seed-big" "$BIG_MIB"
SKOPEO=(skopeo --insecure-policy copy --quiet --src-tls-verify=false --dest-tls-verify=false --preserve-digests)
"${SKOPEO[@]}" --all "oci:$REPO/fixtures/oci/sample:multi" "docker://$UP/bench/multi:v1"
"${SKOPEO[@]}" "oci:$REPO/fixtures/oci/sample:single" "docker://$UP/bench/single:v1"
"${SKOPEO[@]}" "oci:$WORK/seed-big:big" "docker://$UP/bench/big:v1"
rm -rf "$WORK/seed-big"

# ----- regcache, filled by pulling through it ---------------------------------------------
site_config() { # DIR -> writes DIR/regcache.toml with its data in DIR/data
  mkdir -p "$1"
  cat >"$1/regcache.toml" <<EOF
[server]
listen = "127.0.0.1:${2:-0}"
data_dir = "$1/data"

[[upstream]]
name = "origin"
url = "http://$UP"
default = true

[log]
level = "warn"
EOF
}
RC_PORT=$(python3 "$HELPER" free-port)
site_config "$WORK/source" "$RC_PORT"
"$BIN" serve --config "$WORK/source/regcache.toml" >"$WORK/source/log" 2>&1 </dev/null &
RC_PID=$!
PIDS+=("$RC_PID")
wait_ready "http://127.0.0.1:$RC_PORT/v2/" "$RC_PID" "$WORK/source/log" || die "regcache did not start"
log "filling the cache through regcache with skopeo"
for ref in multi:v1 single:v1 big:v1; do
  "${SKOPEO[@]}" --all "docker://127.0.0.1:$RC_PORT/bench/$ref" "dir:$WORK/fill"
  rm -rf "$WORK/fill"
done
stop_pid "$RC_PID"
sync

# The fixture set alone, for the memory comparison.
site_config "$WORK/fixtures"
FIXTURE_LIST="$WORK/fixtures.toml"
printf '[[image]]\nref = "%s/bench/multi:v1"\n\n[[image]]\nref = "%s/bench/single:v1"\n' "$UP" "$UP" >"$FIXTURE_LIST"

measure() { # NAME CMD... -> appends "NAME seconds rss_kib" to $WORK/results
  python3 "$BHELPER" measure "$WORK/m" "${@:2}" >>"$WORK/commands.log" 2>&1
  read -r secs rss status <"$WORK/m"
  [[ $status == 0 ]] || { tail -n 20 "$WORK/commands.log" >&2; die "$1 exited with $status"; }
  echo "$1 $secs $rss" >>"$WORK/results"
}

: >"$WORK/results"
BUNDLE="$WORK/bundle.tar"
for ((round = 1; round <= ROUNDS; round++)); do
  log "round $round of $ROUNDS"
  rm -f "$BUNDLE" "$BUNDLE.digests" "$WORK/ref.tar"
  measure export "$BIN" export --config "$WORK/source/regcache.toml" --all -o "$BUNDLE"
  measure tar-c tar -cf "$WORK/ref.tar" -C "$WORK/source/data/store" blobs
  rm -f "$WORK/ref.tar"

  rm -rf "$WORK/site" && site_config "$WORK/site"
  measure import "$BIN" import --config "$WORK/site/regcache.toml" "$BUNDLE"
  rm -rf "$WORK/extract" && mkdir -p "$WORK/extract"
  measure tar-x tar -xf "$BUNDLE" -C "$WORK/extract"
  rm -rf "$WORK/extract" "$WORK/site"

  rm -rf "$WORK/sync"
  measure skopeo-sync sh -c "for r in multi single big; do skopeo --insecure-policy sync --all --src docker --dest dir --src-tls-verify=false '$UP/bench/'\$r '$WORK/sync' || exit 1; done"
  # The other half of a skopeo workflow across a gap: that directory into an empty registry.
  start_registry "push-$round"
  measure skopeo-push skopeo --insecure-policy sync --all --src dir --dest docker --dest-tls-verify=false "$WORK/sync" "127.0.0.1:$REG_PORT/bench"
  stop_pid "$REG_PID"
  rm -rf "$WORK/sync" "$WORK/push-$round"
done
BUNDLE_BYTES=$(stat -c %s "$BUNDLE")

log "the fixture set alone (memory does not grow with the bundle)"
measure export-small "$BIN" export --config "$WORK/source/regcache.toml" "$FIXTURE_LIST" -o "$WORK/small.tar"
measure import-small "$BIN" import --config "$WORK/fixtures/regcache.toml" "$WORK/small.tar"
log ".tar.zst, once"
measure export-zst "$BIN" export --config "$WORK/source/regcache.toml" --all -o "$WORK/bundle.tar.zst"
rm -rf "$WORK/site" && site_config "$WORK/site"
measure import-zst "$BIN" import --config "$WORK/site/regcache.toml" "$WORK/bundle.tar.zst"
ZST_BYTES=$(stat -c %s "$WORK/bundle.tar.zst")

LOAD_AT_END=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$WORK/results" "$BUNDLE_BYTES" "$ZST_BYTES" "$LOAD_AT_START" "$LOAD_AT_END" <<'EOF'
import statistics, sys
path, bundle_bytes, zst_bytes, load0, load1 = sys.argv[1:]
rows = {}
for line in open(path):
    name, secs, rss = line.split()
    rows.setdefault(name, []).append((float(secs), int(rss)))
med = {k: statistics.median(s for s, _ in v) for k, v in rows.items()}
rss = {k: max(r for _, r in v) for k, v in rows.items()}
mib = int(bundle_bytes) / 2**20
def rate(k): return mib / med[k]
def verdict(ok): return "ok" if ok else "MISS"
print(f"\nbundle: {mib:.0f} MiB (.tar.zst: {int(zst_bytes) / 2**20:.0f} MiB); "
      f"median of {len(rows['export'])} rounds; load average {load0} at start, {load1} at end\n")
print(f"{'':34}{'seconds':>9}{'MiB/s':>9}{'peak RSS':>11}")
for k, label in [("export", "regcache export"), ("tar-c", "tar -cf"),
                 ("import", "regcache import"), ("tar-x", "tar -xf"), ("skopeo-sync", "skopeo sync (3 repos) to dir"),
                 ("skopeo-push", "skopeo sync dir to registry"),
                 ("export-zst", "regcache export .tar.zst"), ("import-zst", "regcache import .tar.zst"),
                 ("export-small", "regcache export, fixture set only"), ("import-small", "regcache import, fixture set only")]:
    if k in med:
        speed = "-" if k.endswith("small") else f"{rate(k):.0f}"
        print(f"{label:34}{med[k]:9.2f}{speed:>9}{rss[k] / 1024:8.1f} MiB")
e, i = med["export"], med["import"]
checks = [
    (f"export vs tar -cf: {med['tar-c'] / e:.2f}x", med["tar-c"] / e >= 0.5),
    (f"import vs tar -xf: {med['tar-x'] / i:.2f}x", med["tar-x"] / i >= 0.5),
    (f"export vs skopeo sync: {med['skopeo-sync'] / e:.1f}x faster", med["skopeo-sync"] / e >= 3),
    (f"import vs skopeo sync: {med['skopeo-sync'] / i:.1f}x faster (vs skopeo sync dir to registry, "
     f"the import side of a skopeo workflow: {med['skopeo-push'] / i:.1f}x)", med["skopeo-sync"] / i >= 3),
    (f"peak RSS: export {rss['export'] / 1024:.1f} MiB, import {rss['import'] / 1024:.1f} MiB "
     f"(fixture set only: {rss['export-small'] / 1024:.1f} / {rss['import-small'] / 1024:.1f} MiB; "
     f".tar.zst: {rss['export-zst'] / 1024:.1f} / {rss['import-zst'] / 1024:.1f} MiB)",
     max(rss["export"], rss["import"], rss["export-zst"], rss["import-zst"]) <= 64 * 1024),
]
print()
for text, ok in checks:
    print(f"  [{verdict(ok)}] {text}   (target: {'>= 0.5x' if 'tar' in text.split(':')[0] else '>= 3x' if 'skopeo' in text else '<= 64 MiB'})")
EOF
