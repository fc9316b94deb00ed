//! Applied settings (I6): the ttl per upstream and `storage.delete.enabled`, as last
//! applied, live in SQLite. At start-up a change is detected and the stored schedule is
//! rewritten to match, in one transaction.

use super::expiry::expiry_sql;
use super::{Metadata, MetadataError};
use rusqlite::{params, OptionalExtension, Transaction};

/// The settings that shape stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedSettings {
    /// (upstream name, ttl in seconds; 0 = never expire)
    pub ttls: Vec<(String, i64)>,
    pub delete_enabled: bool,
}

/// What applying changed, for the one log line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettingsChange {
    /// (upstream, old ttl, new ttl, entries rescheduled)
    pub ttl_changes: Vec<(String, i64, i64, u64)>,
    /// (old, new, deferred entries rescheduled, deferred deletes resumed)
    pub delete_switch: Option<(bool, bool, u64, u64)>,
    /// Deferred deletes resumed with deletes on and no switch (deferred by another process).
    pub deferred_deletes_resumed: u64,
}

impl SettingsChange {
    pub fn is_empty(&self) -> bool {
        self.ttl_changes.is_empty() && self.delete_switch.is_none() && self.deferred_deletes_resumed == 0
    }
}

impl std::fmt::Display for SettingsChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (upstream, old, new, n) in &self.ttl_changes {
            parts.push(format!(
                "upstream {upstream} ttl {old}s -> {new}s: {n} entries rescheduled"
            ));
        }
        if let Some((old, new, entries, deletes)) = self.delete_switch {
            parts.push(format!(
                "storage.delete.enabled {old} -> {new}: {entries} deferred entries scheduled at now + ttl, {deletes} deferred deletes resumed"
            ));
        }
        if self.deferred_deletes_resumed > 0 {
            parts.push(format!(
                "{} deletes deferred by a process with storage.delete.enabled=false resumed",
                self.deferred_deletes_resumed
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

const DELETE_KEY: &str = "storage.delete.enabled";
const ENTRY_TABLES: [&str; 3] = ["tags", "repo_manifests", "repo_blobs"];

impl Metadata {
    pub async fn apply_settings(
        &self,
        settings: AppliedSettings,
        now: i64,
    ) -> Result<SettingsChange, MetadataError> {
        self.write(move |tx| apply(tx, &settings, now)).await
    }

    /// The settings last applied.
    pub async fn applied_settings(&self) -> Result<AppliedSettings, MetadataError> {
        self.read(|c| {
            let mut stmt = c.prepare("SELECT upstream, ttl_secs FROM upstream_settings ORDER BY upstream")?;
            let ttls = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            let delete: Option<String> = c
                .query_row("SELECT value FROM settings WHERE key = ?1", [DELETE_KEY], |r| {
                    r.get(0)
                })
                .optional()?;
            Ok(AppliedSettings {
                ttls,
                delete_enabled: delete.as_deref() != Some("false"),
            })
        })
        .await
    }
}

fn apply(tx: &Transaction<'_>, s: &AppliedSettings, now: i64) -> Result<SettingsChange, MetadataError> {
    let mut change = SettingsChange::default();
    for (upstream, ttl) in &s.ttls {
        // Never applied counts as 0: entries cached without a schedule get one.
        let old: i64 = tx
            .query_row(
                "SELECT ttl_secs FROM upstream_settings WHERE upstream = ?1",
                [upstream],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        let known: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM upstream_settings WHERE upstream = ?1)",
            [upstream],
            |r| r.get(0),
        )?;
        if old != *ttl || !known {
            // Only `0 -> T` uses `now` (?2); SQLite refuses a parameter the statement lacks.
            let (expires, uses_now) = match (old, *ttl) {
                (_, 0) => ("NULL".to_owned(), false),
                (0, t) => (format!("?2 + {t}"), true),
                (_, t) => (format!("last_used_at + {t}"), false),
            };
            let mut n = 0;
            for table in ENTRY_TABLES {
                let sql = format!(
                    "UPDATE {table} SET expires_at = {expires}
                      WHERE deferred = 0 AND pinned = 0 AND repo_id IN (SELECT id FROM repositories WHERE upstream = ?1)"
                );
                n += if uses_now {
                    tx.execute(&sql, params![upstream, now])?
                } else {
                    tx.execute(&sql, params![upstream])?
                } as u64;
            }
            // Stored referrers answers count from when they were fetched.
            let referrers_expire = if *ttl == 0 {
                "NULL".to_owned()
            } else {
                format!("fetched_at + {ttl}")
            };
            tx.execute(
                &format!(
                    "UPDATE referrers SET expires_at = {referrers_expire}
                      WHERE repo_id IN (SELECT id FROM repositories WHERE upstream = ?1)"
                ),
                params![upstream],
            )?;
            // A first start (nothing applied, nothing cached) changes nothing worth saying.
            if old != *ttl && (known || n > 0) {
                change.ttl_changes.push((upstream.clone(), old, *ttl, n));
            }
        }
        tx.execute(
            "INSERT INTO upstream_settings (upstream, ttl_secs, applied_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (upstream) DO UPDATE SET ttl_secs = excluded.ttl_secs, applied_at = excluded.applied_at",
            params![upstream, ttl, now],
        )?;
    }
    let old_delete: Option<String> = tx
        .query_row("SELECT value FROM settings WHERE key = ?1", [DELETE_KEY], |r| {
            r.get(0)
        })
        .optional()?;
    let old_enabled = old_delete.as_deref().map(|v| v == "true");
    if let Some(old) = old_enabled.filter(|old| *old != s.delete_enabled) {
        let (mut entries, mut deletes) = (0, 0);
        if s.delete_enabled {
            // The switch time counts as the start: deferred entries expire at now + ttl.
            for table in ENTRY_TABLES {
                entries += tx.execute(
                    &format!(
                        "UPDATE {table} SET deferred = 0, expires_at = {} WHERE deferred = 1",
                        expiry_sql("?1", &format!("{table}.repo_id"))
                    ),
                    [now],
                )? as u64;
            }
            deletes = tx.execute(
                "UPDATE pending_deletes SET state = 'pending', next_attempt_at = ?1, deferred_reason = NULL
                  WHERE state = 'deferred'",
                [now],
            )? as u64;
        }
        change.delete_switch = Some((old, s.delete_enabled, entries, deletes));
    } else if s.delete_enabled {
        // No switch, yet a process with deletes off beside this database (`regcache fsck`
        // with its own config) may have deferred deletes: with deletes on they run, or
        // they would wait forever (I3).
        change.deferred_deletes_resumed = tx.execute(
            "UPDATE pending_deletes SET state = 'pending', next_attempt_at = ?1, deferred_reason = NULL
              WHERE state = 'deferred'",
            [now],
        )? as u64;
    }
    tx.execute(
        "INSERT INTO settings (key, value, applied_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value, applied_at = excluded.applied_at",
        params![DELETE_KEY, s.delete_enabled.to_string(), now],
    )?;
    Ok(change)
}
