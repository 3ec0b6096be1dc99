//! A bounded, incremental decoder for compressed response bodies, for inspection only.
//!
//! Metering that sits outside a compression layer (or in front of an upstream that compresses)
//! sees `Content-Encoding: gzip` bytes. The client always gets those original bytes; this
//! decoder produces a plain copy for the JSON reader and the SSE scanner, chunk by chunk.
//!
//! - Codings: `gzip` (also `x-gzip`, multi-member, CRC-32 and length checked) and `deflate`
//!   (zlib-wrapped as RFC 9110 says; a raw deflate stream, which some servers send, is detected
//!   from its first byte). Anything else is [`Coding::Unsupported`] and not inspected.
//! - Bounded: output goes through one reused 32 KiB buffer, handed to a callback piece by
//!   piece, so memory does not grow with the ratio; total output is capped, and decoding stops
//!   for good once the cap would be passed ([`DecodeError::OverCap`]), which also bounds the CPU
//!   a compression bomb can take.
//! - Never panics: corrupt input is [`DecodeError::Corrupt`], a body that ends early is
//!   [`DecodeError::Truncated`]; after an error, `feed` does nothing and returns the error.

use flate2::{Crc, Decompress, FlushDecompress, Status};
use http::HeaderMap;

const OUT_BUF: usize = 32 * 1024;

/// A response's content coding, from its `Content-Encoding` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Coding {
    /// No header, or `identity`.
    Identity,
    /// `gzip` or `x-gzip`.
    Gzip,
    /// `deflate`.
    Deflate,
    /// Anything else (`br`, `zstd`, several codings stacked): not inspected.
    Unsupported,
}

impl Coding {
    pub(crate) fn from_headers(headers: &HeaderMap) -> Coding {
        let mut values = headers.get_all(http::header::CONTENT_ENCODING).iter();
        let Some(value) = values.next() else {
            return Coding::Identity;
        };
        if values.next().is_some() {
            return Coding::Unsupported;
        }
        let Ok(value) = value.to_str() else {
            return Coding::Unsupported;
        };
        let value = value.trim();
        if value.is_empty() || value.eq_ignore_ascii_case("identity") {
            Coding::Identity
        } else if value.eq_ignore_ascii_case("gzip") || value.eq_ignore_ascii_case("x-gzip") {
            Coding::Gzip
        } else if value.eq_ignore_ascii_case("deflate") {
            Coding::Deflate
        } else {
            Coding::Unsupported
        }
    }
}

/// Why decoding stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// The input is not valid for its coding.
    Corrupt,
    /// The stream ended in the middle.
    Truncated,
    /// The decoded output would pass the cap.
    OverCap,
}

/// Where a gzip member's parsing stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// The 10 fixed header bytes; `got` collected so far.
    Fixed { got: u8 },
    /// FEXTRA's 2-byte length.
    ExtraLen { got: u8 },
    /// FEXTRA's data.
    Extra { left: u16 },
    /// FNAME, up to its NUL.
    Name,
    /// FCOMMENT, up to its NUL.
    Comment,
    /// FHCRC's 2 bytes.
    HeaderCrc { left: u8 },
    /// The deflate data.
    Body,
    /// CRC-32 and ISIZE.
    Trailer { got: u8 },
    /// A member (or the zlib stream) ended; only a new gzip member may follow.
    Done,
}

const FHCRC: u8 = 2;
const FEXTRA: u8 = 4;
const FNAME: u8 = 8;
const FCOMMENT: u8 = 16;

/// The decoder; see the module docs.
pub(crate) struct Decoder {
    gzip: bool,
    /// For `deflate`: whether the first byte was seen (zlib or raw chosen).
    started: bool,
    inflate: Decompress,
    stage: Stage,
    header: [u8; 10],
    trailer: [u8; 8],
    crc: Crc,
    buf: Vec<u8>,
    max_output: u64,
    total_out: u64,
    error: Option<DecodeError>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("gzip", &self.gzip)
            .field("stage", &self.stage)
            .field("total_out", &self.total_out)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// A decoder for `coding`, or `None` for identity and unsupported codings.
    pub(crate) fn new(coding: Coding, max_output: u64) -> Option<Decoder> {
        let gzip = match coding {
            Coding::Gzip => true,
            Coding::Deflate => false,
            Coding::Identity | Coding::Unsupported => return None,
        };
        Some(Decoder {
            gzip,
            started: gzip,
            inflate: Decompress::new(false),
            stage: if gzip {
                Stage::Fixed { got: 0 }
            } else {
                Stage::Body
            },
            header: [0; 10],
            trailer: [0; 8],
            crc: Crc::new(),
            buf: Vec::new(),
            max_output,
            total_out: 0,
            error: None,
        })
    }

