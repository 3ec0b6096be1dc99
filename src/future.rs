//! [`ResponseFuture`]: reads the request body first (for metered requests), then waits for the
//! inner service's response and wraps its body in a [`MeteredBody`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::CONTENT_LENGTH;
use http::{Response, response};
use pin_project_lite::pin_project;

use crate::decode::Coding;
use crate::inspect::is_event_stream_response;
use crate::meter::Meter;
use crate::usage_injection::UsageChunkFilter;
use crate::{MeteredBody, MeteringStats};

pub(crate) type Prepare<F> = Pin<Box<dyn Future<Output = (F, Meter)> + Send>>;

pin_project! {
    /// The response future of [`Metering`](crate::Metering).
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // Reading the request body before the inner service is called.
        Prepare { prepare: Prepare<F> },
        // Waiting for the inner service.
        Call {
            #[pin]
            future: F,
            meter: PendingMeter,
        },
    }
}

impl<F> ResponseFuture<F> {
    /// A request that is not metered: only the inner future.
    pub(crate) fn passthrough(future: F) -> Self {
        ResponseFuture {
            state: State::Call {
                future,
                meter: PendingMeter(None),
            },
        }
    }

    /// A metered request whose inner service was called already.
    pub(crate) fn metered(future: F, meter: Meter) -> Self {
        ResponseFuture {
            state: State::Call {
                future,
                meter: PendingMeter(Some(meter)),
            },
        }
    }

    /// A metered request: read the body, then call the inner service.
    pub(crate) fn prepare(prepare: Prepare<F>) -> Self {
        ResponseFuture {
            state: State::Prepare { prepare },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<MeteredBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Prepare { prepare } => {
                    let (future, meter) = ready!(prepare.as_mut().poll(cx));
                    state.set(State::Call {
                        future,
                        meter: PendingMeter(Some(meter)),
                    });
                }
                StateProj::Call { future, meter } => {
                    let result = ready!(future.poll(cx));
                    let meter = meter.0.take();
                    return Poll::Ready(result.map(|response| wrap(response, meter)));
                }
            }
        }
    }
}

fn wrap<B: http_body::Body>(response: Response<B>, meter: Option<Meter>) -> Response<MeteredBody<B>> {
    let (mut head, body) = response.into_parts();
    let filter = meter.as_ref().and_then(|meter| usage_filter(meter, &mut head));
    let body = MeteredBody::new(body, meter.and_then(|meter| meter.start_response(&head)));
    let body = match filter {
        Some((filter, stats)) => body.with_filter(filter, stats),
        None => body,
    };
    Response::from_parts(head, body)
}

/// For a request whose stream usage the layer asked for, the filter that hides it from the
/// client. The response's `Content-Length`, which the filter invalidates, is removed.
fn usage_filter(meter: &Meter, head: &mut response::Parts) -> Option<(UsageChunkFilter, MeteringStats)> {
    if !meter.usage_injected() || !is_event_stream_response(&head.headers) {
        return None;
    }
    let stats = &meter.config().stats;
    if Coding::from_headers(&head.headers) != Coding::Identity {
        stats.incr(|c| &c.usage_chunks_unfiltered);
        tracing::warn!("compressed stream: the usage chunk the layer asked for reaches the client");
        return None;
    }
    head.headers.remove(CONTENT_LENGTH);
    Some((UsageChunkFilter::new(meter.config().max_sse_line), stats.clone()))
}

/// The meter of a request whose response has not arrived; dropped unused, the request was
/// cancelled (or the inner service failed) and that is counted.
struct PendingMeter(Option<Meter>);

impl Drop for PendingMeter {
    fn drop(&mut self) {
        if let Some(meter) = self.0.take() {
            meter.config().stats.incr(|c| &c.requests_cancelled);
            tracing::debug!("request ended before a response: nothing to meter");
        }
    }
}
