//! A metered reverse proxy for any OpenAI- or Anthropic-compatible upstream, configured by
//! environment variables (see `--help`).
//!
//! Run: `UPSTREAM_URL=https://api.openai.com cargo run --release --example gateway`

#[allow(dead_code)]
mod proxy;

use std::process::ExitCode;
use std::time::Duration;

use proxy::Config;
use tower_openmeter::{OpenMeterSink, StdoutSink};
use tracing_subscriber::EnvFilter;

/// How long in-flight requests may take to finish after Ctrl-C or SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the sink may take to deliver what it holds at exit.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

fn usage() -> String {
    format!(
        "gateway: a metered reverse proxy for OpenAI- and Anthropic-compatible APIs\n\n\
         Usage: gateway [--help]\n\n{}\n",
        proxy::ENV_HELP
    )
}

/// Where the events go.
enum Sink {
    Stdout,
    OpenMeter(OpenMeterSink),
}

fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        print!("{}", usage());
        return ExitCode::SUCCESS;
    }
    if let Some(arg) = std::env::args().nth(1) {
        eprintln!("gateway: unexpected argument {arg:?}; configuration is by environment variables\n");
        eprint!("{}", usage());
        return ExitCode::from(2);
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("gateway: invalid configuration: {error}\n(run with --help for every variable)");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("gateway: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(config));
    // Cuts the connections a bounded drain left behind.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn run(config: Config) -> ExitCode {
    let sink = match config.openmeter_sink() {
        None => Sink::Stdout,
        Some(Ok(sink)) => Sink::OpenMeter(sink),
        Some(Err(error)) => {
            eprintln!(
                "gateway: invalid configuration: OPENMETER_URL/OPENMETER_API_KEY/METERING_SPOOL_DIR: {error}"
            );
            return ExitCode::from(2);
        }
    };
    let client = match proxy::upstream_client() {
        Ok(client) => client,
        Err(error) => {
            eprintln!("gateway: cannot build the upstream HTTP client: {error}");
            return ExitCode::FAILURE;
        }
    };
    let layer = config.metering.then(|| match &sink {
        Sink::Stdout => config.metering_layer(StdoutSink::new()),
        Sink::OpenMeter(sink) => config.metering_layer(sink.clone()),
    });
    let app = proxy::app(&config, client, layer);

    let listener = match tokio::net::TcpListener::bind(config.listen_addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("gateway: cannot listen on {}: {error}", config.listen_addr);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().unwrap_or(config.listen_addr);
    tracing::info!(
        upstream = %config.upstream_url,
        sink = match &sink { Sink::Stdout => "stdout".to_owned(), Sink::OpenMeter(s) => s.endpoint().to_string() },
        metering = config.metering,
        shape = ?config.event_shape,
        event_type = %config.event_type,
        source = %config.source,
        "gateway configured"
    );
    eprintln!("listening on http://{addr}");

    let shutdown = async {
        let signal = shutdown_signal().await;
        tracing::info!(%signal, drain = ?DRAIN_TIMEOUT, "stopping: no new connections, finishing in-flight requests");
    };
    let code = match proxy::serve(listener, app, shutdown, DRAIN_TIMEOUT).await {
        Ok(proxy::Stopped::Drained) => {
            tracing::info!("in-flight requests finished");
            ExitCode::SUCCESS
        }
        Ok(proxy::Stopped::DrainTimedOut) => {
            tracing::warn!("in-flight requests still running after {DRAIN_TIMEOUT:?}; cutting them");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "server stopped unexpectedly");
            ExitCode::FAILURE
        }
    };

    match sink {
        // StdoutSink writes synchronously: nothing is held.
        Sink::Stdout => {}
        Sink::OpenMeter(sink) => {
            let report = sink.shutdown(FLUSH_TIMEOUT).await;
            if report.is_lossless() {
                tracing::info!(flushed = report.flushed, "OpenMeter sink flushed");
            } else {
                tracing::error!(
                    flushed = report.flushed,
                    undelivered = report.undelivered,
                    timed_out = report.timed_out,
                    stats = ?report.stats,
                    "OpenMeter sink: events lost"
                );
            }
        }
    }
    code
}

/// Resolves on Ctrl-C, or SIGTERM on Unix; names the signal.
async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "SIGINT",
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
                "SIGTERM"
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<&'static str>();
    tokio::select! {
        signal = ctrl_c => signal,
        signal = terminate => signal,
    }
}
