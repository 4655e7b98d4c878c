//! Waiting between tries while Redis does not answer: one policy, doubling from a first wait
//! to a ceiling, with jitter so that the daemons of a fleet that lost Redis together do not
//! come back at the same instant.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with jitter: each wait is drawn between half and all of the current
/// step, and the step doubles up to `max`; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            step: first,
        }
    }

    /// For a loop that reads (a stream consumer): 100 ms doubling up to 5 s.
    pub fn reads() -> Backoff {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// For a write that must land (outcomes, tracking events, workflow actions): 50 ms
    /// doubling up to 2 s, so that it lands soon after Redis is back.
    pub fn writes() -> Backoff {
        Self::new(Duration::from_millis(50), Duration::from_secs(2))
    }

    /// The wait after one more failure.
    pub fn fail(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        step.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }

    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_ceiling_with_jitter_and_reset() {
        let mut b = Backoff::reads();
        let steps = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
        for ms in steps {
            let w = b.fail();
            let step = Duration::from_millis(ms);
            assert!(
                w >= step / 2 && w <= step,
                "{w:?} outside [{:?}, {step:?}]",
                step / 2
            );
        }
        b.reset();
        assert!(b.fail() <= Duration::from_millis(100));
        // Not all the same: the fleet spreads out.
        let waits: Vec<Duration> = (0..20).map(|_| Backoff::writes().fail()).collect();
        assert!(waits.iter().any(|w| *w != waits[0]), "{waits:?}");
    }
}
