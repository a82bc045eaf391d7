//! Publishing with a confirm.
//!
//! A publish waits for the publisher confirm, at most `confirm_timeout_ms`. Every publish
//! is `mandatory`: a message no queue took is confirmed with an *ack plus a returned message*,
//! so an ack alone proves nothing and a return counts as a failure. Many publishes share one
//! confirm channel and are in flight together; only the hand-over of the frames is
//! serialised (lapin numbers a publish before it queues its frames, and two tasks racing
//! there would get each other's confirms), never the wait for the confirm.

use super::Inner;
use super::QueueError;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use std::sync::PoisonError;

impl Inner {
    /// Publishes to `exchange` (`""`: the default exchange, which routes to the queue named
    /// `routing_key`) and waits for the confirm, at most `confirm_timeout`. Ok only for an
    /// ack without a returned message.
    pub(super) async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), QueueError> {
        let link = self.link()?;
        let confirmed = async {
            let mut publish = std::pin::pin!(link.publisher.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                payload,
                properties,
            ));
            // lapin numbers a publish and queues its frames in the first poll, before its
            // first await (the hand-over of the frames to its I/O thread): only that poll
            // is serialised, so publishes from many tasks never wait for each other's
            // frames to be written and the I/O thread writes them in batches.
            let first = std::future::poll_fn(|cx| {
                let _order = link
                    .publish_order
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                std::task::Poll::Ready(publish.as_mut().poll(cx))
            })
            .await;
            let pending = match first {
                std::task::Poll::Ready(handed_over) => handed_over,
                std::task::Poll::Pending => publish.await,
            }
            .map_err(|e| self.unavailable("publish", e))?;
            pending
                .await
                .map_err(|e| self.unavailable("publish confirm", e))
        };
        let confirmation = tokio::time::timeout(self.confirm_timeout, confirmed)
            .await
            .map_err(|_| QueueError::ConfirmTimeout)??;
        let target = || {
            if exchange.is_empty() {
                routing_key.to_string()
            } else {
                format!("exchange {exchange} (key {routing_key})")
            }
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => {
                let returned_id = returned.delivery.properties.message_id().clone();
                tracing::warn!(
                    target = %target(),
                    returned_id = ?returned_id.as_ref().map(ShortString::as_str),
                    "the broker returned a message: no queue took it"
                );
                Err(QueueError::Unavailable(format!(
                    "the broker could not route the message to {} ({} {})",
                    target(),
                    returned.reply_code,
                    returned.reply_text
                )))
            }
            Confirmation::Nack(_) => Err(QueueError::Unavailable(format!(
                "the broker refused the message for {} (nack)",
                target()
            ))),
            Confirmation::NotRequested => Err(QueueError::Unavailable(
                "publisher confirms are not enabled on the channel".into(),
            )),
        }
    }
}
