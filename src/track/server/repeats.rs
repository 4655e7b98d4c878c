//! The tracking server's memory of recent hits, so that a repeat is answered but not
//! recorded.

use std::time::Duration;

/// Which (message, pixel or link) hits were recorded lately, so that a repeat within the
/// repeat window is answered but not recorded: a replayed or flooded link then costs no
/// Redis write at all, and one message can add at most one event per link and one per
/// pixel per window. Two generations of hashes, each covering `window`: a hit is a repeat
/// if either holds it, so it is remembered between one and two windows. Each generation
/// holds at most `CAP` hashes (then it turns over early): memory stays flat, about 16 bytes
/// a hash, whatever the traffic.
pub(super) struct Repeats {
    window: Duration,
    hasher: std::hash::RandomState,
    gens: std::sync::Mutex<(
        std::collections::HashSet<u64>,
        std::collections::HashSet<u64>,
        std::time::Instant,
    )>,
}

impl Repeats {
    const CAP: usize = 500_000;

    pub(super) fn new(window: Duration) -> Self {
        Repeats {
            window,
            hasher: std::hash::RandomState::new(),
            gens: std::sync::Mutex::new((
                Default::default(),
                Default::default(),
                std::time::Instant::now(),
            )),
        }
    }

    /// True when this (kind, send id, url) was recorded within the window; else it is
    /// remembered now and false is returned.
    pub(super) fn seen(&self, kind: &str, id: &str, url: &str) -> bool {
        self.seen_at(kind, id, url, std::time::Instant::now())
    }

    fn seen_at(&self, kind: &str, id: &str, url: &str, now: std::time::Instant) -> bool {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one((kind, id, url));
        let Ok(mut g) = self.gens.lock() else {
            return false;
        };
        let (current, previous, since) = &mut *g;
        let age = now.saturating_duration_since(*since);
        if age >= 2 * self.window {
            // Nothing was seen for a whole window: both generations are too old.
            current.clear();
            previous.clear();
            *since = now;
        } else if age >= self.window || current.len() >= Self::CAP {
            *previous = std::mem::take(current);
            *since = now;
        }
        if current.contains(&h) || previous.contains(&h) {
            return true;
        }
        current.insert(h);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_is_remembered_for_one_to_two_windows_and_no_longer() {
        use std::time::Instant;
        let w = Duration::from_secs(60);
        let r = Repeats::new(w);
        let t0 = Instant::now();
        assert!(!r.seen_at("c", "j1", "u", t0));
        assert!(r.seen_at("c", "j1", "u", t0 + Duration::from_secs(30)));
        // Machine and human hits, and other links, are apart.
        assert!(!r.seen_at("cm", "j1", "u", t0));
        assert!(!r.seen_at("c", "j1", "v", t0));
        // Still remembered in the previous generation…
        assert!(r.seen_at("c", "j1", "u", t0 + Duration::from_secs(70)));
        // …and after a quiet spell of two windows, forgotten: counted again.
        assert!(!r.seen_at("c", "j1", "u", t0 + Duration::from_secs(300)));
    }
}
