-- Bundle imports in progress (I2, I11). An import commits each verified blob as it reads
-- the bundle, but links an image (tags, manifests, repository links) only once every blob
-- it needs is in. Until then its committed blobs are held here: expiry, eviction, purges
-- and cleanups never queue a held digest for deletion, and reconciliation sees a row for
-- every object. A run that is interrupted keeps its holds, so running it again reuses the
-- blobs instead of writing them again; an import not heard from for longer than
-- `storage.reconcile_grace` (and at least 10 minutes) is abandoned by reconciliation,
-- which drops its holds and queues what nothing else uses for deletion.

CREATE TABLE imports (
    id            INTEGER PRIMARY KEY,
    source        TEXT    NOT NULL,          -- the bundle, as given on the command line
    started_at    INTEGER NOT NULL,
    heartbeat_at  INTEGER NOT NULL           -- the importer's last sign of life
) STRICT;

CREATE TABLE import_blobs (
    digest        TEXT    NOT NULL,
    import_id     INTEGER NOT NULL REFERENCES imports (id) ON DELETE CASCADE,
    PRIMARY KEY (digest, import_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX import_blobs_by_import ON import_blobs (import_id);
