//! Values written with their unit: durations (`"30s"`), rates (`"10/s"`) and percentages
//! (`"5%"`), parsed once into typed values.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A share written `"5%"` (or `"0.3%"`), as a fraction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let v = s
            .trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<f64>().ok())
            .filter(|v| (0.0..=100.0).contains(v))
            .ok_or_else(|| {
                serde::de::Error::custom(format!("{s:?} is not a percentage like \"5%\""))
            })?;
        Ok(Percent(v / 100.0))
    }
}

/// A duration written with its unit: `500ms`, `2s`, `5m`, `1h`, `3d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn get(self) -> Duration {
        self.0
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| format!("duration {s:?} has no unit (ms, s, m, h, d)"))?;
        let (num, unit) = s.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("duration {s:?}: {num:?} is not a number"))?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            "s" => n,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            "w" => n * 7.0 * 86400.0,
            u => return Err(format!("duration {s:?}: unknown unit {u:?}")),
        };
        if !secs.is_finite() || secs < 0.0 {
            return Err(format!("duration {s:?} out of range"));
        }
        // Finite and positive, it can still be past what a Duration holds (from_secs_f64
        // would panic on it).
        Duration::try_from_secs_f64(secs)
            .map(Dur)
            .map_err(|_| format!("duration {s:?} out of range"))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A rate written as `count/unit`: `10/s`, `500/min`, `20000/h`, `100000/d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("rate {s:?} must look like \"10/s\""))?;
        let count: u32 = n
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| format!("rate {s:?}: {n:?} is not a whole number"))?;
        if count == 0 {
            return Err(format!("rate {s:?} must be above zero"));
        }
        let per = match unit.trim() {
            "s" | "sec" => Duration::from_secs(1),
            "m" | "min" => Duration::from_secs(60),
            "h" | "hr" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86400),
            u => return Err(format!("rate {s:?}: unknown unit {u:?} (s, min, h, d)")),
        };
        Ok(Rate { count, per })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A `[[backoff]]` trigger, `"3/10m"`: act only after this many matching replies within the
/// period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trigger {
    pub count: u32,
    pub within: Duration,
}

impl FromStr for Trigger {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, period) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("trigger {s:?} must look like \"3/10m\" (replies / period)"))?;
        let count: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("trigger {s:?}: {n:?} is not a whole number"))?;
        if count == 0 {
            return Err(format!("trigger {s:?}: the count must be above zero"));
        }
        let within: Dur = period
            .trim()
            .parse()
            .map_err(|e| format!("trigger {s:?}: {e}"))?;
        if within.get().is_zero() {
            return Err(format!("trigger {s:?}: the period must be above zero"));
        }
        Ok(Trigger {
            count,
            within: within.get(),
        })
    }
}

impl<'de> Deserialize<'de> for Trigger {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
