//! An incremental scanner for `text/event-stream` bodies, following the WHATWG HTML rules for
//! event stream interpretation, on bytes.
//!
//! - Lines end in LF, CRLF or a lone CR. A frame boundary may fall anywhere: inside a line,
//!   inside a UTF-8 character (the scanner never decodes text), or between the CR and the LF of
//!   one CRLF (that pair is still a single line end, not an extra blank line).
//! - `event:` sets the event type, `data:` lines are joined with LF, a single space after the
//!   colon is stripped, lines starting with `:` are comments (keep-alives), other fields (`id`,
//!   `retry`, unknown names) are ignored, and a blank line dispatches the event. An event with
//!   no `data` line is not dispatched. A leading UTF-8 BOM is ignored.
//! - Memory is bounded: a line longer than the cap is skipped (its remainder discarded up to
//!   its line end) and counted in [`SseScanner::lines_too_long`]; an event whose joined data
//!   would exceed the same cap is dropped and counted in [`SseScanner::events_too_large`].
//!   On request ([`SseScanner::with_long_line_tail`]) the last bytes of an over-long `data:`
//!   line are kept and its event is dispatched marked truncated, so a usage object at the end
//!   of a huge payload can still be found.
//! - Steady state costs no allocation: a line that lies whole inside the fed chunk is read in
//!   place, and the carry-over and data buffers keep their capacity between events (capacity
//!   above [`KEEP_CAPACITY`] is released after use so one huge event does not pin memory).
//!
//! End of stream ([`SseScanner::finish`]): a browser discards an event that is not followed by
//! a blank line. For metering the scanner is deliberately more lenient: an unterminated last
//! line is read as a line and the pending event is dispatched. The consumers parse each event's
//! data as JSON, so a payload cut in the middle fails to parse and is ignored, while a usage
//! chunk whose stream was cut just before its blank line (or that a server ended without one)
//! still counts: the provider sent that usage, and it bills it.

/// The default line cap: 1 MiB.
pub(crate) const DEFAULT_MAX_LINE: usize = 1 << 20;

/// Buffer capacity kept between events; anything above is released.
pub(crate) const KEEP_CAPACITY: usize = 64 * 1024;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event. It borrows the scanner's buffers: copy what must outlive the callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SseEvent<'a> {
    /// The `event:` field's value; empty means the default type, `message`.
    pub(crate) event: &'a [u8],
    /// The `data:` lines, joined with LF; for a truncated event, the tail of its over-long
    /// `data:` line.
    pub(crate) data: &'a [u8],
    /// A `data:` line of this event was over the cap and only its last bytes were kept (see
    /// [`SseScanner::with_long_line_tail`]); `data` is not a complete payload.
    pub(crate) truncated: bool,
}

impl SseEvent<'_> {
    /// The OpenAI-style end marker, `data: [DONE]`.
    pub(crate) fn is_done(&self) -> bool {
        self.data == b"[DONE]"
    }
}

/// The incremental scanner. Feed it every chunk of the body in order, then call
/// [`finish`](SseScanner::finish) once at the end of the stream.
#[derive(Debug)]
pub(crate) struct SseScanner {
    max_line: usize,
    /// The start of a line that began in an earlier chunk.
    line: Vec<u8>,
    /// Discarding the rest of an over-long line (already counted).
    skipping_line: bool,
    /// The last chunk ended in CR: an LF at the start of the next chunk completes that line end.
    after_cr: bool,
    /// No line was completed yet (a BOM may start the first one).
    first_line: bool,
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    data_too_large: bool,
    /// How many last bytes of an over-long `data:` line to keep (0: none).
    long_tail_cap: usize,
    long_tail: Vec<u8>,
    /// The over-long line being skipped is a `data:` line.
    long_is_data: bool,
    /// The pending event's data is the tail of an over-long line.
    truncated: bool,
    lines_too_long: u64,
    events_too_large: u64,
}

impl Default for SseScanner {
    fn default() -> Self {
        SseScanner::new(DEFAULT_MAX_LINE)
    }
}

impl SseScanner {
    /// A scanner whose line cap, and cap on one event's joined data, is `max_line` bytes.
    pub(crate) fn new(max_line: usize) -> Self {
        SseScanner {
            max_line,
            line: Vec::new(),
            skipping_line: false,
            after_cr: false,
            first_line: true,
            event: Vec::new(),
            data: Vec::new(),
            has_data: false,
            data_too_large: false,
            long_tail_cap: 0,
            long_tail: Vec::new(),
            long_is_data: false,
            truncated: false,
            lines_too_long: 0,
            events_too_large: 0,
        }
    }

