#!/usr/bin/env python3
"""SQL replay of a mass expiry: the current schema against a compact one (the next step
named in ARCHITECTURE.md "Known limits"), same work, same driver, same SQLite settings as
regcache's writer.

    python3 scripts/replay_digest_ids.py DATA_DIR_DB [WORK_DIR]

DATA_DIR_DB is a regcache.db seeded by `scripts/bench_expiry.py seed` (every entry due;
keep one with BENCH_KEEP=1, or seed a data dir the server created). The replay copies it
and runs what expiry and the deletion workers do (due tags, manifest links and blob links
in batches; unlinked manifests removed; unreferenced blobs queued, claimed and finished;
no files are touched) until nothing is left, then builds a database of the same shape
(images, repositories, one config and one layer per image) on the compact schema (a
`digests` table giving each digest an integer id in arrival order; links, references
and pending deletes keyed by ids) and replays the same work there. It prints both times.

Only the SQL is measured: no HTTP, no storage, Python's per-statement overhead on both
sides. It is a guide to the schema's cost, not a benchmark of regcache.
"""
import sqlite3, sys, time, os, hashlib, shutil

LIMIT = int(os.environ.get("LIMIT", "4000"))
CLAIM = 2048


def conn(db):
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    c.execute("PRAGMA foreign_keys=ON")
    c.execute("PRAGMA cache_size=-16384")
    c.execute("PRAGMA wal_autocheckpoint=65536")
    c.execute("PRAGMA temp_store=MEMORY")
    return c


COMPACT = """
CREATE TABLE repositories (id INTEGER PRIMARY KEY, upstream TEXT NOT NULL, name TEXT NOT NULL, UNIQUE (upstream, name)) STRICT;
CREATE TABLE upstream_settings (upstream TEXT PRIMARY KEY, ttl_secs INTEGER NOT NULL) STRICT;
CREATE TABLE digests (id INTEGER PRIMARY KEY, digest TEXT NOT NULL UNIQUE) STRICT;
CREATE TABLE blobs (id INTEGER PRIMARY KEY REFERENCES digests (id), size_bytes INTEGER NOT NULL, cached_at INTEGER NOT NULL, last_used_at INTEGER NOT NULL) STRICT;
CREATE TABLE manifests (id INTEGER PRIMARY KEY REFERENCES digests (id), media_type TEXT NOT NULL, size_bytes INTEGER NOT NULL, body BLOB NOT NULL,
  config_id INTEGER, created INTEGER, subject_id INTEGER, cached_at INTEGER NOT NULL) STRICT;
CREATE INDEX manifests_by_config ON manifests (config_id) WHERE config_id IS NOT NULL AND created IS NULL;
CREATE TABLE manifest_refs (manifest_id INTEGER NOT NULL REFERENCES manifests (id) ON DELETE CASCADE, ref_id INTEGER NOT NULL REFERENCES digests (id),
  kind TEXT NOT NULL, PRIMARY KEY (manifest_id, ref_id)) STRICT, WITHOUT ROWID;
CREATE INDEX manifest_refs_by_ref ON manifest_refs (ref_id);
CREATE TABLE repo_blobs (blob_id INTEGER NOT NULL REFERENCES blobs (id), repo_id INTEGER NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
  cached_at INTEGER NOT NULL, last_used_at INTEGER NOT NULL, expires_at INTEGER, deferred INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (blob_id, repo_id)) STRICT, WITHOUT ROWID;
CREATE INDEX repo_blobs_by_repo ON repo_blobs (repo_id, blob_id);
CREATE INDEX repo_blobs_due ON repo_blobs (expires_at, blob_id) WHERE expires_at IS NOT NULL;
CREATE TABLE repo_manifests (manifest_id INTEGER NOT NULL REFERENCES manifests (id), repo_id INTEGER NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
  cached_at INTEGER NOT NULL, last_used_at INTEGER NOT NULL, expires_at INTEGER, deferred INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (manifest_id, repo_id)) STRICT, WITHOUT ROWID;
CREATE INDEX repo_manifests_by_repo ON repo_manifests (repo_id, manifest_id);
CREATE INDEX repo_manifests_due ON repo_manifests (expires_at, manifest_id) WHERE expires_at IS NOT NULL;
CREATE TABLE tags (repo_id INTEGER NOT NULL REFERENCES repositories (id) ON DELETE CASCADE, name TEXT NOT NULL,
  manifest_id INTEGER NOT NULL REFERENCES manifests (id), cached_at INTEGER NOT NULL, last_used_at INTEGER NOT NULL,
  expires_at INTEGER, deferred INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (repo_id, name)) STRICT, WITHOUT ROWID;
CREATE INDEX tags_by_manifest ON tags (manifest_id, repo_id);
CREATE INDEX tags_due ON tags (expires_at, manifest_id) WHERE expires_at IS NOT NULL;
CREATE TABLE pending_deletes (id INTEGER PRIMARY KEY REFERENCES digests (id), size_bytes INTEGER NOT NULL, reason TEXT NOT NULL,
  state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at INTEGER NOT NULL, lease_until INTEGER, last_error TEXT,
  deferred_reason TEXT, created_at INTEGER NOT NULL) STRICT;
CREATE INDEX pending_deletes_due ON pending_deletes (state, next_attempt_at);
CREATE TABLE write_intents (id INTEGER PRIMARY KEY, digest_id INTEGER NOT NULL, expires_at INTEGER NOT NULL) STRICT;
CREATE INDEX write_intents_by_digest ON write_intents (digest_id);
"""


