//! The gateway's parts that tests can build: [`Config`] parsed from the environment, the
//! metering layer it describes, and the reverse-proxy [`app`].
//!
//! Included by `examples/gateway/main.rs` and by `tests/gateway.rs`.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use reqwest::Url;
use serde_json::json;
use tower_openmeter::sink::BuildError;
use tower_openmeter::{EventShape, EventSink, MeteringLayer, OpenMeterSink, Subject};

/// How long to wait for the upstream's response head when `UPSTREAM_TIMEOUT` is unset.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(600);

/// The environment variables the gateway reads, with their defaults, for `--help` and errors.
pub const ENV_HELP: &str = "\
Environment variables (empty counts as unset):
  LISTEN_ADDR                   address to listen on             [default: 127.0.0.1:8080]
  UPSTREAM_URL                  OpenAI- or Anthropic-compatible upstream base URL; the
                                request path and query are appended [default: https://api.openai.com]
  UPSTREAM_TIMEOUT              seconds to wait for the upstream's response head (504 after)
                                                                 [default: 600]
  OPENMETER_URL                 OpenMeter base URL, e.g. https://openmeter.cloud or
                                http://localhost:8888; unset: events are printed to stdout
                                as JSON lines
  OPENMETER_API_KEY             OpenMeter API token (sent as Authorization: Bearer)
  METERING_SPOOL_DIR            directory of a durable event spool, so that a crash or an
                                OpenMeter outage loses no committed event; needs
                                OPENMETER_URL and the crate feature `spool`
                                (cargo run --example gateway --features spool)
                                                                 [default: memory only]
  SUBJECT_HEADER                request header holding the customer id, tried before the
                                body `user` field; unset: body `user` only
  METERING_ENSURE_STREAM_USAGE  1: ask OpenAI-style streams to include usage  [default: 0]
  METERING_EVENT_SHAPE          per-token-type | per-request     [default: per-token-type]
  METERING_EVENT_TYPE           CloudEvent type   [default: prompt, or litellm_tokens for
                                per-request]
  METERING_SOURCE               CloudEvent source [default: tower-openmeter-gateway]
  METERING                      on | off; off runs the same proxy without the layer [default: on]
  RUST_LOG                      log filter for stderr            [default: info]";

/// Which built-in event shape the gateway uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShapeName {
    /// `per-token-type`: one event per non-zero token type.
    PerTokenType,
    /// `per-request`: one event with all counts (the Python proxy's `litellm_tokens`).
    PerRequest,
}

/// The gateway's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `LISTEN_ADDR`.
    pub listen_addr: SocketAddr,
    /// `UPSTREAM_URL`, without a trailing slash.
    pub upstream_url: Url,
    /// `UPSTREAM_TIMEOUT`.
    pub upstream_timeout: Duration,
    /// `OPENMETER_URL`.
    pub openmeter_url: Option<Url>,
    /// `OPENMETER_API_KEY`.
    pub openmeter_api_key: Option<String>,
    /// `METERING_SPOOL_DIR` (feature `spool`).
    pub spool_dir: Option<std::path::PathBuf>,
    /// `SUBJECT_HEADER`.
    pub subject_header: Option<HeaderName>,
    /// `METERING_ENSURE_STREAM_USAGE`.
    pub ensure_stream_usage: bool,
    /// `METERING_EVENT_SHAPE`.
    pub event_shape: ShapeName,
    /// `METERING_EVENT_TYPE`, defaulted by shape.
    pub event_type: String,
    /// `METERING_SOURCE`.
    pub source: String,
    /// `METERING` is not `off`.
    pub metering: bool,
}

/// A configuration value that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The environment variable.
    pub var: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.var, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

fn parse_bool(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(err(
            var,
            format!("expected 1 or 0 (true/false, on/off), got {value:?}"),
        )),
    }
}

