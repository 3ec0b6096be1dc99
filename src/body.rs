//! [`MeteredBody`]: forwards a response body unchanged while its usage is read.
//!
//! How a body is read depends on its head: `application/json` (or no type) is kept, up to
//! `max_response_body`, and parsed at the end; `text/event-stream` goes through the incremental
//! SSE scanner (`sse`) and the per-API stream accumulator (`stream_usage`), so a stream of any
//! length costs at most about two `max_sse_line`s of memory. Usage is emitted once, at the end;
//! a stream that ends early (client gone, upstream error, body dropped) is metered as incomplete
//! with the usage seen so far, or with `usage_source: missing` when none was seen.
//!
//! # Order with a compression layer
//!
//! Metering reads plain bytes best. With tower-http's `CompressionLayer`:
//!
//! - **Metering inside compression** (`ServiceBuilder::new().layer(CompressionLayer::new())
//!   .layer(metering)`, i.e. compression is the outer layer): the metering layer sees the plain
//!   response and the client gets it compressed. This is the cheaper order.
//! - **Metering outside compression** (metering is the outer layer), or an upstream that
//!   compresses itself: the body is `Content-Encoding: gzip` (or `deflate`). The client gets
//!   the compressed bytes unchanged; a bounded decoder (`decode`) makes a plain copy for
//!   inspection only, capped at `max_response_body` for JSON and `max_decoded_stream` for SSE.
//!   Other codings (`br`, `zstd`) are not inspected and are counted as `unparsed_response`.
//!
//! With `ensure_stream_usage`, the client's stream is filtered to hide the usage the layer asked
//! for; that needs the plain stream, so keep metering inside compression when using it.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::MeteringStats;
use crate::meter::{ActiveMeter, Ended};
use crate::usage_injection::UsageChunkFilter;

pin_project! {
    /// A response body that passes every frame to the client at once and unchanged, and reads
    /// the usage it reports on the way.
    ///
    /// The usage is turned into events exactly once: when the body ends (its last frame,
    /// `is_end_stream()` after a frame, an error) or, if it never ends, when it is dropped
    /// (client gone), then marked incomplete. `size_hint` and `is_end_stream` are the inner
    /// body's, so `Content-Length` and framing are unchanged.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        guard: MeterGuard,
        // Only for a stream whose usage the layer asked for (`ensure_stream_usage`).
        filter: Option<Box<ClientFilter>>,
        // A trailers frame waiting behind the filter's last bytes.
        pending: Option<Frame<Bytes>>,
        inner_done: bool,
    }
}

impl<B: Body> MeteredBody<B> {
    pub(crate) fn new(inner: B, meter: Option<Box<ActiveMeter>>) -> Self {
        let mut guard = MeterGuard(meter);
        if inner.is_end_stream() {
            // HEAD, 204, 304 or an empty body: there will be no frame to wait for.
            guard.finish(Ended::Complete);
        }
        MeteredBody {
            inner,
            guard,
            filter: None,
            pending: None,
            inner_done: false,
        }
    }

