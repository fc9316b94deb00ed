-- Expiry and deletion at scale touch pages, not rows: a batch of 2000 images changed rows
-- in a dozen digest-keyed b-trees, each at a random page, so every batch rewrote tens of
-- MiB of pages to the WAL. Three changes make one batch's changes land side by side:
--
-- 1. Due rows of one second are taken in digest order (ties in the due indexes are broken
--    by digest, and expiry asks for that order), so the digest-keyed indexes, tables and
--    manifest references a batch touches are neighbours.
-- 2. blobs, manifests and pending_deletes are keyed by digest alone (WITHOUT ROWID): a row
--    and its key were two b-trees, the rowid one in arrival order, which is random against
--    digest order.
-- 3. Fewer index entries to keep: the config index holds only manifests still waiting for
--    their config's `created` (what commit_blob looks up), and one tags index by (digest,
--    repo_id) serves both the foreign-key check of a manifest delete and lookups by
--    repository and digest.
--
-- Measured on scripts/bench_expiry.sh's million entries: see README "Expiry at scale".
-- Applied with foreign keys off and checked with `PRAGMA foreign_key_check` before commit
-- (SQLite's procedure for rebuilding a table other tables refer to).

CREATE TABLE blobs_new (
    digest        TEXT    PRIMARY KEY,
    size_bytes    INTEGER NOT NULL CHECK (size_bytes >= 0),
    cached_at     INTEGER NOT NULL,
    last_used_at  INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
INSERT INTO blobs_new (digest, size_bytes, cached_at, last_used_at)
    SELECT digest, size_bytes, cached_at, last_used_at FROM blobs;
DROP TABLE blobs;
ALTER TABLE blobs_new RENAME TO blobs;
CREATE INDEX blobs_by_last_use ON blobs (last_used_at);

CREATE TABLE manifests_new (
    digest         TEXT    PRIMARY KEY,
    media_type     TEXT    NOT NULL,
    size_bytes     INTEGER NOT NULL,
    body           BLOB    NOT NULL,
    config_digest  TEXT,                      -- image manifests: the config blob
    created        INTEGER,                   -- image config's `created`, once known
    subject_digest TEXT,                      -- referrers: the manifest this one refers to
    cached_at      INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
INSERT INTO manifests_new (digest, media_type, size_bytes, body, config_digest, created, subject_digest, cached_at)
    SELECT digest, media_type, size_bytes, body, config_digest, created, subject_digest, cached_at FROM manifests;
DROP TABLE manifests;
ALTER TABLE manifests_new RENAME TO manifests;
CREATE INDEX manifests_by_config ON manifests (config_digest)
    WHERE config_digest IS NOT NULL AND created IS NULL;

DROP INDEX tags_due;
CREATE INDEX tags_due ON tags (expires_at, digest) WHERE expires_at IS NOT NULL;
DROP INDEX repo_manifests_due;
CREATE INDEX repo_manifests_due ON repo_manifests (expires_at, digest) WHERE expires_at IS NOT NULL;
DROP INDEX repo_blobs_due;
CREATE INDEX repo_blobs_due ON repo_blobs (expires_at, digest) WHERE expires_at IS NOT NULL;

-- Queries by (repo_id, digest) name this index (INDEXED BY): without statistics SQLite
-- would rather walk the repository's tags by primary key.
DROP INDEX tags_by_digest;
DROP INDEX tags_by_manifest;
CREATE INDEX tags_by_manifest ON tags (digest, repo_id);

CREATE TABLE pending_deletes_new (
    digest          TEXT    PRIMARY KEY,
    size_bytes      INTEGER NOT NULL DEFAULT 0,
    reason          TEXT    NOT NULL,         -- expired | evicted | orphan | repaired | purged
    state           TEXT    NOT NULL CHECK (state IN ('pending', 'deferred', 'deleting')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER,                  -- while 'deleting': when a dead worker's claim lapses
    last_error      TEXT,
    deferred_reason TEXT,
    created_at      INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
INSERT INTO pending_deletes_new (digest, size_bytes, reason, state, attempts, next_attempt_at, lease_until,
                                 last_error, deferred_reason, created_at)
    SELECT digest, size_bytes, reason, state, attempts, next_attempt_at, lease_until,
           last_error, deferred_reason, created_at FROM pending_deletes;
DROP TABLE pending_deletes;
ALTER TABLE pending_deletes_new RENAME TO pending_deletes;
CREATE INDEX pending_deletes_due ON pending_deletes (state, next_attempt_at);
