//! The pipeline: a job's life, one stage per file, in the order it lives it.
//!
//! 1. [`intake`]: read a batch from the sends stream (or reclaim what a stopped daemon
//!    left), validate each job, claim its id, check suppression, `send_at` and frequency
//!    caps, and hand each job that may go to a worker (a task holding one of
//!    `intake.workers` permits, so memory stays flat however long the stream is).
//! 2. [`worker`]: an operator's bounce directive (`paloma bounce --for`) → route (relay,
//!    or the domain's MX hosts) → shape (rate, suspension) → render → send → react (a
//!    throttling reply slows or suspends the site).
//! 3. [`next`]: the one place that decides what the attempt means for the job — ended
//!    (delivered, bounced, failed, suppressed, dead) or back to wait — as the [`next::Record`]
//!    that [`recorder`] writes (event, idempotency state, stats and the stream ack in one
//!    fenced transaction per batch).
//!
//! How a job comes back, and where it waits meanwhile:
//!
//! - **Delayed set** (`{prefix}scheduled`, a sorted set scored by due time): a `send_at` in
//!   the future, a retry after a deferral, a job over its destination's rate or whose site is
//!   suspended, or every source of its pool at its warm-up cap; each member says which
//!   (`paloma queue` shows it). `queue::scheduler` moves each due member back to the sends
//!   stream. `paloma bounce` ends members there (and parked and held ones) as `bounced`,
//!   class `admin` (`control::admin_bounce`).
//! - **Parked** (`{prefix}parked:{campaign}`): a paused campaign's jobs; resuming (or
//!   cancelling) moves them to the delayed set, due now (`control`).
//! - **Held** (`{prefix}held:{campaign}`): the jobs of an A/B test outside its test share,
//!   until the decision; then released to the delayed set with the winner (`experiment`).
//! - **Follow-up**: a new job (`wf:{rule}:{id}`) added to the sends stream by a workflow rule
//!   after this job's event (`workflow`); it is a job of its own, with its own id.
//! - **Reclaimed**: a job whose daemon died or froze past `intake.claim_idle` is read again
//!   from the stream's pending entries by another daemon (`queue::sends`); the stopped one's
//!   outcomes are fenced off.

pub mod intake;
pub mod next;
pub mod recorder;
pub mod worker;

use std::sync::Arc;

use tokio::sync::watch;

use self::recorder::RecorderHandle;
use crate::deliver::Deliverer;
use crate::metrics::Metrics;
use crate::policy::caps::Caps;
use crate::queue::leases::Leases;
use crate::queue::Keys;
use crate::render::Renderer;
use crate::shape::Shaper;
use crate::store::RedisConn;
use crate::workflow::KeepJobs;

/// What the stages share: each component, built from its own settings by `daemon::App`.
pub struct Stages {
    pub renderer: Renderer,
    pub deliverer: Deliverer,
    pub shaper: Arc<Shaper>,
    /// Egress sources and pools: where each message leaves from.
    pub egress: Arc<crate::egress::Egress>,
    /// Frequency caps (`[caps]`), if any.
    pub caps: Option<Caps>,
    pub recorder: RecorderHandle,
    pub leases: Arc<Leases>,
    pub metrics: Arc<Metrics>,
    pub redis: RedisConn,
    pub keys: Keys,
    /// Which finished jobs are kept for workflow follow-ups.
    pub keep: KeepJobs,
    pub retry: next::Retry,
    /// The longest one job may hold a worker (`delivery.attempt_timeout`).
    pub attempt_timeout: std::time::Duration,
    /// `intake.max_job_bytes`.
    pub max_job_bytes: usize,
    /// Other consumer groups whose stopped consumers the intake prunes: (stream, group).
    pub also_prune: Vec<(String, String)>,
    /// Campaign states (pause, cancel), refreshed in the background.
    pub campaigns: Arc<crate::control::Campaigns>,
    /// Operators' bounce directives (`paloma bounce --for`), refreshed in the background.
    pub admin_bounces: Arc<crate::control::admin_bounce::Directives>,
    /// A/B tests: which variant a job goes out as, or held until the decision.
    pub experiments: Arc<crate::experiment::Experiments>,
    /// VERP return paths (`[bounces] domain`), if on.
    pub return_paths: Option<crate::bounces::ReturnPaths>,
    /// Turns true when shutdown begins.
    pub stop: watch::Receiver<bool>,
}
