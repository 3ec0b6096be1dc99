//! What happens to one metered request: deciding from the response head whether to inspect the
//! body, and turning what the body said into a [`UsageRecord`] and events.

use std::sync::Arc;
use std::time::SystemTime;

use http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use http::response;
use serde_json::{Map, Value};

use crate::capture::CaptureSlot;
use crate::inspect::{Inspection, Inspector};
use crate::layer::Config;
use crate::subject::HeadSubject;
use crate::usage::ResponseSummary;
use crate::{Api, MissingSubject, RequestFields, Subject, UsageRecord, UsageSource};

/// How a response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// All of it reached the client.
    Complete,
    /// The body failed (upstream error).
    Error,
    /// The body was dropped before its end (client gone, timeout).
    Dropped,
}

/// The request body's fields: read before the inner service was called, or from the copy
/// taken while it read the body.
pub(crate) enum RequestSide {
    Read(RequestFields),
    Captured(Arc<CaptureSlot>),
}

/// A metered request waiting for its response.
pub(crate) struct Meter {
    config: Arc<Config>,
    api: Api,
    subject: HeadSubject,
    request: RequestSide,
    started: SystemTime,
    labels: Map<String, Value>,
    usage_injected: bool,
}

impl Meter {
    pub(crate) fn new(
        config: Arc<Config>,
        api: Api,
        subject: HeadSubject,
        request: RequestSide,
        started: SystemTime,
        labels: Map<String, Value>,
    ) -> Self {
        Meter {
            config,
            api,
            subject,
            request,
            started,
            labels,
            usage_injected: false,
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn api(&self) -> Api {
        self.api
    }

    /// Marks the request as rewritten to ask for stream usage the client did not ask for.
    pub(crate) fn set_usage_injected(&mut self, injected: bool) {
        self.usage_injected = injected;
    }

    /// Whether the request was rewritten to ask for stream usage.
    pub(crate) fn usage_injected(&self) -> bool {
        self.usage_injected
    }

    /// Decides from the response head how to read the body; `None` when it is not metered.
    pub(crate) fn start_response(self, head: &response::Parts) -> Option<Box<ActiveMeter>> {
        let stats = &self.config.stats;
        if !(self.config.meter_status)(head.status) {
            stats.incr(|c| &c.skipped_status);
            tracing::debug!(status = %head.status, api = self.api.as_str(), "response not metered: status");
            return None;
        }
        match Inspector::for_response(&head.headers, &self) {
            Some(inspector) => Some(Box::new(ActiveMeter {
                meter: self,
                inspector,
            })),
            None => {
                stats.incr(|c| &c.unparsed_response);
                tracing::debug!(
                    content_type = ?head.headers.get(CONTENT_TYPE),
                    content_encoding = ?head.headers.get(CONTENT_ENCODING),
                    api = self.api.as_str(),
                    "response not metered: unsupported content type or encoding"
                );
                None
            }
        }
    }

    /// Turns what the body said into events and hands them to the sink.
    fn conclude(mut self, inspection: Inspection, ended: Ended) {
        let request = match std::mem::replace(&mut self.request, RequestSide::Read(RequestFields::default()))
        {
            RequestSide::Read(fields) => fields,
            RequestSide::Captured(slot) => slot.fields(&self.config.stats),
        };
        let stats = &self.config.stats;
        let complete = ended == Ended::Complete;
        let summary = match inspection {
            Inspection::OverCap => {
                stats.incr(|c| &c.response_over_cap);
                tracing::warn!(
                    api = self.api.as_str(),
                    "response over the inspection cap: not metered"
                );
                return;
            }
            Inspection::Unparsed if complete => {
                stats.incr(|c| &c.unparsed_response);
                tracing::warn!(
                    api = self.api.as_str(),
                    "response body could not be parsed: not metered"
                );
                return;
            }
            Inspection::Unparsed => ResponseSummary::default(),
            Inspection::Summary(summary) => summary,
        };
        if summary.anomalies > 0 {
            stats.add(|c| &c.usage_anomalies, u64::from(summary.anomalies));
            tracing::warn!(
                anomalies = summary.anomalies,
                api = self.api.as_str(),
                "usage had invalid fields"
            );
        }
        let (usage, usage_source) = match summary.usage {
            Some(usage) => (usage, UsageSource::Provider),
            None if complete && !request.stream => {
                stats.incr(|c| &c.skipped_no_usage);
                tracing::debug!(api = self.api.as_str(), "response reported no usage");
                return;
            }
            None => {
                if complete {
                    // A finished stream without usage is billable work whose count was lost:
                    // record it as missing rather than drop it silently.
                    tracing::warn!(
                        api = self.api.as_str(),
                        "stream carried no usage (the client did not ask for \
                         stream_options.include_usage; see ensure_stream_usage): metered as missing"
                    );
                }
                stats.incr(|c| &c.usage_missing);
                (Default::default(), UsageSource::Missing)
            }
        };
        if !complete {
            stats.incr(|c| &c.responses_incomplete);
            tracing::warn!(
                api = self.api.as_str(),
                ?ended,
                "response ended early: metered as incomplete"
            );
        }
        let Some(subject) = self.resolve_subject(&request) else {
            return;
        };
        let config = &self.config;
        let record = UsageRecord {
            id: crate::record::new_record_id(),
            subject,
            model: summary.model.or(request.model),
            provider: config
                .provider
                .clone()
                .unwrap_or_else(|| self.api.provider().to_owned()),
            api: self.api,
            usage,
            time: self.started,
            response_id: summary.response_id,
            stream: request.stream,
            complete,
            usage_source,
            labels: self.labels,
        };
        let events = config.shape.events(&record, &config.source, &config.event_type);
        stats.incr(|c| &c.requests_metered);
        stats.add(|c| &c.events_emitted, events.len() as u64);
        config.sink.send_all(events);
    }

    /// The subject the chain resolves to, or the missing-subject policy's answer.
    fn resolve_subject(&self, request: &RequestFields) -> Option<Subject> {
        let stats = &self.config.stats;
        if let Some(subject) = self
            .subject
            .clone()
            .with_body(request, self.config.max_subject_len)
        {
            return Some(subject);
        }
        match &self.config.missing_subject {
            MissingSubject::Fallback(fallback) => {
                stats.incr(|c| &c.subject_fallback);
                tracing::debug!(subject = %fallback, "no subject found: using the fallback");
                Some(fallback.clone())
            }
            MissingSubject::Skip => {
                stats.incr(|c| &c.subject_skipped);
                tracing::warn!(
                    api = self.api.as_str(),
                    "no subject found: usage not metered (policy: skip)"
                );
                None
            }
        }
    }
}

/// A response body being inspected.
pub(crate) struct ActiveMeter {
    meter: Meter,
    inspector: Inspector,
}

impl ActiveMeter {
    pub(crate) fn observe(&mut self, data: &bytes::Bytes) {
        self.inspector.observe(data);
    }

    pub(crate) fn finish(self, ended: Ended) {
        let ActiveMeter { meter, inspector } = self;
        let inspection = inspector.finish(meter.api, &meter.config, ended == Ended::Complete);
        meter.conclude(inspection, ended);
    }
}
