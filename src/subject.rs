//! Who is billed: the [`Subject`] type and the chain of sources that resolves it.
//!
//! OpenMeter keys usage on the CloudEvent `subject`, which must be a non-empty JSON string. A
//! [`Subject`] can only be built from a non-empty, non-blank string, and it serializes as a
//! plain JSON string, so an array, a number or `null` can never reach OpenMeter.
//!
//! # Trust
//!
//! The body `user` field is chosen by the client. Anyone who can call your gateway can put
//! another customer's id there and bill them. Use [`Subject::body_user`] only where the client
//! is trusted, or as a label behind a trusted source. The secure pattern is an authentication
//! middleware that maps the caller's credential to a customer id and stores it as a request
//! extension, read with [`Subject::extension`]:
//!
//! ```
//! use tower_openmeter::Subject;
//!
//! #[derive(Clone)]
//! struct CustomerId(String);
//! impl AsRef<str> for CustomerId {
//!     fn as_ref(&self) -> &str { &self.0 }
//! }
//!
//! // Set by your auth middleware: `request.extensions_mut().insert(CustomerId(..))`.
//! let chain = Subject::extension::<CustomerId>().or_header("x-customer");
//! # let _ = chain;
//! ```

use std::fmt;
use std::sync::Arc;

use http::request::Parts;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::request::{RequestFields, UserField};

/// The customer that usage is billed to: a non-empty string that is not only white space.
///
/// ```
/// use tower_openmeter::Subject;
///
/// let s = Subject::new("customer-1").unwrap();
/// assert_eq!(serde_json::to_string(&s).unwrap(), r#""customer-1""#);
/// assert!(Subject::new("").is_none());
/// assert!(Subject::new("  ").is_none());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(Arc<str>);

impl Subject {
    /// Makes a subject, or `None` when `value` is empty or only white space.
    pub fn new(value: impl AsRef<str>) -> Option<Self> {
        let value = value.as_ref();
        if value.trim().is_empty() {
            None
        } else {
            Some(Subject(Arc::from(value)))
        }
    }

    /// The subject as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Starts a chain with a request extension of type `T`, typically set by an authentication
    /// middleware. This is the source a client cannot forge.
    pub fn extension<T>() -> SubjectChain
    where
        T: AsRef<str> + Send + Sync + 'static,
    {
        SubjectChain::default().or_extension::<T>()
    }

    /// Starts a chain with a request header.
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name; this is a programming error found at start-up.
    pub fn header(name: &str) -> SubjectChain {
        SubjectChain::default().or_header(name)
    }

    /// Starts a chain with the request body's `user` field (client-chosen: see the module docs).
    pub fn body_user() -> SubjectChain {
        SubjectChain::default().or_body_user()
    }

    /// Starts a chain with a closure over the request head and the fields read from its body.
    pub fn from_fn<F>(f: F) -> SubjectChain
    where
        F: Fn(&Parts, &RequestFields) -> Option<String> + Send + Sync + 'static,
    {
        SubjectChain::default().or_fn(f)
    }
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Subject {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for Subject {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Subject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Subject::new(&*s).ok_or_else(|| serde::de::Error::custom("subject must be a non-empty string"))
    }
}

type ReadExtensionFn = dyn Fn(&http::Extensions) -> Option<String> + Send + Sync;
type ExtractFn = dyn Fn(&Parts, &RequestFields) -> Option<String> + Send + Sync;

#[derive(Clone)]
enum Source {
    Extension(Arc<ReadExtensionFn>, &'static str),
    Header(http::HeaderName),
    BodyUser,
    Fn(Arc<ExtractFn>),
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Extension(_, ty) => write!(f, "extension<{ty}>"),
            Source::Header(name) => write!(f, "header({name})"),
            Source::BodyUser => f.write_str("body user"),
            Source::Fn(_) => f.write_str("closure"),
        }
    }
}

/// Sources of the subject, tried in order until one yields a usable value.
///
/// A value is usable when it is a non-blank string no longer than the configured limit
/// ([`MeteringLayerBuilder::max_subject_len`](crate::MeteringLayerBuilder::max_subject_len),
/// 256 bytes by default). The body `user` may also be a JSON number, used as its decimal string;
/// `null`, arrays and objects count as missing.
#[derive(Clone, Debug, Default)]
pub struct SubjectChain {
    sources: Vec<Source>,
}

