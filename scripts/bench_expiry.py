#!/usr/bin/env python3
"""Helpers for scripts/bench_expiry.sh (issue 3, "Scale"); standard library only.

Subcommands:
  seed DATA_DIR ENTRIES [--repos R] [--layers L] [--ttl SECS]
      Fills a data dir whose schema the server already created with ENTRIES cached
      entries, all due already. An "entry" is one row of tags, repo_manifests or
      repo_blobs (what expiry counts). The state is a consistent pull-through cache of
      small images: each image is one tag -> one manifest (linked in its repository) ->
      one config blob + L layer blobs (each linked in the repository, each a real file
      under store/blobs/sha256/<2 hex>/<64 hex> whose sha256 is its digest, and named by
      the manifest in manifest_refs). So one image = 2 + (1 + L) entries; ENTRIES is
      rounded down to whole images. Also records the applied settings (ttl of upstream
      `bench`, storage.delete.enabled = true) so start-up reschedules nothing.
      Prints one line of shell assignments describing what was seeded.
  watch --pid PID --db DB --t0 EPOCH --ready-file F --out F [--poll S] [--count-every S]
        [--timeout S]
      Samples the server's VmRSS every 50 ms from the start; once READY_FILE exists,
      probes the database read-only every --poll seconds (is anything left in tags,
      repo_manifests, repo_blobs, pending_deletes, blobs, manifests; one read transaction)
      and counts those rows every --count-every seconds, until everything is gone, the
      server exits or the timeout passes. Writes the milestones, the peak RSS and the
      server's CPU seconds to OUT as shell assignments.
  count-files STORE_DIR
      Number of files under STORE_DIR/blobs/sha256.
  count-entries DB
      Rows of tags + repo_manifests + repo_blobs (read-only).
"""

import argparse
import hashlib
import json
import os
import sqlite3
import sys
import time

UPSTREAM = "bench"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
IMAGES_PER_REPO = 250
BATCH_IMAGES = 10000