def build_compact(db, images, repos):
    for f in (db, db + "-wal", db + "-shm"):
        if os.path.exists(f):
            os.remove(f)
    c = conn(db)
    c.executescript(COMPACT)
    now = int(time.time())
    last = now - 3600 - 60
    exp = last + 3600
    cached = last - 600
    c.execute("BEGIN")
    c.executemany("INSERT INTO repositories VALUES (?, 'bench', ?)", ((r + 1, "bench/app-%05d" % r) for r in range(repos)))
    c.execute("INSERT INTO upstream_settings VALUES ('bench', 3600)")
    def did(d):
        return c.execute("INSERT INTO digests (digest) VALUES (?) RETURNING id", (d,)).fetchone()[0]
    for i in range(images):
        repo = i % repos + 1
        layer = "sha256:" + hashlib.sha256(b"layer %d" % i).hexdigest()
        config = "sha256:" + hashlib.sha256(b"config %d" % i).hexdigest()
        body = (b"x" * 395)
        man = "sha256:" + hashlib.sha256(b"man %d" % i).hexdigest()
        mid, cid, lid = did(man), did(config), did(layer)
        c.execute("INSERT INTO manifests VALUES (?, 'application/vnd.oci.image.manifest.v1+json', 395, ?, ?, ?, NULL, ?)", (mid, body, cid, cached, cached))
        c.executemany("INSERT INTO manifest_refs VALUES (?, ?, 'blob')", ((mid, cid), (mid, lid)))
        for b, size in ((cid, 200), (lid, 30)):
            c.execute("INSERT INTO blobs VALUES (?, ?, ?, ?)", (b, size, cached, last))
            c.execute("INSERT INTO repo_blobs VALUES (?, ?, ?, ?, ?, 0)", (b, repo, cached, last, exp))
        c.execute("INSERT INTO repo_manifests VALUES (?, ?, ?, ?, ?, 0)", (mid, repo, cached, last, exp))
        c.execute("INSERT INTO tags VALUES (?, ?, ?, ?, ?, ?, 0)", (repo, "t%d" % i, mid, cached, last, exp))
    c.execute("COMMIT")
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return os.path.getsize(db) // 2**20


T = {}
LONGEST = [0.0]  # the longest expiry transaction, in seconds


def t(name, f):
    s = time.perf_counter()
    r = f()
    T[name] = T.get(name, 0) + time.perf_counter() - s
    return r


def drain_deletes(c, now, finish_one, claim):
    """The deletion workers' loop without storage: one transaction finishes the batch in
    hand (in digest order) and claims the next, until nothing is due."""
    rows = []
    while True:
        c.execute("BEGIN IMMEDIATE")
        t("finish", lambda: [finish_one(d) for d in sorted(rows)])
        rows = t("claim", lambda: [r[0] for r in c.execute(claim, (now, CLAIM)).fetchall()])
        t("commit", lambda: c.execute("COMMIT"))
        if not rows:
            return


