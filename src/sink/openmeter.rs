//! [`OpenMeterSink`]: the [`HttpSink`] pointed at OpenMeter's ingest API.

use std::time::Duration;

use reqwest::Url;

use super::EventSink;
use super::config::BuildError;
use super::http::{HttpSink, HttpSinkBuilder};
use super::shutdown::ShutdownReport;
use super::stats::SinkStats;
use crate::CloudEvent;

/// OpenMeter Cloud, the base URL when `OPENMETER_URL` is not set.
pub const DEFAULT_OPENMETER_URL: &str = "https://openmeter.cloud";

/// The ingest path under the base URL.
const INGEST_PATH: &str = "api/v1/events";

/// Delivers events to OpenMeter: `POST {base}/api/v1/events` with
/// `Content-Type: application/cloudevents-batch+json` and, when an API key is set,
/// `Authorization: Bearer <key>`.
///
/// Batching, retries (with the same ids, so OpenMeter's `source` + `id` deduplication makes
/// them safe), the bounded queue and shutdown are those of [`HttpSink`]; see there. Put a
/// clone into the metering layer and keep one for [`stats`](Self::stats) and
/// [`shutdown`](Self::shutdown):
///
/// ```
/// use std::time::Duration;
/// use tower_openmeter::{MeteringLayer, OpenMeterSink};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_openmeter::sink::BuildError> {
/// let sink = OpenMeterSink::builder("http://localhost:8888")
///     .api_key("om_...")
///     .flush_interval(Duration::from_millis(500))
///     .build()?;
/// assert_eq!(sink.endpoint().as_str(), "http://localhost:8888/api/v1/events");
/// let layer = MeteringLayer::builder().sink(sink.clone()).build();
/// # drop(layer);
///
/// // ... serve; then, on the way out (e.g. after axum's graceful shutdown):
/// let report = sink.shutdown(Duration::from_secs(10)).await;
/// if !report.is_lossless() {
///     eprintln!("events lost: {:?}", report.stats);
/// }
/// # assert!(report.is_lossless());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct OpenMeterSink {
    inner: HttpSink,
}

/// Configures an [`OpenMeterSink`]; from [`OpenMeterSink::builder`].
#[derive(Clone, Debug)]
#[must_use]
pub struct OpenMeterSinkBuilder {
    inner: HttpSinkBuilder,
}

impl OpenMeterSink {
    /// Starts configuring a sink for the OpenMeter at `base_url` (e.g.
    /// `https://openmeter.cloud` or `http://localhost:8888`, with or without a trailing slash).
    pub fn builder(base_url: impl AsRef<str>) -> OpenMeterSinkBuilder {
        let base = base_url.as_ref().trim_end_matches('/');
        OpenMeterSinkBuilder {
            inner: HttpSink::builder(format!("{base}/{INGEST_PATH}")).named("OpenMeterSink"),
        }
    }

    /// Builds a sink with the defaults from `OPENMETER_URL` (default
    /// [`DEFAULT_OPENMETER_URL`]) and `OPENMETER_API_KEY` (optional: self-hosted OpenMeter
    /// has no authentication). Needs a tokio runtime.
    ///
    /// # Errors
    ///
    /// As [`OpenMeterSinkBuilder::build`], and [`BuildError::InvalidEnv`] when a variable is
    /// not Unicode.
    pub fn from_env() -> Result<Self, BuildError> {
        Self::builder_from_env()?.build()
    }

    /// A builder preset from `OPENMETER_URL` and `OPENMETER_API_KEY`, as [`from_env`]
    /// reads them, to adjust further.
    ///
    /// [`from_env`]: Self::from_env
    ///
    /// # Errors
    ///
    /// [`BuildError::InvalidEnv`] when a variable is not Unicode.
    pub fn builder_from_env() -> Result<OpenMeterSinkBuilder, BuildError> {
        Ok(builder_from_vars(
            env_var("OPENMETER_URL")?,
            env_var("OPENMETER_API_KEY")?,
        ))
    }

    /// The URL batches are posted to: `{base}/api/v1/events`.
    pub fn endpoint(&self) -> &Url {
        self.inner.endpoint()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SinkStats {
        self.inner.stats()
    }

    /// Stops intake, flushes everything queued and in flight, and reports what could not be
    /// delivered within `timeout`. Callable on any clone; see [`HttpSink::shutdown`].
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.inner.shutdown(timeout).await
    }

    /// The generic sink underneath.
    pub fn as_http_sink(&self) -> &HttpSink {
        &self.inner
    }
}

impl EventSink for OpenMeterSink {
    #[inline]
    fn send(&self, event: CloudEvent) {
        self.inner.send(event);
    }

    #[inline]
    fn send_all(&self, events: Vec<CloudEvent>) {
        self.inner.send_all(events);
    }
}

/// A variable's value; unset and empty are both `None`.
fn env_var(var: &'static str) -> Result<Option<String>, BuildError> {
    match std::env::var(var) {
        Ok(value) if value.trim().is_empty() => Ok(None),
        Ok(value) => Ok(Some(value.trim().to_owned())),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(BuildError::InvalidEnv { var }),
    }
}

