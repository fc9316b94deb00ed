//! Globs over `upstream/repository` names for cleanup policies and auth rules: `*`
//! matches within one path segment, `**` across segments, `?` one character that is not
//! `/`. Pure.

/// A compiled glob.
#[derive(Debug, Clone)]
pub struct Glob {
    pattern: Vec<char>,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("glob must not be empty".into());
        }
        if pattern.contains("***") {
            return Err(format!("{pattern:?}: use * or **, not ***"));
        }
        Ok(Self {
            pattern: pattern.chars().collect(),
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<char> = name.chars().collect();
        matches_at(&self.pattern, &name)
    }

    /// Whether some name `<prefix>/<more>` matches: for the start-up check of what an
    /// upstream exposes.
    pub fn may_match_under(&self, prefix: &str) -> bool {
        let name: Vec<char> = prefix.chars().chain(std::iter::once('/')).collect();
        can_extend(&self.pattern, &name)
    }
}

/// Like `matches_at`, but `s` is only the start of a name: true if some non-empty
/// continuation of `s` would match.
fn can_extend(p: &[char], s: &[char]) -> bool {
    if s.is_empty() {
        // Any pattern left can match some non-empty text.
        return !p.is_empty();
    }
    match p.first() {
        None => false,
        Some('*') if p.get(1) == Some(&'*') => {
            let rest = &p[2..];
            rest.is_empty() || (0..=s.len()).any(|i| can_extend(rest, &s[i..]))
        }
        Some('*') => {
            let rest = &p[1..];
            match s.iter().position(|c| *c == '/') {
                Some(segment) => (0..=segment).any(|i| can_extend(rest, &s[i..])),
                // The segment runs on past `s`: `*` can take all of it and more.
                None => true,
            }
        }
        Some('?') => s[0] != '/' && can_extend(&p[1..], &s[1..]),
        Some(c) => s[0] == *c && can_extend(&p[1..], &s[1..]),
    }
}

fn matches_at(p: &[char], s: &[char]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some('*') if p.get(1) == Some(&'*') => {
            let rest = &p[2..];
            (0..=s.len()).any(|i| matches_at(rest, &s[i..]))
        }
        Some('*') => {
            let rest = &p[1..];
            let segment = s.iter().position(|c| *c == '/').unwrap_or(s.len());
            (0..=segment).any(|i| matches_at(rest, &s[i..]))
        }
        Some('?') => s.first().is_some_and(|c| *c != '/') && matches_at(&p[1..], &s[1..]),
        Some(c) => s.first() == Some(c) && matches_at(&p[1..], &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        Glob::new(p).unwrap().matches(s)
    }

    #[test]
    fn star_stays_in_a_segment_double_star_crosses() {
        assert!(m("hub/library/*", "hub/library/alpine"));
        assert!(!m("hub/library/*", "hub/library/a/b"));
        assert!(m("hub/**", "hub/library/a/b"));
        assert!(m("*/team/*", "ghcr/team/app"));
        assert!(!m("*/team/*", "ghcr/other/app"));
        assert!(m("hub/app-?", "hub/app-1"));
        assert!(!m("hub/app-?", "hub/app-10"));
        assert!(m("**", "anything/at/all"));
        assert!(!m("hub/x", "hub/xy"));
        assert!(Glob::new("").is_err());
    }

    #[test]
    fn may_match_under_an_upstream() {
        let under = |p: &str, u: &str| Glob::new(p).unwrap().may_match_under(u);
        assert!(under("hub/library/*", "hub"));
        assert!(!under("hub/library/*", "ghcr"));
        assert!(!under("hub/library/*", "hu"));
        assert!(!under("hub", "hub"), "the upstream alone is no repository");
        assert!(under("**", "ghcr"));
        assert!(under("*/team/*", "ghcr"));
        assert!(!under("*", "hub"), "* does not cross the '/'");
        assert!(under("h?b/**", "hub"));
        assert!(under("hub*/x", "hub"));
        assert!(!under("hubx/**", "hub"));
    }
}
