//! Failed logins slow their address down. Each failure from an address makes the next
//! check of new credentials from it wait longer (250 ms, doubling, at most 8 s), and
//! concurrent attempts from it queue one behind another — from its very first attempt,
//! before any has failed, so a burst over many connections is spaced out too — so a
//! guesser gets a few hundred tries an hour per address however many connections it
//! opens. Credentials already verified (cached) never wait. Memory is bounded: at most
//! `ADDRESSES_MAX` addresses are remembered. Pure: callers pass the time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Addresses remembered at once. Each entry is ~64 bytes, so 4096 cost 256 KiB; past
/// that the entry whose last failure is oldest is forgotten.
const ADDRESSES_MAX: usize = 4096;
/// A failure this old is forgotten: a user who mistyped is back to full speed after it.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// The wait after the first failure; it doubles with each further one.
const FIRST_DELAY: Duration = Duration::from_millis(250);
/// The longest wait between two checks from one address.
const DELAY_MAX: Duration = Duration::from_secs(8);
/// An attempt that would have to wait longer than this (many queued behind each other)
/// is refused at once with 429 instead of holding its connection.
pub(super) const WAIT_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    /// When the next check from this address may start.
    next_slot: Instant,
    /// The last failure, or the first attempt while none has failed: what the entry is
    /// forgotten and evicted by.
    last_failure: Instant,
}

/// The address a client is counted under: IPv4 addresses whole, IPv6 by their /64 (one
/// host usually holds a whole /64, so counting single addresses would not slow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum AddrKey {
    V4(u32),
    /// The first 64 bits.
    V6(u64),
}

impl AddrKey {
    pub(super) fn new(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(u32::from(v4)),
                None => Self::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// What a new check from an address must do first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    Now,
    After(Duration),
    /// The queue from this address is longer than `WAIT_MAX`.
    Refused {
        retry_after: Duration,
    },
}

#[derive(Debug, Default)]
pub(super) struct Throttle {
    entries: HashMap<AddrKey, Entry>,
}

/// The spacing of checks from an address with `failures` failed logins: `FIRST_DELAY`
/// while none has failed (concurrent first attempts queue too), doubling per failure.
fn delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_DELAY.saturating_mul(1 << doublings).min(DELAY_MAX)
}

impl Throttle {
    /// Called before new credentials from `addr` are checked: reserves the address's
    /// next slot. An address seen for the first time (or again after a quiet
    /// `FORGET_AFTER`) is checked at once, and the checks arriving behind it queue.
    pub(super) fn admit(&mut self, addr: AddrKey, now: Instant) -> Admission {
        let forgotten = self
            .entries
            .get(&addr)
            .is_none_or(|e| now.duration_since(e.last_failure) > FORGET_AFTER);
        if forgotten {
            self.remember(addr, now);
            self.entries.insert(
                addr,
                Entry {
                    failures: 0,
                    next_slot: now + delay(0),
                    last_failure: now,
                },
            );
            return Admission::Now;
        }
        let Some(e) = self.entries.get_mut(&addr) else {
            return Admission::Now;
        };
        let start = e.next_slot.max(now);
        let wait = start - now;
        if wait > WAIT_MAX {
            return Admission::Refused { retry_after: wait };
        }
        e.next_slot = start + delay(e.failures);
        if wait.is_zero() {
            Admission::Now
        } else {
            Admission::After(wait)
        }
    }

