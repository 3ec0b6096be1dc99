//! The request side: which fields of the request body matter, reading them within a cap, and
//! [`RequestBody`], which hands the inner service exactly the bytes the client sent.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::capture::{BodyEnd, Capture, Captured};
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use serde_json::Value;

/// The request body's `user` field, as the client sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UserField {
    /// A JSON string, as is.
    String(String),
    /// A JSON number, as its decimal text.
    Number(String),
    /// A boolean, an array or an object: never a subject. (`null` reads as no `user`.)
    Other,
}

/// The fields of an LLM request body that metering reads. Everything is optional: a body that
/// was over the cap or not valid JSON gives the default (all `None`/`false`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestFields {
    /// `user`, the client-chosen end-user id (OpenAI); for a body without `user`, Anthropic's
    /// `metadata.user_id`.
    pub user: Option<UserField>,
    /// `model`, when a non-empty string.
    pub model: Option<String>,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
}

impl RequestFields {
    /// Reads the fields from a JSON body; `Err` when the body is not a JSON object.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        Ok(Self::from_top(serde_json::from_slice(body)?))
    }

    /// [`RequestFields::from_json`] over a body kept as chunks (see `chunks`).
    pub(crate) fn from_chunks(body: crate::chunks::Chunks) -> Result<Self, serde_json::Error> {
        Ok(Self::from_top(body.deserialize()?))
    }

    fn from_top(top: RequestTop) -> Self {
        let anthropic_user = || match top.metadata {
            Some(Value::Object(mut metadata)) => metadata.remove("user_id").filter(|v| !v.is_null()),
            _ => None,
        };
        let user = top.user.or_else(anthropic_user).map(|user| match user {
            Value::String(s) => UserField::String(s),
            Value::Number(n) => UserField::Number(n.to_string()),
            _ => UserField::Other,
        });
        let include_usage = top
            .stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        RequestFields {
            user,
            model: crate::usage::string_field(top.model),
            stream: top.stream.and_then(|s| s.as_bool()).unwrap_or(false),
            include_usage,
        }
    }
}

crate::lenient::lenient_struct! {
    struct RequestTop {
        user: Value = "user",
        model: Value = "model",
        stream: Value = "stream",
        stream_options: Value = "stream_options",
        metadata: Value = "metadata",
    }
}

pin_project! {
    /// The request body the inner service receives: exactly the bytes the client sent.
    ///
    /// Usually it is the original body, streamed as the inner service reads it while the layer
    /// keeps a bounded copy to read `user`, `model` and `stream` from. When the layer had to read
    /// the body first (`ensure_stream_usage`, a subject closure), it is the buffered bytes
    /// replayed unchanged (or rewritten to ask for stream usage), followed by whatever was not
    /// read. For requests the layer does not meter it is the original body, untouched.
    pub struct RequestBody<B: Body> {
        prefix: VecDeque<Bytes>,
        prefix_len: u64,
        error: Option<B::Error>,
        trailers: Option<HeaderMap>,
        // A copy of what the inner service reads of `rest`, for the meter.
        capture: Option<Capture>,
        #[pin]
        rest: Option<B>,
    }
}

impl<B: Body> RequestBody<B> {
    /// The original body, untouched.
    pub(crate) fn passthrough(body: B) -> Self {
        RequestBody {
            prefix: VecDeque::new(),
            prefix_len: 0,
            error: None,
            trailers: None,
            capture: None,
            rest: Some(body),
        }
    }

    /// The original body, copied (within the capture's cap) as the inner service reads it.
    pub(crate) fn capturing(body: B, capture: Capture) -> Self {
        let mut body = Self::passthrough(body);
        body.capture = Some(capture);
        body
    }

    /// A complete body whose bytes were read already.
    pub(crate) fn buffered(bytes: Bytes, trailers: Option<HeaderMap>) -> Self {
        let mut body = Self::replay(VecDeque::new(), None);
        body.push_prefix(bytes);
        body.trailers = trailers;
        body
    }

    /// The whole body when it was read completely (and so holds nothing else).
    pub(crate) fn buffered_bytes(&self) -> Option<Bytes> {
        if self.rest.is_some() || self.error.is_some() {
            return None;
        }
        // `buffered` holds the bytes as one chunk.
        Some(self.prefix.front().cloned().unwrap_or_default())
    }

    /// The same body with its bytes replaced (trailers kept); for a complete body only.
    pub(crate) fn with_bytes(self, bytes: Bytes) -> Self {
        Self::buffered(bytes, self.trailers)
    }

    fn replay(prefix: VecDeque<Bytes>, rest: Option<B>) -> Self {
        let prefix_len = prefix.iter().map(|b| b.len() as u64).sum();
        RequestBody {
            prefix,
            prefix_len,
            error: None,
            trailers: None,
            capture: None,
            rest,
        }
    }

    fn push_prefix(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.prefix_len += bytes.len() as u64;
            self.prefix.push_back(bytes);
        }
    }
}

