//! Bounded metric labels: the series of a campaign (`paloma_messages_total{campaign,…}`,
//! engagement, links, complaints, experiments, conversions and revenue) are removed from the registry once none of
//! them has moved for `metrics.campaign_idle`, so `/metrics` holds the campaigns active
//! lately, not every campaign ever sent.
//!
//! Activity is read from the counters themselves (a campaign whose series' sum has not
//! changed since the last sweep is idle), so no call site has to report it. A series that
//! comes back after its removal starts again from its first increment: Prometheus reads
//! that as a counter reset, as it does after a restart.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::IntCounterVec;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// The default of `metrics.campaign_idle`.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(6 * 3600);

/// What the sweeps remember of each campaign: the sum of its series and when it last
/// changed.
#[derive(Default)]
pub struct Reaper {
    seen: HashMap<String, (f64, Instant)>,
}

/// The counters labelled by campaign (always the first label of each).
fn per_campaign(m: &Metrics) -> [&IntCounterVec; 7] {
    [
        &m.messages,
        &m.engagement,
        &m.engagement_unique,
        &m.link_clicks,
        &m.complaints,
        &m.experiment_messages,
        &m.conversions,
    ]
}

/// The families of every per-campaign series, the float revenue counter last (index 7).
fn families(m: &Metrics) -> Vec<Vec<prometheus::proto::MetricFamily>> {
    let mut f: Vec<_> = per_campaign(m).iter().map(|v| v.collect()).collect();
    f.push(m.revenue.collect());
    f
}

impl Reaper {
    /// Removes the series of every campaign idle for `idle` at `now`; returns how many
    /// campaigns were removed.
    pub fn sweep(&mut self, m: &Metrics, idle: Duration, now: Instant) -> usize {
        // Each series: (campaign, its vector, its labels (name, value)).
        type Series = (String, usize, Vec<(String, String)>);
        let mut series: Vec<Series> = Vec::new();
        let mut sums: HashMap<String, f64> = HashMap::new();
        for (v, fams) in families(m).into_iter().enumerate() {
            for family in fams {
                for metric in family.get_metric() {
                    let labels: Vec<(String, String)> = metric
                        .get_label()
                        .iter()
                        .map(|l| (l.name().to_string(), l.value().to_string()))
                        .collect();
                    let Some(campaign) = metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == "campaign")
                        .map(|l| l.value().to_string())
                    else {
                        continue;
                    };
                    let value = metric.get_counter().get_value();
                    *sums.entry(campaign.clone()).or_default() += value;
                    series.push((campaign, v, labels));
                }
            }
        }
        let mut gone: HashSet<String> = HashSet::new();
        for (c, sum) in &sums {
            match self.seen.get_mut(c) {
                Some((last, since)) if *last == *sum => {
                    if now.duration_since(*since) >= idle {
                        gone.insert(c.clone());
                    }
                }
                Some(e) => *e = (*sum, now),
                None => {
                    self.seen.insert(c.clone(), (*sum, now));
                }
            }
        }
        self.seen.retain(|c, _| sums.contains_key(c));
        if gone.is_empty() {
            return 0;
        }
        let vecs = per_campaign(m);
        for (c, v, labels) in &series {
            if gone.contains(c) {
                let by_name: HashMap<&str, &str> = labels
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                let _ = match vecs.get(*v) {
                    Some(vec) => vec.remove(&by_name),
                    None => m.revenue.remove(&by_name),
                };
            }
        }
        for c in &gone {
            self.seen.remove(c);
        }
        gone.len()
    }
}

/// Sweeps every `idle / 4` (at least every minute, at most every 250 ms) until `stop`.
pub async fn reap(metrics: Arc<Metrics>, idle: Duration, stop: watch::Receiver<bool>) {
    let every = (idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(60));
    let mut ticker = crate::ticker::Ticker::new(every, stop);
    let mut reaper = Reaper::default();
    while ticker.tick().await {
        let n = reaper.sweep(&metrics, idle, Instant::now());
        if n > 0 {
            tracing::debug!(campaigns = n, "metric series of idle campaigns removed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_campaigns_lose_their_series_and_active_ones_keep_them() {
        let m = Metrics::new();
        let idle = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut r = Reaper::default();
        m.messages.with_label_values(&["old", "delivered"]).inc();
        m.link_clicks.with_label_values(&["old", "pricing"]).inc();
        m.conversions.with_label_values(&["old", "purchase"]).inc();
        m.revenue.with_label_values(&["old", "EUR"]).inc_by(59.9);
        m.messages.with_label_values(&["new", "delivered"]).inc();
        assert_eq!(r.sweep(&m, idle, t0), 0);
        m.messages.with_label_values(&["new", "delivered"]).inc();
        assert_eq!(r.sweep(&m, idle, t0 + Duration::from_secs(30)), 0);
        m.messages.with_label_values(&["new", "bounced"]).inc();
        // "old" has not moved for 61 s, "new" moved 31 s ago.
        assert_eq!(r.sweep(&m, idle, t0 + Duration::from_secs(61)), 1);
        let text = m.render();
        assert!(!text.contains("campaign=\"old\""), "{text}");
        assert!(text.contains("campaign=\"new\""), "{text}");
        // It comes back when it moves again.
        m.messages.with_label_values(&["old", "delivered"]).inc();
        assert!(m.render().contains("campaign=\"old\""));
    }
}
