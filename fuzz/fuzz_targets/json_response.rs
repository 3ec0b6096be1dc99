//! A complete JSON response of every API: parse, partition, events.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tower_openmeter::__fuzz::json_response(data);
});
