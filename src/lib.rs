//! paloma: an email campaign delivery engine.
//!
//! # Layout
//!
//! The modules follow a message through its life:
//!
//! - [`config`]: the settings tree, one struct per component; each component is built from
//!   its own section.
//! - [`job`]: the job contract and its validation (newtypes parsed at the edge).
//! - [`pipeline`]: a job's life — [`pipeline::intake`] → [`pipeline::worker`] →
//!   [`pipeline::next`] (the one place that decides a job's next state) →
//!   [`pipeline::recorder`] (outcomes and acks written per batch).
//! - [`queue`]: Redis streams and sets the pipeline runs on: one stream consumer type
//!   ([`queue::consumer`]) for the intake and the workflow engine, the sends stream
//!   ([`queue::sends`]), the delayed set, events and idempotency records ([`queue::idem`]).
//! - [`store`]: Redis connections, server checks, and the one key schema ([`store::keys`]).
//! - [`render`]: templates → personalized parts → tracked links → MIME → DKIM.
//! - [`shape`]: per-domain rules, rates (shared in Redis) and throttling state per site
//!   (and per egress source), shared by the fleet; operators' domain suspensions.
//! - [`egress`]: egress sources and pools (bound address, EHLO name, weights), warm-up caps
//!   counted in Redis.
//! - [`deliver`]: SMTP sessions to the relay or to each domain's MX hosts, from the chosen
//!   source; MTA-STS.
//! - [`outcome`]: the vocabulary every layer speaks: what an attempt came to, bounce classes.
//! - [`policy`]: suppression list and frequency caps.
//! - [`experiment`]: A/B tests: assignment, held jobs, the decision (two-proportion test).
//! - [`control`]: campaign pause / resume / cancel, with each daemon's cached copy of the
//!   states; operators' controls per destination (domain suspensions, `paloma queue`,
//!   admin bounces).
//! - [`archive`]: retention of finished campaigns (their counters kept in one hash).
//! - [`bounces`]: what comes back after acceptance: VERP tokens, the inbound SMTP listener,
//!   DSN and ARF parsing, `returned` / `complained` events.
//! - [`track`]: signed tracking tokens and the tracking server (pixel, clicks, unsubscribe).
//! - [`workflow`]: rules → actions: follow-up sends, signed webhooks, not_opened timers.
//! - [`daemon`]: the wiring: `App::build` (components, Redis, listeners) and `App::run`.
//! - [`http`], [`metrics`]: the operations endpoint; [`labels`]: idle campaigns' series
//!   removed.
//! - [`listener`]: how public HTTP listeners are served (timeouts, connection cap).
//! - [`conversions`]: what shops report back (orders, sign-ups), attributed to the
//!   message whose click brought them, counted once per order, with revenue and ROI.
//! - [`api`]: the HTTP API for campaign systems (`/api/v1/…`, bearer token, OpenAPI).
//! - [`pages`]: the campaign report (HTML with SVG charts) on the API listener.
//! - [`stats`]: what is read back of campaigns and recipients, for the CLI and the API.
//! - [`cli`]: the command line, one file per command (`enqueue`, `stats`, `suppress`,
//!   `campaign`, `experiment`, `sources`, `domain`, `queue`, `bounce`, `demo`: the quick
//!   start).
//! - [`panics`]: a panic is one log line, with no backtrace to symbolize.
//! - [`escape`]: HTML escaping, one function for templates and every page.
//! - [`retry`]: waiting between tries while Redis does not answer; [`ticker`]: the loop of
//!   every periodic task.
//! - [`values`]: value types config parses and the rest consumes (campaign and variant
//!   names, address ranges, Redis and webhook URLs, the SendGrid key): a leaf.
//!
//! Dependencies point one way, and a unit test (`layering`) reads the source to keep them
//! so: no cycle among these modules, `values` depends on nothing, `config` only on `values`.
//! `pipeline` uses `shape`, `deliver` and `render`; `shape` uses `deliver`'s types (never
//! the reverse); `store` (connections, keys) sits under `policy`, `policy` under `queue`;
//! the API's routes and the report pages each keep their own state and are composed where
//! the daemon is wired; everything speaks `outcome`.

pub mod api;
pub mod archive;
pub mod bounces;
pub mod cli;
pub mod config;
pub mod control;
pub mod conversions;
pub mod daemon;
pub mod deliver;
pub mod egress;
pub mod escape;
pub mod experiment;
pub mod http;
pub mod job;
pub mod labels;
pub mod listener;
pub mod metrics;
pub mod outcome;
pub mod pages;
pub mod panics;
pub mod pipeline;
pub mod policy;
pub mod queue;
pub mod render;
pub mod retry;
pub mod shape;
pub mod stats;
pub mod store;
pub mod ticker;
pub mod track;
pub mod values;
pub mod workflow;

#[cfg(test)]
mod layering;
