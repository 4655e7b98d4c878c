//! The `paloma` command line: logging, the panic hook and the runtime; the commands are
//! [`paloma::cli`].

use std::process::ExitCode;

use clap::Parser;
use paloma::cli::{self, Cli};

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PALOMA_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    paloma::panics::install();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("paloma: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(cli::run(cli, shutdown_signal())) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("paloma: {e:#}");
            ExitCode::from(1)
        }
    }
}
