//! paloma: an email campaign delivery engine.
//!
//! # Layout
//!
//! The modules follow a message through its life:
//!
//! - [`config`]: the settings tree, one struct per component.
//! - [`job`]: the job contract and its validation (newtypes parsed at the edge).
//! - [`queue`]: Redis: intake from the sends stream, the delayed set, events, dead letters,
//!   and the recorder that writes outcomes and acks per batch.
//! - [`render`]: templates → personalized parts → tracked links → MIME → DKIM.
//! - [`deliver`]: SMTP sessions and the [`deliver::Outcome`] every layer speaks.
//! - [`track`]: signed tracking tokens and the tracking server (pixel, clicks, unsubscribe).
//! - [`workflow`]: rules → actions: follow-up sends, signed webhooks, not_opened timers.
//! - [`daemon`]: the wiring: intake → workers → recorder, shutdown.
//! - [`http`], [`metrics`]: the operations endpoint.
//! - [`listener`]: how public HTTP listeners are served (timeouts, connection cap).
//! - [`cli`]: `enqueue`, `stats`, and [`demo`].

pub mod cli;
pub mod config;
pub mod daemon;
pub mod deliver;
pub mod demo;
pub mod http;
pub mod job;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod queue;
pub mod render;
pub mod shape;
pub mod store;
pub mod track;
pub mod workflow;
