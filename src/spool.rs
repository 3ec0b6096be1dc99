//! A durable on-disk spool of serialized CloudEvents (crate feature `spool`).
//!
//! [`Spool`] is a small, crash-safe FIFO store on top of [`redb`](https://docs.rs/redb), an
//! embedded, pure-Rust, copy-on-write B-tree database with ACID transactions. Events are
//! stored as the exact JSON they will be posted with, so an event that survives a crash is
//! redelivered with its original `id`, and OpenMeter's deduplication on `source` + `id` makes
//! the redelivery exact.
//!
//! Events are grouped into **records** of up to [`record_events`](Spool::set_record_events)
//! events (a JSON array, ready to be posted), each under a monotonic `u64` key: one B-tree
//! entry per record rather than per event keeps the cost per event near a `memcpy`.
//!
//! - [`append`](Spool::append) writes a group of events in **one** transaction (one `fsync`):
//!   when it returns `Ok`, every event it counted as committed is on disk and survives a crash
//!   of the process or of the machine.
//! - [`oldest`](Spool::oldest) / [`read_after`](Spool::read_after) read whole records in key
//!   order, without removing anything.
//! - [`remove`](Spool::remove) deletes records once the delivery of their events is settled.
//! - The spool is bounded by [`max_bytes`](Spool::max_bytes) of stored records. Events that
//!   do not fit are handled by the [`OverflowPolicy`]: drop the newest events (the ones being
//!   appended) or evict the oldest records, and the counts are returned so they can be reported.
//!
//! All methods block on disk I/O: call them from a blocking thread (e.g.
//! `tokio::task::spawn_blocking`), never from an async task or the request path.
//!
//! Only one process can have a spool open at a time (the file is locked); a second
//! [`Spool::open`] fails with [`SpoolErrorKind::Locked`]. The lock is released when the process
//! exits, even by `SIGKILL`, and redb repairs the file on the next open if needed.
//!
//! ```
//! use tower_openmeter::spool::{OverflowPolicy, Spool};
//!
//! # fn main() -> Result<(), tower_openmeter::spool::SpoolError> {
//! let dir = std::env::temp_dir().join(format!("spool-doc-{}", std::process::id()));
//! # let _ = std::fs::remove_dir_all(&dir);
//! let spool = Spool::open(&dir, 1 << 20, OverflowPolicy::DropNewest)?;
//! let appended = spool.append([br#"{"id":"a"}"#.as_slice(), br#"{"id":"b"}"#])?;
//! assert_eq!((appended.committed, spool.len()), (2, 2));
//!
//! let records = spool.oldest(100)?;
//! assert_eq!(records[0].json, br#"[{"id":"a"},{"id":"b"}]"#);
//! assert_eq!(records[0].events, 2);
//! // ... post the records; once OpenMeter has acknowledged them:
//! spool.remove(records.iter().map(|record| record.key))?;
//! assert_eq!(spool.len(), 0);
//! # drop(spool);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use redb::{Database, Durability, ReadableTable, TableDefinition};

/// The file inside the spool directory.
pub const SPOOL_FILE_NAME: &str = "events.redb";

/// Records by key, in append order. A record is a little-endian `u32` event count followed by
/// a JSON array of that many events.
const RECORDS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("records");
/// `next_key`, `bytes` and `events`, updated in the same transaction as `RECORDS`.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const META_NEXT_KEY: &str = "next_key";
const META_BYTES: &str = "bytes";
const META_EVENTS: &str = "events";

/// The bytes a record takes beyond its events' JSON: the count and the brackets.
const RECORD_OVERHEAD: u64 = 4 + 2;

/// Events per record unless set.
pub const DEFAULT_RECORD_EVENTS: usize = 100;

/// Every this many removals without an append, one is made durable, so that a long drain
/// with no new events does not keep redb from reusing the freed pages.
const SYNC_EVERY_REMOVES: u32 = 16;

/// What to drop when an append would take the spool past its byte bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OverflowPolicy {
    /// Keep what is spooled; drop the events being appended that do not fit (the default,
    /// like the in-memory queue when it is full).
    #[default]
    DropNewest,
    /// Evict the oldest spooled records until the new events fit. (A record being posted at
    /// that moment may still be delivered; its events then count as delivered and as dropped.)
    DropOldest,
}

/// What one [`Spool::append`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Appended {
    /// Events written and durably committed.
    pub committed: u64,
    /// Events of this append dropped because they did not fit ([`OverflowPolicy::DropNewest`]),
    /// or because a single event is larger than the whole bound (under either policy).
    pub dropped_newest: u64,
    /// Older spooled events evicted, whole records at a time, to make room
    /// ([`OverflowPolicy::DropOldest`]).
    pub evicted_oldest: u64,
    /// The key of the first record written, if any; the others follow in order.
    pub first_key: Option<u64>,
}

