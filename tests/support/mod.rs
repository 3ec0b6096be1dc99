//! Test helpers shared by the integration tests: `mod support;` in any file under `tests/`.
//!
//! - [`fake_openmeter::FakeOpenMeter`]: a strict fake of OpenMeter's ingest API on 127.0.0.1
//!   with runtime fault modes.
//! - [`upstream`]: a fake LLM upstream answering every API with recorded-style bodies.
//! - [`event_rules`]: OpenMeter's request validation, by hand, as the fake applies it.
//! - [`test_support`]: the crate's own test bodies and `gzip`, shared with its unit tests.
#![allow(dead_code, unreachable_pub)]

pub mod event_rules;
pub mod fake_openmeter;
#[path = "../../src/test_support.rs"]
pub mod test_support;
pub mod upstream;

#[allow(unused_imports)]
pub use fake_openmeter::{FakeOpenMeter, Fault};
