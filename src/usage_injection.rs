//! Optional usage injection for OpenAI-style streams: ask the upstream for usage the client
//! did not ask for, and hide what that changes from the client.
//!
//! Without `stream_options.include_usage`, an OpenAI chat.completions or completions stream
//! reports no usage at all, so a streamed request would go unbilled. When the layer's
//! `ensure_stream_usage` is on:
//!
//! 1. [`request_with_include_usage`] rewrites the request body to set
//!    `stream_options.include_usage: true`. The rewrite is a splice into the original bytes:
//!    every other byte (key order, number spelling, whitespace, other `stream_options` members)
//!    is kept; the caller fixes `Content-Length`.
//! 2. [`UsageChunkFilter`] then removes from the response what the upstream added because of
//!    it. With `include_usage`, OpenAI adds `"usage":null` to every chunk and sends one more
//!    chunk, with `"choices":[]` and the totals, before `data: [DONE]`. The filter:
//!    - drops that usage-only event: a `data:` line whose JSON object has a non-null `usage` and
//!      `choices` that is empty, `null` or absent, together with the rest of its event up to and
//!      including the blank line that ends it, whatever the line endings;
//!    - removes the top-level `"usage":null` member (and its separating comma) from every other
//!      chunk.
//!
//!    For OpenAI's compact JSON the client therefore receives exactly the bytes the upstream
//!    would have sent without injection. Limits, by design: a chunk that has choices *and* a
//!    non-null usage (some backends, vLLM's `continuous_usage_stats`) is passed unchanged, since
//!    it cannot be told apart from a backend that always sends usage; a usage event whose data
//!    is split over several `data:` lines, or a line longer than the cap, is passed unchanged;
//!    lines before the usage chunk's `data:` line in the same event (`event:`, `id:`), which
//!    OpenAI does not send, are passed, which leaves an event without data that clients ignore.
//!
//! The filter is incremental (frames may split anywhere, even inside a CRLF) and bounded: it
//! holds back only the current line, at most the cap, and emits each line as soon as it is
//! complete; a line over the cap is passed through as it arrives. Metering reads the original
//! bytes through the SSE scanner, independently of the filter.

use std::ops::Range;

/// Sets `stream_options.include_usage` to `true` in a JSON request body, keeping every other
/// byte. `None` when the body is not a JSON object (the caller then sends it unchanged).
///
/// Duplicate keys are resolved as most JSON parsers do: the last `stream_options` (and the last
/// `include_usage` in it) is the one changed.
pub(crate) fn request_with_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body).ok()?;
    let open = first_non_ws(body, 0)?;
    if body[open] != b'{' {
        return None;
    }
    let mut members = Vec::new();
    object_members(body, open, &mut members)?;
    let splice = match members.iter().rev().find(|m| key_is(body, m, b"stream_options")) {
        None => insert_member(
            open,
            !members.is_empty(),
            br#""stream_options":{"include_usage":true}"#,
        ),
        Some(options) if body[options.value.start] == b'{' => {
            let mut inner = Vec::new();
            object_members(body, options.value.start, &mut inner)?;
            match inner.iter().rev().find(|m| key_is(body, m, b"include_usage")) {
                Some(flag) => (flag.value.clone(), b"true".to_vec()),
                None => insert_member(options.value.start, !inner.is_empty(), br#""include_usage":true"#),
            }
        }
        // `null` or another non-object value: replaced by the object.
        Some(options) => (options.value.clone(), br#"{"include_usage":true}"#.to_vec()),
    };
    let (range, with) = splice;
    let mut out = Vec::with_capacity(body.len() + with.len());
    out.extend_from_slice(&body[..range.start]);
    out.extend_from_slice(&with);
    out.extend_from_slice(&body[range.end..]);
    Some(out)
}

/// The splice that inserts `member` as the first member of the object opening at `open`.
fn insert_member(open: usize, has_members: bool, member: &[u8]) -> (Range<usize>, Vec<u8>) {
    let mut with = member.to_vec();
    if has_members {
        with.push(b',');
    }
    (open + 1..open + 1, with)
}

/// What the filter does with a complete `data:` line.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Keep,
    /// Remove this byte range of the line (a `"usage":null` member and one comma).
    Remove(Range<usize>),
    /// A usage-only chunk: drop the line and the rest of its event.
    DropEvent,
}