impl SubjectChain {
    /// Adds a request extension of type `T` as the next source.
    pub fn or_extension<T>(mut self) -> Self
    where
        T: AsRef<str> + Send + Sync + 'static,
    {
        let read = |ext: &http::Extensions| ext.get::<T>().map(|v| v.as_ref().to_owned());
        self.sources
            .push(Source::Extension(Arc::new(read), std::any::type_name::<T>()));
        self
    }

    /// Adds a request header as the next source. Header values that are not visible ASCII are
    /// ignored.
    ///
    /// # Panics
    ///
    /// When `name` is not a valid header name.
    pub fn or_header(mut self, name: &str) -> Self {
        let name = http::HeaderName::try_from(name).expect("SubjectChain::or_header: invalid header name");
        self.sources.push(Source::Header(name));
        self
    }

    /// Adds the body `user` field as the next source (client-chosen: see the module docs).
    pub fn or_body_user(mut self) -> Self {
        self.sources.push(Source::BodyUser);
        self
    }

    /// Adds a closure as the next source.
    pub fn or_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&Parts, &RequestFields) -> Option<String> + Send + Sync + 'static,
    {
        self.sources.push(Source::Fn(Arc::new(f)));
        self
    }

    /// Tries each source in order; `None` when none yields a usable subject.
    pub fn resolve(&self, parts: &Parts, fields: &RequestFields, max_len: usize) -> Option<Subject> {
        self.sources
            .iter()
            .find_map(|source| usable(source_value(source, parts, fields)?, max_len))
    }
}

/// What the head sources (extensions, headers) say before the body has been read, for
/// chains without a closure: the body `user` can then be taken later from a copy of the body.
#[derive(Clone, Debug)]
pub(crate) enum HeadSubject {
    /// Final: a source before the body `user` decided, or the chain does not read the body.
    Decided(Option<Subject>),
    /// The body `user` decides; failing it, this (the first source after it that yielded).
    AfterBodyUser(Option<Subject>),
}

impl HeadSubject {
    /// The subject once the body's fields are known.
    pub(crate) fn with_body(self, fields: &RequestFields, max_len: usize) -> Option<Subject> {
        match self {
            HeadSubject::Decided(subject) => subject,
            HeadSubject::AfterBodyUser(after) => {
                body_user(fields).and_then(|user| usable(user, max_len)).or(after)
            }
        }
    }
}

impl SubjectChain {
    /// Whether a closure source is in the chain: closures see the body's fields, so the body
    /// must be read before the inner service is called.
    pub(crate) fn has_closure(&self) -> bool {
        self.sources.iter().any(|s| matches!(s, Source::Fn(_)))
    }

    /// Tries the head sources now; see [`HeadSubject`]. Closure sources are skipped (callers
    /// with a closure in the chain use [`SubjectChain::resolve`]).
    pub(crate) fn resolve_head(&self, parts: &Parts, max_len: usize) -> HeadSubject {
        let no_body = RequestFields::default();
        let mut after_body_user = None;
        let mut body_user_seen = false;
        for source in &self.sources {
            match source {
                Source::BodyUser => body_user_seen = true,
                Source::Fn(_) => {}
                _ => {
                    let Some(subject) =
                        source_value(source, parts, &no_body).and_then(|v| usable(v, max_len))
                    else {
                        continue;
                    };
                    if !body_user_seen {
                        return HeadSubject::Decided(Some(subject));
                    }
                    after_body_user.get_or_insert(subject);
                }
            }
        }
        if body_user_seen {
            HeadSubject::AfterBodyUser(after_body_user)
        } else {
            HeadSubject::Decided(None)
        }
    }
}

fn body_user(fields: &RequestFields) -> Option<String> {
    match &fields.user {
        Some(UserField::String(s)) => Some(s.clone()),
        Some(UserField::Number(n)) => Some(n.clone()),
        _ => None,
    }
}

fn source_value(source: &Source, parts: &Parts, fields: &RequestFields) -> Option<String> {
    match source {
        Source::Extension(read, _) => read(&parts.extensions),
        Source::Header(name) => parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        Source::BodyUser => body_user(fields),
        Source::Fn(f) => f(parts, fields),
    }
}

fn usable(value: String, max_len: usize) -> Option<Subject> {
    if value.len() > max_len {
        return None;
    }
    Subject::new(value)
}

/// What to do when no source yields a subject. Either way the outcome is counted in
/// [`MeteringStats`](crate::MeteringStats).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MissingSubject {
    /// Bill the usage to this subject (default: `"unknown"`), so no usage is lost.
    Fallback(Subject),
    /// Emit no event for the request.
    Skip,
}

impl Default for MissingSubject {
    fn default() -> Self {
        MissingSubject::Fallback(Subject(Arc::from("unknown")))
    }
}
