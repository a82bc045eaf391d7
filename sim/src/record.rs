//! What a fake received, in arrival order, with a wait that wakes on each new record
//! instead of polling: shared by every fake so tests wait the same way everywhere.

use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;

/// An append-only record of received items.
#[derive(Debug)]
pub struct Recorder<T> {
    items: Mutex<Vec<T>>,
    notify: Notify,
}

impl<T> Default for Recorder<T> {
    fn default() -> Self {
        Self {
            items: Mutex::new(Vec::new()),
            notify: Notify::new(),
        }
    }
}

impl<T: Clone> Recorder<T> {
    /// Appends an item and wakes waiters.
    pub fn push(&self, item: T) {
        self.items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(item);
        self.notify.notify_waiters();
    }

    /// Everything recorded so far.
    pub fn all(&self) -> Vec<T> {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The items recorded after the first `n`, in arrival order (none if `n` or fewer are
    /// recorded): for readers that follow a long record without copying all of it again.
    pub fn since(&self, n: usize) -> Vec<T> {
        let items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        items.get(n..).map(<[T]>::to_vec).unwrap_or_default()
    }

    /// How many items are recorded.
    pub fn len(&self) -> usize {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything recorded.
    pub fn clear(&self) {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Waits until at least `n` items are recorded or `timeout` passes; returns what is there.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.len() >= n {
                return self.all();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.all();
            }
        }
    }
}