    #[cfg(test)]
    /// Decoded bytes so far.
    pub(crate) fn total_out(&self) -> u64 {
        self.total_out
    }

    /// Decodes one chunk, handing the output to `on_out` in pieces of at most 32 KiB.
    pub(crate) fn feed<F>(&mut self, input: &[u8], on_out: &mut F) -> Result<(), DecodeError>
    where
        F: FnMut(&[u8]),
    {
        if let Some(error) = self.error {
            return Err(error);
        }
        let result = self.run(input, on_out);
        if let Err(error) = result {
            self.error = Some(error);
            self.buf = Vec::new();
        }
        result
    }

    /// Ends the input: `Err(Truncated)` when the stream stopped in the middle.
    pub(crate) fn finish(&mut self) -> Result<(), DecodeError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        match self.stage {
            Stage::Done => Ok(()),
            // An empty body decodes to nothing.
            Stage::Fixed { got: 0 } if self.total_out == 0 && self.inflate.total_in() == 0 => Ok(()),
            Stage::Body if !self.started => Ok(()),
            _ => {
                self.error = Some(DecodeError::Truncated);
                Err(DecodeError::Truncated)
            }
        }
    }

    fn run<F>(&mut self, mut input: &[u8], on_out: &mut F) -> Result<(), DecodeError>
    where
        F: FnMut(&[u8]),
    {
        if !self.started {
            let Some(&first) = input.first() else {
                return Ok(());
            };
            self.started = true;
            // A zlib header: compression method 8, window at most 32 KiB, and a valid check.
            let zlib = first & 0x0f == 8
                && first >> 4 <= 7
                && input
                    .get(1)
                    .is_none_or(|&flg| (u16::from(first) * 256 + u16::from(flg)) % 31 == 0);
            self.inflate = Decompress::new(zlib);
        }
        while !input.is_empty() || self.stage == Stage::Body {
            match self.stage {
                Stage::Fixed { got } => {
                    let take = (10 - usize::from(got)).min(input.len());
                    let got = usize::from(got);
                    self.header[got..got + take].copy_from_slice(&input[..take]);
                    input = &input[take..];
                    let got = got + take;
                    if got < 10 {
                        self.stage = Stage::Fixed { got: got as u8 };
                        return Ok(());
                    }
                    if self.header[..3] != [0x1f, 0x8b, 8] || self.header[3] & 0xe0 != 0 {
                        return Err(DecodeError::Corrupt);
                    }
                    self.stage = self.after_header_field(Stage::Fixed { got: 10 });
                }
                Stage::ExtraLen { got } => {
                    // The length is kept in the trailer buffer, unused until then.
                    self.trailer[usize::from(got)] = input[0];
                    input = &input[1..];
                    self.stage = if got == 0 {
                        Stage::ExtraLen { got: 1 }
                    } else {
                        Stage::Extra {
                            left: u16::from_le_bytes([self.trailer[0], self.trailer[1]]),
                        }
                    };
                }
                Stage::Extra { left } => {
                    let take = usize::from(left).min(input.len());
                    input = &input[take..];
                    let left = left - take as u16;
                    self.stage = if left == 0 {
                        self.after_header_field(Stage::Extra { left: 0 })
                    } else {
                        Stage::Extra { left }
                    };
                }
                Stage::Name | Stage::Comment => match memchr::memchr(0, input) {
                    Some(nul) => {
                        input = &input[nul + 1..];
                        self.stage = self.after_header_field(self.stage);
                    }
                    None => return Ok(()),
                },
                Stage::HeaderCrc { left } => {
                    input = &input[1..];
                    self.stage = if left > 1 {
                        Stage::HeaderCrc { left: left - 1 }
                    } else {
                        Stage::Body
                    };
                }
                Stage::Body => {
                    let consumed = self.inflate_some(input, on_out)?;
                    input = &input[consumed..];
                    // Input used up and no output left pending: wait for the next chunk.
                    if input.is_empty() && self.stage == Stage::Body && self.buf_was_partial() {
                        return Ok(());
                    }
                }
                Stage::Trailer { got } => {
                    let take = (8 - usize::from(got)).min(input.len());
                    let got = usize::from(got);
                    self.trailer[got..got + take].copy_from_slice(&input[..take]);
                    input = &input[take..];
                    let got = got + take;
                    if got < 8 {
                        self.stage = Stage::Trailer { got: got as u8 };
                        return Ok(());
                    }
                    let crc = u32::from_le_bytes([
                        self.trailer[0],
                        self.trailer[1],
                        self.trailer[2],
                        self.trailer[3],
                    ]);
                    let size = u32::from_le_bytes([
                        self.trailer[4],
                        self.trailer[5],
                        self.trailer[6],
                        self.trailer[7],
                    ]);
                    if crc != self.crc.sum() || size != self.crc.amount() {
                        return Err(DecodeError::Corrupt);
                    }
                    self.stage = Stage::Done;
                }
                Stage::Done => {
                    if !self.gzip {
                        return Err(DecodeError::Corrupt);
                    }
                    // Another gzip member.
                    self.inflate.reset(false);
                    self.crc.reset();
                    self.stage = Stage::Fixed { got: 0 };
                }
            }
        }
        Ok(())
    }

    /// The last inflate call left room in the output buffer: nothing more is pending.
    fn buf_was_partial(&self) -> bool {
        self.buf.len() < OUT_BUF
    }

    /// The gzip header stage after `from`, following the header's flags.
    fn after_header_field(&self, from: Stage) -> Stage {
        let flags = self.header[3];
        let order = [
            (FEXTRA, Stage::ExtraLen { got: 0 }),
            (FNAME, Stage::Name),
            (FCOMMENT, Stage::Comment),
            (FHCRC, Stage::HeaderCrc { left: 2 }),
        ];
        let start = match from {
            Stage::Fixed { .. } => 0,
            Stage::Extra { .. } => 1,
            Stage::Name => 2,
            Stage::Comment => 3,
            _ => 4,
        };
        order[start..]
            .iter()
            .find(|(flag, _)| flags & flag != 0)
            .map_or(Stage::Body, |(_, stage)| *stage)
    }

    /// One inflate call; returns the input consumed. Output goes to `on_out`.
    fn inflate_some<F>(&mut self, input: &[u8], on_out: &mut F) -> Result<usize, DecodeError>
    where
        F: FnMut(&[u8]),
    {
        if self.buf.capacity() < OUT_BUF {
            self.buf = Vec::with_capacity(OUT_BUF);
        }
        self.buf.clear();
        let before_in = self.inflate.total_in();
        let status = self
            .inflate
            .decompress_vec(input, &mut self.buf, FlushDecompress::None)
            .map_err(|_| DecodeError::Corrupt)?;
        let consumed =
            usize::try_from(self.inflate.total_in() - before_in).map_err(|_| DecodeError::Corrupt)?;
        let produced = self.buf.len();
        if produced > 0 {
            self.total_out = self.total_out.saturating_add(produced as u64);
            if self.total_out > self.max_output {
                return Err(DecodeError::OverCap);
            }
            if self.gzip {
                self.crc.update(&self.buf);
            }
            on_out(&self.buf);
        }
        match status {
            Status::StreamEnd => {
                self.stage = if self.gzip {
                    Stage::Trailer { got: 0 }
                } else {
                    Stage::Done
                };
            }
            Status::Ok | Status::BufError => {
                if consumed == 0 && produced == 0 && !input.is_empty() {
                    // No progress with input available: the stream is stuck.
                    return Err(DecodeError::Corrupt);
                }
            }
        }
        Ok(consumed)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sse::tests::split_at;
    use crate::test_support::gzip;
    use flate2::Compression;
    use flate2::write::{DeflateEncoder, ZlibEncoder};
    use proptest::prelude::*;
    use std::io::Write;

    fn decode<'a>(
        coding: Coding,
        max: u64,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<u8>, Result<(), DecodeError>) {
        let mut decoder = Decoder::new(coding, max).unwrap();
        let mut out = Vec::new();
        for chunk in chunks {
            if let Err(e) = decoder.feed(chunk, &mut |piece| {
                assert!(piece.len() <= OUT_BUF);
                out.extend_from_slice(piece)
            }) {
                return (out, Err(e));
            }
        }
        let end = decoder.finish();
        (out, end)
    }

    fn sample() -> Vec<u8> {
        let mut text = Vec::new();
        for i in 0..2000 {
            text.extend_from_slice(format!("data: {{\"i\":{i},\"content\":\"h\u{e9}llo\"}}\n\n").as_bytes());
        }
        text
    }

    #[test]
    fn coding_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(Coding::from_headers(&h), Coding::Identity);
        for (value, coding) in [
            ("gzip", Coding::Gzip),
            ("X-GZIP", Coding::Gzip),
            ("deflate", Coding::Deflate),
            ("identity", Coding::Identity),
            ("br", Coding::Unsupported),
            ("gzip, br", Coding::Unsupported),
        ] {
            h.insert(http::header::CONTENT_ENCODING, value.parse().unwrap());
            assert_eq!(Coding::from_headers(&h), coding, "{value}");
        }
        h.append(http::header::CONTENT_ENCODING, "gzip".parse().unwrap());
        assert_eq!(Coding::from_headers(&h), Coding::Unsupported);
    }

    #[test]
    fn gzip_round_trip_with_header_fields_and_members() {
        let text = sample();
        assert_eq!(
            decode(Coding::Gzip, u64::MAX, [&gzip(&text)[..]]),
            (text.clone(), Ok(()))
        );
        let mut e = flate2::GzBuilder::new()
            .filename("x.txt")
            .comment("c")
            .extra(vec![1, 2, 3])
            .write(Vec::new(), Compression::fast());
        e.write_all(b"abc").unwrap();
        let mut two = e.finish().unwrap();
        two.extend_from_slice(&gzip(b"def"));
        let frames: Vec<&[u8]> = two.chunks(1).collect();
        assert_eq!(decode(Coding::Gzip, 100, frames), (b"abcdef".to_vec(), Ok(())));
    }

    #[test]
    fn deflate_zlib_and_raw() {
        let text = sample();
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(&text).unwrap();
        let z = z.finish().unwrap();
        assert_eq!(
            decode(Coding::Deflate, u64::MAX, [&z[..]]),
            (text.clone(), Ok(()))
        );
        let mut d = DeflateEncoder::new(Vec::new(), Compression::default());
        d.write_all(&text).unwrap();
        let d = d.finish().unwrap();
        assert_eq!(decode(Coding::Deflate, u64::MAX, [&d[..]]), (text, Ok(())));
    }

    #[test]
    fn errors_are_reported() {
        let good = gzip(b"hello world");
        assert_eq!(
            decode(Coding::Gzip, 100, [&b"not gzip at all"[..]]).1,
            Err(DecodeError::Corrupt)
        );
        let cut = &good[..good.len() - 3];
        assert_eq!(
            decode(Coding::Gzip, 100, [cut]),
            (b"hello world".to_vec(), Err(DecodeError::Truncated))
        );
        let mut bad_crc = good.clone();
        let n = bad_crc.len();
        bad_crc[n - 6] ^= 1;
        assert_eq!(
            decode(Coding::Gzip, 100, [&bad_crc[..]]).1,
            Err(DecodeError::Corrupt)
        );
        let mut garbage = good.clone();
        garbage[12] ^= 0xff;
        assert!(decode(Coding::Gzip, 100, [&garbage[..]]).1.is_err());
        assert_eq!(decode(Coding::Gzip, 100, [&b""[..]]), (Vec::new(), Ok(())));
        // After an error, feeding does nothing.
        let mut d = Decoder::new(Coding::Gzip, 100).unwrap();
        assert!(d.feed(b"xxxxxxxxxxxx", &mut |_| {}).is_err());
        assert_eq!(
            d.feed(&good, &mut |_| panic!("no output")),
            Err(DecodeError::Corrupt)
        );
    }

    #[test]
    fn bomb_stops_at_the_cap() {
        let zeros = vec![0u8; 16 << 20];
        let bomb = gzip(&zeros);
        assert!(bomb.len() < 40_000);
        let mut seen = 0u64;
        let mut d = Decoder::new(Coding::Gzip, 1 << 20).unwrap();
        let mut result = Ok(());
        for chunk in bomb.chunks(16 * 1024) {
            result = d.feed(chunk, &mut |piece| seen += piece.len() as u64);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(DecodeError::OverCap));
        assert!(seen <= 1 << 20);
        assert!(d.total_out() <= (1 << 20) + OUT_BUF as u64);
    }

    proptest! {
        #[test]
        fn any_split_decodes_the_same(cuts in prop::collection::vec(any::<usize>(), 0..40)) {
            let text = sample();
            let packed = gzip(&text);
            // Cuts anywhere in the compressed bytes, the header and the trailer included.
            let cuts: Vec<usize> = cuts.iter().map(|cut| cut % (packed.len() + 1)).collect();
            let parts = split_at(&packed, cuts.clone());
            let (out, result) = decode(Coding::Gzip, u64::MAX, parts);
            prop_assert_eq!(result, Ok(()), "cuts {:?} len {}", cuts, packed.len());
            prop_assert!(out == text, "output differs");
        }
    }
}
