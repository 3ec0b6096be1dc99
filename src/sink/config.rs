//! The options of the HTTP sinks, their defaults, and their validation when a sink is built.

use std::fmt;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::HeaderValue;

use super::retry::BackoffConfig;

/// Events per batch unless configured.
pub(crate) const DEFAULT_BATCH_SIZE: usize = 100;
/// How long a partial batch waits for more events unless configured.
pub(crate) const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Events the queue holds unless configured.
pub(crate) const DEFAULT_QUEUE_CAPACITY: usize = 100_000;
/// Batches being sent or retried at once unless configured.
pub(crate) const DEFAULT_MAX_IN_FLIGHT: usize = 4;
/// Time allowed for one HTTP attempt unless configured.
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a batch is retried for unless configured.
pub(crate) const DEFAULT_MAX_RETRY_ELAPSED: Duration = Duration::from_secs(15 * 60);

/// Everything a builder collects.
#[derive(Clone)]
pub(crate) struct Settings {
    /// `"HttpSink"` or `"OpenMeterSink"`, for logs.
    pub(crate) name: &'static str,
    pub(crate) endpoint: String,
    pub(crate) bearer_token: Option<String>,
    pub(crate) batch_size: usize,
    pub(crate) flush_interval: Duration,
    pub(crate) queue_capacity: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) max_retry_elapsed: Duration,
    pub(crate) backoff: BackoffConfig,
    pub(crate) client: Option<reqwest::Client>,
    /// The durable spool, when configured (feature `spool`).
    #[cfg(feature = "spool")]
    pub(crate) spool: Option<crate::spool::SpoolConfig>,
}

impl Settings {
    pub(crate) fn new(name: &'static str, endpoint: String) -> Self {
        Settings {
            name,
            endpoint,
            bearer_token: None,
            batch_size: DEFAULT_BATCH_SIZE,
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_retry_elapsed: DEFAULT_MAX_RETRY_ELAPSED,
            backoff: BackoffConfig::default(),
            client: None,
            #[cfg(feature = "spool")]
            spool: None,
        }
    }

    /// The endpoint as an `http(s)` URL.
    pub(crate) fn endpoint_url(&self) -> Result<Url, BuildError> {
        let invalid = |reason: String| BuildError::InvalidUrl {
            url: self.endpoint.clone(),
            reason,
        };
        let url = Url::parse(&self.endpoint).map_err(|e| invalid(e.to_string()))?;
        match url.scheme() {
            "http" | "https" => Ok(url),
            other => Err(invalid(format!("unsupported scheme {other:?}"))),
        }
    }

    /// The `Authorization` header, marked sensitive so that it is never printed.
    pub(crate) fn authorization(&self) -> Result<Option<HeaderValue>, BuildError> {
        let Some(token) = &self.bearer_token else {
            return Ok(None);
        };
        let mut value =
            HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| BuildError::InvalidApiKey)?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    /// The configured client, or one made for the sink: no redirects (a redirected POST may
    /// become a GET and lose the batch), our user agent.
    pub(crate) fn http_client(&self) -> Result<reqwest::Client, BuildError> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tower-openmeter/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(BuildError::Client)
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut f = f.debug_struct("Settings");
        f.field("endpoint", &self.endpoint)
            .field("api_key", &self.bearer_token.as_ref().map(|_| Redacted))
            .field("batch_size", &self.batch_size)
            .field("flush_interval", &self.flush_interval)
            .field("queue_capacity", &self.queue_capacity)
            .field("max_in_flight", &self.max_in_flight)
            .field("request_timeout", &self.request_timeout)
            .field("max_retry_elapsed", &self.max_retry_elapsed)
            .field("backoff", &self.backoff)
            .field("custom_client", &self.client.is_some());
        #[cfg(feature = "spool")]
        f.field("spool", &self.spool);
        f.finish()
    }
}

/// Prints in place of a secret.
pub(crate) struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why an HTTP sink could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// There is no tokio runtime to run the sink's background task: build the sink inside one
    /// (in `#[tokio::main]`, or within `Runtime::enter`).
    NoRuntime,
    /// The endpoint is not an absolute `http` or `https` URL.
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The API key cannot be sent in an HTTP header (it has control characters).
    InvalidApiKey,
    /// An environment variable is set but is not valid Unicode.
    InvalidEnv {
        /// The variable's name.
        var: &'static str,
    },
    /// The HTTP client could not be created (for instance, no TLS backend).
    Client(reqwest::Error),
    /// The spool could not be opened (feature `spool`).
    #[cfg(feature = "spool")]
    Spool(crate::spool::SpoolError),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::NoRuntime => f.write_str(
                "no tokio runtime: build the sink from within a tokio runtime (e.g. in #[tokio::main])",
            ),
            BuildError::InvalidUrl { url, reason } => write!(f, "invalid URL {url:?}: {reason}"),
            BuildError::InvalidApiKey => f.write_str("the API key is not a valid header value"),
            BuildError::InvalidEnv { var } => write!(f, "{var} is not valid Unicode"),
            BuildError::Client(error) => write!(f, "cannot create the HTTP client: {error}"),
            #[cfg(feature = "spool")]
            BuildError::Spool(error) => write!(f, "cannot open the spool: {error}"),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Client(error) => Some(error),
            #[cfg(feature = "spool")]
            BuildError::Spool(error) => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_absolute_http() {
        let settings = |url: &str| Settings::new("HttpSink", url.to_owned());
        assert!(settings("http://127.0.0.1:1/events").endpoint_url().is_ok());
        assert!(
            settings("https://openmeter.cloud/api/v1/events")
                .endpoint_url()
                .is_ok()
        );
        for bad in ["", "openmeter.cloud", "ftp://host/x", "/api/v1/events"] {
            assert!(
                matches!(settings(bad).endpoint_url(), Err(BuildError::InvalidUrl { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn authorization_is_bearer_and_sensitive() {
        let mut settings = Settings::new("HttpSink", "http://h".into());
        assert!(settings.authorization().unwrap().is_none());
        settings.bearer_token = Some("om_secret".into());
        let value = settings.authorization().unwrap().unwrap();
        assert_eq!(value, "Bearer om_secret");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("om_secret"));
        settings.bearer_token = Some("bad\nkey".into());
        assert!(matches!(settings.authorization(), Err(BuildError::InvalidApiKey)));
    }

    #[test]
    fn debug_redacts_the_key() {
        let mut settings = Settings::new("HttpSink", "http://h".into());
        settings.bearer_token = Some("om_secret".into());
        let debug = format!("{settings:?}");
        assert!(!debug.contains("om_secret"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }
}
