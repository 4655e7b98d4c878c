//! What a panic leaves behind: one log line with its message, thread and location, and no
//! backtrace unless `PALOMA_BACKTRACE=1` asks for one.
//!
//! A panic in a request or a delivery is caught where it happens (a spawned task ends, the
//! worker dead-letters its job) and the daemon carries on; what it must not do is cost the
//! process for the rest of its life. Rust's default hook, with `RUST_BACKTRACE` set, writes
//! ~10 KB of backtrace per panic, and the first one loads and parses the binary's debug info
//! to name the frames: measured on the release binary (`debug = 1`), RSS went from 42 MB to
//! 231 MB at the first panic and stayed there. This hook captures no backtrace, so nothing is
//! symbolized; `RUST_BACKTRACE`, often set for a whole host or image, is not enough to turn
//! that cost back on. `PALOMA_BACKTRACE=1` does, for a developer chasing a panic.
//!
//! Installed by the binary's `main` only: it is process-wide, and the library sets no
//! process state (tests run several daemons in one process).

use std::panic::PanicHookInfo;

/// The environment variable that adds a backtrace to the panic line.
pub const BACKTRACE_VAR: &str = "PALOMA_BACKTRACE";

/// Replaces the panic hook with one that logs each panic as one line (error level, target
/// `paloma::panic`).
pub fn install() {
    let backtrace = wants_backtrace(std::env::var_os(BACKTRACE_VAR).as_deref());
    std::panic::set_hook(Box::new(move |info| {
        let line = describe(info);
        if backtrace {
            let trace = std::backtrace::Backtrace::force_capture();
            tracing::error!(target: "paloma::panic", "{line}\n{trace}");
        } else {
            tracing::error!(target: "paloma::panic", "{line}");
        }
    }));
}

/// `PALOMA_BACKTRACE` set to anything but empty or `0`.
fn wants_backtrace(v: Option<&std::ffi::OsStr>) -> bool {
    v.is_some_and(|v| !v.is_empty() && v != "0")
}

/// "panic in thread 'NAME' at FILE:LINE:COL: MESSAGE", on one line whatever the message
/// holds (its line breaks and control characters are escaped).
pub fn describe(info: &PanicHookInfo<'_>) -> String {
    let message = info
        .payload_as_str()
        .unwrap_or("(a panic without a message)");
    let at = info.location().map_or_else(
        || "an unknown place".to_string(),
        |l| format!("{}:{}:{}", l.file(), l.line(), l.column()),
    );
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    format!(
        "panic in thread '{}' at {at}: {}",
        one_line(name),
        one_line(message)
    )
}

/// `s` with its control characters (line breaks above all) escaped, the rest as is.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn only_a_set_paloma_backtrace_asks_for_a_backtrace() {
        assert!(!wants_backtrace(None));
        assert!(!wants_backtrace(Some(OsStr::new(""))));
        assert!(!wants_backtrace(Some(OsStr::new("0"))));
        assert!(wants_backtrace(Some(OsStr::new("1"))));
        assert!(wants_backtrace(Some(OsStr::new("full"))));
    }

    #[test]
    fn a_message_stays_on_one_line() {
        assert_eq!(one_line("a\nb\r\tc 'é' \"x\""), "a\\nb\\r\\tc 'é' \"x\"");
    }
}
