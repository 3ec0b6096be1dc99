//! A durable on-disk spool of serialized CloudEvents (crate feature `spool`).
//!
//! [`Spool`] is a small, crash-safe FIFO store on top of [`redb`](https://docs.rs/redb), an
//! embedded, pure-Rust, copy-on-write B-tree database with ACID transactions. Every event is
//! stored as the exact JSON it will be posted with, under a monotonic `u64` key, so an event
//! that survives a crash is redelivered with its original `id`, and OpenMeter's
//! deduplication on `source` + `id` makes the redelivery exact.
//!
//! - [`append`](Spool::append) writes a group of events in **one** transaction (one `fsync`):
//!   when it returns `Ok`, every event it counted as committed is on disk and survives a crash
//!   of the process or of the machine.
//! - [`oldest`](Spool::oldest) / [`read_after`](Spool::read_after) read in key order, without
//!   removing anything.
//! - [`remove`](Spool::remove) deletes events once their delivery is settled.
//! - The spool is bounded by [`max_bytes`](Spool::max_bytes) of event JSON. A group that does
//!   not fit is handled by the [`OverflowPolicy`]: drop the newest events (the ones being
//!   appended) or evict the oldest ones, and the count is returned so it can be reported.
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
//! assert_eq!(appended.committed, 2);
//!
//! let batch = spool.oldest(100)?;
//! assert_eq!(batch[0].json, br#"{"id":"a"}"#);
//! // ... post the batch; once OpenMeter has acknowledged it:
//! spool.remove(batch.iter().map(|event| event.key))?;
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

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

/// The file inside the spool directory.
pub const SPOOL_FILE_NAME: &str = "events.redb";

/// Event JSON by key, in append order.
const EVENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("events");
/// `next_key` and `bytes`, updated in the same transaction as `EVENTS`.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const META_NEXT_KEY: &str = "next_key";
const META_BYTES: &str = "bytes";

/// What to drop when an append would take the spool past its byte bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OverflowPolicy {
    /// Keep what is spooled; drop the events being appended that do not fit (the default,
    /// like the in-memory queue when it is full).
    #[default]
    DropNewest,
    /// Evict the oldest spooled events until the new ones fit.
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
    /// Older spooled events evicted to make room ([`OverflowPolicy::DropOldest`]).
    pub evicted_oldest: u64,
    /// The key of the first committed event, if any; the others follow in order.
    pub first_key: Option<u64>,
}

/// One spooled event: its key and the exact JSON it will be posted with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spooled {
    /// Monotonic within one spool file, never reused.
    pub key: u64,
    /// The serialized CloudEvent.
    pub json: Vec<u8>,
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
    len: u64,
    /// Removals committed without an fsync since the last durable commit.
    unsynced_removes: u32,
}

/// Every this many removals without an append, one is made durable, so that a long drain
/// with no new events does not keep redb from reusing the freed pages.
const SYNC_EVERY_REMOVES: u32 = 16;

