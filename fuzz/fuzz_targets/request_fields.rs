//! The request-field reader and the subject chain: the first byte splits the input into an
//! `x-customer` header value and a request body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_openmeter::__fuzz;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let (header, body) = data.split_at(split);
    __fuzz::request_fields(data);
    __fuzz::request_fields(body);
    __fuzz::subject(header, body);
});