/// Reads a body up to `cap` bytes. Returns the body to forward (always the complete original
/// bytes, in order: what was read is replayed, then the rest or the error) and what was read:
/// a complete body's fields, or why there are none.
pub(crate) async fn read_capped<B>(mut body: B, cap: usize) -> (RequestBody<B>, Captured)
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut chunks = VecDeque::new();
    let mut len = 0usize;
    let mut trailers = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    len = len.saturating_add(data.len());
                    chunks.push_back(data);
                    if len > cap {
                        return (RequestBody::replay(chunks, Some(body)), Captured::OverCap);
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
            Some(Err(error)) => {
                let mut replay = RequestBody::replay(chunks, None);
                replay.error = Some(error);
                return (replay, Captured::Failed);
            }
        }
    }
    let bytes = concat(chunks, len);
    let fields = RequestFields::from_json(&bytes);
    (RequestBody::buffered(bytes, trailers), Captured::Complete(fields))
}

/// Joins chunks; a body that came in one chunk is not copied.
fn concat(mut chunks: VecDeque<Bytes>, len: usize) -> Bytes {
    if chunks.len() <= 1 {
        return chunks.pop_front().unwrap_or_default();
    }
    let mut buf = BytesMut::with_capacity(len);
    for chunk in chunks {
        buf.extend_from_slice(&chunk);
    }
    buf.freeze()
}

impl<B> Body for RequestBody<B>
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
        if let Some(chunk) = this.prefix.pop_front() {
            *this.prefix_len -= chunk.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if let Some(error) = this.error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        if let Some(mut rest) = this.rest.as_mut().as_pin_mut() {
            let frame = std::task::ready!(rest.as_mut().poll_frame(cx));
            if let Some(capture) = this.capture.as_mut() {
                match &frame {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            capture.observe(data);
                        }
                        if rest.is_end_stream() {
                            capture.finish(BodyEnd::Complete);
                        }
                    }
                    Some(Err(_)) => capture.finish(BodyEnd::Failed),
                    None => capture.finish(BodyEnd::Complete),
                }
            }
            match frame {
                Some(frame) => return Poll::Ready(Some(frame)),
                None => this.rest.set(None),
            }
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty()
            && self.error.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self
            .rest
            .as_ref()
            .map(Body::size_hint)
            .unwrap_or_else(|| SizeHint::with_exact(0));
        // Upper first: set_lower asserts lower <= upper.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(self.prefix_len));
        }
        hint.set_lower(hint.lower().saturating_add(self.prefix_len));
        hint
    }
}

impl<B: Body + std::fmt::Debug> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("prefix_len", &self.prefix_len)
            .field("rest", &self.rest)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[test]
    fn reads_fields_of_every_user_kind() {
        let f = RequestFields::from_json(
            br#"{"model":"gpt-4o","user":"u-1","stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .unwrap();
        assert_eq!(f.user, Some(UserField::String("u-1".into())));
        assert_eq!(f.model.as_deref(), Some("gpt-4o"));
        assert!(f.stream && f.include_usage);
        let f = RequestFields::from_json(br#"{"user":12345678901234567890}"#).unwrap();
        assert_eq!(f.user, Some(UserField::Number("12345678901234567890".into())));
        assert_eq!(RequestFields::from_json(br#"{"user":null}"#).unwrap().user, None);
        for other in [r#"{"user":["a"]}"#, r#"{"user":{"id":1}}"#, r#"{"user":true}"#] {
            assert_eq!(
                RequestFields::from_json(other.as_bytes()).unwrap().user,
                Some(UserField::Other),
                "{other}"
            );
        }
        let anthropic = br#"{"model":"claude-sonnet-4-5","metadata":{"user_id":"c-7"},"messages":[]}"#;
        assert_eq!(
            RequestFields::from_json(anthropic).unwrap().user,
            Some(UserField::String("c-7".into()))
        );
        let both = br#"{"user":"openai-user","metadata":{"user_id":"c-7"}}"#;
        assert_eq!(
            RequestFields::from_json(both).unwrap().user,
            Some(UserField::String("openai-user".into()))
        );
        assert!(RequestFields::from_json(b"[1,2]").is_err());
        assert!(RequestFields::from_json(b"{not json").is_err());
    }

    #[tokio::test]
    async fn complete_body_is_replayed_byte_identical() {
        let (body, read) = read_capped(Full::new(Bytes::from_static(b"{\"a\":1}")), 1024).await;
        assert!(matches!(read, Captured::Complete(Ok(_))), "{read:?}");
        assert_eq!(body.buffered_bytes().unwrap(), &b"{\"a\":1}"[..]);
        assert_eq!(body.size_hint().exact(), Some(7));
        assert_eq!(body.collect().await.unwrap().to_bytes(), &b"{\"a\":1}"[..]);
    }
}

#[cfg(test)]
mod over_cap_tests {
    use super::*;
    use crate::test_support::ChunkedBody;

    #[tokio::test]
    async fn over_cap_body_is_prefix_plus_rest() {
        let parts = ["{\"user\":", "\"aaaaaaaa", "aaaa\"", "}"];
        let (body, read) = read_capped(ChunkedBody::new(parts), 12).await;
        assert!(matches!(read, Captured::OverCap), "{read:?}");
        assert!(body.buffered_bytes().is_none());
        assert_eq!(
            body.collect().await.unwrap().to_bytes(),
            parts.concat().as_bytes()
        );
    }
}