/// The response-side filter; see the module docs.
#[derive(Debug)]
pub(crate) struct UsageChunkFilter {
    max_line: usize,
    /// The start of a line that began in an earlier chunk (at most `max_line` bytes).
    held: Vec<u8>,
    /// Passing the rest of an over-long line through as it arrives.
    passing: bool,
    /// Inside a dropped event: drop lines up to and including the blank line.
    dropping: bool,
    /// The last chunk ended in CR; `Some(dropped)` says whether that CR was dropped, and so
    /// whether an LF starting the next chunk (the rest of a CRLF) is dropped too.
    after_cr: Option<bool>,
    members: Vec<Member>,
    lines_too_long: u64,
    dropped_events: u64,
    removed_nulls: u64,
}

impl UsageChunkFilter {
    pub(crate) fn new(max_line: usize) -> Self {
        UsageChunkFilter {
            max_line,
            held: Vec::new(),
            passing: false,
            dropping: false,
            after_cr: None,
            members: Vec::new(),
            lines_too_long: 0,
            dropped_events: 0,
            removed_nulls: 0,
        }
    }

    /// Usage-only events removed so far.
    pub(crate) fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    #[cfg(test)]
    /// `"usage":null` members removed so far.
    pub(crate) fn removed_nulls(&self) -> u64 {
        self.removed_nulls
    }

    #[cfg(test)]
    /// Lines longer than the cap, passed through unexamined.
    pub(crate) fn lines_too_long(&self) -> u64 {
        self.lines_too_long
    }

    #[cfg(test)]
    /// Bytes held back, waiting for the end of their line.
    pub(crate) fn held(&self) -> usize {
        self.held.len()
    }

