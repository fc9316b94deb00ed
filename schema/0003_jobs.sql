-- Operator-requested work (I4, I5): purge, resumable repository deletion, cleanup policies.

-- A repository being deleted is no longer served; its rows go in batches and the
-- repository row goes last (design problem 5).
ALTER TABLE repositories ADD COLUMN state TEXT NOT NULL DEFAULT 'active'
    CHECK (state IN ('active', 'delete_scheduled', 'delete_ongoing'));
ALTER TABLE repositories ADD COLUMN delete_requested_at INTEGER;
-- Heartbeat of the worker deleting it; a stale one is reset by the sweeper.
ALTER TABLE repositories ADD COLUMN delete_heartbeat_at INTEGER;
CREATE INDEX repositories_deleting ON repositories (state, delete_requested_at) WHERE state != 'active';

-- Every accepted request is a row; a worker acts on that row alone and records what it
-- did. queued -> running -> succeeded | failed | cancelled.
CREATE TABLE jobs (
    id            INTEGER PRIMARY KEY,
    kind          TEXT    NOT NULL CHECK (kind IN ('purge', 'delete_repository', 'cleanup')),
    args          TEXT    NOT NULL,            -- JSON
    state         TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempts      INTEGER NOT NULL DEFAULT 0,  -- runs that ended in an error
    runs          INTEGER NOT NULL DEFAULT 0,  -- runs started (a long job takes several)
    max_attempts  INTEGER NOT NULL CHECK (max_attempts >= 1),
    run_after     INTEGER NOT NULL,
    lease_until   INTEGER,
    progress      TEXT    NOT NULL DEFAULT '{}', -- JSON counts
    result        TEXT,                        -- JSON, once finished
    last_error    TEXT,
    created_at    INTEGER NOT NULL,
    started_at    INTEGER,
    updated_at    INTEGER NOT NULL,
    finished_at   INTEGER,
    -- One queued or running job per key (a repository's deletion, a policy's cleanup).
    dedupe_key    TEXT
) STRICT;
CREATE INDEX jobs_due ON jobs (state, run_after);
CREATE UNIQUE INDEX jobs_one_active_per_key ON jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state IN ('queued', 'running');

-- Blobs a job handed to the deletion pipeline, so its result can say what became of them.
CREATE TABLE job_deletes (
    job_id  INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    digest  TEXT    NOT NULL,
    PRIMARY KEY (job_id, digest)
) STRICT, WITHOUT ROWID;

-- When each cleanup policy last ran for each repository (its cadence), so a finished
-- cleanup is not queued again before its next turn, even for a vanished repository.
CREATE TABLE cleanup_runs (
    policy      TEXT    NOT NULL,
    upstream    TEXT    NOT NULL,
    repo        TEXT    NOT NULL,
    last_run_at INTEGER NOT NULL,
    PRIMARY KEY (policy, upstream, repo)
) STRICT, WITHOUT ROWID;
