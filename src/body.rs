//! [`MeteredBody`]: forwards a response body unchanged while its usage is read.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::meter::{ActiveMeter, Ended};

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
    }
}

impl<B: Body> MeteredBody<B> {
    pub(crate) fn new(inner: B, meter: Option<Box<ActiveMeter>>) -> Self {
        let mut guard = MeterGuard(meter);
        if inner.is_end_stream() {
            // HEAD, 204, 304 or an empty body: there will be no frame to wait for.
            guard.finish(Ended::Complete);
        }
        MeteredBody { inner, guard }
    }

    /// A body that is not metered.
    pub(crate) fn passthrough(inner: B) -> Self {
        MeteredBody {
            inner,
            guard: MeterGuard(None),
        }
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
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("inner", &self.inner)
            .field("metered", &self.guard.0.is_some())
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