fn parse_http_url(var: &'static str, value: &str) -> Result<Url, ConfigError> {
    let mut url = Url::parse(value).map_err(|e| err(var, format!("{value:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(err(
            var,
            format!("expected an http:// or https:// URL with a host, got {value:?}"),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(err(
            var,
            format!("{value:?} must not have a query, fragment or credentials"),
        ));
    }
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&path);
    Ok(url)
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (a variable name to its value); empty values
    /// count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };

        let listen_addr = match get("LISTEN_ADDR") {
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
            Some(v) => v.parse().map_err(|_| {
                err(
                    "LISTEN_ADDR",
                    format!("expected IP:PORT such as 127.0.0.1:8080, got {v:?}"),
                )
            })?,
        };
        let upstream_url = parse_http_url(
            "UPSTREAM_URL",
            &get("UPSTREAM_URL").unwrap_or_else(|| "https://api.openai.com".into()),
        )?;
        let upstream_timeout = match get("UPSTREAM_TIMEOUT") {
            None => DEFAULT_UPSTREAM_TIMEOUT,
            Some(v) => match v.parse::<f64>() {
                Ok(secs) if secs > 0.0 && secs.is_finite() && secs <= 86_400.0 => {
                    Duration::from_secs_f64(secs)
                }
                _ => {
                    return Err(err(
                        "UPSTREAM_TIMEOUT",
                        format!("expected seconds > 0, got {v:?}"),
                    ));
                }
            },
        };
        let openmeter_url = get("OPENMETER_URL")
            .map(|v| parse_http_url("OPENMETER_URL", &v))
            .transpose()?;
        let openmeter_api_key = get("OPENMETER_API_KEY");
        if openmeter_api_key.is_some() && openmeter_url.is_none() {
            return Err(err(
                "OPENMETER_API_KEY",
                "is set but OPENMETER_URL is not (use https://openmeter.cloud for OpenMeter Cloud)",
            ));
        }
        let spool_dir = get("METERING_SPOOL_DIR").map(std::path::PathBuf::from);
        if spool_dir.is_some() && openmeter_url.is_none() {
            return Err(err(
                "METERING_SPOOL_DIR",
                "is set but OPENMETER_URL is not: the spool holds events for OpenMeter",
            ));
        }
        if spool_dir.is_some() && !cfg!(feature = "spool") {
            return Err(err(
                "METERING_SPOOL_DIR",
                "needs the crate feature `spool` (cargo run --example gateway --features spool)",
            ));
        }
        let subject_header = get("SUBJECT_HEADER")
            .map(|v| {
                HeaderName::try_from(v.as_str())
                    .map_err(|_| err("SUBJECT_HEADER", format!("{v:?} is not a valid header name")))
            })
            .transpose()?;
        let ensure_stream_usage = get("METERING_ENSURE_STREAM_USAGE")
            .map(|v| parse_bool("METERING_ENSURE_STREAM_USAGE", &v))
            .transpose()?
            .unwrap_or(false);
        let event_shape = match get("METERING_EVENT_SHAPE").as_deref() {
            None | Some("per-token-type") => ShapeName::PerTokenType,
            Some("per-request") => ShapeName::PerRequest,
            Some(other) => {
                return Err(err(
                    "METERING_EVENT_SHAPE",
                    format!("expected per-token-type or per-request, got {other:?}"),
                ));
            }
        };
        let event_type = get("METERING_EVENT_TYPE").unwrap_or_else(|| match event_shape {
            ShapeName::PerTokenType => "prompt".into(),
            ShapeName::PerRequest => "litellm_tokens".into(),
        });
        let source = get("METERING_SOURCE").unwrap_or_else(|| "tower-openmeter-gateway".into());
        let metering = match get("METERING").as_deref() {
            None => true,
            Some(v) => parse_bool("METERING", v)?,
        };
        Ok(Config {
            listen_addr,
            upstream_url,
            upstream_timeout,
            openmeter_url,
            openmeter_api_key,
            spool_dir,
            subject_header,
            ensure_stream_usage,
            event_shape,
            event_type,
            source,
            metering,
        })
    }

    /// The metering layer this configuration describes, sending to `sink`.
    pub fn metering_layer(&self, sink: impl EventSink) -> MeteringLayer {
        let subject = match &self.subject_header {
            Some(name) => Subject::header(name.as_str()).or_body_user(),
            None => Subject::body_user(),
        };
        let shape = match self.event_shape {
            ShapeName::PerTokenType => EventShape::PerTokenType,
            ShapeName::PerRequest => EventShape::PerRequest,
        };
        MeteringLayer::builder()
            .sink(sink)
            .source(self.source.clone())
            .event_type(self.event_type.clone())
            .event_shape(shape)
            .subject(subject)
            .ensure_stream_usage(self.ensure_stream_usage)
            .build()
    }

    /// The OpenMeter sink `OPENMETER_URL`, `OPENMETER_API_KEY` and `METERING_SPOOL_DIR`
    /// describe, or `None` when
    /// `OPENMETER_URL` is unset (events then go to stdout). Needs a tokio runtime.
    pub fn openmeter_sink(&self) -> Option<Result<OpenMeterSink, BuildError>> {
        let url = self.openmeter_url.as_ref()?;
        let builder = OpenMeterSink::builder(url.as_str());
        let builder = match &self.openmeter_api_key {
            Some(key) => builder.api_key(key.clone()),
            None => builder,
        };
        #[cfg(feature = "spool")]
        let builder = match &self.spool_dir {
            Some(dir) => builder.spool(tower_openmeter::spool::SpoolConfig::new(dir)),
            None => builder,
        };
        Some(builder.build())
    }
}

/// How serving ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// After `shutdown` resolved, every in-flight request finished within the drain timeout.
    Drained,
    /// Requests were still running at the drain timeout. Their connection tasks are still on
    /// the runtime: the caller exits, and shutting the runtime down cuts them.
    DrainTimedOut,
}

