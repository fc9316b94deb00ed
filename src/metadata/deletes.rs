//! The deletion pipeline's rows (I3, I4): pending deletes are claimed with a lease,
//! finished only once storage confirmed the object gone, and retried with backoff computed
//! in SQL. Write intents keep a delete and a write of the same digest apart.

use super::uploads::keep_stale_uploads;
use super::{now_secs, Metadata, MetadataError};
use rusqlite::{params, OptionalExtension, Transaction};

/// How long a claim on pending deletes lasts before a sweeper may take it back.
const CLAIM_LEASE_SECS: i64 = 300;
/// How long a write intent holds off deletion of its digest. Long, because a large blob
/// over a slow uplink takes long; intents are also cleared at every start-up.
const WRITE_INTENT_SECS: i64 = 6 * 3600;

/// A claimed delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedDelete {
    pub digest: String,
    pub attempts: i64,
}

/// Retry policy for failed deletes: `initial * 2^attempts`, capped at `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial_secs: i64,
    pub max_secs: i64,
}

impl Metadata {
    /// Claims up to `limit` due deletes whose digest nobody is writing.
    pub async fn claim_deletes(&self, now: i64, limit: u32) -> Result<Vec<ClaimedDelete>, MetadataError> {
        self.write(move |tx| claim(tx, now, limit)).await
    }

    /// Records the outcome of claimed deletes: the rows of confirmed ones go (the blob's
    /// row with them); failed ones are rescheduled with backoff and keep their error. Then,
    /// in the same transaction, claims up to `next` more (none when `next` is 0): one
    /// writer turn per batch, which matters while expiry holds the writer between turns.
    pub async fn finish_deletes(
        &self,
        done: Vec<String>,
        failed: Vec<(String, String)>,
        now: i64,
        backoff: Backoff,
        next: u32,
    ) -> Result<Vec<ClaimedDelete>, MetadataError> {
        // In digest order: neighbouring rows share pages of every digest-keyed index.
        let mut done = done;
        done.sort_unstable();
        self.write(move |tx| {
            finish(tx, &done, &failed, now, backoff)?;
            if next == 0 {
                return Ok(Vec::new());
            }
            claim(tx, now, next)
        })
        .await
    }

    /// With deletes switched off, pending deletes wait as deferred, saying why.
    pub async fn defer_pending_deletes(&self, reason: &str) -> Result<u64, MetadataError> {
        let reason = reason.to_owned();
        self.write(move |tx| {
            Ok(tx.execute(
                "UPDATE pending_deletes SET state = 'deferred', deferred_reason = ?1, lease_until = NULL
                  WHERE state IN ('pending', 'deleting')",
                [reason],
            )? as u64)
        })
        .await
    }

    /// Queues a delete for an object found without a row (reconciliation); nothing when a
    /// row or a live write intent accounts for it by now.
    pub async fn enqueue_delete(
        &self,
        digest: &str,
        size: u64,
        reason: &str,
        deferred_reason: Option<&str>,
        now: i64,
    ) -> Result<bool, MetadataError> {
        let counted = super::RemovalReason::ALL
            .into_iter()
            .find(|r| r.label() == reason);
        let (digest, reason, deferred_reason) = (
            digest.to_owned(),
            reason.to_owned(),
            deferred_reason.map(str::to_owned),
        );
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        self.write(move |tx| {
            let state = if deferred_reason.is_some() { "deferred" } else { "pending" };
            Ok(tx.execute(
                // Checked again here, in the inserting transaction: a writer may have
                // committed this digest since reconciliation looked.
                "INSERT INTO pending_deletes (digest, size_bytes, reason, state, next_attempt_at, deferred_reason, created_at)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?5
                  WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE digest = ?1)
                    AND NOT EXISTS (SELECT 1 FROM write_intents WHERE digest = ?1 AND expires_at > ?5)
                 ON CONFLICT (digest) DO NOTHING",
                params![digest, size, reason, state, now, deferred_reason],
            )? > 0)
        })
        .await
        .inspect(|queued| {
            if let (true, Some(reason)) = (*queued, counted) {
                self.stats().removed(reason, 1);
            }
        })
    }

    /// Announces a write of `digest` under its final key. `None` when the digest is being
    /// deleted right now: the caller must not store it (serve it without caching).
    pub async fn begin_write(&self, digest: &str, now: i64) -> Result<Option<i64>, MetadataError> {
        let digest = digest.to_owned();
        self.write(move |tx| {
            let deleting: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM pending_deletes WHERE digest = ?1 AND state = 'deleting' AND lease_until > ?2)",
                params![digest, now],
                |r| r.get(0),
            )?;
            if deleting {
                return Ok(None);
            }
            Ok(Some(tx.query_row(
                "INSERT INTO write_intents (digest, expires_at) VALUES (?1, ?2) RETURNING id",
                params![digest, now + WRITE_INTENT_SECS],
                |r| r.get(0),
            )?))
        })
        .await
    }

    /// Withdraws a write intent whose write did not happen; its multipart upload, if it
    /// had one, is kept for reconciliation to abort.
    pub async fn abandon_write(&self, intent: i64) -> Result<(), MetadataError> {
        self.write(move |tx| {
            keep_stale_uploads(tx, Some(intent), now_secs())?;
            tx.execute("DELETE FROM write_intents WHERE id = ?1", [intent])?;
            Ok(())
        })
        .await
    }

    /// Start-up: no write survives a restart (the multipart uploads of dead writes are
    /// kept for reconciliation to abort), and claims of a dead process lapse now.
    pub async fn reset_after_restart(&self) -> Result<u64, MetadataError> {
        self.write(|tx| {
            keep_stale_uploads(tx, None, now_secs())?;
            tx.execute("DELETE FROM write_intents", [])?;
            Ok(tx.execute(
                "UPDATE pending_deletes SET state = 'pending', lease_until = NULL WHERE state = 'deleting'",
                [],
            )? as u64)
        })
        .await
    }

    /// The state of one pending delete, for tests and status.
    pub async fn pending_delete_state(
        &self,
        digest: &str,
    ) -> Result<Option<(String, i64, Option<String>)>, MetadataError> {
        let digest = digest.to_owned();
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT state, attempts, last_error FROM pending_deletes WHERE digest = ?1",
                [digest],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?)
        })
        .await
    }
}