/// A durable, byte-bounded FIFO of serialized events. See the [module docs](self).
pub struct Spool {
    db: Database,
    path: PathBuf,
    max_bytes: u64,
    policy: OverflowPolicy,
    /// Held for the whole of every write transaction, so the bookkeeping follows the commits.
    meta: Mutex<Meta>,
    /// Lock-free mirrors of `meta` for statistics.
    len: AtomicU64,
    bytes: AtomicU64,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.path)
            .field("max_bytes", &self.max_bytes)
            .field("policy", &self.policy)
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl Spool {
    /// Opens the spool in directory `dir` (created if missing; the file is
    /// [`SPOOL_FILE_NAME`]), keeping at most `max_bytes` of event JSON. Events left by a
    /// previous run are kept, in order, with their keys; new keys continue after them.
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
        if meta.len == 0 {
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
            len: AtomicU64::new(meta.len),
            bytes: AtomicU64::new(meta.bytes),
            meta: Mutex::new(meta),
        })
    }

    /// Creates the tables if needed and reads (or rebuilds) the bookkeeping.
    fn recover(db: &Database) -> Result<Meta, SpoolError> {
        let txn = db.begin_write().map_err(store_error)?;
        let meta = {
            let events = txn.open_table(EVENTS).map_err(store_error)?;
            let mut meta_table = txn.open_table(META).map_err(store_error)?;
            let len = events.len().map_err(store_error)?;
            let last_key = events.last().map_err(store_error)?.map(|(k, _)| k.value());
            let stored_next = meta_table
                .get(META_NEXT_KEY)
                .map_err(store_error)?
                .map(|v| v.value());
            // Never reuse a key, even if the bookkeeping were missing or behind.
            let after_last = last_key.map_or(0, |k| k.saturating_add(1));
            let next_key = stored_next.unwrap_or(0).max(after_last);
            let stored_bytes = meta_table
                .get(META_BYTES)
                .map_err(store_error)?
                .map(|v| v.value());
            let bytes = match stored_bytes {
                Some(bytes) => bytes,
                None => {
                    let mut bytes = 0u64;
                    for entry in events.iter().map_err(store_error)? {
                        let (_, value) = entry.map_err(store_error)?;
                        bytes = bytes.saturating_add(value.value().len() as u64);
                    }
                    bytes
                }
            };
            meta_table.insert(META_NEXT_KEY, next_key).map_err(store_error)?;
            meta_table.insert(META_BYTES, bytes).map_err(store_error)?;
            Meta {
                next_key,
                bytes,
                len,
                unsynced_removes: 0,
            }
        };
        txn.commit().map_err(store_error)?;
        Ok(meta)
    }

    /// Appends events in one durable transaction, applying the byte bound.
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
            let mut table = txn.open_table(EVENTS).map_err(store_error)?;
            for event in events {
                let json = event.as_ref();
                let size = json.len() as u64;
                if size > self.max_bytes {
                    appended.dropped_newest += 1;
                    continue;
                }
                if meta.bytes.saturating_add(size) > self.max_bytes {
                    match self.policy {
                        OverflowPolicy::DropNewest => {
                            appended.dropped_newest += 1;
                            continue;
                        }
                        OverflowPolicy::DropOldest => {
                            while meta.bytes.saturating_add(size) > self.max_bytes {
                                let Some((_, old)) = table.pop_first().map_err(store_error)? else {
                                    break;
                                };
                                let old_size = old.value().len() as u64;
                                meta.bytes = meta.bytes.saturating_sub(old_size);
                                meta.len = meta.len.saturating_sub(1);
                                appended.evicted_oldest += 1;
                            }
                        }
                    }
                }
                let key = meta.next_key;
                table.insert(key, json).map_err(store_error)?;
                appended.first_key.get_or_insert(key);
                meta.next_key = key.saturating_add(1);
                meta.bytes = meta.bytes.saturating_add(size);
                meta.len += 1;
                appended.committed += 1;
            }
            let mut meta_table = txn.open_table(META).map_err(store_error)?;
            meta_table
                .insert(META_NEXT_KEY, meta.next_key)
                .map_err(store_error)?;
            meta_table.insert(META_BYTES, meta.bytes).map_err(store_error)?;
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

    /// Up to `n` of the oldest events, in key order. Nothing is removed.
    ///
    /// # Errors
    ///
    /// Storage failures.
    pub fn oldest(&self, n: usize) -> Result<Vec<Spooled>, SpoolError> {
        self.read_after(None, n)
    }

    /// Up to `n` events with keys greater than `after` (all keys when `None`), in key order.
    /// A reader that has some events in flight passes the last key it took, to get the next
    /// ones without waiting for the first to be removed.
    ///
    /// # Errors
    ///
    /// Storage failures.
    pub fn read_after(&self, after: Option<u64>, n: usize) -> Result<Vec<Spooled>, SpoolError> {
        let start = match after {
            None => 0,
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(key) => key + 1,
        };
        if n == 0 {
            return Ok(Vec::new());
        }
        let txn = self.db.begin_read().map_err(store_error)?;
        let table = txn.open_table(EVENTS).map_err(store_error)?;
        let mut out = Vec::with_capacity(n.min(1024));
        for entry in table.range(start..).map_err(store_error)? {
            let (key, value) = entry.map_err(store_error)?;
            out.push(Spooled {
                key: key.value(),
                json: value.value().to_vec(),
            });
            if out.len() == n {
                break;
            }
        }
        Ok(out)
    }

    /// Removes the events with these keys in one transaction; keys not present (already
    /// removed or evicted) are skipped. Returns how many were removed.
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
        let mut removed = 0;
        let mut txn = self.db.begin_write().map_err(store_error)?;
        // A removal needs no fsync of its own: it becomes durable with the next append. A crash
        // before that brings settled events back, and they are posted again with their ids,
        // which OpenMeter deduplicates.
        if meta.unsynced_removes + 1 < SYNC_EVERY_REMOVES {
            txn.set_durability(Durability::Eventual);
        }
        {
            let mut table = txn.open_table(EVENTS).map_err(store_error)?;
            for key in keys {
                if let Some(old) = table.remove(key).map_err(store_error)? {
                    meta.bytes = meta.bytes.saturating_sub(old.value().len() as u64);
                    meta.len = meta.len.saturating_sub(1);
                    removed += 1;
                }
            }
            let mut meta_table = txn.open_table(META).map_err(store_error)?;
            meta_table.insert(META_BYTES, meta.bytes).map_err(store_error)?;
        }
        if removed == 0 {
            txn.abort().map_err(store_error)?;
            return Ok(0);
        }
        txn.commit().map_err(store_error)?;
        meta.unsynced_removes = (meta.unsynced_removes + 1) % SYNC_EVERY_REMOVES;
        *guard = meta;
        self.publish(meta);
        Ok(removed)
    }

    fn publish(&self, meta: Meta) {
        self.len.store(meta.len, Ordering::Relaxed);
        self.bytes.store(meta.bytes, Ordering::Relaxed);
    }

    /// How many events are spooled.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether no event is spooled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of event JSON spooled (the file itself is larger: keys, B-tree pages, and
    /// free pages that redb reuses).
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

