use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use super::EventSink;
use crate::CloudEvent;

/// Keeps events in memory: for tests. Clones share the same events.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use tower_openmeter::{CloudEvent, EventSink, MemorySink, Subject};
///
/// let sink = MemorySink::new();
/// let event = CloudEvent::new("id", "src", "prompt", Subject::new("c").unwrap(), Default::default());
/// sink.send(event);
/// let events = sink.wait_for(1, Duration::from_secs(1)).await.unwrap();
/// assert_eq!(events[0].id, "id");
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct MemorySink {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    events: Mutex<Vec<CloudEvent>>,
    changed: Notify,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of every event received so far.
    pub fn events(&self) -> Vec<CloudEvent> {
        self.lock().clone()
    }

    /// Removes and returns every event received so far.
    pub fn take(&self) -> Vec<CloudEvent> {
        std::mem::take(&mut *self.lock())
    }

    /// Waits until at least `n` events have arrived, then returns a copy of all of them; on
    /// timeout returns what arrived in `Err`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<CloudEvent>, Vec<CloudEvent>> {
        let wait = async {
            loop {
                let notified = self.shared.changed.notified();
                {
                    let events = self.lock();
                    if events.len() >= n {
                        return events.clone();
                    }
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| self.events())
    }

    fn lock(&self) -> MutexGuard<'_, Vec<CloudEvent>> {
        // A panic elsewhere while holding the lock leaves the Vec valid; keep serving it.
        self.shared.events.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl EventSink for MemorySink {
    fn send(&self, event: CloudEvent) {
        self.lock().push(event);
        self.shared.changed.notify_waiters();
    }

    fn send_all(&self, events: Vec<CloudEvent>) {
        self.lock().extend(events);
        self.shared.changed.notify_waiters();
    }
}
