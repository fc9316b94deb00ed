//! Globs over `upstream/repository` names for cleanup policies: `*` matches within one
//! path segment, `**` across segments, `?` one character that is not `/`. Pure.

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
}
