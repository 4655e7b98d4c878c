//! Address ranges (`a.b.c.d/n`, `x::/n`) as config lists them and as the tracking server
//! (scanner networks) and mx delivery (prohibited and allowed targets) look them up.

use std::net::IpAddr;
use std::path::Path;

/// Why an address range was refused; its text quotes the range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("{0:?} is not an address range (a.b.c.d/n or x::/n)")]
    NotARange(String),
    #[error(
        "{0:?}: write IPv4 ranges as a.b.c.d/n (an IPv4-mapped IPv6 prefix is easy to get wrong)"
    )]
    MappedPrefix(String),
    #[error("{range:?}: prefix length must be 0..={max}")]
    PrefixLength { range: String, max: u32 },
}

/// Why a file of ranges could not be read: the file, and the line that is not a range.
#[derive(Debug, thiserror::Error)]
pub enum RangeFileError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {source}")]
    Line {
        path: String,
        line: usize,
        source: RangeError,
    },
}

/// A set of address ranges, looked up by binary search (a published egress list has tens
/// of thousands of ranges). IPv4 is kept as IPv4-mapped IPv6.
#[derive(Debug, Default, Clone)]
pub struct Networks {
    /// Sorted, non-overlapping inclusive ranges.
    ranges: Vec<(u128, u128)>,
}

impl Networks {
    /// Parses `a.b.c.d/n`, `x:y::/n` or a bare address.
    pub fn parse_cidr(s: &str) -> Result<(u128, u128), RangeError> {
        let s = s.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| RangeError::NotARange(s.into()))?;
        let (bits, max) = match ip {
            IpAddr::V4(v4) => (u128::from(v4.to_ipv6_mapped()), 32),
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && len.is_some() => {
                return Err(RangeError::MappedPrefix(s.into()))
            }
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let len: u32 =
            match len {
                Some(l) => l.parse().ok().filter(|&n| n <= max).ok_or_else(|| {
                    RangeError::PrefixLength {
                        range: s.into(),
                        max,
                    }
                })?,
                None => max,
            };
        let host_bits = max - len;
        let mask = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        Ok((bits & !mask, bits | mask))
    }

    pub fn new(ranges: impl IntoIterator<Item = (u128, u128)>) -> Self {
        let mut v: Vec<(u128, u128)> = ranges.into_iter().collect();
        v.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(v.len());
        for (lo, hi) in v {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Networks { ranges: merged }
    }

    /// Ranges from a file: one per line, or CSV whose first column is the range (the format
    /// of Apple's egress list); blank lines and `#` comments are skipped.
    pub fn read_file(path: &Path) -> Result<Vec<(u128, u128)>, RangeFileError> {
        let shown = || path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RangeFileError::Read {
            path: shown(),
            source,
        })?;
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let first = line.split(',').next().unwrap_or("").trim();
            if first.is_empty() || first.starts_with('#') {
                continue;
            }
            out.push(
                Self::parse_cidr(first).map_err(|source| RangeFileError::Line {
                    path: shown(),
                    line: n + 1,
                    source,
                })?,
            );
        }
        Ok(out)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let x = match ip {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => u128::from(v4.to_ipv6_mapped()),
                None => u128::from(v6),
            },
        };
        let i = self.ranges.partition_point(|&(lo, _)| lo <= x);
        i > 0 && self.ranges[i - 1].1 >= x
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_merge_and_look_up() {
        let r = |s: &str| Networks::parse_cidr(s).unwrap();
        let n = Networks::new([r("10.0.0.0/8"), r("10.1.0.0/16"), r("2001:db8::/32")]);
        assert_eq!(n.len(), 2);
        assert!(n.contains("10.200.1.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(n.contains("2001:db8::1".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(Networks::parse_cidr("10.0.0.0/33").is_err());
        assert!(Networks::parse_cidr("::ffff:10.0.0.0/8").is_err());
        assert!(Networks::parse_cidr("::ffff:10.0.0.1").is_ok());
    }
}
