-- Durable expiry and deletion (I2, I3, I4, I6).
--
-- Every tag, manifest link and blob link has a due time (`expires_at`, NULL = never),
-- derived from when it was last used and the upstream's ttl. With storage deletes off,
-- due entries are kept and marked `deferred` instead of being removed.

ALTER TABLE tags ADD COLUMN expires_at INTEGER;
ALTER TABLE tags ADD COLUMN deferred INTEGER NOT NULL DEFAULT 0 CHECK (deferred IN (0, 1));
ALTER TABLE repo_manifests ADD COLUMN expires_at INTEGER;
ALTER TABLE repo_manifests ADD COLUMN deferred INTEGER NOT NULL DEFAULT 0 CHECK (deferred IN (0, 1));
ALTER TABLE repo_blobs ADD COLUMN expires_at INTEGER;
ALTER TABLE repo_blobs ADD COLUMN deferred INTEGER NOT NULL DEFAULT 0 CHECK (deferred IN (0, 1));

CREATE INDEX tags_due ON tags (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX repo_manifests_due ON repo_manifests (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX repo_blobs_due ON repo_blobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX tags_by_digest ON tags (repo_id, digest);
CREATE INDEX blobs_by_last_use ON blobs (last_used_at);

-- A deletion is a persisted intention (I3): the row goes only once storage confirmed the
-- object is gone (not-found counts as gone). The blob's row stays until then.
CREATE TABLE pending_deletes (
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
) STRICT;
CREATE INDEX pending_deletes_due ON pending_deletes (state, next_attempt_at);

-- A blob about to be written under its final key. Deletion workers never claim a digest
-- with a live intent, and a writer never writes a digest being deleted, so a delete can
-- not remove an object that a row is about to claim.
CREATE TABLE write_intents (
    id         INTEGER PRIMARY KEY,
    digest     TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;
CREATE INDEX write_intents_by_digest ON write_intents (digest);

-- The ttl last applied per upstream (I6): a change is detected at start-up and the
-- stored schedule rewritten to match.
CREATE TABLE upstream_settings (
    upstream   TEXT    PRIMARY KEY,
    ttl_secs   INTEGER NOT NULL CHECK (ttl_secs >= 0),
    applied_at INTEGER NOT NULL
) STRICT;
