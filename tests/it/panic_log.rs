//! A panic costs one log line and no memory: the daemon's hook (`paloma::panics`) captures no
//! backtrace, so nothing is symbolized, even with `RUST_BACKTRACE=1` in the environment (as
//! many hosts and images set it). With Rust's default hook the same panic in this test binary
//! printed a ~100-line backtrace and took RSS up by the size of the parsed debug info.
//!
//! Its own process: a panic hook, a tracing subscriber and the RSS are process-wide, and
//! every other scenario shares this test binary. The test runs this binary again with only
//! the measurement (`in_its_own_process`, ignored in a normal run) and reads its verdict.

use std::io::Write;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Set in the child process that runs the measurement.
const CHILD: &str = "PALOMA_TEST_PANIC_LOG_CHILD";

#[test]
fn a_panic_is_one_log_line_without_a_backtrace_even_with_rust_backtrace_set() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "panic_log::in_its_own_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .expect("running this test binary again");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("1 passed"),
        "the measurement did not run: {text}"
    );
    println!("{text}");
}

#[test]
#[ignore = "run in its own process by the test above"]
fn in_its_own_process() {
    // Among the other scenarios (`--include-ignored`) it would measure them too: nothing.
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    // Before any panic: the standard library reads it once.
    std::env::set_var("RUST_BACKTRACE", "1");
    std::env::remove_var(paloma::panics::BACKTRACE_VAR);
    let log = Log::default();
    let w = log.clone();
    tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .init();
    paloma::panics::install();

    let before = rss_kb();
    // The kind of panic issue 22 found in a listener: untrusted text sliced by byte index.
    let text = String::from("€uro");
    let panicked = std::thread::Builder::new()
        .name("request".into())
        .spawn(move || text[..2].len())
        .unwrap()
        .join();
    assert!(panicked.is_err());
    let grown = rss_kb().saturating_sub(before);

    let out = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "one line per panic:\n{out}");
    assert!(
        lines[0].contains("ERROR")
            && lines[0].contains("panic in thread 'request' at tests/it/panic_log.rs:")
            && lines[0].contains("byte index 2 is not a char boundary"),
        "{out}"
    );
    assert!(!out.contains("backtrace"), "{out}");
    assert!(
        grown < 8 * 1024,
        "RSS grew by {grown} KB at the first panic"
    );
    println!(
        "panic logged in {} bytes, RSS +{grown} KB: {}",
        out.len(),
        lines[0]
    );
}