fn builder_from_vars(url: Option<String>, api_key: Option<String>) -> OpenMeterSinkBuilder {
    let builder = OpenMeterSink::builder(url.as_deref().unwrap_or(DEFAULT_OPENMETER_URL));
    match api_key {
        Some(key) => builder.api_key(key),
        None => builder,
    }
}

macro_rules! delegate {
    ($( $(#[$doc:meta])* fn $name:ident($arg:ident: $ty:ty); )*) => {
        $(
            $(#[$doc])*
            pub fn $name(self, $arg: $ty) -> Self {
                OpenMeterSinkBuilder { inner: self.inner.$name($arg) }
            }
        )*
    };
}

impl OpenMeterSinkBuilder {
    /// Sends `Authorization: Bearer <key>` (OpenMeter Cloud's API token, `om_...`). Without it
    /// (or with an empty key) no `Authorization` header is sent, as self-hosted OpenMeter
    /// expects. The key never appears in `Debug` output or logs.
    pub fn api_key(self, key: impl Into<String>) -> Self {
        OpenMeterSinkBuilder {
            inner: self.inner.bearer_token(key),
        }
    }

    delegate! {
        /// The most events per request (default 100, OpenMeter's own collector preset).
        fn batch_size(events: usize);
        /// How long a partial batch waits for more events before it is sent (default 1 s).
        fn flush_interval(interval: Duration);
        /// How many events the queue holds; when it is full `send` drops the newest event
        /// (default 100 000).
        fn queue_capacity(events: usize);
        /// How many batches may be sent or wait to be retried at once (default 4).
        fn max_in_flight(batches: usize);
        /// The time allowed for one HTTP attempt (default 10 s).
        fn request_timeout(timeout: Duration);
        /// How long a failing batch is retried before it is dropped and counted
        /// (default 15 min).
        fn max_retry_elapsed(elapsed: Duration);
        /// Uses this client; by default the sink makes its own, which does not follow
        /// redirects.
        fn client(client: reqwest::Client);
    }

    /// The bounds of the backoff between retries (default 200 ms doubling up to 30 s); see
    /// [`HttpSinkBuilder::backoff`].
    pub fn backoff(self, base: Duration, max: Duration) -> Self {
        OpenMeterSinkBuilder {
            inner: self.inner.backoff(base, max),
        }
    }

    /// Spools events on disk between the queue and delivery (feature `spool`): what was
    /// committed survives a crash and is delivered first on the next start, with its original
    /// ids. See [`HttpSinkBuilder::spool`] and [`SpoolConfig`](crate::spool::SpoolConfig).
    ///
    /// ```
    /// use tower_openmeter::OpenMeterSink;
    /// use tower_openmeter::spool::SpoolConfig;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_openmeter::sink::BuildError> {
    /// # let dir = std::env::temp_dir().join(format!("om-spool-doc-{}", std::process::id()));
    /// let sink = OpenMeterSink::builder("http://127.0.0.1:8888")
    ///     .spool(SpoolConfig::new(&dir).max_bytes(256 << 20))
    ///     .build()?;
    /// # drop(sink);
    /// # std::fs::remove_dir_all(&dir).ok();
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "spool")]
    #[cfg_attr(docsrs, doc(cfg(feature = "spool")))]
    pub fn spool(self, config: crate::spool::SpoolConfig) -> Self {
        OpenMeterSinkBuilder {
            inner: self.inner.spool(config),
        }
    }

    /// Builds the sink and starts its background task on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`BuildError::NoRuntime`] outside a tokio runtime; [`BuildError::InvalidUrl`],
    /// [`BuildError::InvalidApiKey`] or [`BuildError::Client`] for a bad configuration.
    pub fn build(self) -> Result<OpenMeterSink, BuildError> {
        Ok(OpenMeterSink {
            inner: self.inner.build()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(builder: OpenMeterSinkBuilder) -> String {
        builder.inner.settings_endpoint().to_owned()
    }

    #[test]
    fn base_url_with_or_without_trailing_slash() {
        for base in ["http://om:8888", "http://om:8888/", "http://om:8888//"] {
            assert_eq!(
                endpoint(OpenMeterSink::builder(base)),
                "http://om:8888/api/v1/events"
            );
        }
        assert_eq!(
            endpoint(OpenMeterSink::builder("https://gw.example/openmeter/")),
            "https://gw.example/openmeter/api/v1/events"
        );
    }

    #[test]
    fn env_defaults_to_cloud_without_key() {
        let builder = builder_from_vars(None, None);
        assert_eq!(endpoint(builder.clone()), "https://openmeter.cloud/api/v1/events");
        assert!(!format!("{builder:?}").contains("<redacted>"));
        let builder = builder_from_vars(Some("http://localhost:8888".into()), Some("om_k".into()));
        assert_eq!(endpoint(builder.clone()), "http://localhost:8888/api/v1/events");
        let debug = format!("{builder:?}");
        assert!(debug.contains("<redacted>") && !debug.contains("om_k"), "{debug}");
    }

    #[test]
    fn building_needs_a_runtime() {
        let error = OpenMeterSink::builder("http://127.0.0.1:9").build().unwrap_err();
        assert!(matches!(error, BuildError::NoRuntime));
        assert!(error.to_string().contains("tokio runtime"));
    }
}
