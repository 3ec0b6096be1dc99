//! The spooled pipeline of an HTTP sink (feature `spool`): the bounded queue → group commits to
//! the disk [`Spool`] → batches read back from the spool → POST → removed once settled.
//!
//! Two loops share the spool. The **writer** takes events from the queue, waits at most
//! `commit_interval` (or until `commit_max_events`) for more (already serialized by `send`) and
//! appends them in one transaction on a blocking thread. The **reader** reads batches in key order (the
//! leftovers of a previous run come first), hands each to a delivery task (at most
//! `max_in_flight`), and each task posts the exact stored bytes until OpenMeter settles them:
//! 2xx removes them (delivered), a non-retryable status removes them (rejected, counted), and
//! anything else is retried with backoff, without a time limit: the spool's byte bound, not a
//! retry clock, limits what an outage can pile up. At the shutdown deadline whatever is not
//! settled stays in the spool for the next start; nothing committed is dropped by a shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::sleep_until;

use super::config::{BuildError, Settings};
use super::delivery::{Delivery, wait_before_retry};
use super::encode;
use super::outcome::Outcome;
use super::retry::{Backoff, BackoffConfig};
use super::shutdown::{ShutdownListener, Stopping};
use super::stats::{Counters, DropReason};
use super::throttle::LogThrottle;
use crate::spool::{Record, Spool, SpoolConfig};

/// The backoff of a failing spool write (disk full, I/O error).
const WRITE_BACKOFF: BackoffConfig = BackoffConfig {
    base: Duration::from_millis(50),
    max: Duration::from_secs(5),
};

/// What the writer, the reader and the delivery tasks share.
struct State {
    spool: Spool,
    counters: Arc<Counters>,
    /// Events read for delivery and not removed yet.
    posting: AtomicU64,
    /// Signalled after each commit, and when the writer is done.
    changed: Notify,
    /// The queue is closed and drained: nothing more will be committed.
    writer_done: AtomicBool,
    /// Spool faults and overflows are logged at most this often.
    log: LogThrottle,
}

impl State {
    /// Events in the spool that no task is delivering: an estimate (it reads low while the
    /// remover is between deleting a batch and updating `posting`), used only to start a full
    /// batch without waiting for the flush interval, never to decide what is left to read.
    fn waiting(&self) -> u64 {
        self.spool
            .len()
            .saturating_sub(self.posting.load(Ordering::Relaxed))
    }

    fn publish(&self) {
        self.counters.publish_spool(self.spool.len(), self.spool.bytes());
    }
}

/// The spooled pipeline, ready to run.
pub(crate) struct Pipeline {
    queue: mpsc::Receiver<Vec<u8>>,
    delivery: Arc<Delivery>,
    state: Arc<State>,
    commit_interval: Duration,
    commit_max_events: usize,
    batch_size: usize,
    flush_interval: Duration,
    max_in_flight: usize,
    shutdown: ShutdownListener,
}

impl Pipeline {
    /// Opens the spool (blocking file I/O, once, while the sink is built).
    pub(crate) fn open(
        config: &SpoolConfig,
        queue: mpsc::Receiver<Vec<u8>>,
        delivery: Arc<Delivery>,
        settings: &Settings,
        shutdown: ShutdownListener,
    ) -> Result<Self, BuildError> {
        let mut spool =
            Spool::open(&config.dir, config.max_bytes, config.policy).map_err(BuildError::Spool)?;
        // Records of one batch each: the reader posts whole records.
        spool.set_record_events(settings.batch_size.max(1));
        if !spool.is_empty() {
            tracing::info!(
                sink = delivery.name,
                events = spool.len(),
                bytes = spool.bytes(),
                path = %spool.path().display(),
                "spool holds events from a previous run: delivering them first"
            );
        }
        let state = Arc::new(State {
            spool,
            counters: Arc::clone(&delivery.counters),
            posting: AtomicU64::new(0),
            changed: Notify::new(),
            writer_done: AtomicBool::new(false),
            log: LogThrottle::new(Duration::from_secs(10)),
        });
        state.publish();
        Ok(Pipeline {
            queue,
            delivery,
            state,
            commit_interval: config.commit_interval,
            commit_max_events: config.commit_max_events.max(1),
            batch_size: settings.batch_size.max(1),
            flush_interval: settings.flush_interval,
            max_in_flight: settings.max_in_flight.max(1),
            shutdown,
        })
    }

