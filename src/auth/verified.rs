//! Basic logins already verified with bcrypt, by the keyed hash of user and password, so
//! a client pays for bcrypt once, not on every request. Bounded; emptied when the
//! htpasswd file is reloaded, and an entry verified against an older file is never
//! added. Only successes are kept: a wrong password is checked (and slowed) every time.

use super::credentials::Key;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Logins remembered at once. An entry is ~100 bytes; 4096 distinct working logins is
/// more than any site has, and only a correct password can add one.
const ENTRIES_MAX: usize = 4096;

#[derive(Debug, Default)]
pub(super) struct Verified {
    map: HashMap<Key, Arc<str>>,
    /// Insertion order, for dropping the oldest when full.
    order: VecDeque<Key>,
    /// The `Logins::generation` the entries were verified against.
    generation: u64,
}

impl Verified {
    pub(super) fn get(&self, key: &Key, generation: u64) -> Option<Arc<str>> {
        if generation != self.generation {
            return None;
        }
        self.map.get(key).cloned()
    }

    /// Remembers a login verified against `generation`; one verified against another
    /// (the file changed meanwhile) is dropped.
    pub(super) fn insert(&mut self, key: Key, identity: Arc<str>, generation: u64) {
        if generation != self.generation {
            if generation < self.generation {
                return;
            }
            self.clear(generation);
        }
        if self.map.insert(key, identity).is_none() {
            self.order.push_back(key);
            while self.order.len() > ENTRIES_MAX {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    /// Forgets everything: the identity files changed.
    pub(super) fn clear(&mut self, generation: u64) {
        self.map.clear();
        self.order.clear();
        self.generation = generation;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: usize) -> Key {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(n as u64).to_be_bytes());
        k
    }

    #[test]
    fn bounded_oldest_out_and_generations_respected() {
        let mut v = Verified::default();
        for n in 0..ENTRIES_MAX + 10 {
            v.insert(key(n), Arc::from("alice"), 0);
        }
        assert_eq!(v.len(), ENTRIES_MAX);
        assert!(v.get(&key(0), 0).is_none());
        assert_eq!(v.get(&key(ENTRIES_MAX + 9), 0).as_deref(), Some("alice"));
        assert!(
            v.get(&key(ENTRIES_MAX + 9), 1).is_none(),
            "a newer file sees nothing old"
        );
        v.clear(1);
        assert_eq!(v.len(), 0);
        v.insert(key(1), Arc::from("bob"), 0);
        assert_eq!(v.len(), 0, "verified against the old file: not kept");
        v.insert(key(1), Arc::from("bob"), 2);
        assert_eq!(v.get(&key(1), 2).as_deref(), Some("bob"));
    }
}
