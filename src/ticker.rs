//! A ticker with a stop signal: the loop of every periodic task (campaign states, guards,
//! experiments, retention, event trimming, metric labels, idle sessions).

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior};

/// Ticks every `every` (a late tick is delayed, not bunched up) until `stop` turns true or
/// its sender is gone.
pub struct Ticker {
    tick: Interval,
    stop: watch::Receiver<bool>,
}

impl Ticker {
    /// The first tick comes at once.
    pub fn new(every: Duration, stop: watch::Receiver<bool>) -> Ticker {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ticker { tick, stop }
    }

    /// Waits for the next tick: true, or false once the task is to stop.
    pub async fn tick(&mut self) -> bool {
        if *self.stop.borrow() {
            return false;
        }
        tokio::select! {
            _ = self.tick.tick() => true,
            _ = self.stop.wait_for(|s| *s) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ticks_until_stopped() {
        let (tx, rx) = watch::channel(false);
        let mut t = Ticker::new(Duration::from_secs(1), rx);
        let start = tokio::time::Instant::now();
        assert!(t.tick().await);
        assert!(t.tick().await);
        assert!(t.tick().await);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        tx.send(true).unwrap();
        assert!(!t.tick().await);
        // A dropped sender stops it too.
        let (tx, rx) = watch::channel(false);
        let mut t = Ticker::new(Duration::from_secs(1), rx);
        assert!(t.tick().await);
        drop(tx);
        assert!(!t.tick().await);
    }
}
