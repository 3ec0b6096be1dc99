//! What one attempt to post a batch came to: delivered, rejected for good, or worth retrying.

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;

use super::retry::parse_retry_after;

/// The most of an error response's body that is read to find the problem `detail`.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// The result of one attempt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Any 2xx.
    Delivered,
    /// A status that retrying cannot fix (400, 401, 403, other 4xx but 408 and 429, 3xx).
    Rejected { status: StatusCode, detail: String },
    /// 408, 429, 5xx, a timeout or a connection error; `after` is the server's `Retry-After`.
    Retry { reason: String, after: Option<Duration> },
}

/// Classifies a response, reading at most [`MAX_ERROR_BODY`] bytes of its body.
pub(crate) async fn classify(mut response: reqwest::Response) -> Outcome {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| parse_retry_after(value, SystemTime::now()));
    let mut body = Vec::new();
    // Reading the body (even of a 2xx) lets the connection go back to the pool.
    while body.len() < MAX_ERROR_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    classify_parts(status, retry_after, &body)
}

/// Classifies a transport failure: always retryable.
pub(crate) fn classify_error(error: &reqwest::Error) -> Outcome {
    let kind = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    Outcome::Retry {
        reason: format!("{kind}: {error}"),
        after: None,
    }
}

/// Classifies a status, its `Retry-After` and its body.
pub(crate) fn classify_parts(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Outcome {
    if status.is_success() {
        return Outcome::Delivered;
    }
    let detail = problem_detail(status, body);
    let retryable = status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error();
    if retryable {
        Outcome::Retry {
            reason: format!("HTTP {}: {detail}", status.as_u16()),
            after: retry_after,
        }
    } else {
        Outcome::Rejected { status, detail }
    }
}

/// The RFC 7807 `detail` of an `application/problem+json` body; else its `title`; else the
/// status's reason phrase.
pub(crate) fn problem_detail(status: StatusCode, body: &[u8]) -> String {
    let problem = serde_json::from_slice::<serde_json::Value>(body).ok();
    let member = |name: &str| {
        problem
            .as_ref()
            .and_then(|p| p.get(name))
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    member("detail")
        .or_else(|| member("title"))
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("unknown status").to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).unwrap()
    }

    #[test]
    fn any_2xx_is_delivered() {
        for code in [200, 201, 202, 204] {
            assert_eq!(classify_parts(status(code), None, b""), Outcome::Delivered);
        }
    }

    #[test]
    fn client_errors_are_rejected_with_the_problem_detail() {
        let body = br#"{"type":"about:blank","title":"Bad Request","status":400,"detail":"no events found"}"#;
        assert_eq!(
            classify_parts(status(400), None, body),
            Outcome::Rejected {
                status: status(400),
                detail: "no events found".into()
            }
        );
        let untitled = br#"{"title":"Unauthorized","detail":""}"#;
        assert_eq!(
            classify_parts(status(401), None, untitled),
            Outcome::Rejected {
                status: status(401),
                detail: "Unauthorized".into()
            }
        );
        for code in [302, 403, 404, 409, 412, 413, 422] {
            assert!(
                matches!(
                    classify_parts(status(code), None, b"<html>"),
                    Outcome::Rejected { .. }
                ),
                "{code}"
            );
        }
    }

    #[test]
    fn throttling_timeouts_and_server_errors_are_retried() {
        let after = Some(Duration::from_secs(1));
        assert_eq!(
            classify_parts(status(429), after, b""),
            Outcome::Retry {
                reason: "HTTP 429: Too Many Requests".into(),
                after
            }
        );
        for code in [408, 500, 502, 503, 504] {
            assert!(
                matches!(
                    classify_parts(status(code), None, b""),
                    Outcome::Retry { after: None, .. }
                ),
                "{code}"
            );
        }
    }
}
