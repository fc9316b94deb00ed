-- Multipart uploads (S3, GCS) are recorded so none is left open unseen (I2). An upload
-- id is written on its blob's write intent before the first part is sent. When the
-- write is abandoned, or a restart finds the intent of a dead process, the upload moves
-- to stale_uploads, and reconciliation aborts it there (an upload the store no longer
-- knows counts as aborted). Without this, parts of an upload in flight at a crash stayed
-- in the bucket, billed, until a lifecycle rule removed them.

ALTER TABLE write_intents ADD COLUMN upload_key TEXT;
ALTER TABLE write_intents ADD COLUMN upload_id TEXT;

CREATE TABLE stale_uploads (
    upload_key TEXT    NOT NULL,
    upload_id  TEXT    NOT NULL,
    since      INTEGER NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (upload_key, upload_id)
) STRICT, WITHOUT ROWID;
