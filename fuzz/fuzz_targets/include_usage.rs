//! The `stream_options.include_usage` request rewrite.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tower_openmeter::__fuzz::include_usage_rewrite(data);
});
