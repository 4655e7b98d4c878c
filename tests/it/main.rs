//! The integration tests: one binary, one module per scenario, against real peers (see
//! `common`). One binary links the library once and builds `common` once; the scenarios
//! run side by side on the test threads, so a scenario that needs the machine to itself
//! (a timing bound, a throughput or memory figure) takes `common::exclusive()` first.
//!
//! The peers (redis-server, Postfix, dnsmasq, aiosmtpd, Chromium…) are not installed from
//! here: `scripts/install-test-peers` does it, and `scripts/test` runs it before this.
//! Run one scenario with a filter: `cargo test --test it fuzz::`.

mod common;

mod api;
mod backoff_rules;
mod blocking_work;
mod bounce_fields;
mod bounce_listener;
mod bounce_rotation;
mod bounce_sessions;
mod campaign;
mod campaign_control;
mod campaign_names;
mod campaign_scale;
mod cli_ops;
mod clock_skew;
mod cluster;
mod conversions;
mod crash_kill;
mod crash_recovery;
mod dead_letters;
mod dkim;
mod domain_counts;
mod domain_suspend;
mod egress;
mod engagement;
mod experiments;
mod failover;
mod faults;
mod fleet;
mod fuzz;
mod grafana_dashboard;
mod guards;
mod late_bounces;
mod lost_reply;
mod mta_sts;
mod mx_idle_sessions;
mod mx_limits;
mod mx_rate;
mod mx_routing;
mod mx_suppression;
mod mx_throttling;
mod operator_controls;
mod optout;
mod panic_log;
mod provider_webhooks;
mod redis_checks;
mod redis_outage;
mod refused_writes;
mod relay_dns;
mod relay_tls;
mod report_pages;
mod shared_backoff;
mod sink_faults;
mod slow_bodies;
mod slow_clients;
mod smuggling;
mod touches;
mod tracking;
mod tracking_flood;
mod webhooks;
mod workflow_clicks;
mod workflow_timers;
mod wrong_type_keys;
