-- Referrers answers are stored under keys a client chooses (any subject digest, any
-- artifactType filter), so they must not grow without limit (I10): they expire with the
-- ttl like every cached entry (expires_at = fetched_at + ttl of the repository's
-- upstream; NULL = never, with ttl 0), and metadata/referrers.rs keeps at most a bound of
-- them per repository, dropping the oldest.

ALTER TABLE referrers ADD COLUMN expires_at INTEGER;

UPDATE referrers SET expires_at = fetched_at + (
    SELECT u.ttl_secs FROM upstream_settings u JOIN repositories r ON r.upstream = u.upstream
     WHERE r.id = referrers.repo_id AND u.ttl_secs > 0);

CREATE INDEX referrers_due ON referrers (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX referrers_by_age ON referrers (repo_id, fetched_at);