/// How an [`OpenMeterSink`](crate::sink::OpenMeterSink) spools events on disk.
///
/// Events go from `send` into the sink's bounded in-memory queue, from there to the spool in
/// group commits, and are read back from the spool for delivery; they are removed only once
/// OpenMeter has acknowledged them (2xx) or rejected them for good (400, 401, 403, ...).
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

    fn open(dir: &Path, max: u64, policy: OverflowPolicy) -> Spool {
        Spool::open(dir, max, policy).unwrap()
    }

    fn keys(events: &[Spooled]) -> Vec<u64> {
        events.iter().map(|e| e.key).collect()
    }

    #[test]
    fn append_read_remove_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 20, OverflowPolicy::DropNewest);
        assert!(spool.is_empty());
        let a = spool.append(["a", "bb", "ccc"]).unwrap();
        assert_eq!((a.committed, a.first_key), (3, Some(0)));
        assert_eq!((spool.len(), spool.bytes()), (3, 6));
        let all = spool.oldest(10).unwrap();
        assert_eq!(keys(&all), [0, 1, 2]);
        assert_eq!(all[1].json, b"bb");
        assert_eq!(keys(&spool.oldest(2).unwrap()), [0, 1]);
        assert_eq!(keys(&spool.read_after(Some(0), 10).unwrap()), [1, 2]);
        assert!(spool.read_after(Some(u64::MAX), 10).unwrap().is_empty());
        assert!(spool.oldest(0).unwrap().is_empty());
        assert_eq!(spool.remove([0, 2, 7]).unwrap(), 2);
        assert_eq!(spool.remove([0]).unwrap(), 0);
        assert_eq!((spool.len(), spool.bytes()), (1, 2));
        assert_eq!(spool.append(Vec::<Vec<u8>>::new()).unwrap(), Appended::default());
    }

    #[test]
    fn keys_stay_monotonic_across_reopen_even_when_drained() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = open(dir.path(), 1 << 20, OverflowPolicy::DropNewest);
            spool.append(["x", "y"]).unwrap();
            spool.remove([0, 1]).unwrap();
        }
        let spool = open(dir.path(), 1 << 20, OverflowPolicy::DropNewest);
        assert!(spool.is_empty());
        assert_eq!(spool.append(["z"]).unwrap().first_key, Some(2));
    }

    #[test]
    fn recovers_events_and_bytes_after_an_unclean_drop() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 1 << 20, OverflowPolicy::DropNewest);
        spool.append(["one", "two"]).unwrap();
        spool.remove([0]).unwrap();
        // The removal becomes durable with this append.
        spool.append(["three"]).unwrap();
        // Leak the handle, as a crash would: nothing is flushed on drop beyond the commits.
        std::mem::forget(spool);
        // redb's file lock belongs to the leaked handle's file; a fresh process would get it.
        // In-process, simulate by copying the committed file elsewhere.
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(
            dir.path().join(SPOOL_FILE_NAME),
            copy.path().join(SPOOL_FILE_NAME),
        )
        .unwrap();
        let spool = open(copy.path(), 1 << 20, OverflowPolicy::DropNewest);
        let events = spool.oldest(10).unwrap();
        assert_eq!(keys(&events), [1, 2]);
        assert_eq!(events[1].json, b"three");
        assert_eq!((spool.len(), spool.bytes()), (2, 8));
        assert_eq!(spool.append(["four"]).unwrap().first_key, Some(3));
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_lives() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path(), 1 << 20, OverflowPolicy::DropNewest);
        let second = Spool::open(dir.path(), 1 << 20, OverflowPolicy::DropNewest).unwrap_err();
        assert_eq!(second.kind(), SpoolErrorKind::Locked);
        assert!(second.to_string().contains("open elsewhere"));
        drop(first);
        open(dir.path(), 1 << 20, OverflowPolicy::DropNewest);
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
    fn drop_newest_keeps_the_spool_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 10, OverflowPolicy::DropNewest);
        let a = spool.append(["1234", "5678", "9abc", "d"]).unwrap();
        assert_eq!((a.committed, a.dropped_newest, a.evicted_oldest), (3, 1, 0));
        assert_eq!(spool.bytes(), 9);
        let b = spool.append(["xy", "z"]).unwrap();
        assert_eq!((b.committed, b.dropped_newest, b.first_key), (1, 1, Some(3)));
        assert_eq!(spool.bytes(), 10);
        assert_eq!(spool.oldest(10).unwrap().last().unwrap().json, b"z");
    }

    #[test]
    fn drop_oldest_evicts_until_the_new_fits() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open(dir.path(), 10, OverflowPolicy::DropOldest);
        spool.append(["1234", "5678"]).unwrap();
        let a = spool.append(["abcdef"]).unwrap();
        assert_eq!((a.committed, a.evicted_oldest), (1, 1));
        assert_eq!(keys(&spool.oldest(10).unwrap()), [1, 2]);
        assert_eq!(spool.bytes(), 10);
        // Within one append, its own earlier events can be evicted too.
        let b = spool.append(["0123456789", "9876543210"]).unwrap();
        assert_eq!((b.committed, b.evicted_oldest), (2, 3));
        assert_eq!(keys(&spool.oldest(10).unwrap()), [4]);
    }

    #[test]
    fn an_event_larger_than_the_bound_is_dropped_under_both_policies() {
        let dir = tempfile::tempdir().unwrap();
        for policy in [OverflowPolicy::DropNewest, OverflowPolicy::DropOldest] {
            let dir = dir.path().join(format!("{policy:?}"));
            let spool = open(&dir, 4, policy);
            spool.append(["ab"]).unwrap();
            let a = spool.append(["too long"]).unwrap();
            assert_eq!((a.committed, a.dropped_newest, a.evicted_oldest), (0, 1, 0));
            assert_eq!(spool.len(), 1);
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
            1 => (0usize..6, 0usize..6).prop_map(|(skip, n)| Op::RemoveAfter(skip, n)),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// The spool behaves like a byte-bounded queue model, across reopens.
        #[test]
        fn behaves_like_a_bounded_queue(
            ops in prop::collection::vec(op(), 1..25),
            oldest in any::<bool>(),
        ) {
            let policy = if oldest { OverflowPolicy::DropOldest } else { OverflowPolicy::DropNewest };
            let max = 100u64;
            let dir = tempfile::tempdir().unwrap();
            let mut spool = Some(open(dir.path(), max, policy));
            let mut model: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
            let mut next = 0u64;
            for op in ops {
                let s = spool.as_ref().unwrap();
                match op {
                    Op::Append(sizes) => {
                        let events: Vec<Vec<u8>> = sizes
                            .iter()
                            .map(|&n| (0..n).map(|i| b'a' + ((next as usize + i) % 26) as u8).collect())
                            .collect();
                        let mut expect = Appended::default();
                        for json in &events {
                            let size = json.len() as u64;
                            let used = |m: &VecDeque<(u64, Vec<u8>)>| m.iter().map(|e| e.1.len() as u64).sum::<u64>();
                            if size > max { expect.dropped_newest += 1; continue; }
                            if used(&model) + size > max {
                                if policy == OverflowPolicy::DropNewest { expect.dropped_newest += 1; continue; }
                                while used(&model) + size > max { model.pop_front(); expect.evicted_oldest += 1; }
                            }
                            expect.first_key.get_or_insert(next);
                            model.push_back((next, json.clone()));
                            next += 1;
                            expect.committed += 1;
                        }
                        prop_assert_eq!(s.append(&events).unwrap(), expect);
                    }
                    Op::RemoveOldest(n) => {
                        let got = s.oldest(n).unwrap();
                        let removed = s.remove(got.iter().map(|e| e.key)).unwrap();
                        let n = n.min(model.len());
                        prop_assert_eq!(removed as usize, n);
                        model.drain(..n);
                    }
                    Op::RemoveAfter(skip, n) => {
                        let after = model.get(skip).map(|e| e.0);
                        let got = s.read_after(after, n).unwrap();
                        let start = if after.is_some() { skip + 1 } else { 0 };
                        let expect: Vec<u64> = model.iter().skip(start).take(n).map(|e| e.0).collect();
                        prop_assert_eq!(keys(&got), expect.clone());
                        s.remove(expect.iter().copied()).unwrap();
                        model.retain(|e| !expect.contains(&e.0));
                    }
                    Op::Reopen => {
                        drop(spool.take());
                        spool = Some(open(dir.path(), max, policy));
                    }
                }
                let s = spool.as_ref().unwrap();
                prop_assert_eq!(s.len(), model.len() as u64);
                prop_assert_eq!(s.bytes(), model.iter().map(|e| e.1.len() as u64).sum::<u64>());
                let all = s.oldest(usize::MAX).unwrap();
                let expect: Vec<Spooled> = model.iter().map(|(key, json)| Spooled { key: *key, json: json.clone() }).collect();
                prop_assert_eq!(all, expect);
            }
        }
    }
}
