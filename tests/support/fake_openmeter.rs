//! A strict fake of OpenMeter's ingest API (`POST /api/v1/events`) on 127.0.0.1, port 0.
//!
//! It answers `400 application/problem+json` for exactly what OpenMeter rejects (see
//! [`event_rules`](super::event_rules)), `401` without the bearer key when one is required,
//! and `204` otherwise; it records what it accepts, deduplicated by (`source`, `id`) like
//! OpenMeter, and can be switched into fault modes at runtime ([`Fault`]).
//!
//! ```ignore
//! let fake = FakeOpenMeter::start().await;
//! let sink = OpenMeterSink::builder(fake.base_url()).build()?;
//! fake.fail_next(3, Fault::ServerError);
//! let events = fake.wait_for_events(10, Duration::from_secs(5)).await?;
//! ```

use std::collections::{BTreeMap, HashSet};
use std::future::pending;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tower::ServiceExt;

use super::event_rules;

/// The ingest path.
pub const INGEST_PATH: &str = "/api/v1/events";

/// A fault the fake can be switched into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `500` problem+json with an empty `detail`, nothing ingested.
    ServerError,
    /// Ingests a valid batch, then answers `500` (OpenMeter's partial ingestion): a retry
    /// must be deduplicated.
    AcceptThenServerError,
    /// `429` with `Retry-After: 1`.
    TooManyRequests,
    /// Holds the request this long (past the client's timeout), then answers `503`.
    Hang(Duration),
    /// Reads the request, then closes the connection without a response.
    CloseConnection,
    /// `401` problem+json.
    Unauthorized,
}

/// A request as the fake received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A running fake; stops when dropped.
pub struct FakeOpenMeter {
    addr: SocketAddr,
    state: Arc<FakeState>,
    server: JoinHandle<()>,
}

struct FakeState {
    api_key: Option<String>,
    inner: Mutex<Inner>,
    changed: Notify,
    request_ids: AtomicU64,
}

#[derive(Default)]
struct Inner {
    accepted: Vec<Map<String, Value>>,
    seen: HashSet<(String, String)>,
    duplicates: u64,
    statuses: BTreeMap<u16, u64>,
    requests: Vec<RecordedRequest>,
    fault: Option<ActiveFault>,
    faults_served: u64,
    connections_closed: u64,
}

struct ActiveFault {
    fault: Fault,
    remaining: Option<u64>,
    until: Option<Instant>,
}

#[derive(Clone)]
struct Connection {
    state: Arc<FakeState>,
    kill: Arc<Notify>,
}

impl FakeOpenMeter {
    /// Starts a fake without authentication (like self-hosted OpenMeter).
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts a fake that requires `Authorization: Bearer <api_key>` (like OpenMeter Cloud).
    pub async fn start_with_key(api_key: &str) -> Self {
        Self::start_with(Some(api_key.to_owned())).await
    }

    async fn start_with(api_key: Option<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(FakeState {
            api_key,
            inner: Mutex::default(),
            changed: Notify::new(),
            request_ids: AtomicU64::new(0),
        });
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        FakeOpenMeter { addr, state, server }
    }

    /// `http://127.0.0.1:<port>`, the base URL to give `OpenMeterSink::builder`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The full ingest URL.
    pub fn events_url(&self) -> String {
        format!("{}{INGEST_PATH}", self.base_url())
    }

    /// Applies `fault` to the next `n` requests.
    pub fn fail_next(&self, n: u64, fault: Fault) {
        self.state.lock().fault = Some(ActiveFault {
            fault,
            remaining: Some(n),
            until: None,
        });
    }

    /// Applies `fault` to every request for `duration` from now.
    pub fn fail_for(&self, duration: Duration, fault: Fault) {
        self.state.lock().fault = Some(ActiveFault {
            fault,
            remaining: None,
            until: Some(Instant::now() + duration),
        });
    }

    /// Ends any fault mode.
    pub fn recover(&self) {
        self.state.lock().fault = None;
    }

    /// The unique events accepted so far, in arrival order.
    pub fn events(&self) -> Vec<Map<String, Value>> {
        self.state.lock().accepted.clone()
    }

    /// The ids of the unique events accepted so far, in arrival order.
    pub fn event_ids(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Valid events received again with a (`source`, `id`) already accepted.
    pub fn duplicates(&self) -> u64 {
        self.state.lock().duplicates
    }

    /// How many requests got each status.
    pub fn statuses(&self) -> BTreeMap<u16, u64> {
        self.state.lock().statuses.clone()
    }

    /// How many requests got `status`.
    pub fn requests_with_status(&self, status: u16) -> u64 {
        self.statuses().get(&status).copied().unwrap_or(0)
    }

    /// Every request received, faulted ones included.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.lock().requests.clone()
    }

    /// Requests a fault mode answered (or hung or cut).
    pub fn faults_served(&self) -> u64 {
        self.state.lock().faults_served
    }

    /// Connections closed mid-request by [`Fault::CloseConnection`].
    pub fn connections_closed(&self) -> u64 {
        self.state.lock().connections_closed
    }

