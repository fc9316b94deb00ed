-- Pinning and prefetch (issue 12).
--
-- A pin is an operator's wish, kept whether or not the image is cached: `pins` names a
-- tag or a manifest digest of a repository by upstream and name (not by repository id, so
-- a pin made before anything is cached, or kept across a purge, applies when the image is
-- cached again). The entries of a pinned image carry `pinned = 1` and no due time
-- (`expires_at IS NULL`): expiry never sees them (its due indexes hold only rows with a
-- due time, so its cost is unchanged), eviction and cleanup policies skip them. Which
-- rows are pinned is derived from `pins` (metadata/pins.rs) whenever a pin changes or a
-- manifest or blob link is cached into a repository that has pins.

ALTER TABLE tags ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1));
ALTER TABLE repo_manifests ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1));
ALTER TABLE repo_blobs ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0 CHECK (pinned IN (0, 1));

-- Few rows are pinned: these partial indexes hold only those, so counting them (status,
-- repositories) and finding them (unpinning) read a handful of pages, and an unpinned
-- row costs them nothing beyond the check of its flag.
CREATE INDEX tags_pinned ON tags (repo_id) WHERE pinned = 1;
CREATE INDEX repo_manifests_pinned ON repo_manifests (repo_id) WHERE pinned = 1;
CREATE INDEX repo_blobs_pinned ON repo_blobs (digest) WHERE pinned = 1;

CREATE TABLE pins (
    upstream   TEXT    NOT NULL,
    repo       TEXT    NOT NULL,              -- as the upstream knows it (Docker Hub: library/…)
    reference  TEXT    NOT NULL,              -- a tag, or a manifest digest (sha256:…)
    created_at INTEGER NOT NULL,
    PRIMARY KEY (upstream, repo, reference)
) STRICT, WITHOUT ROWID;

-- When each `[[prefetch]]` list was last queued (its cadence), as cleanup_runs is for
-- policies.
CREATE TABLE prefetch_runs (
    name        TEXT    PRIMARY KEY,
    last_run_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- A new job kind: the jobs table is rebuilt for its CHECK constraint (SQLite cannot alter
-- one), with foreign keys off and checked before commit (job_deletes refers to it).
CREATE TABLE jobs_new (
    id            INTEGER PRIMARY KEY,
    kind          TEXT    NOT NULL CHECK (kind IN ('purge', 'delete_repository', 'cleanup', 'prefetch')),
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
INSERT INTO jobs_new (id, kind, args, state, attempts, runs, max_attempts, run_after, lease_until, progress,
                      result, last_error, created_at, started_at, updated_at, finished_at, dedupe_key)
    SELECT id, kind, args, state, attempts, runs, max_attempts, run_after, lease_until, progress,
           result, last_error, created_at, started_at, updated_at, finished_at, dedupe_key FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;
CREATE INDEX jobs_due ON jobs (state, run_after);
CREATE UNIQUE INDEX jobs_one_active_per_key ON jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state IN ('queued', 'running');
