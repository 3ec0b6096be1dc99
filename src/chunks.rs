//! A body's bytes as they arrived, kept without copying up to a cap, and read as JSON without
//! joining them when that would double the memory held.

use std::collections::VecDeque;
use std::io::{self, Read};

use bytes::{Buf, Bytes};
use serde::de::DeserializeOwned;

/// Bodies up to this size are joined into one buffer and parsed as a slice (faster); larger
/// ones are parsed straight from their chunks, so a copy never holds more than this on top of
/// the chunks.
const JOIN_LIMIT: usize = 64 * 1024;

/// The chunks of a body, shared with the frames they came in (no copy), up to a cap: past it
/// every chunk is let go and the body is marked over the cap.
#[derive(Debug)]
pub(crate) struct Chunks {
    parts: VecDeque<Bytes>,
    len: usize,
    cap: usize,
    over_cap: bool,
}

impl Chunks {
    /// Holds at most `cap` bytes.
    pub(crate) fn bounded(cap: usize) -> Self {
        Chunks {
            parts: VecDeque::new(),
            len: 0,
            cap,
            over_cap: false,
        }
    }

    pub(crate) fn push(&mut self, data: &Bytes) {
        if self.over_cap || data.is_empty() {
            return;
        }
        self.len = self.len.saturating_add(data.len());
        if self.len > self.cap {
            self.over_cap = true;
            self.parts = VecDeque::new();
        } else {
            self.parts.push_back(data.clone());
        }
    }

    /// Whether more than the cap arrived (and so nothing is held).
    pub(crate) fn is_over_cap(&self) -> bool {
        self.over_cap
    }

    /// Parses the body as JSON: a single chunk in place, a small body joined, a large one read
    /// across its chunks.
    pub(crate) fn deserialize<T: DeserializeOwned>(self) -> serde_json::Result<T> {
        if self.parts.len() <= 1 {
            let body = self.parts.front().map_or(&[][..], |b| &b[..]);
            return serde_json::from_slice(body);
        }
        if self.len <= JOIN_LIMIT {
            let joined = crate::request::concat(self.parts, self.len);
            return serde_json::from_slice(&joined);
        }
        serde_json::from_reader(ChunkReader(self.parts))
    }
}

/// Reads chunks in order, releasing each as it is consumed.
struct ChunkReader(VecDeque<Bytes>);

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while let Some(front) = self.0.front_mut() {
            if front.has_remaining() {
                let n = out.len().min(front.remaining());
                front.copy_to_slice(&mut out[..n]);
                return Ok(n);
            }
            self.0.pop_front();
        }
        Ok(0)
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
    fn past_the_cap_nothing_is_held() {
        let mut chunks = Chunks::bounded(4);
        chunks.push(&Bytes::from_static(b"{\"a"));
        assert!(!chunks.is_over_cap());
        chunks.push(&Bytes::from_static(b"\":1}"));
        assert!(chunks.is_over_cap() && chunks.parts.is_empty());
        chunks.push(&Bytes::from_static(b"x"));
        assert!(chunks.is_over_cap() && chunks.parts.is_empty());
    }
}