    /// Filters one chunk, appending what the client gets to `out`.
    pub(crate) fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        if !input.is_empty() {
            if let Some(dropped) = self.after_cr.take() {
                if input[0] == b'\n' {
                    if !dropped {
                        out.push(b'\n');
                    }
                    input = &input[1..];
                }
            }
        }
        while !input.is_empty() {
            let Some(end) = memchr::memchr2(b'\n', b'\r', input) else {
                self.partial(input, out);
                return;
            };
            let mut next = end + 1;
            let mut cr_at_end = false;
            if input[end] == b'\r' {
                match input.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => cr_at_end = true,
                }
            }
            let (content, term) = (&input[..end], &input[end..next]);
            let dropped = if self.passing {
                self.passing = false;
                self.emit(&[content, term], out)
            } else if self.held.is_empty() {
                self.line(content, term, out)
            } else if self.held.len() + content.len() > self.max_line {
                self.lines_too_long += 1;
                let held = std::mem::take(&mut self.held);
                let dropped = self.emit(&[&held, content, term], out);
                self.held = held;
                self.held.clear();
                dropped
            } else {
                self.held.extend_from_slice(content);
                let held = std::mem::take(&mut self.held);
                let dropped = self.line(&held, term, out);
                self.held = held;
                self.held.clear();
                dropped
            };
            crate::sse::release(&mut self.held);
            if cr_at_end {
                self.after_cr = Some(dropped);
            }
            input = &input[next..];
        }
    }

    /// Ends the stream: a held unterminated line is passed on as is.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        let held = std::mem::take(&mut self.held);
        self.emit(&[&held], out);
        self.passing = false;
        self.dropping = false;
        self.after_cr = None;
    }

    fn partial(&mut self, part: &[u8], out: &mut Vec<u8>) {
        if self.passing {
            self.emit(&[part], out);
        } else if self.held.len() + part.len() > self.max_line {
            self.lines_too_long += 1;
            self.passing = true;
            let held = std::mem::take(&mut self.held);
            self.emit(&[&held, part], out);
            crate::sse::release(&mut self.held);
        } else {
            self.held.extend_from_slice(part);
        }
    }

    /// Emits bytes unless inside a dropped event; returns whether they were dropped.
    fn emit(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> bool {
        if !self.dropping {
            for part in parts {
                out.extend_from_slice(part);
            }
        }
        self.dropping
    }

    /// A complete line, at most the cap when `held` was used; returns whether it was dropped.
    fn line(&mut self, content: &[u8], term: &[u8], out: &mut Vec<u8>) -> bool {
        if content.is_empty() {
            let dropped = self.dropping;
            self.dropping = false;
            if !dropped {
                out.extend_from_slice(term);
            }
            return dropped;
        }
        if self.dropping {
            return true;
        }
        if content.len() > self.max_line {
            self.lines_too_long += 1;
            return self.emit(&[content, term], out);
        }
        let verdict = match content.strip_prefix(b"data:") {
            Some(value) => {
                let offset = content.len() - value.len();
                let space = usize::from(value.first() == Some(&b' '));
                match self.classify(&value[space..]) {
                    Verdict::Remove(r) => Verdict::Remove(r.start + offset + space..r.end + offset + space),
                    other => other,
                }
            }
            None => Verdict::Keep,
        };
        match verdict {
            Verdict::Keep => self.emit(&[content, term], out),
            Verdict::Remove(r) => {
                self.removed_nulls += 1;
                self.emit(&[&content[..r.start], &content[r.end..], term], out)
            }
            Verdict::DropEvent => {
                self.dropped_events += 1;
                self.dropping = true;
                true
            }
        }
    }

    fn classify(&mut self, json: &[u8]) -> Verdict {
        if crate::stream_usage::USAGE_KEY.find(json).is_none() {
            return Verdict::Keep;
        }
        let Some(open) = first_non_ws(json, 0).filter(|&i| json[i] == b'{') else {
            return Verdict::Keep;
        };
        self.members.clear();
        if object_members(json, open, &mut self.members).is_none() {
            return Verdict::Keep;
        }
        let members = &self.members;
        let Some(at) = members.iter().rposition(|m| key_is(json, m, b"usage")) else {
            return Verdict::Keep;
        };
        let usage = &members[at];
        if &json[usage.value.clone()] == b"null" {
            let range = if at > 0 {
                members[at - 1].value.end..usage.value.end
            } else if let Some(next) = members.get(1) {
                usage.key.start..next.key.start
            } else {
                usage.key.start..usage.value.end
            };
            return Verdict::Remove(range);
        }
        let choices = members.iter().rev().find(|m| key_is(json, m, b"choices"));
        let no_choices = match choices {
            None => true,
            Some(m) => {
                let value = &json[m.value.clone()];
                value == b"null"
                    || (value.first() == Some(&b'[')
                        && first_non_ws(value, 1).map(|i| value[i]) == Some(b']'))
            }
        };
        if no_choices {
            Verdict::DropEvent
        } else {
            Verdict::Keep
        }
    }
}

/// One member of a JSON object: the key with its quotes, and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Member {
    key: Range<usize>,
    value: Range<usize>,
}

/// Whether a member's key is `name` (decoding escapes when the key has any).
fn key_is(json: &[u8], member: &Member, name: &[u8]) -> bool {
    let raw = &json[member.key.start + 1..member.key.end - 1];
    if !raw.contains(&b'\\') {
        return raw == name;
    }
    serde_json::from_slice::<String>(&json[member.key.clone()]).is_ok_and(|key| key.as_bytes() == name)
}

