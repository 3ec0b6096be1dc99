//! An event stream of every API through the SSE scanner and stream usage readers, whole and chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tower_openmeter::__fuzz::sse_stream(data);
});