    /// Makes room for `addr` when it is not remembered and the table is full: the
    /// forgotten entries go, then the one whose last failure is oldest.
    fn remember(&mut self, addr: AddrKey, now: Instant) {
        if self.entries.contains_key(&addr) || self.entries.len() < ADDRESSES_MAX {
            return;
        }
        self.entries
            .retain(|_, e| now.duration_since(e.last_failure) <= FORGET_AFTER);
        if self.entries.len() >= ADDRESSES_MAX {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_failure)
                .map(|(k, _)| *k)
            {
                self.entries.remove(&oldest);
            }
        }
    }

    /// Records a failed login from `addr`.
    pub(super) fn failed(&mut self, addr: AddrKey, now: Instant) {
        self.remember(addr, now);
        let e = self.entries.entry(addr).or_insert(Entry {
            failures: 0,
            next_slot: now,
            last_failure: now,
        });
        if now.duration_since(e.last_failure) > FORGET_AFTER {
            e.failures = 0;
        }
        e.failures = e.failures.saturating_add(1);
        e.last_failure = now;
        e.next_slot = e.next_slot.max(now + delay(e.failures));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(super) fn failures(&self, addr: AddrKey) -> u32 {
        self.entries.get(&addr).map_or(0, |e| e.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(n: u32) -> AddrKey {
        AddrKey::new(IpAddr::V4(Ipv4Addr::from(n)))
    }

    #[test]
    fn each_failure_doubles_the_wait_up_to_the_bound() {
        let mut t = Throttle::default();
        let a = v4(1);
        let t0 = Instant::now();
        assert_eq!(t.admit(a, t0), Admission::Now);
        t.failed(a, t0);
        assert_eq!(t.admit(a, t0), Admission::After(Duration::from_millis(250)));
        // A later attempt queues behind the one just admitted.
        assert_eq!(t.admit(a, t0), Admission::After(Duration::from_millis(500)));
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..10 {
            t.failed(a, t1);
        }
        assert_eq!(t.admit(a, t1), Admission::After(DELAY_MAX));
        // Another address is not slowed.
        assert_eq!(t.admit(v4(2), t1), Admission::Now);
        // Queued far enough, attempts are refused instead of held.
        let mut last = Admission::Now;
        for _ in 0..10 {
            last = t.admit(a, t1);
        }
        assert!(
            matches!(last, Admission::Refused { retry_after } if retry_after > WAIT_MAX),
            "{last:?}"
        );
        // Forgotten after a quiet quarter hour.
        assert_eq!(
            t.admit(a, t1 + FORGET_AFTER + Duration::from_secs(1)),
            Admission::Now
        );
    }

    #[test]
    fn concurrent_first_attempts_queue_before_any_has_failed() {
        let mut t = Throttle::default();
        let a = v4(7);
        let t0 = Instant::now();
        assert_eq!(t.admit(a, t0), Admission::Now);
        // A burst from a new address over many connections: one at a time, spaced out.
        let waits: Vec<Admission> = (0..3).map(|_| t.admit(a, t0)).collect();
        assert_eq!(
            waits,
            [250, 500, 750].map(|ms| Admission::After(Duration::from_millis(ms)))
        );
        // Once the queue has drained, a single attempt goes at once again.
        assert_eq!(t.admit(a, t0 + Duration::from_secs(2)), Admission::Now);
        // And past the quiet quarter hour the address starts afresh.
        let later = t0 + FORGET_AFTER + Duration::from_secs(3);
        assert_eq!(t.admit(a, later), Admission::Now);
        assert_eq!(t.admit(a, later), Admission::After(FIRST_DELAY));
        assert_eq!(t.failures(a), 0, "an attempt is not a failure");
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_is_forgotten_first() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        for n in 0..(ADDRESSES_MAX as u32 + 100) {
            t.failed(v4(n), t0 + Duration::from_millis(u64::from(n)));
        }
        assert_eq!(t.len(), ADDRESSES_MAX);
        let now = t0 + Duration::from_secs(10);
        assert_eq!(t.admit(v4(0), now), Admission::Now, "the oldest went first");
        assert!(matches!(
            t.admit(v4(ADDRESSES_MAX as u32 + 99), t0 + Duration::from_millis(4195)),
            Admission::After(_)
        ));
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_v4_as_v4() {
        let a = AddrKey::new("2001:db8:1:2::1".parse().unwrap());
        let b = AddrKey::new("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = AddrKey::new("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mapped = AddrKey::new(IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()));
        assert_eq!(mapped, AddrKey::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
        assert_ne!(
            AddrKey::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            AddrKey::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        );
    }
}