def log(msg):
    print("[seed %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def seed(args):
    data_dir = args.data_dir
    per_image = 3 + args.layers  # tag + manifest link + (config + layers) blob links
    images = args.entries // per_image
    if images < 1:
        sys.exit("ENTRIES must be at least %d (one image)" % per_image)
    repos = args.repos or max(1, (images + IMAGES_PER_REPO - 1) // IMAGES_PER_REPO)
    db_path = os.path.join(data_dir, "regcache.db")
    blob_root = os.path.join(data_dir, "store", "blobs", "sha256")
    for i in range(256):
        os.makedirs(os.path.join(blob_root, "%02x" % i), exist_ok=True)

    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -1048576")  # 1 GiB page cache for the bulk insert
    conn.execute("PRAGMA temp_store = MEMORY")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version < 2:
        sys.exit("%s has schema version %d; start the server once first" % (db_path, version))
    existing = sum(
        conn.execute("SELECT count(*) FROM %s" % t).fetchone()[0]
        for t in ("tags", "repo_manifests", "repo_blobs", "blobs", "manifests"))
    if existing:
        sys.exit("%s is not empty" % db_path)

    now = int(time.time())
    ttl = args.ttl
    # Used long enough ago that last use + ttl is already past: everything is due now.
    last_used = now - ttl - 60
    expires = last_used + ttl
    cached = last_used - 600

    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO repositories (id, upstream, name, created_at, last_used_at) VALUES (?, ?, ?, ?, ?)",
        ((r + 1, UPSTREAM, "bench/app-%05d" % r, cached, last_used) for r in range(repos)))
    conn.execute(
        "INSERT INTO upstream_settings (upstream, ttl_secs, applied_at) VALUES (?, ?, ?)"
        " ON CONFLICT (upstream) DO UPDATE SET ttl_secs = excluded.ttl_secs, applied_at = excluded.applied_at",
        (UPSTREAM, ttl, cached))
    conn.execute(
        "INSERT INTO settings (key, value, applied_at) VALUES ('storage.delete.enabled', 'true', ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value, applied_at = excluded.applied_at",
        (cached,))

    files = 0
    file_bytes = 0
    started = time.monotonic()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)

    def write_blob(content):
        nonlocal files, file_bytes
        hexd = hashlib.sha256(content).hexdigest()
        fd = os.open(os.path.join(blob_root, hexd[:2], hexd), flags, 0o644)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
        files += 1
        file_bytes += len(content)
        return "sha256:" + hexd

    for first in range(0, images, BATCH_IMAGES):
        blobs, manifests, refs, repo_blobs, repo_manifests, tags = [], [], [], [], [], []
        for i in range(first, min(images, first + BATCH_IMAGES)):
            repo_id = i % repos + 1
            layer_descs = []
            diff_ids = []
            for k in range(args.layers):
                content = b"regcache bench layer %d/%d\n" % (i, k)
                d = write_blob(content)
                blobs.append((d, len(content)))
                layer_descs.append({"mediaType": OCI_LAYER, "digest": d, "size": len(content)})
                diff_ids.append(d)
            config = json.dumps(
                {"architecture": "amd64", "os": "linux",
                 "rootfs": {"type": "layers", "diff_ids": diff_ids}},
                separators=(",", ":"), sort_keys=True).encode()
            config_digest = write_blob(config)
            blobs.append((config_digest, len(config)))
            body = json.dumps(
                {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                 "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                 "layers": layer_descs},
                separators=(",", ":"), sort_keys=True).encode()
            m_digest = "sha256:" + hashlib.sha256(body).hexdigest()
            manifests.append((m_digest, OCI_MANIFEST, len(body), body, config_digest, cached))
            refs.append((m_digest, config_digest))
            for desc in layer_descs:
                refs.append((m_digest, desc["digest"]))
            for b in [config_digest] + diff_ids:
                repo_blobs.append((repo_id, b))
            repo_manifests.append((repo_id, m_digest))
            tags.append((repo_id, "v%07d" % i, m_digest))
        conn.executemany(
            "INSERT INTO blobs (digest, size_bytes, cached_at, last_used_at) VALUES (?, ?, %d, %d)"
            % (cached, last_used), blobs)
        conn.executemany(
            "INSERT INTO manifests (digest, media_type, size_bytes, body, config_digest, cached_at)"
            " VALUES (?, ?, ?, ?, ?, ?)", manifests)
        conn.executemany(
            "INSERT INTO manifest_refs (manifest_digest, ref_digest, kind) VALUES (?, ?, 'blob')", refs)
        conn.executemany(
            "INSERT INTO repo_blobs (repo_id, digest, cached_at, last_used_at, expires_at)"
            " VALUES (?, ?, %d, %d, %d)" % (cached, last_used, expires), repo_blobs)
        conn.executemany(
            "INSERT INTO repo_manifests (repo_id, digest, cached_at, last_used_at, expires_at)"
            " VALUES (?, ?, %d, %d, %d)" % (cached, last_used, expires), repo_manifests)
        conn.executemany(
            "INSERT INTO tags (repo_id, name, digest, cached_at, last_used_at, expires_at)"
            " VALUES (?, ?, ?, %d, %d, %d)" % (cached, last_used, expires), tags)
        done = min(images, first + BATCH_IMAGES)
        if done % (BATCH_IMAGES * 10) == 0 or done == images:
            rate = done / max(time.monotonic() - started, 1e-9)
            log("%d/%d images (%d files), %.0f images/s" % (done, images, files, rate))
    conn.execute("COMMIT")
    # The server must start on an empty WAL, as after a clean shutdown.
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = {t: conn.execute("SELECT count(*) FROM %s" % t).fetchone()[0]
              for t in ("tags", "repo_manifests", "repo_blobs", "blobs", "manifests", "manifest_refs")}
    conn.close()
    entries = counts["tags"] + counts["repo_manifests"] + counts["repo_blobs"]
    assert entries == images * per_image, (entries, images, per_image)
    assert counts["blobs"] == files, (counts, files)
    print("SEED_ENTRIES=%d SEED_IMAGES=%d SEED_REPOS=%d SEED_TAGS=%d SEED_MANIFEST_LINKS=%d "
          "SEED_BLOB_LINKS=%d SEED_BLOBS=%d SEED_MANIFESTS=%d SEED_FILES=%d SEED_FILE_BYTES=%d "
          "SEED_DB_BYTES=%d SEED_EXPIRES_AT=%d"
          % (entries, images, repos, counts["tags"], counts["repo_manifests"], counts["repo_blobs"],
             counts["blobs"], counts["manifests"], files, file_bytes, os.path.getsize(db_path),
             expires))


def read_status(pid):
    """(VmRSS KiB, VmHWM KiB) of pid, or None when it is gone."""
    rss = hwm = 0
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return rss, hwm


def cpu_secs(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


TABLES = {
    "tags": "tags",
    "manifest_links": "repo_manifests",
    "blob_links": "repo_blobs",
    "pending": "pending_deletes",
    "blobs": "blobs",
    "manifests": "manifests",
}


def watch(args):
    """Milestones come from cheap EXISTS probes every --poll seconds; full counts (a scan
    of each table, ~0.1 s of a core at 1 M entries) only every --count-every seconds, so
    the watcher does not compete much with the server it measures."""
    pid, t0 = args.pid, args.t0
    peak_rss = peak_at = 0
    rss_ready = None
    conn = None
    ms = {}  # milestone -> seconds after t0
    last = None
    next_poll = next_count = 0.0
    read_secs = 0.0
    polls = counts = 0
    cpu = None
    reason = "timeout"
    deadline = time.time() + args.timeout

    def mark(name, t):
        if name not in ms:
            ms[name] = t - t0

    while True:
        now = time.time()
        st = read_status(pid)
        if st is None:
            reason = "server exited"
            break
        if st[0] > peak_rss:
            peak_rss, peak_at = st[0], now - t0
        hwm = st[1]
        cpu = cpu_secs(pid) or cpu
        if conn is None and os.path.exists(args.ready_file):
            rss_ready = st[0]
            conn = sqlite3.connect("file:%s?mode=ro" % args.db, uri=True, isolation_level=None,
                                   timeout=30)
        if conn is not None and now >= next_poll:
            q0 = time.time()  # the snapshot is as of the start of the read
            full = q0 >= next_count
            conn.execute("BEGIN")
            if full:
                c = {k: conn.execute("SELECT count(*) FROM %s" % t).fetchone()[0]
                     for k, t in TABLES.items()}
            else:
                c = {k: conn.execute("SELECT EXISTS (SELECT 1 FROM %s)" % t).fetchone()[0]
                     for k, t in TABLES.items()}
            # Until the first batch commits, a count of the tags (~10 ms; every batch
            # starts with them) so the start of expiry is seen within a poll.
            tags_left = None
            if "first_expired" not in ms:
                tags_left = c["tags"] if full else conn.execute("SELECT count(*) FROM tags").fetchone()[0]
            conn.execute("COMMIT")
            read_secs += time.time() - q0
            polls += 1
            entries = c["tags"] + c["manifest_links"] + c["blob_links"]
            if c["pending"]:
                mark("first_queued", q0)
            if tags_left is not None and tags_left < args.tags:
                mark("first_expired", q0)
            if entries == 0:
                mark("entries_done", q0)
            if entries == 0 and c["pending"] == 0 and c["blobs"] == 0 and c["manifests"] == 0:
                mark("all_done", q0)
                reason = "done"
            if full:
                counts += 1
                if last is None:
                    ms["entries_at_ready"] = entries
                if c["blobs"] < args.blobs:
                    mark("first_deleted", q0)
                last = c
                print("[watch %6.1fs] entries %d (tags %d, manifest links %d, blob links %d); "
                      "manifests %d; pending deletes %d; blobs %d; RSS %.1f MiB"
                      % (q0 - t0, entries, c["tags"], c["manifest_links"], c["blob_links"],
                         c["manifests"], c["pending"], c["blobs"], st[0] / 1024),
                      file=sys.stderr, flush=True)
                next_count = q0 + args.count_every
            if reason == "done":
                break
            next_poll = q0 + args.poll
        if now > deadline:
            break
        time.sleep(0.05)
    st = read_status(pid)
    if st is not None:
        hwm = max(hwm, st[1])
    if conn is not None and reason != "server exited":
        last = {k: conn.execute("SELECT count(*) FROM %s" % t).fetchone()[0]
                for k, t in TABLES.items()}
    with open(args.out + ".tmp", "w") as f:
        f.write("W_REASON='%s'\nW_END=%.3f\n" % (reason, time.time() - t0))
        for k, v in ms.items():
            f.write("W_%s=%s\n" % (k.upper(), ("%.3f" % v) if isinstance(v, float) else v))
        f.write("W_PEAK_RSS_KIB=%d\nW_PEAK_RSS_AT=%.2f\nW_HWM_KIB=%d\n" % (peak_rss, peak_at, hwm))
        f.write("W_RSS_READY_KIB=%d\n" % (rss_ready or 0))
        f.write("W_CPU_SECS=%.2f\n" % (cpu or 0))
        f.write("W_POLLS=%d\nW_COUNTS=%d\nW_READ_SECS=%.2f\n" % (polls, counts, read_secs))
        if last is not None:
            for k, v in last.items():
                f.write("W_LAST_%s=%d\n" % (k.upper(), v))
    os.replace(args.out + ".tmp", args.out)


def count_files(args):
    root = os.path.join(args.store_dir, "blobs", "sha256")
    n = 0
    try:
        with os.scandir(root) as top:
            for d in top:
                if d.is_dir(follow_symlinks=False):
                    with os.scandir(d.path) as inner:
                        n += sum(1 for _ in inner)
                else:
                    n += 1
    except FileNotFoundError:
        pass
    print(n)


def count_entries(args):
    conn = sqlite3.connect("file:%s?mode=ro" % args.db, uri=True)
    print(sum(conn.execute("SELECT count(*) FROM %s" % t).fetchone()[0]
              for t in ("tags", "repo_manifests", "repo_blobs")))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("seed")
    s.add_argument("data_dir")
    s.add_argument("entries", type=int)
    s.add_argument("--repos", type=int, default=0)
    s.add_argument("--layers", type=int, default=1)
    s.add_argument("--ttl", type=int, default=3600)
    w = sub.add_parser("watch")
    w.add_argument("--pid", type=int, required=True)
    w.add_argument("--db", required=True)
    w.add_argument("--t0", type=float, required=True)
    w.add_argument("--ready-file", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--entries", type=int, required=True)
    w.add_argument("--blobs", type=int, required=True)
    w.add_argument("--tags", type=int, required=True)
    w.add_argument("--poll", type=float, default=0.5)
    w.add_argument("--count-every", type=float, default=5.0)
    w.add_argument("--timeout", type=float, default=600)
    c = sub.add_parser("count-files")
    c.add_argument("store_dir")
    e = sub.add_parser("count-entries")
    e.add_argument("db")
    args = p.parse_args()
    {"seed": seed, "watch": watch, "count-files": count_files,
     "count-entries": count_entries}[args.cmd](args)


if __name__ == "__main__":
    main()