    /// Starts the writer and the reader.
    pub(crate) fn spawn(self, runtime: &tokio::runtime::Handle) {
        let writer = Writer {
            queue: self.queue,
            state: Arc::clone(&self.state),
            interval: self.commit_interval,
            max_events: self.commit_max_events,
            deadline: self.shutdown.deadline.clone(),
        };
        runtime.spawn(writer.run());
        let (removals, receiver) = mpsc::channel(REMOVAL_QUEUE);
        let remover = runtime.spawn(remove_loop(receiver, Arc::clone(&self.state)));
        let reader = Reader {
            delivery: self.delivery,
            state: self.state,
            removals: Some(removals),
            remover,
            batch_size: self.batch_size,
            flush_interval: self.flush_interval,
            max_in_flight: self.max_in_flight,
            shutdown: self.shutdown,
        };
        runtime.spawn(reader.run());
    }
}

/// Moves events from the queue to the spool in group commits.
struct Writer {
    queue: mpsc::Receiver<Vec<u8>>,
    state: Arc<State>,
    interval: Duration,
    max_events: usize,
    deadline: watch::Receiver<Option<Instant>>,
}

impl Writer {
    async fn run(mut self) {
        let mut batch: Vec<Vec<u8>> = Vec::with_capacity(self.max_events);
        let mut control_open = true;
        loop {
            if self.deadline.borrow_and_update().is_some() {
                // Shutting down: take no more, commit everything queued.
                self.queue.close();
            }
            tokio::select! {
                received = self.queue.recv_many(&mut batch, self.max_events) => {
                    if received == 0 {
                        break;
                    }
                    self.state.counters.taken(received as u64);
                    self.state.counters.publish_queued(self.queue.len());
                }
                changed = self.deadline.changed(), if control_open => {
                    if changed.is_err() {
                        control_open = false;
                    }
                    continue;
                }
            }
            // Group commit: wait up to the interval for more, unless the group is full.
            let until = tokio::time::Instant::now() + self.interval;
            while batch.len() < self.max_events {
                let room = self.max_events - batch.len();
                tokio::select! {
                    biased;
                    received = self.queue.recv_many(&mut batch, room) => {
                        if received == 0 {
                            break;
                        }
                        self.state.counters.taken(received as u64);
                    self.state.counters.publish_queued(self.queue.len());
                    }
                    () = tokio::time::sleep_until(until) => break,
                }
            }
            let events = std::mem::replace(&mut batch, Vec::with_capacity(self.max_events));
            self.commit(events).await;
        }
        self.state.writer_done.store(true, Ordering::Release);
        self.state.changed.notify_one();
    }

