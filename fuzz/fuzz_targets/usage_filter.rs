//! The usage-chunk response filter, whole and chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tower_openmeter::__fuzz::usage_filter(data);
});