    /// Keeps the last `bytes` of an over-long `data:` line (default 0, none): the event it
    /// belongs to is then dispatched as [`truncated`](SseEvent::truncated), with that tail as
    /// its data and its other data lines dropped. A final usage object is small and near the end
    /// of its payload, so a reader can still find it there (the Responses API's
    /// `response.completed` repeats the whole output before its `usage`). The line is still
    /// counted in [`lines_too_long`](Self::lines_too_long). Extra memory: up to twice `bytes`.
    pub(crate) fn with_long_line_tail(mut self, bytes: usize) -> Self {
        self.long_tail_cap = bytes;
        self
    }

    /// Lines longer than the cap that were skipped so far.
    pub(crate) fn lines_too_long(&self) -> u64 {
        self.lines_too_long
    }

    /// Events dropped so far because their joined data exceeded the cap.
    pub(crate) fn events_too_large(&self) -> u64 {
        self.events_too_large
    }

    #[cfg(test)]
    /// Bytes currently buffered (carry-over line plus pending event), for tests and limits.
    pub(crate) fn buffered(&self) -> usize {
        self.line.len() + self.event.len() + self.data.len()
    }

    /// Scans one chunk, calling `on_event` for every event it completes.
    pub(crate) fn feed<F>(&mut self, mut chunk: &[u8], on_event: &mut F)
    where
        F: FnMut(SseEvent<'_>),
    {
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
        }
        while !chunk.is_empty() {
            let Some(end) = memchr::memchr2(b'\n', b'\r', chunk) else {
                self.push_partial(chunk);
                return;
            };
            let mut next = end + 1;
            if chunk[end] == b'\r' {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            self.end_line(&chunk[..end], on_event);
            chunk = &chunk[next..];
        }
    }

    /// Ends the stream: reads an unterminated last line and dispatches a pending event (see
    /// the module docs), then resets for reuse.
    pub(crate) fn finish<F>(&mut self, on_event: &mut F)
    where
        F: FnMut(SseEvent<'_>),
    {
        if self.skipping_line {
            self.skipping_line = false;
            self.end_long();
        } else if !self.line.is_empty() {
            self.end_line(&[], on_event);
        }
        self.after_cr = false;
        self.dispatch(on_event);
        self.line.clear();
        self.first_line = true;
    }

    fn push_partial(&mut self, part: &[u8]) {
        if self.skipping_line {
            if self.long_is_data {
                self.push_tail(part);
            }
            return;
        }
        if self.line.len() + part.len() > self.max_line {
            let line = std::mem::take(&mut self.line);
            self.begin_long(&line, part);
            self.line = line;
            self.skipping_line = true;
            self.line.clear();
            release(&mut self.line);
            return;
        }
        self.line.extend_from_slice(part);
    }

    /// An over-long line starts with `head` then `more`: count it, and start keeping its tail
    /// when it is a `data:` line.
    fn begin_long(&mut self, head: &[u8], more: &[u8]) {
        self.lines_too_long += 1;
        self.long_tail.clear();
        let mut prefix = [0u8; 6];
        let n = head.len().min(6);
        prefix[..n].copy_from_slice(&head[..n]);
        let m = more.len().min(6 - n);
        prefix[n..n + m].copy_from_slice(&more[..m]);
        let prefix = &prefix[..n + m];
        self.long_is_data = self.long_tail_cap > 0 && prefix.starts_with(b"data:");
        if self.long_is_data {
            // Keep the value only: skip `data:` and one optional space.
            let skip = 5 + usize::from(prefix.get(5) == Some(&b' '));
            let from_head = skip.min(head.len());
            self.push_tail(&head[from_head..]);
            self.push_tail(&more[(skip - from_head).min(more.len())..]);
        }
    }

    fn push_tail(&mut self, bytes: &[u8]) {
        let cap = self.long_tail_cap;
        if bytes.len() >= cap {
            self.long_tail.clear();
            self.long_tail.extend_from_slice(&bytes[bytes.len() - cap..]);
            return;
        }
        self.long_tail.extend_from_slice(bytes);
        if self.long_tail.len() > 2 * cap {
            let cut = self.long_tail.len() - cap;
            self.long_tail.drain(..cut);
        }
    }

    /// The over-long line ended: a `data:` line's tail becomes the event's (truncated) data.
    fn end_long(&mut self) {
        if std::mem::take(&mut self.long_is_data) {
            let start = self.long_tail.len().saturating_sub(self.long_tail_cap);
            self.data.clear();
            self.data.extend_from_slice(&self.long_tail[start..]);
            self.has_data = true;
            self.data_too_large = false;
            self.truncated = true;
        }
        self.long_tail.clear();
        release(&mut self.long_tail);
    }

    /// A line end was found; `tail` is the part of the line inside the current chunk.
    fn end_line<F>(&mut self, tail: &[u8], on_event: &mut F)
    where
        F: FnMut(SseEvent<'_>),
    {
        if self.skipping_line {
            self.skipping_line = false;
            if self.long_is_data {
                self.push_tail(tail);
            }
            self.end_long();
            return;
        }
        if self.line.is_empty() {
            if tail.len() > self.max_line {
                self.begin_long(tail, &[]);
                self.end_long();
            } else {
                self.line_complete(tail, on_event);
            }
            return;
        }
        if self.line.len() + tail.len() > self.max_line {
            let line = std::mem::take(&mut self.line);
            self.begin_long(&line, tail);
            self.end_long();
            self.line = line;
        } else {
            self.line.extend_from_slice(tail);
            let line = std::mem::take(&mut self.line);
            self.line_complete(&line, on_event);
            self.line = line;
        }
        self.line.clear();
        release(&mut self.line);
    }

    fn line_complete<F>(&mut self, mut line: &[u8], on_event: &mut F)
    where
        F: FnMut(SseEvent<'_>),
    {
        if self.first_line {
            self.first_line = false;
            line = line.strip_prefix(BOM).unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(on_event);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match field {
            b"event" => {
                self.event.clear();
                self.event.extend_from_slice(value);
            }
            b"data" => self.push_data(value),
            _ => {}
        }
    }

    fn push_data(&mut self, value: &[u8]) {
        if self.data_too_large || self.truncated {
            return;
        }
        let separator = usize::from(self.has_data);
        self.has_data = true;
        if self.data.len() + separator + value.len() > self.max_line {
            self.data_too_large = true;
            self.events_too_large += 1;
            self.data.clear();
            release(&mut self.data);
            return;
        }
        if separator == 1 {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
    }

    fn dispatch<F>(&mut self, on_event: &mut F)
    where
        F: FnMut(SseEvent<'_>),
    {
        if self.has_data && !self.data_too_large {
            on_event(SseEvent {
                event: &self.event,
                data: &self.data,
                truncated: self.truncated,
            });
        }
        self.truncated = false;
        self.has_data = false;
        self.data_too_large = false;
        self.event.clear();
        self.data.clear();
        release(&mut self.event);
        release(&mut self.data);
    }
}

/// Frees an (empty) buffer's capacity beyond [`KEEP_CAPACITY`].
pub(crate) fn release(buf: &mut Vec<u8>) {
    if buf.capacity() > KEEP_CAPACITY {
        buf.shrink_to(KEEP_CAPACITY);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Owned copy of an event, for assertions.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) struct Owned {
        pub(crate) event: String,
        pub(crate) data: String,
    }

    pub(crate) fn scan_chunks<'a>(
        max_line: usize,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<Owned>, u64, u64) {
        let mut scanner = SseScanner::new(max_line);
        let mut events = Vec::new();
        let mut push = |ev: SseEvent<'_>| {
            events.push(Owned {
                event: String::from_utf8_lossy(ev.event).into_owned(),
                data: String::from_utf8_lossy(ev.data).into_owned(),
            })
        };
        for chunk in chunks {
            scanner.feed(chunk, &mut push);
        }
        scanner.finish(&mut push);
        (events, scanner.lines_too_long(), scanner.events_too_large())
    }

    fn scan(input: &str) -> Vec<Owned> {
        scan_chunks(DEFAULT_MAX_LINE, [input.as_bytes()]).0
    }

    fn ev(event: &str, data: &str) -> Owned {
        Owned {
            event: event.into(),
            data: data.into(),
        }
    }

    /// Splits `input` at every given position (sorted, deduplicated).
    pub(crate) fn split_at(input: &[u8], mut cuts: Vec<usize>) -> Vec<&[u8]> {
        cuts.retain(|&c| c <= input.len());
        cuts.sort_unstable();
        cuts.dedup();
        let mut out = Vec::new();
        let mut start = 0;
        for cut in cuts {
            out.push(&input[start..cut]);
            start = cut;
        }
        out.push(&input[start..]);
        out
    }

    #[test]
    fn fields_comments_and_dispatch() {
        let input = ": keep-alive\n\
            event: message_start\n\
            data: {\"a\":1}\n\
            id: 7\n\
            retry: 100\n\
            unknown\n\
            \n\
            data:no-space\n\
            data:  two spaces\n\
            data\n\
            \n\
            event: only-an-event\n\
            \n\
            data: [DONE]\n\n";
        assert_eq!(
            scan(input),
            vec![
                ev("message_start", "{\"a\":1}"),
                ev("", "no-space\n two spaces\n"),
                ev("", "[DONE]"),
            ]
        );
    }

    #[test]
    fn every_line_ending() {
        let expected = vec![ev("e", "a\nb"), ev("", "c")];
        for sep in ["\n", "\r\n", "\r"] {
            let input = format!("event: e{sep}data: a{sep}data: b{sep}{sep}data: c{sep}{sep}");
            assert_eq!(scan(&input), expected, "{sep:?}");
        }
        // Mixed endings in one stream.
        assert_eq!(scan("event: e\r\ndata: a\rdata: b\n\r\ndata: c\r\r"), expected);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        let input = b"data: a\r\n\r\ndata: b\r\n\r\n";
        for cut in 0..=input.len() {
            let (events, ..) = scan_chunks(64, [&input[..cut], &input[cut..]]);
            assert_eq!(events, vec![ev("", "a"), ev("", "b")], "cut at {cut}");
        }
        // A chunk that is only "\n" after a CR-terminated chunk.
        let (events, ..) = scan_chunks(64, [&b"data: a\r"[..], b"\n", b"\r", b"\n", b""]);
        assert_eq!(events, vec![ev("", "a")]);
    }

    #[test]
    fn bom_and_utf8_split() {
        let input = "\u{FEFF}data: h\u{e9}llo \u{1F600}\n\n";
        let bytes = input.as_bytes();
        for cut in 0..=bytes.len() {
            let (events, ..) = scan_chunks(64, [&bytes[..cut], &bytes[cut..]]);
            assert_eq!(events, vec![ev("", "h\u{e9}llo \u{1F600}")]);
        }
    }

    #[test]
    fn finish_reads_unterminated_event() {
        assert_eq!(scan("data: {\"usage\":1}\n"), vec![ev("", "{\"usage\":1}")]);
        assert_eq!(scan("data: {\"usage\":1}"), vec![ev("", "{\"usage\":1}")]);
        assert_eq!(scan("event: x\n"), vec![]);
        assert_eq!(scan(""), vec![]);
    }

    #[test]
    fn long_line_is_skipped_and_counted() {
        let long = "x".repeat(100);
        let input = format!("data: a\n\ndata: {long}\ndata: b\n\n: {long}\ndata: c\n\n");
        let (events, too_long, _) = scan_chunks(50, [input.as_bytes()]);
        assert_eq!(events, vec![ev("", "a"), ev("", "b"), ev("", "c")]);
        assert_eq!(too_long, 2);
        // The same in one-byte frames.
        let frames: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
        assert_eq!(scan_chunks(50, frames), (events, 2, 0));
        // Exactly the cap is fine.
        let exact = format!("data: {}\n\n", "y".repeat(44));
        assert_eq!(scan_chunks(50, [exact.as_bytes()]).1, 0);
    }

    #[test]
    fn oversized_event_data_is_dropped_and_counted() {
        let part = "z".repeat(30);
        let input = format!("data: {part}\ndata: {part}\n\ndata: ok\n\n");
        let (events, too_long, too_large) = scan_chunks(50, [input.as_bytes()]);
        assert_eq!((events, too_long, too_large), (vec![ev("", "ok")], 0, 1));
    }

    #[test]
    fn endless_line_stays_within_the_cap() {
        let mut scanner = SseScanner::new(1024);
        let block = [b'q'; 700];
        let mut seen = 0;
        for _ in 0..10_000 {
            scanner.feed(&block, &mut |_| seen += 1);
            assert!(scanner.buffered() <= 1024);
            assert!(scanner.line.capacity() <= KEEP_CAPACITY.max(2048));
        }
        scanner.feed(b"\ndata: after\n\n", &mut |_| seen += 1);
        assert_eq!((seen, scanner.lines_too_long()), (1, 1));
    }

    #[test]
    fn buffers_are_reused() {
        let mut scanner = SseScanner::new(DEFAULT_MAX_LINE);
        let chunk = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
        scanner.feed(chunk, &mut |_| {});
        let capacity = (scanner.data.capacity(), scanner.line.capacity());
        for _ in 0..1000 {
            scanner.feed(chunk, &mut |_| {});
        }
        assert_eq!((scanner.data.capacity(), scanner.line.capacity()), capacity);
        assert_eq!(scanner.line.capacity(), 0, "whole lines are read in place");
    }

    #[test]
    fn long_data_line_keeps_its_tail_when_asked() {
        let value = format!("{{\"output\":\"{}\",\"usage\":{{\"n\":1}}}}", "o".repeat(300));
        let input = format!(
            "event: response.completed\r\ndata: {value}\r\ndata: more\r\n\r\ndata: {}\n\ndata: ok\n\n",
            "p".repeat(300)
        );
        let tail_of = |s: &str| s[s.len() - 40..].to_owned();
        let expected = vec![
            ("response.completed".to_owned(), tail_of(&value), true),
            (String::new(), tail_of(&"p".repeat(300)), true),
            (String::new(), "ok".to_owned(), false),
        ];
        for frame in [1, 2, 7, 64, 1000] {
            let mut scanner = SseScanner::new(100).with_long_line_tail(40);
            let mut events = Vec::new();
            let mut push = |ev: SseEvent<'_>| {
                events.push((
                    String::from_utf8_lossy(ev.event).into_owned(),
                    String::from_utf8_lossy(ev.data).into_owned(),
                    ev.truncated,
                ))
            };
            for chunk in input.as_bytes().chunks(frame) {
                scanner.feed(chunk, &mut push);
            }
            scanner.finish(&mut push);
            assert_eq!(events, expected, "frames of {frame}");
            assert_eq!(scanner.lines_too_long(), 2);
            assert!(scanner.long_tail.capacity() <= KEEP_CAPACITY);
        }
        // A long line that is not `data:` keeps nothing; the stream may also end inside one.
        let mut scanner = SseScanner::new(10).with_long_line_tail(4);
        let mut events = Vec::new();
        scanner.feed(b": a long comment line\ndata: abcdefghijklmnop", &mut |ev| {
            events.push(ev.data.to_vec())
        });
        scanner.finish(&mut |ev| events.push(ev.data.to_vec()));
        assert_eq!(events, vec![b"mnop".to_vec()]);
    }

    const MIXED: &str = "\u{FEFF}: comment\r\nevent: message_start\r\ndata: {\"x\":\"\u{e9}\"}\r\n\r\n\
        :\n\ndata: one\rdata: two\r\rid: 1\ndata: three\n\ndata: [DONE]\r\n\r\n";

    proptest! {
        #[test]
        fn any_split_gives_the_same_events(cuts in prop::collection::vec(0usize..200, 0..40)) {
            let whole = scan_chunks(DEFAULT_MAX_LINE, [MIXED.as_bytes()]);
            prop_assert_eq!(whole.0.len(), 4);
            let parts = split_at(MIXED.as_bytes(), cuts);
            prop_assert_eq!(scan_chunks(DEFAULT_MAX_LINE, parts), whole);
        }

        #[test]
        fn any_split_counts_long_lines_the_same(
            lens in prop::collection::vec(0usize..80, 1..12),
            cuts in prop::collection::vec(0usize..800, 0..30),
        ) {
            let mut input = String::new();
            for (i, len) in lens.iter().enumerate() {
                input.push_str(&format!("data: {}\r\n", "d".repeat(*len)));
                if i % 2 == 1 { input.push_str("\r\n"); }
            }
            let whole = scan_chunks(40, [input.as_bytes()]);
            let expected_long = lens.iter().filter(|&&l| l + 6 > 40).count() as u64;
            prop_assert_eq!(whole.1, expected_long);
            let parts = split_at(input.as_bytes(), cuts);
            prop_assert_eq!(scan_chunks(40, parts), whole);
        }
    }
}