def run_to_empty(c, expire, deletes, tables):
    """Expiry batches, each followed by the deletes it queued, until nothing is due and
    `tables` are empty. Returns (entries, seconds)."""
    start = time.perf_counter()
    total = 0
    while True:
        b0 = time.perf_counter()
        n = expire()
        LONGEST[0] = max(LONGEST[0], time.perf_counter() - b0)
        total += n
        t("deletes", deletes)
        if n == 0:
            break
    el = time.perf_counter() - start
    left = {k: c.execute("SELECT count(*) FROM " + k).fetchone()[0] for k in tables}
    assert not any(left.values()), left
    return total, el


def run_compact(db):
    c = conn(db)
    now = int(time.time())

    def expire():
        c.execute("BEGIN IMMEDIATE")
        tags = t("tags.sel", lambda: c.execute("SELECT repo_id, name FROM tags WHERE expires_at <= ? ORDER BY expires_at, manifest_id LIMIT ?", (now, LIMIT)).fetchall())
        t("tags.del", lambda: [c.execute("DELETE FROM tags WHERE repo_id = ? AND name = ?", k) for k in tags])
        rms = t("rm.sel", lambda: c.execute("""SELECT rm.manifest_id, rm.repo_id,
            (SELECT CASE WHEN count(*) = 0 THEN NULL ELSE coalesce(max(e), 0) END FROM (
              SELECT t.expires_at AS e FROM tags t WHERE t.manifest_id = rm.manifest_id AND t.repo_id = rm.repo_id
              UNION ALL SELECT p.expires_at FROM manifest_refs mr JOIN repo_manifests p ON p.manifest_id = mr.manifest_id AND p.repo_id = rm.repo_id
               WHERE mr.ref_id = rm.manifest_id AND mr.kind = 'manifest'))
            FROM repo_manifests rm WHERE rm.expires_at <= ? ORDER BY rm.expires_at, rm.manifest_id LIMIT ?""", (now, LIMIT)).fetchall())
        gone_m = [m for m, r, h in rms if h is None]
        t("rm.del", lambda: [c.execute("DELETE FROM repo_manifests WHERE manifest_id = ? AND repo_id = ?", (m, r)) for m, r, h in rms if h is None])
        rbs = t("rb.sel", lambda: c.execute("""SELECT rb.blob_id, rb.repo_id,
            (SELECT CASE WHEN count(*) = 0 THEN NULL ELSE coalesce(max(p.expires_at), 0) END FROM manifest_refs mr
               JOIN repo_manifests p ON p.manifest_id = mr.manifest_id AND p.repo_id = rb.repo_id
              WHERE mr.ref_id = rb.blob_id AND mr.kind = 'blob')
            FROM repo_blobs rb WHERE rb.expires_at <= ? ORDER BY rb.expires_at, rb.blob_id LIMIT ?""", (now, LIMIT)).fetchall())
        t("rb.del", lambda: [c.execute("DELETE FROM repo_blobs WHERE blob_id = ? AND repo_id = ?", (b, r)) for b, r, h in rbs if h is None])
        cand = [b for b, r, h in rbs if h is None]
        def rmman():
            out = []
            for m in gone_m:
                if c.execute("SELECT EXISTS (SELECT 1 FROM repo_manifests WHERE manifest_id = ?)", (m,)).fetchone()[0]:
                    continue
                refs = c.execute("DELETE FROM manifest_refs WHERE manifest_id = ? RETURNING ref_id, kind", (m,)).fetchall()
                out += [r for r, k in refs if k == "blob"]
                c.execute("DELETE FROM manifests WHERE id = ?", (m,))
                out.append(-m)  # the manifest's own digest id may go too
            return out
        cand += t("manifests", rmman)
        def enq():
            for d in sorted(set(cand)):
                if d < 0:
                    forget_digest(-d)
                    continue
                n = c.execute("""INSERT INTO pending_deletes (id, size_bytes, reason, state, next_attempt_at, created_at)
                    SELECT b.id, b.size_bytes, 'expired', 'pending', ?2, ?2 FROM blobs b WHERE b.id = ?1
                      AND NOT EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.blob_id = b.id)
                      AND NOT EXISTS (SELECT 1 FROM manifest_refs mr WHERE mr.ref_id = b.id)
                    ON CONFLICT (id) DO NOTHING""", (d, now)).rowcount
                if not n:
                    forget_digest(d)
        t("enqueue", enq)
        t("commit", lambda: c.execute("COMMIT"))
        return len(tags) + len(rms) + len(rbs)

    def forget_digest(d):
        # A digest id goes once nothing names it.
        c.execute("""DELETE FROM digests WHERE id = ?1
            AND NOT EXISTS (SELECT 1 FROM blobs WHERE id = ?1) AND NOT EXISTS (SELECT 1 FROM manifests WHERE id = ?1)
            AND NOT EXISTS (SELECT 1 FROM manifest_refs WHERE ref_id = ?1) AND NOT EXISTS (SELECT 1 FROM pending_deletes WHERE id = ?1)""", (d,))

    def finish_one(d):
        if c.execute("DELETE FROM pending_deletes WHERE id = ? AND state = 'deleting'", (d,)).rowcount:
            c.execute("DELETE FROM blobs WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM repo_blobs WHERE blob_id = ?1)", (d,))
            forget_digest(d)

    claim = """UPDATE pending_deletes SET state = 'deleting', lease_until = ?1 + 300
        WHERE id IN (SELECT p.id FROM pending_deletes p WHERE p.state = 'pending' AND p.next_attempt_at <= ?1
          AND NOT EXISTS (SELECT 1 FROM write_intents w WHERE w.digest_id = p.id AND w.expires_at > ?1)
          ORDER BY p.next_attempt_at LIMIT ?2) RETURNING id"""
    return run_to_empty(c, expire, lambda: drain_deletes(c, now, finish_one, claim),
                        ("digests", "blobs", "manifests", "pending_deletes", "repo_blobs", "manifest_refs"))


