//! Conversation order within one worker: jobs of one conversation run one after another in
//! the order they were taken from the queue, so each sees the history its predecessor
//! wrote. The consumer loop takes a turn synchronously as it receives a delivery (that fixes
//! the order); the job's task then waits for its predecessor's turn to end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Per conversation key: the generation and completion signal of its last job.
type Tails = Arc<Mutex<HashMap<String, (u64, oneshot::Receiver<()>)>>>;

/// Turn-taking per conversation key.
#[derive(Debug, Default)]
pub(crate) struct ConversationOrder {
    tails: Tails,
    next_gen: Mutex<u64>,
}

/// One job's place in its conversation's line. Dropping it lets the next job go.
#[derive(Debug)]
pub(crate) struct Turn {
    predecessor: Option<oneshot::Receiver<()>>,
    _done: oneshot::Sender<()>,
    key: String,
    generation: u64,
    tails: Tails,
}

impl ConversationOrder {
    /// Places a job at the end of `key`'s line.
    pub(crate) fn take_turn(&self, key: &str) -> Turn {
        let generation = {
            let mut g = self.next_gen.lock().unwrap();
            *g += 1;
            *g
        };
        let (tx, rx) = oneshot::channel();
        let predecessor = self
            .tails
            .lock()
            .unwrap()
            .insert(key.to_string(), (generation, rx))
            .map(|(_, rx)| rx);
        Turn {
            predecessor,
            _done: tx,
            key: key.to_string(),
            generation,
            tails: self.tails.clone(),
        }
    }
}

impl Turn {
    /// Waits until the previous job of the conversation has finished.
    pub(crate) async fn wait_for_predecessor(&mut self) {
        if let Some(rx) = self.predecessor.take() {
            // Err means the predecessor's Turn was dropped: it is finished either way.
            let _ = rx.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        // The last job of a conversation removes its entry, so the map holds only live lines.
        let mut tails = self.tails.lock().unwrap();
        if tails
            .get(&self.key)
            .is_some_and(|(g, _)| *g == self.generation)
        {
            tails.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn jobs_of_one_conversation_run_in_turn_order() {
        let order = ConversationOrder::default();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for i in 0..5u64 {
            let mut turn = order.take_turn("c");
            let log = log.clone();
            handles.push(tokio::spawn(async move {
                turn.wait_for_predecessor().await;
                tokio::time::sleep(Duration::from_millis(10 * (5 - i))).await;
                log.lock().unwrap().push(i);
                drop(turn);
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert!(order.tails.lock().unwrap().is_empty());
    }
}
