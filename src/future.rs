//! [`ResponseFuture`]: reads the request body first (for metered requests), then waits for the
//! inner service's response and wraps its body in a [`MeteredBody`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;

use crate::MeteredBody;
use crate::meter::Meter;

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
    let (head, body) = response.into_parts();
    let body = match meter.and_then(|meter| meter.start_response(&head)) {
        Some(active) => MeteredBody::new(body, Some(active)),
        None => MeteredBody::passthrough(body),
    };
    Response::from_parts(head, body)
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
