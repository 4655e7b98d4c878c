//! Contact pressure: how many marketing messages a person had already been sent when a
//! campaign reached them, and what the campaign's figures were at each level — the curve
//! that shows where more mail stops paying.
//!
//! Each delivered marketing message adds one to a month counter of the recipient's hash
//! (`{prefix}r:{address}`, field `t:YYYYMM`; the hash lives 400 days past its last write, as
//! the caps keep it). When a job is claimed, the counters of the current and the 12 previous
//! months are read in the same round trip (so "the last 365 days" is counted by calendar
//! month: between 12 and 13 months back). The job's *touch* is that sum plus one — 1 for a
//! person's first marketing message of the year — and falls in a bucket of [`BUCKETS`].
//! Outcomes, people's unique opens and clicks, unsubscribes and complaints are counted per
//! bucket in `{prefix}touches:{campaign}` (fields `{bucket}:{what}`).
//!
//! Both sides are one script call per batch ([`READ`] in the claim round trip, [`COUNT`] in
//! the recorder's transaction), not commands per message: with an HMGET per job and an
//! HINCRBY and EXPIRE per delivery, the e2e bench ran about 10% below its rate before
//! contact pressure; with the two scripts, within 3%.

use chrono::{Datelike, Months};

/// Sums each batch recipient's month counters (KEYS: the hashes; ARGV: the months).
pub const READ: &str = include_str!("scripts/touches_read.lua");

/// Adds one to each delivered message's month counter and keeps the hash (KEYS: the hashes;
/// ARGV: the month, [`KEEP_SECS`]).
pub const COUNT: &str = include_str!("scripts/touches_count.lua");

/// The touch buckets, in order.
pub const BUCKETS: [&str; 6] = ["1", "2", "3", "4-6", "7-12", "13+"];

/// How long a recipient's hash is kept after its last write (as the caps keep it).
pub const KEEP_SECS: u64 = 34_560_000;

/// The bucket of a job that is its recipient's `touch`-th marketing message of the year.
pub fn bucket(touch: u32) -> &'static str {
    match touch {
        0 | 1 => "1",
        2 => "2",
        3 => "3",
        4..=6 => "4-6",
        7..=12 => "7-12",
        _ => "13+",
    }
}

/// The field of the month counter of `at`.
pub fn month_field(at: chrono::DateTime<chrono::Utc>) -> String {
    format!("t:{:04}{:02}", at.year(), at.month())
}

/// The fields of the current month and the 12 before it.
pub fn months(now: chrono::DateTime<chrono::Utc>) -> Vec<String> {
    (0..13)
        .filter_map(|back| now.checked_sub_months(Months::new(back)))
        .map(month_field)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn buckets_and_months() {
        let b: Vec<&str> = [1, 2, 3, 4, 6, 7, 12, 13, 400].map(bucket).to_vec();
        assert_eq!(
            b,
            ["1", "2", "3", "4-6", "4-6", "7-12", "7-12", "13+", "13+"]
        );
        let now = chrono::Utc.with_ymd_and_hms(2026, 3, 31, 12, 0, 0).unwrap();
        let m = months(now);
        assert_eq!(m.len(), 13);
        assert_eq!(m[0], "t:202603");
        assert_eq!(m[1], "t:202602");
        assert_eq!(m[12], "t:202503");
    }
}
