//! A body's bytes as they arrive, kept up to a cap: a body of one chunk is held without
//! copying, a longer one is copied into one buffer as it goes, so that the chunks themselves are
//! let go once passed on and the JSON parser reads one slice.
//!
//! Why not keep every chunk and read across them: holding them costs the same memory as the
//! copy, and serde_json reading through `io::Read` is about ten times slower than from a slice
//! (a 1 MiB response took 4.2 ms instead of 0.4 ms).

use bytes::Bytes;
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use serde::de::DeserializeOwned;

/// The body length a message's `Content-Length` declares, if it is a number.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// The first allocation of a copy, unless the body is declared shorter.
const MIN_COPY: usize = 4096;

/// A bounded body: nothing, one shared chunk, or a copy of several.
#[derive(Debug)]
pub(crate) struct Chunks {
    first: Option<Bytes>,
    joined: Vec<u8>,
    len: usize,
    cap: usize,
    /// The declared length (`Content-Length`), to size the copy once.
    expected: usize,
    over_cap: bool,
}

impl Chunks {
    /// Holds at most `cap` bytes.
    pub(crate) fn bounded(cap: usize) -> Self {
        Chunks {
            first: None,
            joined: Vec::new(),
            len: 0,
            cap,
            expected: 0,
            over_cap: false,
        }
    }

    /// Bounds the growth of the copy by the length the body declares (ignored past the cap).
    pub(crate) fn expecting(mut self, declared: Option<u64>) -> Self {
        self.expected = declared.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
        self
    }

    /// Keeps a shared handle on the first chunk, and copies from the second on.
    pub(crate) fn push(&mut self, data: &Bytes) {
        if !self.accept(data.len()) {
            return;
        }
        if self.len == data.len() {
            self.first = Some(data.clone());
        } else {
            self.append(data);
        }
    }

    /// Copies a chunk that arrived as a slice (a decoder's output).
    pub(crate) fn push_slice(&mut self, data: &[u8]) {
        if self.accept(data.len()) {
            self.append(data);
        }
    }

    /// Counts `n` more bytes; false when nothing is to be kept (empty, or over the cap).
    fn accept(&mut self, n: usize) -> bool {
        if self.over_cap || n == 0 {
            return false;
        }
        self.len = self.len.saturating_add(n);
        if self.len > self.cap {
            self.over_cap = true;
            self.first = None;
            self.joined = Vec::new();
            return false;
        }
        true
    }

    fn append(&mut self, data: &[u8]) {
        if let Some(first) = self.first.take() {
            self.reserve(first.len());
            self.joined.extend_from_slice(&first);
        }
        self.reserve(data.len());
        self.joined.extend_from_slice(data);
    }

    /// Grows the copy by doubling, never past the declared length (when the body keeps to it)
    /// nor past the cap. The declared length only bounds the growth: reserving it up front would
    /// let a peer that declares 32 MiB and sends a few bytes make every connection hold 32 MiB.
    fn reserve(&mut self, additional: usize) {
        let needed = self.joined.len() + additional;
        if needed <= self.joined.capacity() {
            return;
        }
        let limit = if self.expected >= needed {
            self.expected.min(self.cap)
        } else {
            self.cap
        };
        let target = (self.joined.capacity() * 2).max(MIN_COPY).min(limit).max(needed);
        self.joined.reserve_exact(target - self.joined.len());
    }

    /// Whether more than the cap arrived (and so nothing is held).
    pub(crate) fn is_over_cap(&self) -> bool {
        self.over_cap
    }

    /// Parses the body as JSON.
    pub(crate) fn deserialize<T: DeserializeOwned>(self) -> serde_json::Result<T> {
        match &self.first {
            Some(first) => serde_json::from_slice(first),
            None => serde_json::from_slice(&self.joined),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn chunks_of(body: &[u8], size: usize) -> Chunks {
        let mut chunks = Chunks::bounded(usize::MAX);
        for piece in body.chunks(size) {
            chunks.push(&Bytes::copy_from_slice(piece));
        }
        chunks
    }

    #[test]
    fn every_path_parses_the_same_json() {
        let small = br#"{"a":[1,2,3],"b":"x\u00e9"}"#;
        let big = format!(r#"{{"pad":"{}","usage":{{"n":7}}}}"#, "z".repeat(200_000));
        for (body, size) in [
            (&small[..], 1000),
            (&small[..], 3),
            (big.as_bytes(), 4096),
            (big.as_bytes(), 7),
        ] {
            let parsed: Value = chunks_of(body, size).deserialize().unwrap();
            assert_eq!(parsed, serde_json::from_slice::<Value>(body).unwrap());
        }
        assert!(Chunks::bounded(10).deserialize::<Value>().is_err());
        assert!(
            chunks_of(&big.as_bytes()[..100_000], 999)
                .deserialize::<Value>()
                .is_err()
        );
    }

    #[test]
    fn one_chunk_is_shared_and_more_are_copied_once() {
        let body = Bytes::from_static(br#"{"usage":{"n":7}}"#);
        let mut one = Chunks::bounded(1024);
        one.push(&body);
        assert!(one.joined.is_empty());
        assert_eq!(one.first.as_ref().map(|b| b.as_ptr()), Some(body.as_ptr()));

        let mut two = Chunks::bounded(1024).expecting(Some(body.len() as u64));
        two.push(&body.slice(..5));
        two.push(&body.slice(5..));
        assert!(two.first.is_none());
        assert_eq!(two.joined, &body[..]);
        assert_eq!(
            two.joined.capacity(),
            body.len(),
            "bounded by the declared length"
        );
        let mut sliced = Chunks::bounded(1024);
        sliced.push_slice(&body[..3]);
        sliced.push_slice(&body[3..]);
        assert_eq!(sliced.joined, &body[..]);
    }

    #[test]
    fn a_declared_length_is_not_reserved_before_the_bytes_arrive() {
        let mut chunks = Chunks::bounded(32 << 20).expecting(Some(32 << 20));
        chunks.push(&Bytes::from_static(b"{\"model\":"));
        chunks.push(&Bytes::from_static(b"\"gpt\""));
        assert!(
            chunks.joined.capacity() <= MIN_COPY,
            "{}",
            chunks.joined.capacity()
        );
        let mut honest = Chunks::bounded(32 << 20).expecting(Some(3 * 100_000));
        for _ in 0..3 {
            honest.push(&Bytes::from(vec![b' '; 100_000]));
        }
        assert_eq!(
            honest.joined.capacity(),
            300_000,
            "the last growth stops at the declared length"
        );
    }

    #[test]
    fn the_copy_never_grows_past_the_cap() {
        let mut chunks = Chunks::bounded(1000).expecting(Some(1 << 40));
        for _ in 0..10 {
            chunks.push(&Bytes::from(vec![b' '; 100]));
        }
        assert!(!chunks.is_over_cap());
        assert_eq!(chunks.joined.len(), 1000);
        assert!(chunks.joined.capacity() <= 1000, "{}", chunks.joined.capacity());
    }

    #[test]
    fn past_the_cap_nothing_is_held() {
        let mut chunks = Chunks::bounded(4);
        chunks.push(&Bytes::from_static(b"{\"a"));
        assert!(!chunks.is_over_cap());
        chunks.push(&Bytes::from_static(b"\":1}"));
        assert!(chunks.is_over_cap() && chunks.first.is_none() && chunks.joined.capacity() == 0);
        chunks.push(&Bytes::from_static(b"x"));
        assert!(chunks.is_over_cap() && chunks.joined.is_empty());
    }
}
