//! A `usage` object of every API.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tower_openmeter::__fuzz::usage_json(data);
});
