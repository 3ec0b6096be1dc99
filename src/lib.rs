//! Meter LLM token usage at the HTTP layer and bill it through [OpenMeter](https://openmeter.io).
//!
//! [`MeteringLayer`] wraps any tower HTTP service that serves OpenAI-compatible APIs (chat
//! completions, completions, embeddings, the Responses API) or Anthropic's Messages API. For
//! each metered request it reads the `usage` block of the response as the bytes stream past
//! (JSON, or a `text/event-stream`), partitions the tokens into disjoint types (input, cache
//! read, cache write, output), and hands [`CloudEvent`]s keyed on a customer [`Subject`] to an
//! [`EventSink`].
//!
//! Metering never changes a response and never fails a request: every frame is forwarded at
//! once and unchanged, and anything the layer cannot meter is passed through and counted in
//! [`MeteringStats`].
//!
//! # In production
//!
//! [`OpenMeterSink`] queues events (bounded; `send` never blocks), posts them in batches, retries
//! with the same ids so OpenMeter's deduplication makes delivery exact, and flushes on
//! [`OpenMeterSink::shutdown`]. Take the subject from your authentication middleware, not from
//! the client-chosen body `user` (see [`Subject`]):
//!
//! ```no_run
//! use std::time::Duration;
//! use axum::{Router, routing::post};
//! use tower_openmeter::{MeteringLayer, OpenMeterSink, Subject};
//!
//! #[derive(Clone)]
//! struct CustomerId(String); // inserted as a request extension by your auth middleware
//! impl AsRef<str> for CustomerId {
//!     fn as_ref(&self) -> &str { &self.0 }
//! }
//!
//! # async fn chat() -> &'static str { "" }
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let sink = OpenMeterSink::from_env()?; // OPENMETER_URL, OPENMETER_API_KEY
//! let app: Router = Router::new()
//!     .route("/v1/chat/completions", post(chat))
//!     .layer(
//!         MeteringLayer::builder()
//!             .sink(sink.clone())
//!             .source("my-gateway")
//!             .subject(Subject::extension::<CustomerId>().or_header("x-customer"))
//!             .build(),
//!     );
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).with_graceful_shutdown(async {
//!     let _ = tokio::signal::ctrl_c().await;
//! }).await?;
//! let report = sink.shutdown(Duration::from_secs(10)).await; // flush what is queued
//! assert!(report.is_lossless());
//! # Ok(()) }
//! ```
//!
//! # Where things are
//!
//! - Which requests are metered, the request body and the subject: [`MeteringLayer`],
//!   [`MeteringLayerBuilder`], [`Subject`], [`SubjectChain`].
//! - The token partition of each API: [`Usage`]; the events made from it: [`EventShape`],
//!   [`UsageRecord`].
//! - Streams, compression and layer order: [`MeteredBody`].
//! - Sinks: [`sink`] ([`OpenMeterSink`], [`HttpSink`], [`MemorySink`] for tests,
//!   [`StdoutSink`]); with the `spool` feature, a durable disk spool (`spool` module).
//! - Counters: [`MeteringStats`] for the layer, [`SinkStats`] for a sink.
//!
//! # Features
//!
//! `rustls` (default) or `native-tls` for the OpenMeter client's TLS; `metrics` to record
//! sink statistics through the `metrics` facade; `spool` for the disk spool.
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