    /// Waits until at least `n` unique events were accepted and returns them all; on timeout
    /// returns what arrived in `Err`.
    pub async fn wait_for_events(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Map<String, Value>>, Vec<Map<String, Value>>> {
        self.wait_until(timeout, |inner| inner.accepted.len() >= n)
            .await
            .map(|()| self.events())
            .map_err(|()| self.events())
    }

    /// Waits until at least `n` requests were received.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |inner| inner.requests.len() >= n)
            .await
            .is_ok()
    }

    async fn wait_until(&self, timeout: Duration, done: impl Fn(&Inner) -> bool) -> Result<(), ()> {
        let wait = async {
            loop {
                let notified = self.state.changed.notified();
                if done(&self.state.lock()) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| ())
    }
}

impl Drop for FakeOpenMeter {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeState {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fault for this request, if one is active (consumes one of `fail_next`'s).
    fn take_fault(&self) -> Option<Fault> {
        let mut inner = self.lock();
        let active = inner.fault.as_mut()?;
        let live = match (active.remaining.as_mut(), active.until) {
            (Some(0), _) => false,
            (Some(n), _) => {
                *n -= 1;
                true
            }
            (None, Some(until)) => Instant::now() < until,
            (None, None) => true,
        };
        let fault = active.fault;
        if live {
            inner.faults_served += 1;
            Some(fault)
        } else {
            inner.fault = None;
            None
        }
    }

    fn record_request(&self, request: RecordedRequest) {
        self.lock().requests.push(request);
        self.changed.notify_waiters();
    }

    /// Stores new events, skipping (`source`, `id`) pairs already seen.
    fn ingest(&self, events: Vec<Map<String, Value>>) {
        let mut inner = self.lock();
        for event in events {
            let key = (
                event["source"].as_str().unwrap_or_default().to_owned(),
                event["id"].as_str().unwrap_or_default().to_owned(),
            );
            if inner.seen.insert(key) {
                inner.accepted.push(event);
            } else {
                inner.duplicates += 1;
            }
        }
    }

    fn respond(&self, status: StatusCode, response: Response) -> Response {
        *self.lock().statuses.entry(status.as_u16()).or_default() += 1;
        self.changed.notify_waiters();
        response
    }

    fn problem(&self, status: StatusCode, detail: &str) -> Response {
        let id = self.request_ids.fetch_add(1, Ordering::Relaxed);
        let body = json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or_default(),
            "status": status.as_u16(),
            "detail": detail,
            "instance": format!("urn:request:fake/{id}"),
        });
        let response = (
            status,
            [(CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response();
        self.respond(status, response)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(key) = &self.api_key else {
            return true;
        };
        headers
            .get(AUTHORIZATION)
            .is_some_and(|value| value.as_bytes() == format!("Bearer {key}").as_bytes())
    }

    /// OpenMeter's validation: content type, JSON shape, every event.
    fn validate(&self, headers: &HeaderMap, body: &[u8]) -> Result<Vec<Map<String, Value>>, String> {
        let content_types: Vec<_> = headers.get_all(CONTENT_TYPE).iter().collect();
        let content_type = match content_types.as_slice() {
            [] => None,
            [one] => Some(one.as_bytes()),
            _ => return Err("invalid content type: multiple values".into()),
        };
        let kind = event_rules::body_kind(content_type)?;
        event_rules::parse_events(kind, body)
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<FakeState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let connection = Connection {
            state: Arc::clone(&state),
            kill: Arc::new(Notify::new()),
        };
        tokio::spawn(serve_connection(stream, connection));
    }
}

/// Serves one connection with hyper; a handler in [`Fault::CloseConnection`] mode fires
/// `kill`, which drops the connection with the request unanswered.
async fn serve_connection(stream: tokio::net::TcpStream, connection: Connection) {
    let kill = Arc::clone(&connection.kill);
    let router = Router::new()
        .route(INGEST_PATH, post(ingest))
        .with_state(connection);
    let service = hyper::service::service_fn(move |request| router.clone().oneshot(request));
    let serve = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = serve => {}
        () = kill.notified() => {}
    }
}

async fn ingest(
    State(connection): State<Connection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let state = &connection.state;
    state.record_request(RecordedRequest {
        method: method.to_string(),
        path: uri.path().to_owned(),
        headers: headers.clone(),
        body: body.clone(),
    });
    match state.take_fault() {
        None => {}
        Some(Fault::ServerError) => return state.problem(StatusCode::INTERNAL_SERVER_ERROR, ""),
        Some(Fault::Unauthorized) => {
            return state.problem(StatusCode::UNAUTHORIZED, "invalid token");
        }
        Some(Fault::TooManyRequests) => {
            let mut response = state.problem(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
            response
                .headers_mut()
                .insert(RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
            return response;
        }
        Some(Fault::Hang(duration)) => {
            tokio::time::sleep(duration).await;
            return state.problem(StatusCode::SERVICE_UNAVAILABLE, "hung");
        }
        Some(Fault::CloseConnection) => {
            state.lock().connections_closed += 1;
            connection.kill.notify_one();
            return pending().await;
        }
        Some(Fault::AcceptThenServerError) => {
            if let Ok(events) = state.validate(&headers, &body) {
                state.ingest(events);
            }
            return state.problem(StatusCode::INTERNAL_SERVER_ERROR, "");
        }
    }
    if !state.authorized(&headers) {
        return state.problem(StatusCode::UNAUTHORIZED, "invalid or missing API token");
    }
    match state.validate(&headers, &body) {
        Ok(events) => {
            state.ingest(events);
            state.respond(StatusCode::NO_CONTENT, StatusCode::NO_CONTENT.into_response())
        }
        Err(detail) => state.problem(StatusCode::BAD_REQUEST, &detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str =
        r#"{"specversion":"1.0","id":"a","source":"s","type":"prompt","subject":"c","data":{"tokens":1}}"#;

    async fn post(fake: &FakeOpenMeter, content_type: &str, body: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(fake.events_url())
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
            .await
            .expect("request to the fake");
        let status = response.status().as_u16();
        let is_problem = response
            .headers()
            .get("content-type")
            .is_some_and(|ct| ct == "application/problem+json");
        let body = response.bytes().await.expect("body");
        let problem = if is_problem {
            serde_json::from_slice(&body).expect("problem json")
        } else {
            assert!(body.is_empty(), "success has an empty body");
            Value::Null
        };
        (status, problem)
    }

    #[tokio::test]
    async fn fake_accepts_valid_events_and_dedups_by_source_and_id() {
        let fake = FakeOpenMeter::start().await;
        assert_eq!(post(&fake, event_rules::SINGLE, EVENT).await.0, 204);
        assert_eq!(
            post(&fake, event_rules::BATCH, &format!("[{EVENT}]")).await.0,
            204
        );
        assert_eq!(post(&fake, event_rules::JSON, EVENT).await.0, 204);
        let other_source = EVENT.replace(r#""source":"s""#, r#""source":"t""#);
        assert_eq!(
            post(&fake, event_rules::JSON, &format!("[{other_source}]"))
                .await
                .0,
            204
        );
        assert_eq!(fake.event_ids(), ["a", "a"]);
        assert_eq!(fake.duplicates(), 2);
        assert_eq!(fake.requests_with_status(204), 4);
    }

    #[tokio::test]
    async fn fake_rejects_bad_requests_with_problem_json_and_ingests_nothing() {
        let fake = FakeOpenMeter::start().await;
        let bad_subject = EVENT.replace(r#""subject":"c""#, r#""subject":["c"]"#);
        let cases = [
            (
                "application/cloudevents-batch+json; charset=utf-8",
                format!("[{EVENT}]"),
                "invalid content type",
            ),
            ("text/plain", EVENT.to_owned(), "invalid content type"),
            (event_rules::BATCH, "[]".to_owned(), "no events found"),
            (event_rules::BATCH, EVENT.to_owned(), "unexpected JSON"),
            (
                event_rules::BATCH,
                format!("[{EVENT},{bad_subject}]"),
                "subject must be a string",
            ),
        ];
        for (content_type, body, detail) in cases {
            let (status, problem) = post(&fake, content_type, &body).await;
            assert_eq!(status, 400, "{content_type} {body}");
            assert_eq!(problem["status"], 400);
            assert_eq!(problem["type"], "about:blank");
            let got = problem["detail"].as_str().unwrap_or_default();
            assert!(got.contains(detail), "{got:?} lacks {detail:?}");
        }
        assert!(fake.events().is_empty());
        assert_eq!(fake.requests_with_status(400), 5);
    }

    #[tokio::test]
    async fn fake_requires_the_bearer_key_when_configured() {
        let fake = FakeOpenMeter::start_with_key("om_k").await;
        assert_eq!(post(&fake, event_rules::SINGLE, EVENT).await.0, 401);
        let response = reqwest::Client::new()
            .post(fake.events_url())
            .header("content-type", event_rules::SINGLE)
            .header("authorization", "Bearer om_k")
            .body(EVENT)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), 204);
        assert_eq!(fake.event_ids(), ["a"]);
    }

    #[tokio::test]
    async fn fake_fault_modes_apply_then_recover() {
        let fake = FakeOpenMeter::start().await;
        fake.fail_next(2, Fault::TooManyRequests);
        assert_eq!(post(&fake, event_rules::SINGLE, EVENT).await.0, 429);
        assert_eq!(post(&fake, event_rules::SINGLE, EVENT).await.0, 429);
        assert_eq!(post(&fake, event_rules::SINGLE, EVENT).await.0, 204);
        fake.fail_next(1, Fault::CloseConnection);
        let cut = reqwest::Client::new()
            .post(fake.events_url())
            .header("content-type", event_rules::SINGLE)
            .body(EVENT)
            .send()
            .await;
        assert!(cut.is_err(), "the connection should be closed: {cut:?}");
        assert_eq!(fake.connections_closed(), 1);
        assert_eq!(fake.faults_served(), 3);
    }
}
