//! [`Metering`]: the service that reads each LLM request and meters its response.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, request};
use http_body::Body;
use tower::Service;

use crate::capture::{Capture, Captured};
use crate::chunks::declared_length;
use crate::inspect::{is_json, media_type};
use crate::layer::Config;
use crate::meter::{Meter, RequestSide};
use crate::request::read_capped;
use crate::subject::HeadSubject;
use crate::{Api, MeteredBody, RequestBody, RequestFields, ResponseFuture};

/// Meters the LLM requests that pass through it; made by [`MeteringLayer`](crate::MeteringLayer).
///
/// POST requests with a JSON body on an API path are read (up to a cap) and their responses
/// metered; every other request goes to the inner service untouched, without buffering or
/// allocation. The inner service receives a [`RequestBody`] that yields exactly the bytes the
/// client sent.
#[derive(Clone, Debug)]
pub struct Metering<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Metering<S> {
    pub(crate) fn from_config(inner: S, config: Arc<Config>) -> Self {
        Metering { inner, config }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The API a request is for when the layer meters it; otherwise counts why not.
    fn metered_api<B>(&self, request: &Request<B>) -> Option<Api> {
        let stats = &self.config.stats;
        let api = (request.method() == Method::POST)
            .then(|| self.config.api_for_path(request.uri().path()))
            .flatten();
        let Some(api) = api else {
            stats.incr(|c| &c.skipped_not_api);
            return None;
        };
        let json = request
            .headers()
            .get(CONTENT_TYPE)
            .is_none_or(|v| is_json(media_type(v.as_bytes())));
        if !json {
            stats.incr(|c| &c.skipped_not_json);
            return None;
        }
        Some(api)
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Metering<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Body<Data = Bytes> + Send + Unpin + 'static,
    ReqBody::Error: Send,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        self.config.stats.incr(|c| &c.requests_seen);
        let Some(api) = self.metered_api(&request) else {
            return ResponseFuture::passthrough(self.inner.call(request.map(RequestBody::passthrough)));
        };
        if self.reads_body_first(api) {
            self.call_after_reading_body(api, request)
        } else {
            self.call_capturing_body(api, request)
        }
    }
}

impl<S> Metering<S> {
    /// Whether the body must be read before the inner service sees the request: to rewrite it
    /// (`ensure_stream_usage`) or for a subject closure that looks at its fields.
    fn reads_body_first(&self, api: Api) -> bool {
        self.config.may_inject_stream_usage(api) || self.config.subject.has_closure()
    }

    /// The usual path: the request goes to the inner service at once, and its body's fields
    /// are read from a copy taken as the inner service reads it (see `capture`).
    fn call_capturing_body<ReqBody, ResBody>(
        &mut self,
        api: Api,
        request: Request<ReqBody>,
    ) -> ResponseFuture<S::Future>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
        ReqBody: Body<Data = Bytes>,
    {
        let config = &self.config;
        let started = SystemTime::now();
        let (head, body) = request.into_parts();
        let subject = config.subject.resolve_head(&head, config.max_subject_len);
        let labels = config.data_fields.as_ref().map(|f| f(&head)).unwrap_or_default();
        let declared = declared_length(&head.headers);
        let (body, request_side) = if config.over_request_cap(declared) {
            let side = RequestSide::Read(Captured::OverCap.into_fields(&config.stats));
            (RequestBody::passthrough(body), side)
        } else {
            let (capture, slot) = Capture::new(config.max_request_body, declared);
            (RequestBody::capturing(body, capture), RequestSide::Captured(slot))
        };
        let meter = Meter::new(config.clone(), api, subject, request_side, started, labels);
        let future = self.inner.call(Request::from_parts(head, body));
        ResponseFuture::metered(future, meter)
    }

    /// Reads the body (within the cap) before calling the inner service, which then gets the
    /// same bytes, or the rewritten ones with `ensure_stream_usage`.
    fn call_after_reading_body<ReqBody, ResBody>(
        &mut self,
        api: Api,
        request: Request<ReqBody>,
    ) -> ResponseFuture<S::Future>
    where
        S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        ReqBody: Body<Data = Bytes> + Send + Unpin + 'static,
        ReqBody::Error: Send,
    {
        // The ready service goes into the future; this one keeps a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        let started = SystemTime::now();
        ResponseFuture::prepare(Box::pin(async move {
            let (mut head, body) = request.into_parts();
            let (body, fields) = read_request(&config, &head, body).await;
            let (body, injected) = ensure_stream_usage(&config, api, &mut head, body, &fields);
            let subject = config.subject.resolve(&head, &fields, config.max_subject_len);
            let labels = config.data_fields.as_ref().map(|f| f(&head)).unwrap_or_default();
            let subject = HeadSubject::Decided(subject);
            let request_side = RequestSide::Read(fields);
            let mut meter = Meter::new(config, api, subject, request_side, started, labels);
            meter.set_usage_injected(injected);
            (inner.call(Request::from_parts(head, body)), meter)
        }))
    }
}

/// Reads the request body within the cap and the fields metering needs from it. The body
/// returned yields the original bytes whatever happened.
async fn read_request<B>(config: &Config, head: &request::Parts, body: B) -> (RequestBody<B>, RequestFields)
where
    B: Body<Data = Bytes> + Unpin,
{
    if config.over_request_cap(declared_length(&head.headers)) {
        let fields = Captured::OverCap.into_fields(&config.stats);
        return (RequestBody::passthrough(body), fields);
    }
    let (body, read) = read_capped(body, config.max_request_body).await;
    (body, read.into_fields(&config.stats))
}

/// With `ensure_stream_usage`, rewrites a streaming OpenAI-style request that did not ask for
/// usage to ask for it, fixing `Content-Length`. Returns the body to send and whether it was
/// rewritten. The response side removes what the rewrite adds (see `usage_injection`).
fn ensure_stream_usage<B: Body>(
    config: &Config,
    api: Api,
    head: &mut request::Parts,
    body: RequestBody<B>,
    fields: &RequestFields,
) -> (RequestBody<B>, bool) {
    let wanted = config.may_inject_stream_usage(api) && fields.stream && !fields.include_usage;
    if !wanted {
        return (body, false);
    }
    let Some(bytes) = body.buffered_bytes() else {
        return (body, false);
    };
    let Some(rewritten) = crate::usage_injection::request_with_include_usage(&bytes) else {
        return (body, false);
    };
    if head.headers.contains_key(CONTENT_LENGTH) {
        head.headers
            .insert(CONTENT_LENGTH, http::HeaderValue::from(rewritten.len()));
    }
    config.stats.incr(|c| &c.stream_usage_injected);
    tracing::debug!(api = api.as_str(), "streaming request rewritten to include usage");
    (body.with_bytes(Bytes::from(rewritten)), true)
}