fn claim(tx: &Transaction<'_>, now: i64, limit: u32) -> Result<Vec<ClaimedDelete>, MetadataError> {
    let mut stmt = tx.prepare_cached(
        "UPDATE pending_deletes SET state = 'deleting', lease_until = ?1 + ?3
          WHERE digest IN (
            -- One ordered range of the (state, next_attempt_at) index per state,
            -- each stopping at the limit: an OR of the two reads and sorts every
            -- due row, which at a million pending deletes dominates a round.
            SELECT digest FROM (
              SELECT digest, next_attempt_at FROM (
                SELECT p.digest, p.next_attempt_at FROM pending_deletes p
                 WHERE p.state = 'pending' AND p.next_attempt_at <= ?1
                   AND NOT EXISTS (SELECT 1 FROM write_intents w WHERE w.digest = p.digest AND w.expires_at > ?1)
                 ORDER BY p.next_attempt_at LIMIT ?2)
              UNION ALL
              SELECT digest, next_attempt_at FROM (
                SELECT p.digest, p.next_attempt_at FROM pending_deletes p
                 WHERE p.state = 'deleting' AND p.lease_until <= ?1
                   AND NOT EXISTS (SELECT 1 FROM write_intents w WHERE w.digest = p.digest AND w.expires_at > ?1)
                 ORDER BY p.next_attempt_at LIMIT ?2))
             ORDER BY next_attempt_at LIMIT ?2)
         RETURNING digest, attempts",
    )?;
    let rows = stmt.query_map(params![now, limit, CLAIM_LEASE_SECS], |r| {
        Ok(ClaimedDelete {
            digest: r.get(0)?,
            attempts: r.get(1)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn finish(
    tx: &Transaction<'_>,
    done: &[String],
    failed: &[(String, String)],
    now: i64,
    backoff: Backoff,
) -> Result<(), MetadataError> {
    let mut finish =
        tx.prepare_cached("DELETE FROM pending_deletes WHERE digest = ?1 AND state = 'deleting'")?;
    let mut forget = tx.prepare_cached(
        "DELETE FROM blobs WHERE digest = ?1 AND NOT EXISTS (SELECT 1 FROM repo_blobs WHERE digest = ?1)",
    )?;
    for digest in done {
        if finish.execute([digest])? > 0 {
            forget.execute([digest])?;
        }
    }
    let mut retry = tx.prepare_cached(
        "UPDATE pending_deletes SET state = 'pending', lease_until = NULL, attempts = attempts + 1,
                last_error = ?2,
                next_attempt_at = ?3 + min(?5, ?4 * (1 << min(attempts, 30)))
          WHERE digest = ?1 AND state = 'deleting'",
    )?;
    for (digest, error) in failed {
        retry.execute(params![
            digest,
            error,
            now,
            backoff.initial_secs,
            backoff.max_secs
        ])?;
    }
    Ok(())
}