/// Serves `app` until `shutdown` resolves, then stops accepting connections, lets in-flight
/// requests finish for up to `drain`, and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<Stopped> {
    use axum::serve::ListenerExt;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    // Streamed chunks go out at once: without TCP_NODELAY, Nagle's algorithm holds a small SSE
    // chunk until the client acknowledges the previous one (up to 40 ms with delayed ACKs).
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    });
    let mut server = tokio::spawn(async move { server.await });
    tokio::select! {
        result = &mut server => {
            // axum's serve only ends on its own by an error or a panic.
            return Err(match result {
                Ok(Err(error)) => error,
                Ok(Ok(())) => std::io::Error::other("server stopped"),
                Err(join) => std::io::Error::other(join),
            });
        }
        () = shutdown => {}
    }
    let _ = stop_tx.send(true);
    match tokio::time::timeout(drain, &mut server).await {
        Ok(_) => Ok(Stopped::Drained),
        Err(_) => {
            server.abort();
            Ok(Stopped::DrainTimedOut)
        }
    }
}

/// What the proxy handler shares.
#[derive(Clone, Debug)]
struct Upstream {
    client: reqwest::Client,
    base: Url,
    timeout: Duration,
}

/// The HTTP client the gateway uses upstream: pooled, keep-alive, never decompressing, and
/// never following redirects (the client sees them as the upstream sent them).
pub fn upstream_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_gzip()
        .no_brotli()
        .no_deflate()
        .no_zstd()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_keepalive(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()
}

/// The reverse proxy: every request goes upstream, wrapped in `metering` when given.
pub fn app(config: &Config, client: reqwest::Client, metering: Option<MeteringLayer>) -> Router {
    let upstream = Upstream {
        client,
        base: config.upstream_url.clone(),
        timeout: config.upstream_timeout,
    };
    let router = Router::new().fallback(forward);
    let router = match metering {
        Some(layer) => router.layer(layer),
        None => router,
    };
    router.with_state(upstream)
}

/// The upstream URL for a request: the base URL's path, then the request's path and query.
pub fn upstream_url(base: &Url, uri: &Uri) -> Url {
    let mut url = base.clone();
    let path = format!("{}{}", base.path().trim_end_matches('/'), uri.path());
    url.set_path(&path);
    url.set_query(uri.query());
    url
}

/// Removes the hop-by-hop headers (RFC 9110 section 7.6.1): `Connection` and the headers it
/// names, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding` and `Upgrade`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// An error response in OpenAI's format; never metered (not 2xx).
pub fn error_response(status: StatusCode, kind: &str, code: &str, message: String) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "code": code}});
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
        .into_response()
}

async fn forward(State(upstream): State<Upstream>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let url = upstream_url(&upstream.base, &parts.uri);
    remove_hop_by_hop(&mut parts.headers);
    // reqwest sets `Host` from the upstream URL.
    parts.headers.remove(header::HOST);

    let outgoing = upstream
        .client
        .request(parts.method, url)
        .headers(parts.headers)
        .body(reqwest::Body::wrap(SyncBody::new(body)));
    let response = match tokio::time::timeout(upstream.timeout, outgoing.send()).await {
        Err(_) => {
            tracing::warn!(timeout = ?upstream.timeout, "upstream response timed out");
            return error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                "upstream_timeout",
                format!("the upstream did not answer within {:?}", upstream.timeout),
            );
        }
        Ok(Err(error)) => {
            let (status, code) = if error.is_timeout() {
                (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
            } else {
                (StatusCode::BAD_GATEWAY, "upstream_unreachable")
            };
            let message = format!("upstream request failed: {}", error_chain(&error));
            tracing::warn!("{message}");
            return error_response(status, "upstream_error", code, message);
        }
        Ok(Ok(response)) => response,
    };

    let mut builder = Response::builder().status(response.status());
    if let Some(headers) = builder.headers_mut() {
        *headers = response.headers().clone();
        remove_hop_by_hop(headers);
    }
    let body = Body::new(reqwest::Body::from(response));
    builder.body(body).unwrap_or_else(|error| {
        error_response(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "bad_upstream_response",
            error.to_string(),
        )
    })
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// Makes a `Send` body `Sync`, as `reqwest::Body::wrap` requires, without locking on the data
/// path: `poll_frame` has `&mut self`, so the mutex is only taken for the size hint.
struct SyncBody<B>(Mutex<B>);

impl<B> SyncBody<B> {
    fn new(body: B) -> Self {
        SyncBody(Mutex::new(body))
    }
}

impl<B> http_body::Body for SyncBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let body = self.get_mut().0.get_mut().unwrap_or_else(PoisonError::into_inner);
        std::pin::Pin::new(body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).size_hint()
    }
}
