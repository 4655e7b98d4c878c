//! `[[sources]]` and `[[pools]]`: where mx-mode mail leaves from. A source is a local
//! address bound before connecting and the EHLO name it speaks as, optionally with a warm-up
//! plan (messages per UTC day); a pool is a weighted set of sources, picked per job
//! (`[delivery] pool`, or the job's `pool` field).

use serde::Deserialize;

/// One egress source (`[[sources]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRule {
    /// Its name in pools, metrics, `paloma sources` and Redis keys: 1–64 of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// The local address bound before connect (IPv4 or IPv6), one this host owns.
    pub address: String,
    /// The EHLO name it introduces itself with: its address's PTR name.
    pub helo: String,
    /// A new address's ramp: at most `daily[n-1]` messages on its n-th UTC day from `start`.
    pub warmup: Option<WarmupRule>,
}

/// `warmup = { start = "2026-12-07", daily = [200, 500, …] }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupRule {
    /// Day 1, `YYYY-MM-DD` (UTC). Before it the source sends nothing.
    pub start: String,
    /// Messages allowed on day 1, 2, …: above zero and never decreasing. After the last day
    /// the source has no cap.
    pub daily: Vec<u64>,
}

/// One pool (`[[pools]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolRule {
    pub name: String,
    pub sources: Vec<PoolMember>,
}

/// A source of a pool and its share of the pool's traffic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMember {
    pub source: String,
    /// Relative share (0 takes the source out of the pool's choice without removing it).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// The name of the pool made of every source at weight 1 when sources are given without
/// any `[[pools]]`.
pub const IMPLICIT_POOL: &str = "default";

impl WarmupRule {
    /// Day 1 as days since the Unix epoch, or why the date cannot be read.
    pub fn start_day(&self) -> Result<i64, String> {
        let d = chrono::NaiveDate::parse_from_str(&self.start, "%Y-%m-%d")
            .map_err(|e| format!("{:?} is not a YYYY-MM-DD date: {e}", self.start))?;
        let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("a date");
        Ok(d.signed_duration_since(epoch).num_days())
    }
}

impl super::Settings {
    /// The pools jobs may name: the `[[pools]]`, or the implicit one of every source.
    pub fn pool_names(&self) -> impl Iterator<Item = &str> {
        let implicit = (self.pools.is_empty() && !self.sources.is_empty()).then_some(IMPLICIT_POOL);
        self.pools.iter().map(|p| p.name.as_str()).chain(implicit)
    }

    /// The pool a job without a `pool` field leaves from (None without `[[sources]]`).
    pub fn default_pool(&self) -> Option<&str> {
        if self.sources.is_empty() {
            return None;
        }
        self.delivery
            .pool
            .as_deref()
            .or_else(|| self.pools.first().map(|p| p.name.as_str()))
            .or(Some(IMPLICIT_POOL))
    }
}

#[cfg(test)]
mod tests {
    use super::super::Settings;

    const BASE: &str = "[sender]\nfrom = \"a@b.test\"\nhelo = \"h.test\"\n[tracking]\nsecret = \"0123456789abcdef0\"\n";
    const SRC: &str = "[[sources]]\nname = \"ip1\"\naddress = \"127.0.0.2\"\nhelo = \"one.test\"\n[[sources]]\nname = \"ip2\"\naddress = \"::1\"\nhelo = \"two.test\"\n";

    fn load(extra: &str) -> Result<Settings, String> {
        Settings::from_toml(&format!("{BASE}{extra}"), vec![])
            .map_err(|e| format!("{} | {e}", e.key_name().unwrap_or("?")))
    }

    fn refused(extra: &str, key: &str, says: &str) {
        let e = load(extra).unwrap_err();
        assert!(e.starts_with(&format!("{key} |")), "{e}");
        assert!(e.contains(says), "{e}");
    }

    #[test]
    fn sources_and_pools_load_with_their_defaults() {
        let s = load(&format!("[delivery]\nmode = \"mx\"\n{SRC}")).unwrap();
        assert_eq!(s.default_pool(), Some("default"));
        assert_eq!(s.pool_names().collect::<Vec<_>>(), ["default"]);
        let s = load(&format!(
            "[delivery]\nmode = \"mx\"\npool = \"b\"\n{SRC}[[pools]]\nname = \"a\"\nsources = [{{ source = \"ip1\" }}]\n[[pools]]\nname = \"b\"\nsources = [{{ source = \"ip1\", weight = 0 }}, {{ source = \"ip2\", weight = 2 }}]\n"
        ))
        .unwrap();
        assert_eq!(s.default_pool(), Some("b"));
        assert_eq!(s.pools[0].sources[0].weight, 1, "weight defaults to 1");
        assert_eq!(load("").unwrap().default_pool(), None);
    }

    #[test]
    fn bad_egress_config_says_what_to_change() {
        let mx = "[delivery]\nmode = \"mx\"\n";
        refused(SRC, "sources", "mode = \"mx\"");
        refused(
            &format!(
                "{mx}[[sources]]\nname = \"ip1\"\naddress = \"203.0.113.300\"\nhelo = \"a.test\"\n"
            ),
            "sources[0].address",
            "IPv4 or IPv6",
        );
        refused(
            &format!(
                "{mx}[[sources]]\nname = \"ip 1\"\naddress = \"127.0.0.2\"\nhelo = \"a.test\"\n"
            ),
            "sources[0].name",
            "A-Z",
        );
        refused(
            &format!("{mx}{SRC}[[pools]]\nname = \"p\"\nsources = [{{ source = \"ip3\" }}]\n"),
            "pools[0].sources[0].source",
            "names no source \"ip3\": the [[sources]] are ip1, ip2",
        );
        refused(
            &format!("{mx}{SRC}[[pools]]\nname = \"p\"\nsources = [{{ source = \"ip1\", weight = 0 }}]\n"),
            "pools[0].sources",
            "every weight is 0",
        );
        refused(
            &format!("{mx}pool = \"q\"\n{SRC}[[pools]]\nname = \"p\"\nsources = [{{ source = \"ip1\" }}]\n"),
            "delivery.pool",
            "names no pool",
        );
        refused(
            &format!("{mx}{SRC}[[pools]]\nname = \"p\"\nsources = [{{ source = \"ip1\" }}]\n[[pools]]\nname = \"q\"\nsources = [{{ source = \"ip2\" }}]\n"),
            "delivery.pool",
            "name the default one",
        );
        refused(
            &format!("{mx}[[sources]]\nname = \"ip1\"\naddress = \"127.0.0.2\"\nhelo = \"a.test\"\nwarmup = {{ start = \"2026-12-07\", daily = [200, 100] }}\n"),
            "sources[0].warmup.daily",
            "out of order: day 2 allows 100 after 200",
        );
        refused(
            &format!("{mx}[[sources]]\nname = \"ip1\"\naddress = \"127.0.0.2\"\nhelo = \"a.test\"\nwarmup = {{ start = \"7/12/2026\", daily = [200] }}\n"),
            "sources[0].warmup.start",
            "YYYY-MM-DD",
        );
        refused(
            &format!("{mx}[[pools]]\nname = \"p\"\nsources = []\n"),
            "pools",
            "need [[sources]]",
        );
    }
}