    /// Filters what the client gets through `filter` (the metering still reads the original
    /// bytes). The size hint becomes unknown: the length changes.
    pub(crate) fn with_filter(mut self, filter: UsageChunkFilter, stats: MeteringStats) -> Self {
        self.filter = Some(Box::new(ClientFilter {
            filter,
            stats,
            finished: false,
        }));
        self
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        if let Some(frame) = this.pending.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if *this.inner_done {
            return Poll::Ready(None);
        }
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let guard = this.guard;
        if guard.0.is_some() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        guard.observe(data);
                    }
                    // hyper stops polling once a body says it has ended, without a final None.
                    if this.inner.is_end_stream() {
                        guard.finish(Ended::Complete);
                    }
                }
                Some(Err(_)) => guard.finish(Ended::Error),
                None => guard.finish(Ended::Complete),
            }
        }
        let Some(filter) = this.filter.as_mut() else {
            return Poll::Ready(frame);
        };
        let frame = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = this.inner.is_end_stream();
                    Some(Ok(Frame::data(filter.feed(&data, end))))
                }
                Err(trailers) => {
                    let tail = filter.finish();
                    if tail.is_empty() {
                        Some(Ok(trailers))
                    } else {
                        *this.pending = Some(trailers);
                        Some(Ok(Frame::data(tail)))
                    }
                }
            },
            Some(Err(error)) => {
                filter.finish();
                Some(Err(error))
            }
            None => {
                *this.inner_done = true;
                let tail = filter.finish();
                (!tail.is_empty()).then(|| Ok(Frame::data(tail)))
            }
        };
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && (self.inner_done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.filter.is_some() {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

/// The client-side filter of a stream whose usage the layer asked for.
struct ClientFilter {
    filter: UsageChunkFilter,
    stats: MeteringStats,
    finished: bool,
}

impl ClientFilter {
    /// Filters one frame; at the end of the stream, also flushes what was held back.
    fn feed(&mut self, data: &Bytes, end: bool) -> Bytes {
        let mut out = Vec::with_capacity(data.len());
        self.filter.feed(data, &mut out);
        if end {
            out.extend_from_slice(&self.finish());
        }
        Bytes::from(out)
    }

    /// Ends the stream (once): the bytes still held back, and the counts.
    fn finish(&mut self) -> Bytes {
        if self.finished {
            return Bytes::new();
        }
        self.finished = true;
        let mut out = Vec::new();
        self.filter.finish(&mut out);
        self.stats
            .add(|c| &c.usage_chunks_removed, self.filter.dropped_events());
        Bytes::from(out)
    }
}

impl Drop for ClientFilter {
    fn drop(&mut self) {
        if !self.finished {
            self.finished = true;
            self.stats
                .add(|c| &c.usage_chunks_removed, self.filter.dropped_events());
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("inner", &self.inner)
            .field("metered", &self.guard.0.is_some())
            .field("filtered", &self.filter.is_some())
            .finish()
    }
}

/// Owns the meter and finishes it exactly once; dropping it unfinished means the body was cut.
struct MeterGuard(Option<Box<ActiveMeter>>);

impl MeterGuard {
    fn observe(&mut self, data: &Bytes) {
        if let Some(meter) = &mut self.0 {
            meter.observe(data);
        }
    }

    fn finish(&mut self, ended: Ended) {
        if let Some(meter) = self.0.take() {
            (*meter).finish(ended);
        }
    }
}

impl Drop for MeterGuard {
    fn drop(&mut self) {
        self.finish(Ended::Dropped);
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::poll_fn;
    use std::pin::pin;
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body::Body;
    use http_body_util::{BodyExt, Full};
    use tower::{ServiceBuilder, ServiceExt};

    use crate::test_support::ChunkedBody;
    use crate::{MemorySink, MeteringLayer, RequestBody};

    const CHAT: &str = r#"{"id":"c","model":"m","usage":{"prompt_tokens":3,"completion_tokens":4}}"#;

    async fn metered_response(sink: &MemorySink) -> Response<crate::MeteredBody<ChunkedBody>> {
        let service = ServiceBuilder::new()
            .layer(MeteringLayer::new(sink.clone()))
            .service_fn(|_: Request<RequestBody<Full<Bytes>>>| async {
                let chunks = CHAT.as_bytes().chunks(5).map(<[u8]>::to_vec);
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(ChunkedBody::new(chunks))
                        .unwrap(),
                )
            });
        let request = Request::post("/v1/chat/completions")
            .body(Full::from(r#"{"user":"u"}"#))
            .unwrap();
        service.oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn finishes_at_is_end_stream_without_a_final_none_and_only_once() {
        let sink = MemorySink::new();
        let response = metered_response(&sink).await;
        let mut body = Box::pin(response.into_body());
        let mut bytes = Vec::new();
        // Poll like hyper with Content-Length: stop as soon as the body says it has ended.
        while !body.is_end_stream() {
            let frame = poll_fn(|cx| body.as_mut().poll_frame(cx)).await.unwrap().unwrap();
            bytes.extend_from_slice(frame.data_ref().unwrap());
        }
        assert_eq!(bytes, CHAT.as_bytes());
        assert_eq!(
            sink.events().len(),
            2,
            "emitted at the last frame, before any None"
        );
        assert!(poll_fn(|cx| body.as_mut().poll_frame(cx)).await.is_none());
        drop(body);
        assert_eq!(sink.events().len(), 2, "never twice");
    }

    #[tokio::test]
    async fn size_hint_and_bytes_are_the_inner_bodys() {
        let sink = MemorySink::new();
        let response = metered_response(&sink).await;
        assert_eq!(response.body().size_hint().exact(), Some(CHAT.len() as u64));
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            CHAT.as_bytes()
        );
        assert_eq!(sink.wait_for(2, Duration::from_secs(1)).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_midway_emits_one_incomplete_record() {
        let sink = MemorySink::new();
        let response = metered_response(&sink).await;
        {
            let mut body = pin!(response.into_body());
            poll_fn(|cx| body.as_mut().poll_frame(cx)).await.unwrap().unwrap();
            assert!(sink.events().is_empty());
        }
        let events = sink.events();
        // A JSON body cut short has no readable usage: one zero-token event says so.
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data["complete"], false);
        assert_eq!(events[0].data["usage_source"], "missing");
    }

    /// Through the layer with `ensure_stream_usage`: an upstream with Content-Length, frames
    /// split anywhere, an unterminated last line.
    #[tokio::test]
    async fn filtered_stream_drops_usage_and_content_length_and_flushes_the_tail() {
        let upstream = concat!(
            "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\r\n\r\n",
            "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\r\n\r\n",
            ": tail without line end",
        );
        let expected = concat!(
            "data: {\"id\":\"c\",\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\n",
            ": tail without line end",
        );
        for frame in [1, 3, 7, 1000] {
            let sink = MemorySink::new();
            let layer = MeteringLayer::builder()
                .sink(sink.clone())
                .ensure_stream_usage(true)
                .build();
            let stats = layer.stats();
            let service = ServiceBuilder::new().layer(layer).service_fn(
                move |request: Request<RequestBody<Full<Bytes>>>| async move {
                    let declared = request.headers()["content-length"].clone();
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    assert_eq!(declared, body.len().to_string().as_str());
                    assert!(body.starts_with(br#"{"stream_options":{"include_usage":true},"#));
                    let chunks = upstream.as_bytes().chunks(frame).map(<[u8]>::to_vec);
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "text/event-stream")
                            .header("content-length", upstream.len())
                            .body(ChunkedBody::new(chunks))
                            .unwrap(),
                    )
                },
            );
            let request = Request::post("/v1/chat/completions")
                .header("content-length", 26)
                .body(Full::from(r#"{"user":"u","stream":true}"#))
                .unwrap();
            let response = service.oneshot(request).await.unwrap();
            assert!(response.headers().get("content-length").is_none());
            assert_eq!(response.body().size_hint().exact(), None);
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(bytes, expected.as_bytes(), "frames of {frame}");
            let events = sink.wait_for(2, Duration::from_secs(1)).await.unwrap();
            assert_eq!(events[0].data["tokens"], 3);
            assert_eq!(stats.snapshot().usage_chunks_removed, 1);
        }
    }
}