    /// Appends one group of serialized events, retrying a failing disk until it works or the
    /// shutdown deadline passes.
    async fn commit(&self, mut jsons: Vec<Vec<u8>>) {
        let counters = &self.state.counters;
        let mut backoff = Backoff::new(WRITE_BACKOFF);
        loop {
            let state = Arc::clone(&self.state);
            let count = jsons.len() as u64;
            let group = jsons;
            let written = tokio::task::spawn_blocking(move || {
                let result = state.spool.append(&group);
                (group, result)
            })
            .await;
            let error = match written {
                Ok((_, Ok(appended))) => {
                    counters.unsettled_to_spool(appended.committed);
                    if appended.dropped_newest > 0 {
                        counters.record_dropped(DropReason::SpoolFull, appended.dropped_newest, true);
                    }
                    if appended.evicted_oldest > 0 {
                        counters.record_dropped(DropReason::SpoolFull, appended.evicted_oldest, false);
                    }
                    if (appended.dropped_newest > 0 || appended.evicted_oldest > 0) && self.state.log.allow()
                    {
                        tracing::warn!(
                            dropped_newest = appended.dropped_newest,
                            evicted_oldest = appended.evicted_oldest,
                            max_bytes = self.state.spool.max_bytes(),
                            "spool full: events dropped (logged at most every 10 s)"
                        );
                    }
                    self.state.publish();
                    self.state.changed.notify_one();
                    return;
                }
                Ok((group, Err(error))) => {
                    jsons = group;
                    error.to_string()
                }
                Err(error) => {
                    // The blocking task panicked or the runtime is shutting down: the group
                    // is gone.
                    counters.record_dropped(DropReason::Shutdown, count, true);
                    tracing::error!(%error, events = count, "spool write task failed; its events are lost");
                    return;
                }
            };
            counters.set_last_error(format!("spool write failed: {error}"));
            let wait = backoff.next_wait().max(Duration::from_millis(10));
            let deadline = *self.deadline.borrow();
            if deadline.is_some_and(|d| Instant::now() + wait > d) {
                counters.record_dropped(DropReason::Shutdown, jsons.len() as u64, true);
                tracing::error!(
                    events = jsons.len(), %error,
                    "spool write still failing at the shutdown deadline: events dropped"
                );
                return;
            }
            if self.state.log.allow() {
                tracing::error!(
                    events = jsons.len(), %error, ?wait,
                    "spool write failed; will retry (the queue fills meanwhile; logged at most every 10 s)"
                );
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// Reads batches from the spool and runs their deliveries.
struct Reader {
    delivery: Arc<Delivery>,
    state: Arc<State>,
    /// To the remover; dropped when the reader is done, which lets the remover finish.
    removals: Option<mpsc::Sender<Removal>>,
    remover: tokio::task::JoinHandle<()>,
    batch_size: usize,
    flush_interval: Duration,
    max_in_flight: usize,
    shutdown: ShutdownListener,
}

impl Reader {
    async fn run(mut self) {
        let permits = Arc::new(Semaphore::new(self.max_in_flight));
        let mut tasks = JoinSet::new();
        let mut after: Option<u64> = None;
        // Leftovers of a previous run go at once, without waiting to fill a batch.
        let mut backlog = !self.state.spool.is_empty();
        let mut linger_until: Option<Instant> = None;
        let mut stopping: Option<Stopping> = None;
        let mut control_open = true;
        let Some(removals) = self.removals.take() else {
            return;
        };
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let counters = Arc::clone(&self.state.counters);
        loop {
            let now = Instant::now();
            let writer_done = self.state.writer_done.load(Ordering::Acquire);
            // Whether records were committed past the cursor: keys only grow, so unlike counts
            // this never misses a record. What is left behind the cursor was tried this run
            // (given back at the shutdown deadline, or its removal failed) and waits for the
            // next start.
            let unread = self.state.spool.next_key() > after.map_or(0, |key| key + 1);
            if !unread && writer_done && tasks.is_empty() {
                break;
            }
            if stopping.is_some_and(|s| now >= s.deadline) {
                // Unsettled batches go back to waiting in the spool.
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
            if !unread {
                linger_until = None;
            } else if linger_until.is_none() {
                linger_until = Some(now + self.flush_interval);
            }
            // `waiting` is only a hint that a full batch is there (it can lag a removal).
            let ready = unread
                && (self.state.waiting() >= self.batch_size as u64
                    || backlog
                    || writer_done
                    || stopping.is_some()
                    || linger_until.is_some_and(|t| now >= t));
            tokio::select! {
                biased;
                () = sleep_until(stopping.map_or(far, |s| s.deadline).into()), if stopping.is_some() => {}
                changed = self.shutdown.deadline.changed(), if control_open && stopping.is_none() => {
                    match changed {
                        Ok(()) => {
                            if let Some(deadline) = *self.shutdown.deadline.borrow_and_update() {
                                stopping = Some(Stopping::begin(deadline, &counters));
                                tracing::info!(sink = self.delivery.name, "shutting down: committing queued events and delivering the spool");
                            }
                        }
                        Err(_) => control_open = false,
                    }
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(error) = joined {
                        tracing::error!(sink = self.delivery.name, %error, "delivery task failed");
                    }
                }
                Ok(permit) = Arc::clone(&permits).acquire_owned(), if ready => {
                    let state = Arc::clone(&self.state);
                    let n = self.batch_size;
                    let next_key = state.spool.next_key();
                    let read = tokio::task::spawn_blocking(move || state.spool.read_after(after, n)).await;
                    match read {
                        Ok(Ok(batch)) if !batch.is_empty() => {
                            let events = batch.iter().map(|r| u64::from(r.events)).sum::<u64>();
                            if events < self.batch_size as u64 {
                                backlog = false;
                            }
                            after = batch.last().map(|r| r.key);
                            self.state.posting.fetch_add(events, Ordering::Relaxed);
                            linger_until = None;
                            let posting = Posting {
                                state: Arc::clone(&self.state),
                                removals: removals.clone(),
                                events,
                                done: false,
                            };
                            let deadline = self.shutdown.deadline.clone();
                            tasks.spawn(deliver(Arc::clone(&self.delivery), posting, batch, deadline, permit));
                        }
                        Ok(Ok(_)) => {
                            // The records past the cursor were evicted (`DropOldest`) before
                            // they were read: move past them.
                            backlog = false;
                            after = after.max(next_key.checked_sub(1));
                        }
                        Ok(Err(error)) => {
                            if self.state.log.allow() {
                                tracing::error!(%error, "spool read failed; will retry (logged at most every 10 s)");
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(error) => {
                            tracing::error!(%error, "spool read task failed");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                () = self.state.changed.notified() => {}
                () = sleep_until(linger_until.unwrap_or(far).into()), if linger_until.is_some() && !ready => {}
            }
        }
        // Let the remover finish what the settled batches handed it.
        drop(removals);
        if let Err(error) = (&mut self.remover).await {
            tracing::error!(%error, "spool remover failed");
        }
        self.state.publish();
        self.report(stopping);
    }

    fn report(&self, stopping: Option<Stopping>) {
        let counters = &self.state.counters;
        let stats = counters.snapshot(0);
        let Some(stopping) = stopping else {
            tracing::debug!(
                sink = self.delivery.name,
                ?stats,
                "all handles dropped; spooled sink done"
            );
            return;
        };
        let report = stopping.report(stats);
        if report.stats.spooled > 0 {
            tracing::warn!(
                sink = self.delivery.name,
                flushed = report.flushed,
                spooled = report.stats.spooled,
                "shut down with events left in the spool: they are delivered on the next start"
            );
        } else {
            tracing::info!(
                sink = self.delivery.name,
                flushed = report.flushed,
                "shut down; spool empty"
            );
        }
        self.shutdown.report.send_replace(Some(report));
    }
}

/// A batch being delivered. Dropped unsettled (shutdown deadline, abort), its events stay in
/// the spool for the next start: not lost, not counted as dropped.
struct Posting {
    state: Arc<State>,
    removals: mpsc::Sender<Removal>,
    events: u64,
    done: bool,
}

impl Posting {
    /// Hands the settled batch to the remover, which deletes it from the spool together with
    /// other settled batches, off the delivery path.
    async fn remove(&mut self, keys: Vec<u64>) {
        let removal = Removal {
            keys,
            events: self.events,
        };
        if self.removals.send(removal).await.is_ok() {
            self.done = true;
        }
    }
}

/// Settled records to delete.
struct Removal {
    keys: Vec<u64>,
    events: u64,
}

/// Removals waiting for the remover, at most.
const REMOVAL_QUEUE: usize = 1024;

/// Deletes settled records, many batches per transaction. A failed removal only means a
/// redelivery after the next start, which OpenMeter deduplicates.
async fn remove_loop(mut removals: mpsc::Receiver<Removal>, state: Arc<State>) {
    let mut taken = Vec::new();
    while removals.recv_many(&mut taken, 256).await > 0 {
        let events: u64 = taken.iter().map(|r| r.events).sum();
        let keys: Vec<u64> = taken.drain(..).flat_map(|r| r.keys).collect();
        let spool_state = Arc::clone(&state);
        match tokio::task::spawn_blocking(move || spool_state.spool.remove(keys)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(
                %error, "settled events could not be removed from the spool; they will be posted again after a restart (deduplicated)"
            ),
            Err(error) => tracing::error!(%error, "spool remove task failed"),
        }
        state.posting.fetch_sub(events, Ordering::Relaxed);
        state.publish();
        state.changed.notify_one();
    }
}

impl Drop for Posting {
    fn drop(&mut self) {
        // A settled batch is the remover's to account for; an unsettled one goes back here.
        if !self.done {
            self.state.posting.fetch_sub(self.events, Ordering::Relaxed);
            self.state.publish();
            self.state.changed.notify_one();
        }
    }
}

/// Posts one spooled batch until it is settled or the shutdown deadline stops it.
async fn deliver(
    delivery: Arc<Delivery>,
    mut posting: Posting,
    batch: Vec<Record>,
    mut shutdown: watch::Receiver<Option<Instant>>,
    _permit: OwnedSemaphorePermit,
) {
    let events = posting.events;
    let body = encode::batch_body(batch.iter().map(Record::inner_json));
    let keys: Vec<u64> = batch.iter().map(|record| record.key).collect();
    drop(batch);
    if events == 0 {
        // Only damaged records: nothing to post, just remove them.
        tracing::warn!(
            sink = delivery.name,
            records = keys.len(),
            "damaged spool records removed"
        );
        posting.remove(keys).await;
        return;
    }
    let counters = Arc::clone(&delivery.counters);
    let mut backoff = Backoff::new(delivery.backoff);
    loop {
        let (reason, after) = match delivery.attempt(&body).await {
            Outcome::Delivered => {
                posting.remove(keys).await;
                counters.record_delivered(events, false);
                tracing::debug!(sink = delivery.name, events, "spooled batch delivered");
                return;
            }
            Outcome::Rejected { status, detail } => {
                delivery.log_rejection(status, &detail, events);
                posting.remove(keys).await;
                counters.record_rejected(status.as_u16(), events, false);
                return;
            }
            Outcome::Retry { reason, after } => (reason, after),
        };
        counters.set_last_error(reason.clone());
        let wait = after.unwrap_or_else(|| backoff.next_wait());
        let deadline = *shutdown.borrow();
        if deadline.is_some_and(|d| Instant::now() + wait > d) {
            tracing::warn!(
                sink = delivery.name, events, error = %reason,
                "batch left in the spool: the next retry would pass the shutdown deadline"
            );
            return;
        }
        tracing::warn!(sink = delivery.name, events, error = %reason, ?wait, "spooled batch failed; will retry");
        wait_before_retry(wait, after.is_some(), deadline.is_none(), &mut shutdown).await;
        counters.record_retry();
    }
}