/// One spooled record: its key and its events, as the JSON array they are posted as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Monotonic within one spool file, never reused.
    pub key: u64,
    /// How many events `json` holds (0 for a damaged record, whose `json` is empty).
    pub events: u32,
    /// The serialized CloudEvents, a JSON array: `[{...},{...}]`.
    pub json: Vec<u8>,
}

impl Record {
    /// The events' JSON without the array brackets, to join records into one batch.
    pub fn inner_json(&self) -> &[u8] {
        match self.json.as_slice() {
            [b'[', inner @ .., b']'] => inner,
            _ => &[],
        }
    }
}

/// Reads a stored record value: its event count and its JSON array. `None` if damaged.
fn decode(value: &[u8]) -> Option<(u32, &[u8])> {
    let (count, json) = value.split_first_chunk::<4>()?;
    let count = u32::from_le_bytes(*count);
    let well_formed =
        count > 0 && json.len() >= 2 && json.first() == Some(&b'[') && json.last() == Some(&b']');
    well_formed.then_some((count, json))
}

/// The event count of a stored record; 0 if damaged.
fn events_of(value: &[u8]) -> u64 {
    decode(value).map_or(0, |(count, _)| u64::from(count))
}
/// The kind of a [`SpoolError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpoolErrorKind {
    /// Another process (or another `Spool` in this one) has the spool open.
    Locked,
    /// The file is not a spool, is corrupted beyond repair, or was written by an incompatible
    /// version. Move it aside to start a new spool; its events are lost to this process.
    Corrupt,
    /// The file system failed (disk full, permissions, I/O error).
    Io,
    /// Any other storage failure.
    Store,
}

/// An error of the spool's store.
#[derive(Debug)]
pub struct SpoolError {
    kind: SpoolErrorKind,
    source: Box<dyn StdError + Send + Sync>,
}

impl SpoolError {
    /// What went wrong, broadly.
    pub fn kind(&self) -> SpoolErrorKind {
        self.kind
    }
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            SpoolErrorKind::Locked => "spool is open elsewhere",
            SpoolErrorKind::Corrupt => "spool file is unreadable",
            SpoolErrorKind::Io => "spool I/O failed",
            SpoolErrorKind::Store => "spool store failed",
        };
        write!(f, "{what}: {}", self.source)
    }
}

impl StdError for SpoolError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.source)
    }
}

impl From<std::io::Error> for SpoolError {
    fn from(error: std::io::Error) -> Self {
        SpoolError {
            kind: SpoolErrorKind::Io,
            source: Box::new(error),
        }
    }
}

