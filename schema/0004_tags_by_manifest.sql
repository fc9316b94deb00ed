-- Deleting a manifest row checks `tags.digest REFERENCES manifests` for every tag: without
-- an index on the digest alone that is a scan of all tags per manifest (5.7 s for 500
-- manifests over 100 000 tags; 2 ms with this index). Expiry, purge, cleanup and
-- repository deletion all delete manifests.
CREATE INDEX tags_by_manifest ON tags (digest);
