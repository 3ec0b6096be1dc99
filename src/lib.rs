//! Meter LLM token usage at the HTTP layer and bill it through [OpenMeter](https://openmeter.io).
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod event;
mod record;
mod request;
mod stats;
mod subject;
mod usage;

pub mod sink;

#[cfg(test)]
mod test_support;

pub use event::{CloudEvent, SpecVersion, rfc3339_millis};
pub use record::{EventShape, UsageRecord, UsageSource};
pub use request::{RequestBody, RequestFields, UserField};
pub use sink::{EventSink, MemorySink, StdoutSink};
pub use stats::{MeteringStats, StatsSnapshot};
pub use subject::{MissingSubject, Subject, SubjectChain};
pub use usage::{Api, TokenType, Usage};
