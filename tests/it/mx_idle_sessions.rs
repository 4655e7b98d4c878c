//! Idle SMTP sessions to an MX are kept open after their last message, for the next one, and
//! closed after `idle_timeout` with no more mail to send.

use crate::common;

use std::time::Duration;

use common::mx::*;
use common::*;

#[test]
fn idle_sessions_are_closed_after_their_timeout_without_more_mail() {
    let mport = free_port();
    let e = env(
        &[
            "mx-host=idle.test,mx.idle.test,10",
            "host-record=mx.idle.test,127.0.0.3",
        ],
        &[("127.0.0.3", &[])],
        "idle_timeout = \"2s\"",
        &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""),
    );
    let mut conn = e.redis.conn();
    enqueue_raw(
        &mut conn,
        &e.setup.prefix,
        &jobs_to("i", &["a@idle.test", "b@idle.test", "c@idle.test"]),
    );
    let daemon = Daemon::spawn(&e.setup.config);
    wait_terminal(
        &mut conn,
        &e.setup.prefix,
        3,
        Duration::from_secs(30),
        Some(&daemon),
    );
    // The session outlives its last message (kept for the next one, up to idle_timeout)…
    let open = metric_in(&metrics_text(mport), "paloma_smtp_sessions_open");
    assert!(
        open.is_some_and(|n| n >= 1.0),
        "no session was kept open after the mail: {open:?}"
    );
    // …and with nothing else to send, the housekeeping closes it on its own.
    wait_until_daemon(
        "no SMTP session open",
        Duration::from_secs(15),
        &daemon,
        || metric_in(&metrics_text(mport), "paloma_smtp_sessions_open") == Some(0.0),
    );
}