/// Lists the members of the object opening at `open` into `out`; returns the index just past
/// its closing brace, or `None` when the text is not shaped like an object. This is a
/// structural scan (strings and nesting), not a validation.
fn object_members(json: &[u8], open: usize, out: &mut Vec<Member>) -> Option<usize> {
    let mut i = first_non_ws(json, open + 1)?;
    if json[i] == b'}' {
        return Some(i + 1);
    }
    loop {
        if json[i] != b'"' {
            return None;
        }
        let key_end = string_end(json, i)?;
        let colon = first_non_ws(json, key_end)?;
        if json[colon] != b':' {
            return None;
        }
        let value_start = first_non_ws(json, colon + 1)?;
        let value_end = value_end(json, value_start)?;
        out.push(Member {
            key: i..key_end,
            value: value_start..value_end,
        });
        let sep = first_non_ws(json, value_end)?;
        match json[sep] {
            b',' => i = first_non_ws(json, sep + 1)?,
            b'}' => return Some(sep + 1),
            _ => return None,
        }
    }
}

/// The index just past the string whose opening quote is at `start`.
fn string_end(json: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        let at = i + memchr::memchr2(b'"', b'\\', json.get(i..)?)?;
        if json[at] == b'"' {
            return Some(at + 1);
        }
        i = at + 2;
    }
}

