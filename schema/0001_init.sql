-- Initial schema: what the pull-through cache knows. Times are Unix seconds (UTC).
-- Blob bytes never live here; manifests (at most 4 MiB each) do.

CREATE TABLE repositories (
    id            INTEGER PRIMARY KEY,
    upstream      TEXT    NOT NULL,          -- upstream name from the config
    name          TEXT    NOT NULL,          -- repository name as the upstream knows it
    created_at    INTEGER NOT NULL,
    last_used_at  INTEGER NOT NULL,
    UNIQUE (upstream, name)
) STRICT;

-- One row per blob object in storage, keyed by content digest (I1: only verified content).
CREATE TABLE blobs (
    digest        TEXT    PRIMARY KEY,
    size_bytes    INTEGER NOT NULL CHECK (size_bytes >= 0),
    cached_at     INTEGER NOT NULL,
    last_used_at  INTEGER NOT NULL
) STRICT;

-- A blob may be served under a repository only through a link (I7).
CREATE TABLE repo_blobs (
    repo_id       INTEGER NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    digest        TEXT    NOT NULL REFERENCES blobs (digest),
    cached_at     INTEGER NOT NULL,
    last_used_at  INTEGER NOT NULL,
    PRIMARY KEY (repo_id, digest)
) STRICT, WITHOUT ROWID;
CREATE INDEX repo_blobs_by_digest ON repo_blobs (digest);

CREATE TABLE manifests (
    digest         TEXT    PRIMARY KEY,
    media_type     TEXT    NOT NULL,
    size_bytes     INTEGER NOT NULL,
    body           BLOB    NOT NULL,
    config_digest  TEXT,                      -- image manifests: the config blob
    created        INTEGER,                   -- image config's `created`, once known
    subject_digest TEXT,                      -- referrers: the manifest this one refers to
    cached_at      INTEGER NOT NULL
) STRICT;
CREATE INDEX manifests_by_config ON manifests (config_digest) WHERE config_digest IS NOT NULL;

-- What a manifest refers to: blobs (config, layers) and, for indexes, child manifests.
CREATE TABLE manifest_refs (
    manifest_digest TEXT NOT NULL REFERENCES manifests (digest) ON DELETE CASCADE,
    ref_digest      TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('blob', 'manifest')),
    PRIMARY KEY (manifest_digest, ref_digest)
) STRICT, WITHOUT ROWID;
CREATE INDEX manifest_refs_by_ref ON manifest_refs (ref_digest);

CREATE TABLE repo_manifests (
    repo_id       INTEGER NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    digest        TEXT    NOT NULL REFERENCES manifests (digest),
    cached_at     INTEGER NOT NULL,
    last_used_at  INTEGER NOT NULL,
    PRIMARY KEY (repo_id, digest)
) STRICT, WITHOUT ROWID;
CREATE INDEX repo_manifests_by_digest ON repo_manifests (digest);

CREATE TABLE tags (
    repo_id       INTEGER NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    name          TEXT    NOT NULL,
    digest        TEXT    NOT NULL REFERENCES manifests (digest),
    cached_at     INTEGER NOT NULL,
    last_used_at  INTEGER NOT NULL,
    PRIMARY KEY (repo_id, name)
) STRICT, WITHOUT ROWID;

-- The upstream's full tag list, kept so tag listing works while offline.
CREATE TABLE tag_lists (
    repo_id       INTEGER PRIMARY KEY REFERENCES repositories (id) ON DELETE CASCADE,
    names         TEXT    NOT NULL,           -- JSON array of strings
    fetched_at    INTEGER NOT NULL
) STRICT;

-- Referrers API answers, per (repository, subject digest, artifactType filter or '').
CREATE TABLE referrers (
    repo_id       INTEGER NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    digest        TEXT    NOT NULL,
    artifact_type TEXT    NOT NULL,
    media_type    TEXT    NOT NULL,
    body          BLOB    NOT NULL,
    filters_applied TEXT,
    fetched_at    INTEGER NOT NULL,
    PRIMARY KEY (repo_id, digest, artifact_type)
) STRICT, WITHOUT ROWID;

-- Settings that shape stored state, as last applied (I6).
CREATE TABLE settings (
    key           TEXT PRIMARY KEY,
    value         TEXT NOT NULL,
    applied_at    INTEGER NOT NULL
) STRICT;
