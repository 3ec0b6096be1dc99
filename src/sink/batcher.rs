//! The background task: drains the queue into batches (by size or by interval), hands each to
//! a delivery task (at most `max_in_flight` at once), and flushes everything on shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::sleep_until;

use super::delivery::Delivery;
use super::shutdown::{ShutdownListener, Stopping};
use super::stats::DropReason;

/// The state of the background task.
pub(crate) struct Batcher {
    /// Events as JSON, serialized by `send` (see `encode`).
    pub(crate) queue: mpsc::Receiver<Vec<u8>>,
    /// Notified by `send` when at least a batch is queued.
    pub(crate) batch_ready: Arc<Notify>,
    pub(crate) delivery: Arc<Delivery>,
    pub(crate) batch_size: usize,
    pub(crate) flush_interval: Duration,
    pub(crate) max_in_flight: usize,
    pub(crate) shutdown: ShutdownListener,
}

impl Batcher {
    /// Runs until the queue is closed and drained and every batch settled: after a shutdown,
    /// or once every handle is dropped.
    pub(crate) async fn run(mut self) {
        let permits = Arc::new(Semaphore::new(self.max_in_flight));
        let mut tasks = JoinSet::new();
        let mut batch: Vec<Vec<u8>> = Vec::with_capacity(self.batch_size);
        let mut flush_at: Option<Instant> = None;
        let mut flush_due = false;
        let mut intake_open = true;
        let mut control_open = true;
        let mut stopping: Option<Stopping> = None;
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut pull = false;
        loop {
            let full = batch.len() >= self.batch_size;
            let room = self.batch_size.saturating_sub(batch.len()).max(1);
            // Between a batch's first event and its flush, the queue is not watched (so `send`
            // wakes nobody) unless `send` says a full batch is waiting; at flush time what was
            // queued meanwhile joins the batch before it goes.
            let drained = self.queue.is_empty() || !intake_open;
            let due = !batch.is_empty() && (full || (flush_due && drained) || !intake_open);
            let watch_queue = batch.is_empty() || pull || flush_due || stopping.is_some();
            if batch.is_empty() && !intake_open && tasks.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                () = sleep_until(stopping.as_ref().map_or(far, |s| s.deadline).into()),
                    if stopping.is_some() => {
                    self.give_up(&mut batch, &mut tasks).await;
                    break;
                }
                changed = self.shutdown.deadline.changed(), if control_open && stopping.is_none() => {
                    let open = changed.is_ok();
                    match changed.ok().and_then(|()| *self.shutdown.deadline.borrow_and_update()) {
                        Some(deadline) => stopping = Some(self.begin_stop(deadline)),
                        None => control_open = open,
                    }
                }
                Ok(permit) = permits.clone().acquire_owned(), if due => {
                    let events = std::mem::replace(&mut batch, Vec::with_capacity(self.batch_size));
                    (flush_at, flush_due) = (None, false);
                    self.dispatch(events, permit, &mut tasks);
                }
                () = self.batch_ready.notified(), if intake_open && !full && !watch_queue => {
                    pull = true;
                }
                received = self.queue.recv_many(&mut batch, room),
                    if intake_open && !full && watch_queue => {
                    pull = false;
                    if received == 0 {
                        intake_open = false;
                    } else {
                        self.delivery.counters.taken(received as u64);
                        self.delivery.counters.publish_queued(self.queue.len());
                        flush_at.get_or_insert_with(|| Instant::now() + self.flush_interval);
                    }
                }
                () = sleep_until(flush_at.unwrap_or(far).into()), if flush_at.is_some() && !flush_due => {
                    flush_due = true;
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(error) = joined {
                        tracing::error!(sink = self.delivery.name, %error, "delivery task failed");
                    }
                }
            }
        }
        self.report(stopping);
    }

    /// Stops intake (queued events are still drained) and notes where the counters stand.
    fn begin_stop(&mut self, deadline: Instant) -> Stopping {
        self.queue.close();
        tracing::info!(sink = self.delivery.name, "shutting down: flushing queued events");
        Stopping::begin(deadline, &self.delivery.counters)
    }

    /// Hands a batch to its own delivery task, which holds `permit` until it is settled.
    fn dispatch(&self, events: Vec<Vec<u8>>, permit: OwnedSemaphorePermit, tasks: &mut JoinSet<()>) {
        let shutdown = self.shutdown.deadline.clone();
        tasks.spawn(Arc::clone(&self.delivery).deliver(events, shutdown, permit));
    }

    /// The shutdown deadline passed: drop what is queued, abort the deliveries (their
    /// unsettled events count as dropped by shutdown), and wait for the aborts to land.
    async fn give_up(&mut self, batch: &mut Vec<Vec<u8>>, tasks: &mut JoinSet<()>) {
        let counters = &self.delivery.counters;
        counters.record_dropped(DropReason::Shutdown, batch.len() as u64, true);
        batch.clear();
        self.queue.close();
        let mut queued = 0;
        while self.queue.try_recv().is_ok() {
            queued += 1;
        }
        counters.record_dropped(DropReason::Shutdown, queued, false);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// Publishes the shutdown report, if a shutdown was asked for.
    fn report(&self, stopping: Option<Stopping>) {
        let counters = &self.delivery.counters;
        counters.publish_queued(self.queue.len());
        let stats = counters.snapshot(self.queue.len() as u64);
        let Some(stopping) = stopping else {
            tracing::debug!(
                sink = self.delivery.name,
                ?stats,
                "all handles dropped; background task done"
            );
            return;
        };
        let report = stopping.report(stats);
        if report.undelivered == 0 {
            tracing::info!(sink = self.delivery.name, flushed = report.flushed, stats = ?report.stats, "shut down");
        } else {
            tracing::error!(
                sink = self.delivery.name, flushed = report.flushed, undelivered = report.undelivered,
                stats = ?report.stats, "shut down with undelivered events"
            );
        }
        self.shutdown.report.send_replace(Some(report));
    }
}