def run_current(db):
    c = conn(db)
    now = int(time.time())

    def expire():
        c.execute("BEGIN IMMEDIATE")
        tags = t("tags.sel", lambda: c.execute("SELECT repo_id, name FROM tags WHERE expires_at <= ? ORDER BY expires_at, digest LIMIT ?", (now, LIMIT)).fetchall())
        t("tags.del", lambda: [c.execute("DELETE FROM tags WHERE repo_id = ? AND name = ?", k) for k in tags])
        rms = t("rm.sel", lambda: c.execute("""SELECT rm.repo_id, rm.digest,
            (SELECT CASE WHEN count(*) = 0 THEN NULL ELSE coalesce(max(e), 0) END FROM (
              SELECT t.expires_at AS e FROM tags t INDEXED BY tags_by_manifest WHERE t.digest = rm.digest AND t.repo_id = rm.repo_id
              UNION ALL SELECT p.expires_at FROM manifest_refs mr JOIN repo_manifests p ON p.digest = mr.manifest_digest AND p.repo_id = rm.repo_id
               WHERE mr.ref_digest = rm.digest AND mr.kind = 'manifest'))
            FROM repo_manifests rm WHERE rm.expires_at <= ? ORDER BY rm.expires_at, rm.digest LIMIT ?""", (now, LIMIT)).fetchall())
        gone_m = [m for r, m, h in rms if h is None]
        t("rm.del", lambda: [c.execute("DELETE FROM repo_manifests WHERE repo_id = ? AND digest = ?", (r, m)) for r, m, h in rms if h is None])
        rbs = t("rb.sel", lambda: c.execute("""SELECT rb.repo_id, rb.digest,
            (SELECT CASE WHEN count(*) = 0 THEN NULL ELSE coalesce(max(p.expires_at), 0) END FROM manifest_refs mr
               JOIN repo_manifests p ON p.digest = mr.manifest_digest AND p.repo_id = rb.repo_id
              WHERE mr.ref_digest = rb.digest AND mr.kind = 'blob')
            FROM repo_blobs rb WHERE rb.expires_at <= ? ORDER BY rb.expires_at, rb.digest LIMIT ?""", (now, LIMIT)).fetchall())
        t("rb.del", lambda: [c.execute("DELETE FROM repo_blobs WHERE repo_id = ? AND digest = ?", (r, b)) for r, b, h in rbs if h is None])
        cand = [b for r, b, h in rbs if h is None]
        def rmman():
            out = []
            for m in gone_m:
                if c.execute("SELECT EXISTS (SELECT 1 FROM repo_manifests WHERE digest = ?)", (m,)).fetchone()[0]:
                    continue
                out += [r[0] for r in c.execute("SELECT ref_digest FROM manifest_refs WHERE manifest_digest = ? AND kind = 'blob'", (m,))]
                c.execute("DELETE FROM manifests WHERE digest = ?", (m,))
            return out
        cand += t("manifests", rmman)
        def enq():
            for d in sorted(set(cand)):
                c.execute("""INSERT INTO pending_deletes (digest, size_bytes, reason, state, next_attempt_at, created_at)
                    SELECT b.digest, b.size_bytes, 'expired', 'pending', ?2, ?2 FROM blobs b WHERE b.digest = ?1
                      AND NOT EXISTS (SELECT 1 FROM repo_blobs rb WHERE rb.digest = ?1)
                      AND NOT EXISTS (SELECT 1 FROM manifest_refs mr WHERE mr.ref_digest = ?1 AND mr.kind = 'blob')
                    ON CONFLICT (digest) DO NOTHING""", (d, now))
        t("enqueue", enq)
        t("commit", lambda: c.execute("COMMIT"))
        return len(tags) + len(rms) + len(rbs)

    def finish_one(d):
        if c.execute("DELETE FROM pending_deletes WHERE digest = ? AND state = 'deleting'", (d,)).rowcount:
            c.execute("DELETE FROM blobs WHERE digest = ?1 AND NOT EXISTS (SELECT 1 FROM repo_blobs WHERE digest = ?1)", (d,))

    claim = """UPDATE pending_deletes SET state = 'deleting', lease_until = ?1 + 300
        WHERE digest IN (SELECT p.digest FROM pending_deletes p WHERE p.state = 'pending' AND p.next_attempt_at <= ?1
          AND NOT EXISTS (SELECT 1 FROM write_intents w WHERE w.digest = p.digest AND w.expires_at > ?1)
          ORDER BY p.next_attempt_at LIMIT ?2) RETURNING digest"""
    return run_to_empty(c, expire, lambda: drain_deletes(c, now, finish_one, claim),
                        ("blobs", "manifests", "pending_deletes", "repo_blobs", "manifest_refs"))


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    seeded = sys.argv[1]
    work = sys.argv[2] if len(sys.argv) == 3 else os.path.dirname(os.path.abspath(seeded))
    src = sqlite3.connect("file:%s?mode=ro" % seeded, uri=True)
    version = src.execute("PRAGMA user_version").fetchone()[0]
    images = src.execute("SELECT count(*) FROM manifests").fetchone()[0]
    repos = src.execute("SELECT count(*) FROM repositories").fetchone()[0]
    due = src.execute("SELECT (SELECT count(*) FROM tags) + (SELECT count(*) FROM repo_manifests)"
                      " + (SELECT count(*) FROM repo_blobs)").fetchone()[0]
    src.close()
    current = os.path.join(work, "replay-current.db")
    compact = os.path.join(work, "replay-compact.db")
    for f in (current, current + "-wal", current + "-shm"):
        if os.path.exists(f):
            os.remove(f)
    shutil.copy(seeded, current)
    print("replaying %d entries (%d images in %d repositories), schema version %d, %d per batch"
          % (due, images, repos, version, LIMIT))
    n, secs = run_current(current)
    print("current schema: %d entries in %.1f s (%.0f entries/s), longest expiry batch %.2f s"
          % (n, secs, n / secs, LONGEST[0]))
    T.clear()
    LONGEST[0] = 0.0
    size = build_compact(compact, images, repos)
    n2, secs2 = run_compact(compact)
    print("compact schema (%d MiB): %d entries in %.1f s (%.0f entries/s), longest expiry batch %.2f s"
          % (size, n2, secs2, n2 / secs2, LONGEST[0]))
    print("compact / current: %.2f" % (secs2 / secs))
    for f in (current, current + "-wal", current + "-shm", compact, compact + "-wal", compact + "-shm"):
        if os.path.exists(f):
            os.remove(f)


if __name__ == "__main__":
    main()