/// Every redb error converts into `redb::Error`; classify that.
fn store_error(error: impl Into<redb::Error>) -> SpoolError {
    let error = error.into();
    let kind = match &error {
        redb::Error::DatabaseAlreadyOpen => SpoolErrorKind::Locked,
        redb::Error::Corrupted(_)
        | redb::Error::UpgradeRequired(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TypeDefinitionChanged { .. }
        | redb::Error::TableIsMultimap(_) => SpoolErrorKind::Corrupt,
        redb::Error::Io(_) | redb::Error::PreviousIo => SpoolErrorKind::Io,
        _ => SpoolErrorKind::Store,
    };
    SpoolError {
        kind,
        source: Box::new(error),
    }
}

/// The committed bookkeeping, changed only after a successful commit.
#[derive(Clone, Copy, Debug)]
struct Meta {
    next_key: u64,
    bytes: u64,
    /// Events, over all records.
    events: u64,
    /// Removals committed without an fsync since the last durable commit.
    unsynced_removes: u32,
}

/// A durable, byte-bounded FIFO of serialized events. See the [module docs](self).
pub struct Spool {
    db: Database,
    path: PathBuf,
    max_bytes: u64,
    policy: OverflowPolicy,
    record_events: usize,
    /// Held for the whole of every write transaction, so the bookkeeping follows the commits.
    meta: Mutex<Meta>,
    /// Lock-free mirrors of `meta` for statistics and readers.
    len: AtomicU64,
    bytes: AtomicU64,
    next_key: AtomicU64,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.path)
            .field("max_bytes", &self.max_bytes)
            .field("policy", &self.policy)
            .field("record_events", &self.record_events)
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// A record being filled by [`Spool::append`].
struct Pending {
    json: Vec<u8>,
    events: u32,
}

impl Pending {
    fn new() -> Self {
        Pending {
            json: vec![0, 0, 0, 0, b'['],
            events: 0,
        }
    }

    /// The stored size of the record with one more event of `size` bytes.
    fn size_with(&self, size: u64) -> u64 {
        if self.events == 0 {
            size + RECORD_OVERHEAD
        } else {
            self.json.len() as u64 + 1 + size + 1
        }
    }

    fn push(&mut self, json: &[u8]) {
        if self.events > 0 {
            self.json.push(b',');
        }
        self.json.extend_from_slice(json);
        self.events += 1;
    }

    /// The stored value, and a fresh pending record in its place.
    fn finish(&mut self) -> (Vec<u8>, u32) {
        let mut done = std::mem::replace(self, Pending::new());
        done.json.push(b']');
        done.json[..4].copy_from_slice(&done.events.to_le_bytes());
        (done.json, done.events)
    }
}

impl Spool {
    /// Opens the spool in directory `dir` (created if missing; the file is
    /// [`SPOOL_FILE_NAME`]), keeping at most `max_bytes` of stored records (the events' JSON
    /// plus a few bytes per record). Records left by a previous run are kept, in order, with
    /// their keys; new keys continue after them.
    ///
    /// # Errors
    ///
    /// [`SpoolErrorKind::Locked`] if the spool is open elsewhere, [`SpoolErrorKind::Corrupt`]
    /// if the file cannot be read as a spool, [`SpoolErrorKind::Io`] for file-system errors.
    pub fn open(dir: impl AsRef<Path>, max_bytes: u64, policy: OverflowPolicy) -> Result<Spool, SpoolError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let path = dir.join(SPOOL_FILE_NAME);
        let mut db = Database::create(&path).map_err(store_error)?;
        let meta = Self::recover(&db)?;
        if meta.events == 0 {
            // Give the space of a drained spool back to the file system. Best effort.
            if let Err(error) = db.compact() {
                tracing::debug!(%error, "spool compaction skipped");
            }
        }
        Ok(Spool {
            db,
            path,
            max_bytes,
            policy,
            record_events: DEFAULT_RECORD_EVENTS,
            len: AtomicU64::new(meta.events),
            bytes: AtomicU64::new(meta.bytes),
            next_key: AtomicU64::new(meta.next_key),
            meta: Mutex::new(meta),
        })
    }

    /// Sets how many events a record holds at most (default [`DEFAULT_RECORD_EVENTS`]; at
    /// least 1). A reader that posts whole records gets batches of about this size.
    pub fn set_record_events(&mut self, events: usize) {
        self.record_events = events.clamp(1, u32::MAX as usize);
    }

    /// Creates the tables if needed and reads (or rebuilds) the bookkeeping.
    fn recover(db: &Database) -> Result<Meta, SpoolError> {
        let txn = db.begin_write().map_err(store_error)?;
        let meta = {
            let records = txn.open_table(RECORDS).map_err(store_error)?;
            let mut meta_table = txn.open_table(META).map_err(store_error)?;
            let stored = |key: &str| -> Result<Option<u64>, SpoolError> {
                Ok(meta_table.get(key).map_err(store_error)?.map(|v| v.value()))
            };
            let (stored_next, stored_bytes, stored_events) =
                (stored(META_NEXT_KEY)?, stored(META_BYTES)?, stored(META_EVENTS)?);
            let last_key = records.last().map_err(store_error)?.map(|(k, _)| k.value());
            // Never reuse a key, even if the bookkeeping were missing or behind.
            let after_last = last_key.map_or(0, |k| k.saturating_add(1));
            let next_key = stored_next.unwrap_or(0).max(after_last);
            let (bytes, events) = match (stored_bytes, stored_events) {
                (Some(bytes), Some(events)) => (bytes, events),
                _ => {
                    let (mut bytes, mut events) = (0u64, 0u64);
                    for entry in records.iter().map_err(store_error)? {
                        let (_, value) = entry.map_err(store_error)?;
                        bytes = bytes.saturating_add(value.value().len() as u64);
                        events = events.saturating_add(events_of(value.value()));
                    }
                    (bytes, events)
                }
            };
            meta_table.insert(META_NEXT_KEY, next_key).map_err(store_error)?;
            meta_table.insert(META_BYTES, bytes).map_err(store_error)?;
            meta_table.insert(META_EVENTS, events).map_err(store_error)?;
            Meta {
                next_key,
                bytes,
                events,
                unsynced_removes: 0,
            }
        };
        txn.commit().map_err(store_error)?;
        Ok(meta)
    }

    /// Appends events in one durable transaction, in records of at most
    /// [`record_events`](Self::set_record_events), applying the byte bound.
    ///
    /// Returns once the transaction is committed to disk. On error nothing of this call is
    /// written (the transaction is rolled back) and the caller still holds the events.
    ///
    /// # Errors
    ///
    /// Storage failures, e.g. [`SpoolErrorKind::Io`] when the disk is full.
    pub fn append<I>(&self, events: I) -> Result<Appended, SpoolError>
    where
        I: IntoIterator,
        I::Item: AsRef<[u8]>,
    {
        let mut events = events.into_iter().peekable();
        if events.peek().is_none() {
            return Ok(Appended::default());
        }
        let mut guard = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        let mut meta = *guard;
        let mut appended = Appended::default();
        let txn = self.db.begin_write().map_err(store_error)?;
        {
            let mut table = txn.open_table(RECORDS).map_err(store_error)?;
            let mut pending = Pending::new();
            for event in events {
                let json = event.as_ref();
                let size = json.len() as u64;
                if size + RECORD_OVERHEAD > self.max_bytes {
                    appended.dropped_newest += 1;
                    continue;
                }
                // The committed bytes plus the record being filled, with this event.
                let fits = |meta: &Meta, pending: &Pending| {
                    meta.bytes.saturating_add(pending.size_with(size)) <= self.max_bytes
                };
                if !fits(&meta, &pending) {
                    let mut evicted_enough = false;
                    if self.policy == OverflowPolicy::DropOldest {
                        while !fits(&meta, &pending) {
                            let Some((_, old)) = table.pop_first().map_err(store_error)? else {
                                break;
                            };
                            let old = old.value();
                            meta.bytes = meta.bytes.saturating_sub(old.len() as u64);
                            let count = events_of(old);
                            meta.events = meta.events.saturating_sub(count);
                            appended.evicted_oldest += count;
                        }
                        evicted_enough = fits(&meta, &pending);
                    }
                    if !evicted_enough {
                        appended.dropped_newest += 1;
                        continue;
                    }
                }
                pending.push(json);
                appended.committed += 1;
                if pending.events as usize >= self.record_events {
                    insert_record(&mut table, &mut pending, &mut meta, &mut appended)?;
                }
            }
            if pending.events > 0 {
                insert_record(&mut table, &mut pending, &mut meta, &mut appended)?;
            }
            let mut meta_table = txn.open_table(META).map_err(store_error)?;
            meta_table
                .insert(META_NEXT_KEY, meta.next_key)
                .map_err(store_error)?;
            meta_table.insert(META_BYTES, meta.bytes).map_err(store_error)?;
            meta_table.insert(META_EVENTS, meta.events).map_err(store_error)?;
        }
        if appended.committed == 0 && appended.evicted_oldest == 0 {
            txn.abort().map_err(store_error)?;
            return Ok(appended);
        }
        txn.commit().map_err(store_error)?;
        meta.unsynced_removes = 0;
        *guard = meta;
        self.publish(meta);
        Ok(appended)
    }

    /// The oldest records, in key order, with `max_events` events in all at most (but always
    /// at least one record when any is spooled). Nothing is removed.
    ///
    /// # Errors
    ///
    /// Storage failures.
    pub fn oldest(&self, max_events: usize) -> Result<Vec<Record>, SpoolError> {
        self.read_after(None, max_events)
    }

    /// Like [`oldest`](Self::oldest), among the records with keys greater than `after` (all
    /// when `None`). A reader that has some records in flight passes the last key it took, to
    /// get the next ones without waiting for the first to be removed.
    ///
    /// A damaged record (not written by this version) is returned with no events and empty
    /// `json`, so that the reader removes it.
    ///
    /// # Errors
    ///
    /// Storage failures.
    pub fn read_after(&self, after: Option<u64>, max_events: usize) -> Result<Vec<Record>, SpoolError> {
        let start = match after {
            None => 0,
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(key) => key + 1,
        };
        if max_events == 0 {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read().map_err(store_error)?;
        let table = txn.open_table(RECORDS).map_err(store_error)?;
        let mut out = Vec::new();
        let mut total = 0usize;
        for entry in table.range(start..).map_err(store_error)? {
            let (key, value) = entry.map_err(store_error)?;
            let record = match decode(value.value()) {
                Some((events, json)) => Record {
                    key: key.value(),
                    events,
                    json: json.to_vec(),
                },
                None => Record {
                    key: key.value(),
                    events: 0,
                    json: Vec::new(),
                },
            };
            let events = record.events as usize;
            if !out.is_empty() && total + events > max_events {
                break;
            }
            total += events;
            out.push(record);
            if total >= max_events {
                break;
            }
        }
        Ok(out)
    }

    /// Removes the records with these keys in one transaction; keys not present (already
    /// removed or evicted) are skipped. Returns how many events were removed.
    ///
    /// The removal is not flushed to disk on its own (no `fsync`): it becomes durable with the
    /// next [`append`](Self::append), or with every 16th removal. After a crash in between,
    /// removed events can reappear; redelivered with their original ids, they are deduplicated
    /// by OpenMeter.
    ///
    /// # Errors
    ///
    /// Storage failures; then nothing is removed.
    pub fn remove<I>(&self, keys: I) -> Result<u64, SpoolError>
    where
        I: IntoIterator<Item = u64>,
    {
        let mut keys = keys.into_iter().peekable();
        if keys.peek().is_none() {
            return Ok(0);
        }
        let mut guard = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        let mut meta = *guard;
        let mut removed_records = 0u64;
        let mut removed_events = 0u64;
        let mut txn = self.db.begin_write().map_err(store_error)?;
        // A removal needs no fsync of its own: it becomes durable with the next append. A crash
        // before that brings settled events back, and they are posted again with their ids,
        // which OpenMeter deduplicates.
        if meta.unsynced_removes + 1 < SYNC_EVERY_REMOVES {
            txn.set_durability(Durability::Eventual);
        }
        {
            let mut table = txn.open_table(RECORDS).map_err(store_error)?;
            for key in keys {
                if let Some(old) = table.remove(key).map_err(store_error)? {
                    let old = old.value();
                    meta.bytes = meta.bytes.saturating_sub(old.len() as u64);
                    let count = events_of(old);
                    meta.events = meta.events.saturating_sub(count);
                    removed_events += count;
                    removed_records += 1;
                }
            }
            let mut meta_table = txn.open_table(META).map_err(store_error)?;
            meta_table.insert(META_BYTES, meta.bytes).map_err(store_error)?;
            meta_table.insert(META_EVENTS, meta.events).map_err(store_error)?;
        }
        if removed_records == 0 {
            txn.abort().map_err(store_error)?;
            return Ok(0);
        }
        txn.commit().map_err(store_error)?;
        meta.unsynced_removes = (meta.unsynced_removes + 1) % SYNC_EVERY_REMOVES;
        *guard = meta;
        self.publish(meta);
        Ok(removed_events)
    }

    fn publish(&self, meta: Meta) {
        self.len.store(meta.events, Ordering::Relaxed);
        self.bytes.store(meta.bytes, Ordering::Relaxed);
        self.next_key.store(meta.next_key, Ordering::Release);
    }

    /// The key the next appended record will get: every record ever committed has a smaller
    /// key. A reader holding a cursor (the last key it took) has records left to read when
    /// `next_key() > cursor + 1`, unless they were removed or evicted meanwhile.
    pub fn next_key(&self) -> u64 {
        self.next_key.load(Ordering::Acquire)
    }

    /// How many events are spooled.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no event is spooled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of stored records: the events' JSON plus a few bytes per record. (The file
    /// itself is larger: keys, B-tree pages, and free pages that redb reuses.)
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The bound on [`bytes`](Self::bytes).
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The policy applied when an append does not fit.
    pub fn policy(&self) -> OverflowPolicy {
        self.policy
    }

    /// The spool file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes a filled record under the next key.
fn insert_record(
    table: &mut redb::Table<'_, u64, &'static [u8]>,
    pending: &mut Pending,
    meta: &mut Meta,
    appended: &mut Appended,
) -> Result<(), SpoolError> {
    let (value, events) = pending.finish();
    let key = meta.next_key;
    table.insert(key, value.as_slice()).map_err(store_error)?;
    appended.first_key.get_or_insert(key);
    meta.next_key = key.saturating_add(1);
    meta.bytes = meta.bytes.saturating_add(value.len() as u64);
    meta.events += u64::from(events);
    Ok(())
}

/// How an [`OpenMeterSink`](crate::sink::OpenMeterSink) spools events on disk.
///
/// Events go from `send` into the sink's bounded in-memory queue, from there to the spool in
/// group commits (on a blocking thread, never on the request path), and are read
/// back from the spool for delivery, one record (up to `batch_size` events) per batch or more;
/// they are removed only once OpenMeter has acknowledged them (2xx) or rejected them for good
/// (400, 401, 403, ...: counted as rejected). Failing batches (408, 429, 5xx, timeouts,
/// connection errors) are retried with backoff **without a time limit**: `max_retry_elapsed`
/// does not apply, the byte bound (`max_bytes`) limits what an outage can pile up.
///
/// **The guarantee.** An event is durable once its group commit returns, at most
/// [`commit_interval`](Self::commit_interval) after `send` (sooner when
/// [`commit_max_events`](Self::commit_max_events) events are waiting), plus the time of one
/// commit. Durable events survive a crash of the process or the machine, long outages of
/// OpenMeter, and restarts: on start, they are delivered first, with their original ids, so
/// OpenMeter's deduplication makes the redelivery exact (an event acknowledged just before a
/// crash may be posted twice; it is counted once). What can still be lost:
/// - events accepted by `send` but not yet committed when the process dies (the window above,
///   plus whatever sits in the in-memory queue when the spool writer cannot keep up);
/// - events that do not fit: dropped from the in-memory queue when it is full, or by the
///   spool's [`OverflowPolicy`] when `max_bytes` is reached; all are counted;
/// - the whole spool, if its disk is lost, or if its file is corrupted beyond redb's repair.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    pub(crate) dir: PathBuf,
    pub(crate) max_bytes: u64,
    pub(crate) policy: OverflowPolicy,
    pub(crate) commit_interval: Duration,
    pub(crate) commit_max_events: usize,
}

impl SpoolConfig {
    /// The default bound on the spooled event JSON: 1 GiB (a few million events).
    pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
    /// The default longest wait before a group commit: 5 ms.
    pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(5);
    /// The default largest group commit: 1000 events.
    pub const DEFAULT_COMMIT_MAX_EVENTS: usize = 1000;

    /// Spools in directory `dir` (created if missing), with the defaults.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolConfig {
            dir: dir.into(),
            max_bytes: Self::DEFAULT_MAX_BYTES,
            policy: OverflowPolicy::default(),
            commit_interval: Self::DEFAULT_COMMIT_INTERVAL,
            commit_max_events: Self::DEFAULT_COMMIT_MAX_EVENTS,
        }
    }

    /// The bound on spooled event JSON (default [`DEFAULT_MAX_BYTES`](Self::DEFAULT_MAX_BYTES)).
    #[must_use]
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// What is dropped when the spool is full (default [`OverflowPolicy::DropNewest`]).
    #[must_use]
    pub fn overflow_policy(mut self, policy: OverflowPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The longest an event waits in memory for its group commit: the window in which a
    /// crash loses it (default 5 ms). Zero commits whatever is waiting at once.
    #[must_use]
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// The most events in one group commit; a full group commits without waiting for the
    /// interval (default 1000; at least 1).
    #[must_use]
    pub fn commit_max_events(mut self, events: usize) -> Self {
        self.commit_max_events = events.max(1);
        self
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn open(dir: &Path, max: u64, policy: OverflowPolicy, per_record: usize) -> Spool {
        let mut spool = Spool::open(dir, max, policy).unwrap();
        spool.set_record_events(per_record);
        spool
    }

    fn keys(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.key).collect()
    }

    #[test]
    fn append_read_remove_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 20, OverflowPolicy::DropNewest, 2);
        assert!(spool.is_empty());
        let a = spool.append(["a", "bb", "ccc"]).unwrap();
        assert_eq!((a.committed, a.first_key), (3, Some(0)));
        // [a,bb] and [ccc], each with a 4-byte count.
        assert_eq!((spool.len(), spool.bytes()), (3, 10 + 9));
        assert_eq!(spool.next_key(), 2);
        let all = spool.oldest(10).unwrap();
        assert_eq!(keys(&all), [0, 1]);
        assert_eq!((all[0].events, all[0].json.as_slice()), (2, b"[a,bb]".as_slice()));
        assert_eq!(all[0].inner_json(), b"a,bb");
        assert_eq!(keys(&spool.oldest(2).unwrap()), [0]);
        assert_eq!(keys(&spool.oldest(1).unwrap()), [0], "at least one record");
        assert_eq!(keys(&spool.read_after(Some(0), 10).unwrap()), [1]);
        assert!(spool.read_after(Some(u64::MAX), 10).unwrap().is_empty());
        assert!(spool.oldest(0).unwrap().is_empty());
        assert_eq!(spool.remove([0, 7]).unwrap(), 2);
        assert_eq!(spool.remove([0]).unwrap(), 0);
        assert_eq!((spool.len(), spool.bytes()), (1, 9));
        assert_eq!(spool.next_key(), 2, "removals do not move it");
        assert_eq!(spool.append(Vec::<Vec<u8>>::new()).unwrap(), Appended::default());
    }

    #[test]
    fn keys_stay_monotonic_across_reopen_even_when_drained() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = open(dir.path(), 1 << 20, OverflowPolicy::DropNewest, 1);
            spool.append(["x", "y"]).unwrap();
            spool.remove([0, 1]).unwrap();
        }
        let spool = open(dir.path(), 1 << 20, OverflowPolicy::DropNewest, 1);
        assert!(spool.is_empty());
        assert_eq!(spool.next_key(), 2, "restored on open");
        assert_eq!(spool.append(["z"]).unwrap().first_key, Some(2));
        assert_eq!(spool.next_key(), 3);
    }

    #[test]
    fn recovers_records_and_counts_after_an_unclean_drop() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 20, OverflowPolicy::DropNewest, 1);
        spool.append(["one", "two"]).unwrap();
        spool.remove([0]).unwrap();
        // The removal becomes durable with this append.
        spool.append(["three"]).unwrap();
        // Leak the handle, as a crash would: nothing is flushed beyond the commits. The file
        // lock belongs to the leaked handle, so read a copy of the file, as a new process would.
        std::mem::forget(spool);
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(
            dir.path().join(SPOOL_FILE_NAME),
            copy.path().join(SPOOL_FILE_NAME),
        )
        .unwrap();
        let spool = open(copy.path(), 1 << 20, OverflowPolicy::DropNewest, 1);
        let records = spool.oldest(10).unwrap();
        assert_eq!(keys(&records), [1, 2]);
        assert_eq!(records[1].json, b"[three]");
        assert_eq!((spool.len(), spool.bytes()), (2, 9 + 11));
        assert_eq!(spool.append(["four"]).unwrap().first_key, Some(3));
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_lives() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path(), 1 << 20, OverflowPolicy::DropNewest, 1);
        let second = Spool::open(dir.path(), 1 << 20, OverflowPolicy::DropNewest).unwrap_err();
        assert_eq!(second.kind(), SpoolErrorKind::Locked);
        assert!(second.to_string().contains("open elsewhere"));
        drop(first);
        open(dir.path(), 1 << 20, OverflowPolicy::DropNewest, 1);
    }

    #[test]
    fn a_file_that_is_not_a_spool_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        for garbage in [
            vec![0u8; 10],
            vec![0xffu8; 4096],
            b"redb\x1a\x0a\xa9\x0d\x0a garbage after the magic".to_vec(),
        ] {
            std::fs::write(dir.path().join(SPOOL_FILE_NAME), &garbage).unwrap();
            let error = Spool::open(dir.path(), 1 << 20, OverflowPolicy::DropNewest).unwrap_err();
            assert!(
                matches!(
                    error.kind(),
                    SpoolErrorKind::Corrupt | SpoolErrorKind::Io | SpoolErrorKind::Store
                ),
                "{error}"
            );
        }
    }

    #[test]
    fn damaged_records_are_returned_empty_for_removal() {
        assert_eq!(decode(b"\x02\0\0\0[a,b]"), Some((2, b"[a,b]".as_slice())));
        for bad in [
            &b""[..],
            b"\x01\0\0",
            b"\0\0\0\0[a]",
            b"\x01\0\0\0[a",
            b"\x01\0\0\0",
        ] {
            assert_eq!(decode(bad), None, "{bad:?}");
            assert_eq!(events_of(bad), 0);
        }
        let record = Record {
            key: 0,
            events: 0,
            json: Vec::new(),
        };
        assert_eq!(record.inner_json(), b"");
    }

    #[test]
    fn drop_newest_keeps_the_spool_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 20, OverflowPolicy::DropNewest, 100);
        // [1234,5678,9abc] takes 4 + 16 = 20 bytes; "d" no longer fits.
        let a = spool.append(["1234", "5678", "9abc", "d"]).unwrap();
        assert_eq!((a.committed, a.dropped_newest, a.evicted_oldest), (3, 1, 0));
        assert_eq!(spool.bytes(), 20);
        let b = spool.append(["z"]).unwrap();
        assert_eq!((b.committed, b.dropped_newest, b.first_key), (0, 1, None));
        assert_eq!(spool.len(), 3);
    }

    #[test]
    fn drop_oldest_evicts_whole_records_until_the_new_fits() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 30, OverflowPolicy::DropOldest, 2);
        spool.append(["1234", "5678", "abcd"]).unwrap(); // 4+11 and 4+6: 25 bytes
        assert_eq!(spool.bytes(), 25);
        let a = spool.append(["efghijkl"]).unwrap(); // 4+10: the first record goes
        assert_eq!((a.committed, a.evicted_oldest), (1, 2));
        assert_eq!(keys(&spool.oldest(10).unwrap()), [1, 2]);
        assert_eq!((spool.len(), spool.bytes()), (2, 10 + 14));
    }

    #[test]
    fn an_event_larger_than_the_bound_is_dropped_under_both_policies() {
        let dir = tempfile::tempdir().unwrap();
        for policy in [OverflowPolicy::DropNewest, OverflowPolicy::DropOldest] {
            let dir = dir.path().join(format!("{policy:?}"));
            let spool = open(&dir, 10, policy, 10);
            spool.append(["ab"]).unwrap();
            let a = spool.append(["too long"]).unwrap();
            assert_eq!((a.committed, a.dropped_newest, a.evicted_oldest), (0, 1, 0));
            assert_eq!(spool.len(), 1);
        }
    }

    /// The model: records of events, packed and bounded as the spool does.
    #[derive(Default)]
    struct Model {
        records: VecDeque<(u64, Vec<Vec<u8>>)>,
        next: u64,
    }

    fn stored(events: &[Vec<u8>]) -> u64 {
        RECORD_OVERHEAD + events.iter().map(|e| e.len() as u64 + 1).sum::<u64>() - 1
    }

    impl Model {
        fn bytes(&self) -> u64 {
            self.records.iter().map(|r| stored(&r.1)).sum()
        }

        fn append(&mut self, events: &[Vec<u8>], max: u64, policy: OverflowPolicy, per: usize) -> Appended {
            let mut out = Appended::default();
            let mut pending: Vec<Vec<u8>> = Vec::new();
            for json in events {
                if json.len() as u64 + RECORD_OVERHEAD > max {
                    out.dropped_newest += 1;
                    continue;
                }
                let with = |p: &Vec<Vec<u8>>| {
                    let mut p = p.clone();
                    p.push(json.clone());
                    stored(&p)
                };
                if self.bytes() + with(&pending) > max {
                    if policy == OverflowPolicy::DropOldest {
                        while self.bytes() + with(&pending) > max {
                            let Some(old) = self.records.pop_front() else {
                                break;
                            };
                            out.evicted_oldest += old.1.len() as u64;
                        }
                    }
                    if self.bytes() + with(&pending) > max {
                        out.dropped_newest += 1;
                        continue;
                    }
                }
                pending.push(json.clone());
                out.committed += 1;
                if pending.len() >= per {
                    out.first_key.get_or_insert(self.next);
                    self.records.push_back((self.next, std::mem::take(&mut pending)));
                    self.next += 1;
                }
            }
            if !pending.is_empty() {
                out.first_key.get_or_insert(self.next);
                self.records.push_back((self.next, pending));
                self.next += 1;
            }
            out
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Append(Vec<usize>),
        RemoveOldest(usize),
        RemoveAfter(usize, usize),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => prop::collection::vec(0usize..40, 0..8).prop_map(Op::Append),
            2 => (0usize..6).prop_map(Op::RemoveOldest),
            1 => (0usize..4, 0usize..6).prop_map(|(skip, n)| Op::RemoveAfter(skip, n)),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The spool behaves like a byte-bounded queue of records, across reopens.
        #[test]
        fn behaves_like_a_bounded_queue_of_records(
            ops in prop::collection::vec(op(), 1..25),
            oldest in any::<bool>(),
            per in 1usize..4,
        ) {
            let policy = if oldest { OverflowPolicy::DropOldest } else { OverflowPolicy::DropNewest };
            let max = 120u64;
            let dir = tempfile::tempdir().unwrap();
            let mut spool = Some(open(dir.path(), max, policy, per));
            let mut model = Model::default();
            for op in ops {
                let s = spool.as_ref().unwrap();
                match op {
                    Op::Append(sizes) => {
                        let events: Vec<Vec<u8>> = sizes
                            .iter()
                            .map(|&n| (0..n).map(|i| b'a' + ((model.next as usize + i) % 26) as u8).collect())
                            .collect();
                        let expect = model.append(&events, max, policy, per);
                        prop_assert_eq!(s.append(&events).unwrap(), expect);
                    }
                    Op::RemoveOldest(n) => {
                        let got = s.oldest(n).unwrap();
                        let removed = s.remove(got.iter().map(|r| r.key)).unwrap();
                        let taken: Vec<u64> = got.iter().map(|r| r.key).collect();
                        let events: u64 = model.records.iter().filter(|r| taken.contains(&r.0)).map(|r| r.1.len() as u64).sum();
                        prop_assert_eq!(removed, events);
                        prop_assert!(n == 0 || model.records.is_empty() || !got.is_empty());
                        model.records.retain(|r| !taken.contains(&r.0));
                    }
                    Op::RemoveAfter(skip, n) => {
                        let after = model.records.get(skip).map(|r| r.0);
                        let got = s.read_after(after, n).unwrap();
                        let start = if after.is_some() { skip + 1 } else { 0 };
                        let expect: Vec<u64> = model.records.iter().skip(start).map(|r| r.0).take(got.len()).collect();
                        prop_assert_eq!(keys(&got), expect.clone());
                        s.remove(expect.iter().copied()).unwrap();
                        model.records.retain(|r| !expect.contains(&r.0));
                    }
                    Op::Reopen => {
                        drop(spool.take());
                        spool = Some(open(dir.path(), max, policy, per));
                    }
                }
                let s = spool.as_ref().unwrap();
                prop_assert_eq!(s.len(), model.records.iter().map(|r| r.1.len() as u64).sum::<u64>());
                prop_assert_eq!(s.bytes(), model.bytes());
                let all = s.oldest(usize::MAX).unwrap();
                let expect: Vec<Record> = model.records.iter().map(|(key, events)| {
                    let mut json = b"[".to_vec();
                    json.extend_from_slice(&events.join(&b","[..]));
                    json.push(b']');
                    Record { key: *key, events: events.len() as u32, json }
                }).collect();
                prop_assert_eq!(all, expect);
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;

    /// `cargo test --release --features spool --lib spool::timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn timing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30, OverflowPolicy::DropNewest).unwrap();
        let event = vec![b'x'; 264];
        for group in [1000usize, 10_000] {
            let events: Vec<&[u8]> = (0..group).map(|_| event.as_slice()).collect();
            let t = Instant::now();
            for _ in 0..10 {
                spool.append(&events).unwrap();
            }
            eprintln!("append {group}: {:?} per commit", t.elapsed() / 10);
        }
        let mut after = None;
        let t = Instant::now();
        let mut reads = 0;
        let mut keys = Vec::new();
        loop {
            let batch = spool.read_after(after, 100).unwrap();
            if batch.is_empty() {
                break;
            }
            after = batch.last().map(|e| e.key);
            keys.push(batch.iter().map(|e| e.key).collect::<Vec<_>>());
            reads += 1;
        }
        eprintln!("read 100: {:?} per read ({reads})", t.elapsed() / reads);
        let t = Instant::now();
        let n = keys.len() as u32;
        for k in keys {
            spool.remove(k).unwrap();
        }
        eprintln!("remove 100: {:?} per remove", t.elapsed() / n);
    }
}
