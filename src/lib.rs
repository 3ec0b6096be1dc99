//! Meter LLM token usage at the HTTP layer and bill it through [OpenMeter](https://openmeter.io).
//!
//! [`MeteringLayer`] wraps any tower HTTP service that serves OpenAI-compatible APIs (chat
//! completions, completions, embeddings, the Responses API) or Anthropic's Messages API. For
//! each metered request it reads the `usage` block of the response as the bytes stream past,
//! partitions the tokens into disjoint types (input, cache read, cache write, output), and hands
//! [`CloudEvent`]s keyed on a customer [`Subject`] to an [`EventSink`].
//!
//! Metering never changes a response and never fails a request: every frame is forwarded at
//! once and unchanged, and anything the layer cannot meter is passed through and counted in
//! [`MeteringStats`].
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use tower_openmeter::{MeteringLayer, StdoutSink, Subject};
//!
//! # async fn chat() -> &'static str { "" }
//! let app: Router = Router::new()
//!     .route("/v1/chat/completions", post(chat))
//!     .layer(
//!         MeteringLayer::builder()
//!             .sink(StdoutSink::new())
//!             .source("my-gateway")
//!             .subject(Subject::header("x-customer").or_body_user())
//!             .build(),
//!     );
//! ```
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
mod capture;
mod chunks;
mod decode;
mod event;
mod future;
mod inspect;
mod layer;
mod lenient;
mod meter;
mod record;
mod request;
mod service;
mod sse;
mod stats;
mod stream_usage;
mod subject;
mod usage;
mod usage_injection;

#[doc(hidden)]
#[path = "fuzz.rs"]
pub mod __fuzz;
pub mod sink;
#[cfg(feature = "spool")]
#[cfg_attr(docsrs, doc(cfg(feature = "spool")))]
pub mod spool;

#[cfg(test)]
mod test_support;

pub use body::MeteredBody;
pub use event::{CloudEvent, SpecVersion, rfc3339_millis};
pub use future::ResponseFuture;
pub use layer::{MeteringLayer, MeteringLayerBuilder};
pub use record::{EventShape, UsageRecord, UsageSource};
pub use request::{RequestBody, RequestFields, UserField};
pub use service::Metering;
pub use sink::{
    EventSink, HttpSink, HttpSinkBuilder, MemorySink, OpenMeterSink, OpenMeterSinkBuilder, ShutdownReport,
    SinkStats, StdoutSink,
};
pub use stats::{MeteringStats, StatsSnapshot};
pub use subject::{MissingSubject, Subject, SubjectChain};
pub use usage::{Api, TokenType, Usage};
