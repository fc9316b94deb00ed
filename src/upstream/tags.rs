//! An upstream's tag list: its `Link` pages followed only on the upstream's own origin
//! (I9: the credentials go with every page), and bounded in pages and bytes (I10).

use super::client::{header_string, read_limited, Upstream};
use super::error::UpstreamError;
use crate::oci::RepoName;
use reqwest::header::LINK;
use reqwest::Method;

/// Tag list pages followed at most; at 1000 tags a page that is 100 000 tags.
pub const TAG_PAGES_MAX: usize = 100;
const TAG_PAGE_SIZE: usize = 1000;
/// Bytes of tag-list JSON read at most, over all pages: 100 000 tags of 80 characters.
/// The list is held in memory, stored as one SQLite row and sorted for every request, so
/// an upstream must not be able to make it larger than that.
pub const TAG_LIST_MAX_BYTES: usize = 8 * 1024 * 1024;

impl Upstream {
    /// The tag list, following `Link` pages on the upstream's own origin, bounded by
    /// `TAG_PAGES_MAX` pages and `TAG_LIST_MAX_BYTES`: past a bound, the tags of the pages
    /// read so far (logged as a warning).
    pub async fn tags(&self, repo: &RepoName) -> Result<Vec<String>, UpstreamError> {
        #[derive(serde::Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let mut url = self.url(&format!("/v2/{repo}/tags/list?n={TAG_PAGE_SIZE}"))?;
        let mut names = Vec::new();
        let mut budget = TAG_LIST_MAX_BYTES;
        for page in 0.. {
            if page == TAG_PAGES_MAX {
                tracing::warn!(
                    upstream = %self.name, repo.name = %repo, pages_max = TAG_PAGES_MAX,
                    "tag list has more pages than regcache follows; listing the first ones"
                );
                break;
            }
            let resp = self
                .checked(self.send(Method::GET, url.clone(), repo, None).await?)
                .await?;
            let next = header_string(resp.headers(), LINK).and_then(|l| next_link(&l));
            let body = match read_limited(resp, budget, &self.name).await {
                Err(UpstreamError::TooLarge { .. }) if page > 0 => {
                    tracing::warn!(
                        upstream = %self.name, repo.name = %repo, max_bytes = TAG_LIST_MAX_BYTES,
                        "tag list is larger than regcache reads; listing the first pages"
                    );
                    break;
                }
                other => other?,
            };
            budget -= body.len();
            let page: TagList = serde_json::from_slice(&body).map_err(|e| UpstreamError::Invalid {
                upstream: self.name.clone(),
                message: format!("tag list: {e}"),
            })?;
            names.extend(page.tags.unwrap_or_default());
            let Some(next) = next else {
                break;
            };
            let next = url.join(&next).map_err(|e| UpstreamError::Invalid {
                upstream: self.name.clone(),
                message: format!("tag list Link {next:?}: {e}"),
            })?;
            if !self.is_own_origin(&next) {
                // Not followed: the credentials must not go there (I9), and regcache is
                // not to be steered by an upstream into asking other hosts.
                tracing::warn!(
                    upstream = %self.name, repo.name = %repo,
                    link.origin = %next.origin().ascii_serialization(),
                    "tag list Link points to another origin; not followed, listing the pages read so far"
                );
                break;
            }
            url = next;
        }
        Ok(names)
    }
}

/// The target of a `Link: <url>; rel="next"` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next");
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| target.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_header_next_target() {
        assert_eq!(
            next_link(r#"</v2/a/tags/list?n=2&last=b>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?n=2&last=b")
        );
        assert_eq!(next_link(r#"<http://x/y>; rel="prev""#), None);
        assert_eq!(next_link("garbage"), None);
    }
}
