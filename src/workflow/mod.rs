//! Workflows (`[[workflows]]`): rules that turn events into actions, a follow-up send or a
//! webhook.
//!
//! The engine reads `{prefix}events` through a consumer group of its own
//! (`{redis.group}-workflows`), shared by every daemon so each event is handled once, and
//! acknowledges a batch only after acting on it; entries a stopped daemon left pending are
//! reclaimed after `intake.claim_idle`. The group is created at the end of the stream: rules
//! act on events written from the first start with workflows on, not on a backlog of old
//! ones (a new `delivered` rule must not fire for every mail ever sent).
//!
//! - **Positive rules** (`delivered`, `opened`, `clicked` [one named `link`],
//!   `unsubscribed`, `bounced`) act when their event is read, after `delay` if set.
//! - **Negative rules** (`not_opened`, `not_clicked` `within` a window): a `delivered` event
//!   arms a durable timer, a member of the sorted set `{prefix}timers` scored by its due time;
//!   the first qualifying event removes it by name (ZREM of a member computed from the event,
//!   not a scan). An open cancels `not_opened`; a click cancels `not_clicked` (of the named link
//!   if set) and also `not_opened` (a click proves the mail was opened with images off); an
//!   unsubscribe or a bounce cancels both. Due timers are leased by a Lua script, acted on,
//!   then removed, so a daemon dying in between leaves them to fire again, not lost.
//! - Events with `machine: true` (image proxies, link scanners) neither fire nor cancel a rule
//!   unless it says `machine = true`.
//!
//! Actions:
//!
//! - **Follow-up send**: a new job on `{prefix}sends` to the same recipient, with the original
//!   job's `to`, `to_name`, `data`, `from` and `reply_to`, template `send.template`, campaign
//!   `send.campaign` (default: the original campaign), and id `wf:{rule}:{original id}`. The
//!   daemon keeps each delivered job it may need in `{prefix}wfjob:{id}` (only for campaigns a
//!   send rule matches, for the longest `within` + `delay` plus 7 days). A Lua script adds the
//!   job only if the recipient is not in `{prefix}suppressed` (for any reason) and
//!   `SET {prefix}wf:{rule}:{id} NX` succeeds: once per send and rule, however often a link is
//!   clicked. A rule never fires for its own follow-ups (its name in the id's `wf:` chain), so
//!   rules cannot loop.
//! - **Webhook**: see [`webhook`]; queued in `{prefix}webhooks` and POSTed by any daemon.
//!
//! Timers fire only up to the point the event consumer has read (its watermark), so a daemon
//! catching up on a backlog does not send "you did not open" to someone whose open is still
//! unread in the stream.
//!
//! Files: [`rules`] (the rule model: triggers, actions, matching an event, timer plans,
//! follow-up jobs, which jobs to keep), [`engine`] (the event consumer and the timer loop
//! that act on them), [`timers`], [`webhook`] and [`client`].

pub mod client;
mod engine;
mod rules;
pub mod timers;
pub mod webhook;

pub use engine::*;
pub use rules::*;

#[cfg(test)]
mod tests;
