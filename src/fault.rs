//! Fault injection for tests: named points in the code that panic when a test has armed
//! them, to prove a panic is contained (I10). Compiled only with the cargo feature
//! `fault-injection`, which is off by default and turned on for the test build alone (a
//! dev-dependency of this crate on itself); in any other build `point` is an empty
//! inline function, so no client and no configuration can trigger a fault.

#[cfg(feature = "fault-injection")]
mod armed {
    use std::sync::{Mutex, PoisonError};

    /// Armed (point, key) pairs. A handful at most, so a list.
    static ARMED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

    /// Makes the next pass through `point(name, key)` panic, once.
    pub fn panic_once(name: &str, key: &str) {
        ARMED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name.to_owned(), key.to_owned()));
    }

    /// Panics if `(name, key)` is armed (and disarms it).
    pub fn point(name: &str, key: &str) {
        let hit = {
            let mut armed = ARMED.lock().unwrap_or_else(PoisonError::into_inner);
            let at = armed.iter().position(|(n, k)| n == name && k == key);
            at.map(|i| armed.swap_remove(i)).is_some()
        };
        // Outside the lock, so the panic poisons nothing here.
        assert!(!hit, "fault injected at {name} for {key}");
    }
}

#[cfg(feature = "fault-injection")]
pub use armed::{panic_once, point};

/// A fault-injection point: nothing, in a build without `fault-injection`.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str, _key: &str) {}
