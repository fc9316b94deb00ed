//! Evaluating a cleanup policy against a repository's recorded tags. Pure: the decision
//! is a function of the policy, the tags and the time.

use crate::config::CleanupPolicy;
use crate::metadata::TagInfo;
use regex::Regex;
use serde::Serialize;

/// A policy ready to evaluate.
#[derive(Debug, Clone)]
pub(super) struct CompiledPolicy {
    keep_n: usize,
    older_than_secs: Option<i64>,
    delete: Regex,
    keep: Option<Regex>,
}

impl CompiledPolicy {
    /// Compiles `p` (already validated at config load; an error names the field).
    pub(super) fn new(p: &CleanupPolicy) -> Result<Self, String> {
        // Anchored, so `name_regex_delete = "v.*"` means "starts with v", as GitLab does.
        let anchored = |r: &str| Regex::new(&format!("^(?:{r})$"));
        Ok(Self {
            keep_n: p.keep_n,
            older_than_secs: p
                .older_than
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            delete: anchored(&p.name_regex_delete).map_err(|e| format!("name_regex_delete: {e}"))?,
            keep: p
                .name_regex_keep
                .as_deref()
                .map(anchored)
                .transpose()
                .map_err(|e| format!("name_regex_keep: {e}"))?,
        })
    }
}

/// What a policy decided for one tag, and why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Decision {
    pub tag: String,
    pub digest: String,
    pub created: Option<i64>,
    pub delete: bool,
    pub reason: String,
}

/// The decision for every tag: candidates (match `name_regex_delete`, not
/// `name_regex_keep`) ordered by `created` (newest first; unknown `created` counts as the
/// time the tag was cached); the first `keep_n` kept; of the rest, those older than
/// `older_than` deleted.
pub(super) fn evaluate(policy: &CompiledPolicy, tags: &[TagInfo], now: i64) -> Vec<Decision> {
    let mut decisions = Vec::with_capacity(tags.len());
    let mut candidates: Vec<&TagInfo> = Vec::new();
    for t in tags {
        let reason = if t.pinned {
            Some("pinned (exempt from cleanup policies)")
        } else if !policy.delete.is_match(&t.name) {
            Some("does not match name_regex_delete")
        } else if policy.keep.as_ref().is_some_and(|k| k.is_match(&t.name)) {
            Some("matches name_regex_keep")
        } else {
            None
        };
        match reason {
            Some(r) => decisions.push(decision(t, false, r.to_owned())),
            None => candidates.push(t),
        }
    }
    let age = |t: &TagInfo| t.created.unwrap_or(t.cached_at);
    candidates.sort_by(|a, b| age(b).cmp(&age(a)).then_with(|| a.name.cmp(&b.name)));
    for (rank, t) in candidates.into_iter().enumerate() {
        let d = if rank < policy.keep_n {
            decision(
                t,
                false,
                format!("among the {} newest (rank {})", policy.keep_n, rank + 1),
            )
        } else {
            match policy.older_than_secs {
                Some(limit) if now - age(t) < limit => decision(
                    t,
                    false,
                    format!("rank {} but created within older_than", rank + 1),
                ),
                Some(_) => decision(
                    t,
                    true,
                    format!(
                        "rank {} > keep_n {} and older than older_than",
                        rank + 1,
                        policy.keep_n
                    ),
                ),
                None => decision(t, true, format!("rank {} > keep_n {}", rank + 1, policy.keep_n)),
            }
        };
        decisions.push(d);
    }
    decisions
}

fn decision(t: &TagInfo, delete: bool, reason: String) -> Decision {
    Decision {
        tag: t.name.clone(),
        digest: t.digest.clone(),
        created: t.created,
        delete,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Duration;

    const DAY: i64 = 86_400;
    const NOW: i64 = 1_700_000_000;

    fn tag(name: &str, age_days: i64) -> TagInfo {
        TagInfo {
            name: name.into(),
            digest: format!("sha256:{name}"),
            created: Some(NOW - age_days * DAY),
            cached_at: NOW,
            last_used_at: NOW,
            pinned: false,
        }
    }

    fn policy(
        keep_n: usize,
        older_than_days: Option<u64>,
        delete: &str,
        keep: Option<&str>,
    ) -> CompiledPolicy {
        CompiledPolicy::new(&CleanupPolicy {
            name: "p".into(),
            repositories: "**".into(),
            keep_n,
            older_than: older_than_days.map(|d| Duration::from_secs(d * 86_400)),
            name_regex_delete: delete.into(),
            name_regex_keep: keep.map(str::to_owned),
            cadence: Duration::from_secs(86_400),
        })
        .unwrap()
    }

    fn deleted(p: &CompiledPolicy, tags: &[TagInfo]) -> Vec<String> {
        let mut d: Vec<String> = evaluate(p, tags, NOW)
            .into_iter()
            .filter(|d| d.delete)
            .map(|d| d.tag)
            .collect();
        d.sort();
        d
    }

    #[test]
    fn keep_n_newest_by_created_then_older_than() {
        let tags = [tag("a", 1), tag("b", 10), tag("c", 40), tag("d", 50), tag("e", 5)];
        // Newest first: a(1) e(5) b(10) c(40) d(50).
        assert_eq!(deleted(&policy(2, None, ".*", None), &tags), ["b", "c", "d"]);
        assert_eq!(deleted(&policy(2, Some(30), ".*", None), &tags), ["c", "d"]);
        assert_eq!(deleted(&policy(0, Some(45), ".*", None), &tags), ["d"]);
        assert!(deleted(&policy(10, None, ".*", None), &tags).is_empty());
    }

    #[test]
    fn regexes_choose_candidates_and_are_anchored() {
        let tags = [
            tag("v1", 100),
            tag("v2", 90),
            tag("main", 80),
            tag("pr-1", 70),
            tag("xv1", 60),
        ];
        assert_eq!(deleted(&policy(0, None, "v.*", None), &tags), ["v1", "v2"]);
        assert_eq!(
            deleted(&policy(0, None, ".*", Some("main|v.*")), &tags),
            ["pr-1", "xv1"]
        );
        // keep_n counts candidates only: main is not a candidate.
        assert_eq!(deleted(&policy(1, None, "v.*|pr-.*", None), &tags), ["v1", "v2"]);
    }

    #[test]
    fn pinned_tags_are_kept_and_are_not_candidates() {
        let mut tags = [tag("old", 100), tag("older", 200), tag("new", 1)];
        tags[1].pinned = true;
        let d = evaluate(&policy(1, None, ".*", None), &tags, NOW);
        assert_eq!(deleted(&policy(1, None, ".*", None), &tags), ["old"]);
        let older = d.iter().find(|d| d.tag == "older").unwrap();
        assert!(!older.delete && older.reason.contains("pinned"), "{older:?}");
    }

    #[test]
    fn unknown_created_counts_as_cached_time_and_reasons_are_given() {
        let mut t = tag("x", 0);
        t.created = None;
        t.cached_at = NOW - 100 * DAY;
        let d = evaluate(&policy(0, Some(30), ".*", None), &[t], NOW);
        assert!(d[0].delete, "{d:?}");
        assert!(d[0].reason.contains("older_than"));
    }
}