/// The index just past the value starting at `start`.
fn value_end(json: &[u8], start: usize) -> Option<usize> {
    match json.get(start)? {
        b'"' => string_end(json, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            while let Some(&b) = json.get(i) {
                match b {
                    b'"' => {
                        i = string_end(json, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let len = json[start..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'))
                .unwrap_or(json.len() - start);
            (len > 0).then_some(start + len)
        }
    }
}

fn first_non_ws(json: &[u8], from: usize) -> Option<usize> {
    json.get(from..)?
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
        .map(|i| from + i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Api;
    use crate::sse::tests::split_at;
    use crate::stream_usage::tests::{CHAT_INCLUDE_USAGE, CHAT_NO_USAGE, CHAT_USAGE, run};
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn rewrite(body: &str) -> String {
        String::from_utf8(request_with_include_usage(body.as_bytes()).unwrap()).unwrap()
    }

    fn filter_chunks<'a>(max_line: usize, chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut filter = UsageChunkFilter::new(max_line);
        let mut out = Vec::new();
        for chunk in chunks {
            filter.feed(chunk, &mut out);
            assert!(filter.held() <= max_line);
        }
        filter.finish(&mut out);
        out
    }

    fn filter(input: &str) -> String {
        String::from_utf8(filter_chunks(1 << 20, [input.as_bytes()])).unwrap()
    }

    #[test]
    fn request_rewrite_keeps_every_other_byte() {
        assert_eq!(
            rewrite(r#"{"model":"gpt-4o","stream":true,"temperature":1.0,"n":1e2}"#),
            r#"{"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"temperature":1.0,"n":1e2}"#
        );
        assert_eq!(
            rewrite(" { } "),
            r#" {"stream_options":{"include_usage":true} } "#
        );
        assert_eq!(
            rewrite(r#"{"stream":true,"stream_options":{"include_obfuscation":false}}"#),
            r#"{"stream":true,"stream_options":{"include_usage":true,"include_obfuscation":false}}"#
        );
        assert_eq!(
            rewrite(r#"{"stream_options": {"include_usage" : false }, "x": "{\"stream_options\":1}"}"#),
            r#"{"stream_options": {"include_usage" : true }, "x": "{\"stream_options\":1}"}"#
        );
        assert_eq!(
            rewrite(r#"{"stream_options":null,"stream":true}"#),
            r#"{"stream_options":{"include_usage":true},"stream":true}"#
        );
        assert_eq!(
            rewrite(r#"{"stream_options":{}}"#),
            r#"{"stream_options":{"include_usage":true}}"#
        );
        // Escaped key, duplicate keys: the last one is changed.
        assert_eq!(
            rewrite(r#"{"stream_options":{},"stream\u005foptions":{"a":1}}"#),
            r#"{"stream_options":{},"stream\u005foptions":{"include_usage":true,"a":1}}"#
        );
        for bad in ["", "[]", "{", "{\"a\":}", "null", "{\"a\":1} x"] {
            assert_eq!(request_with_include_usage(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn request_rewrite_is_semantically_minimal() {
        let body = json!({"model":"m","messages":[{"role":"user","content":"hi \"there\" {"}],
            "stream":true,"user":"u-1","stream_options":{"other":[1,2,{"x":null}]}});
        let text = serde_json::to_vec_pretty(&body).unwrap();
        let out: Value = serde_json::from_slice(&request_with_include_usage(&text).unwrap()).unwrap();
        let mut expected = body.clone();
        expected["stream_options"]["include_usage"] = json!(true);
        assert_eq!(out, expected);
        let fields = crate::RequestFields::from_json(&serde_json::to_vec(&out).unwrap()).unwrap();
        assert!(fields.include_usage && fields.stream);
    }

    #[test]
    fn filtered_injected_stream_equals_the_uninjected_one() {
        assert_eq!(filter(CHAT_INCLUDE_USAGE), CHAT_NO_USAGE);
        let mut f = UsageChunkFilter::new(1 << 20);
        let mut out = Vec::new();
        f.feed(CHAT_INCLUDE_USAGE.as_bytes(), &mut out);
        f.finish(&mut out);
        assert_eq!((f.dropped_events(), f.removed_nulls()), (1, 4));
        // Metering reads the original bytes.
        let u = run(Api::ChatCompletions, [CHAT_INCLUDE_USAGE.as_bytes()]);
        assert_eq!(u.summary().usage, Some(CHAT_USAGE));
    }

    #[test]
    fn line_endings_comments_and_other_events() {
        let crlf = CHAT_INCLUDE_USAGE.replace("\n", "\r\n");
        assert_eq!(filter(&crlf), CHAT_NO_USAGE.replace("\n", "\r\n"));
        let cr = CHAT_INCLUDE_USAGE.replace("\n", "\r");
        assert_eq!(filter(&cr), CHAT_NO_USAGE.replace("\n", "\r"));
        let input = ": keep-alive\n\n\
            data: {\"usage\":null,\"choices\":[{\"delta\":{}}]}\n\n\
            event: x\ndata: {\"choices\":null,\"usage\":{\"prompt_tokens\":1}}\nid: 9\n\n\
            data: {\"choices\":[{\"x\":1}],\"usage\":{\"prompt_tokens\":1}}\n\n\
            data: {\"choices\":[ ],\"usage\":{}}\n\n\
            data: {\"usage\":null}\n\n\
            data: {\"usage\":{\"a\":1}}\n\
            data: [DONE]\n\n";
        let expected = ": keep-alive\n\n\
            data: {\"choices\":[{\"delta\":{}}]}\n\n\
            event: x\n\
            data: {\"choices\":[{\"x\":1}],\"usage\":{\"prompt_tokens\":1}}\n\n\
            data: {}\n\n";
        assert_eq!(filter(input), expected);
    }

    #[test]
    fn unterminated_and_long_lines_pass_unchanged() {
        let long = format!(
            "data: {{\"choices\":[],\"usage\":{{\"x\":\"{}\"}}}}\n\n",
            "y".repeat(100)
        );
        assert_eq!(filter_chunks(50, [long.as_bytes()]), long.as_bytes());
        let frames: Vec<&[u8]> = long.as_bytes().chunks(7).collect();
        assert_eq!(filter_chunks(50, frames), long.as_bytes());
        assert_eq!(filter("data: {\"usage\":null"), "data: {\"usage\":null");
    }

    #[test]
    fn endless_line_is_streamed_with_bounded_memory() {
        let mut f = UsageChunkFilter::new(1024);
        let mut out = Vec::new();
        let block = [b'a'; 700];
        for _ in 0..1000 {
            f.feed(&block, &mut out);
            assert!(f.held() <= 1024);
        }
        assert_eq!(out.len(), 700 * 1000);
        assert_eq!(f.lines_too_long(), 1);
    }

    #[test]
    fn every_split_position_gives_the_same_bytes() {
        let input = CHAT_INCLUDE_USAGE.replace("\n", "\r\n");
        let expected = CHAT_NO_USAGE.replace("\n", "\r\n");
        let bytes = input.as_bytes();
        for cut in 0..=bytes.len() {
            let out = filter_chunks(1 << 20, [&bytes[..cut], &bytes[cut..]]);
            assert_eq!(out, expected.as_bytes(), "cut at {cut}");
        }
    }

    /// Throughput figures: `cargo test --release --lib throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn throughput() {
        use std::time::Instant;
        let delta = "data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741000000,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_f9f4fb6dbf\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" token\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n";
        let stream = format!(
            "{}{CHAT_INCLUDE_USAGE}",
            delta.repeat(64 * 1024 * 1024 / delta.len())
        );
        let mib = stream.len() as f64 / (1024.0 * 1024.0);
        let frames: Vec<&[u8]> = stream.as_bytes().chunks(4096).collect();
        let started = Instant::now();
        let usage = run(Api::ChatCompletions, frames.iter().copied());
        let scan = started.elapsed();
        assert_eq!(usage.summary().usage, Some(CHAT_USAGE));
        let started = Instant::now();
        let mut filter = UsageChunkFilter::new(1 << 20);
        let mut out = Vec::with_capacity(8192);
        let mut total = 0;
        for frame in &frames {
            out.clear();
            filter.feed(frame, &mut out);
            total += out.len();
        }
        let filtered = started.elapsed();
        assert!(total > 0);
        let gz = crate::test_support::gzip(stream.as_bytes());
        let started = Instant::now();
        let mut decoder = crate::decode::Decoder::new(crate::decode::Coding::Gzip, u64::MAX).unwrap();
        let mut decoded = 0;
        for chunk in gz.chunks(4096) {
            decoder.feed(chunk, &mut |p| decoded += p.len()).unwrap();
        }
        let decode = started.elapsed();
        assert_eq!(decoded, stream.len());
        let rate = |d: std::time::Duration| mib / d.as_secs_f64();
        eprintln!(
            "{mib:.0} MiB of chat deltas in 4 KiB frames: scan+usage {:.0} MiB/s, filter {:.0} MiB/s, gunzip {:.0} MiB/s",
            rate(scan),
            rate(filtered),
            rate(decode)
        );
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_bytes(
            cuts in prop::collection::vec(0usize..3000, 0..60),
            ending in prop::sample::select(vec!["\n", "\r\n", "\r"]),
            cap in prop::sample::select(vec![64usize, 400, 1 << 20]),
        ) {
            let input = CHAT_INCLUDE_USAGE.replace("\n", ending);
            let whole = filter_chunks(cap, [input.as_bytes()]);
            if cap == 1 << 20 {
                let expected = CHAT_NO_USAGE.replace("\n", ending);
                prop_assert_eq!(&whole, expected.as_bytes());
            }
            let parts = split_at(input.as_bytes(), cuts);
            prop_assert_eq!(filter_chunks(cap, parts), whole);
        }

        #[test]
        fn rewrite_never_panics_and_sets_the_flag(body in "\\PC{0,40}", key in "[a-z_]{1,8}") {
            let _ = request_with_include_usage(body.as_bytes());
            let doc = json!({ key.clone(): body, "stream_options": {"k": [key]} });
            let text = serde_json::to_vec(&doc).unwrap();
            let out: Value = serde_json::from_slice(&request_with_include_usage(&text).unwrap()).unwrap();
            prop_assert_eq!(&out["stream_options"]["include_usage"], &json!(true));
        }
    }
}
