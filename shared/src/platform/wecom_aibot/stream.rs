//! An AI bot answer's progress, kept in the cache so any ingress replica can answer
//! WeCom's refreshes: `aibot:{stream}` holds the text shown so far and whether it is final
//! (created by the ingress when it queues the message, so a repeat of the `msgid` is
//! recognised and a refresh before the worker starts sees "nothing yet", not "unknown").
//! Exactly one of two paths delivers the final answer — the stream or the `response_url` —
//! and `aibot:{stream}:end` records which, taken once with set-if-absent: by the ingress
//! when it serves the final text, by the worker when no refresh took it in time or the
//! stream window passed. Whoever comes second sees the other's claim.

use crate::cache::{Cache, CacheError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// WeCom's limit on a stream reply's `content` (and a `response_url` markdown), in bytes.
pub const CONTENT_LIMIT: usize = 20_480;

/// How long progress and claims are kept: the `response_url`'s hour, and a margin.
pub const STATE_TTL: Duration = Duration::from_secs(2 * 3600);

/// The stream's last words when the answer comes through the `response_url` instead.
pub const FOLLOWS: &str = "（回答将以单独消息发送。）(The answer follows as a separate message.)";

/// Ends a stream whose answer is longer than WeCom shows; the rest follows.
pub const CONTINUED: &str = "\n\n……（接下一条消息 / continued in the next message）";

/// The stream id the message `msgid` to bot `bot_id` is answered with: the same for every
/// repeat of the message, and not guessable from it alone in another bot.
pub fn stream_id(bot_id: &str, msgid: &str) -> String {
    let digest = Sha256::new()
        .chain_update(bot_id.as_bytes())
        .chain_update([0])
        .chain_update(msgid.as_bytes())
        .finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// What the stream shows now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    /// The text so far (cumulative), or the whole answer once `finish`.
    pub text: String,
    /// The answer is complete.
    pub finish: bool,
    /// When the ingress accepted the message (ms since epoch): the window counts from here.
    pub started_ms: i64,
}

/// Who delivers the final answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// A refresh reply carries it.
    Stream,
    /// The worker posts it to the `response_url`.
    ResponseUrl,
}

impl Claim {
    fn as_str(self) -> &'static str {
        match self {
            Claim::Stream => "stream",
            Claim::ResponseUrl => "url",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "stream" => Some(Claim::Stream),
            "url" => Some(Claim::ResponseUrl),
            _ => None,
        }
    }
}

fn state_key(stream: &str) -> String {
    format!("aibot:{stream}")
}

fn claim_key(stream: &str) -> String {
    format!("aibot:{stream}:end")
}

fn posted_key(stream: &str) -> String {
    format!("aibot:{stream}:posted")
}

/// The stream's progress in one cache.
pub struct Streams<'a>(pub &'a dyn Cache);

impl std::fmt::Debug for Streams<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Streams")
    }
}

impl Streams<'_> {
    /// Creates an empty stream; false if it exists (the message was queued before).
    pub async fn begin(&self, stream: &str, now_ms: i64) -> Result<bool, CacheError> {
        let state = StreamState {
            text: String::new(),
            finish: false,
            started_ms: now_ms,
        };
        self.0
            .set_nx(&state_key(stream), &encode(&state), STATE_TTL)
            .await
    }

    /// Forgets a stream whose message could not be queued, so WeCom's retry is not taken
    /// for a repeat.
    pub async fn abandon(&self, stream: &str) -> Result<(), CacheError> {
        self.0.delete(&state_key(stream)).await
    }

    /// The stream's progress; None if unknown or expired. An unreadable value reads as
    /// unknown.
    pub async fn read(&self, stream: &str) -> Result<Option<StreamState>, CacheError> {
        Ok(self
            .0
            .get(&state_key(stream))
            .await?
            .and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Shows `state`.
    pub async fn write(&self, stream: &str, state: &StreamState) -> Result<(), CacheError> {
        self.0
            .set(&state_key(stream), &encode(state), STATE_TTL)
            .await
    }

    /// Claims the final answer for `by`; returns who has it (`by`, or who came first).
    pub async fn claim(&self, stream: &str, by: Claim) -> Result<Claim, CacheError> {
        let key = claim_key(stream);
        if self.0.set_nx(&key, by.as_str(), STATE_TTL).await? {
            return Ok(by);
        }
        Ok(self.claimed(stream).await?.unwrap_or(by))
    }

    /// Who has claimed the final answer, if anyone.
    pub async fn claimed(&self, stream: &str) -> Result<Option<Claim>, CacheError> {
        Ok(self
            .0
            .get(&claim_key(stream))
            .await?
            .as_deref()
            .and_then(Claim::parse))
    }

    /// Whether the `response_url` post was made.
    pub async fn posted(&self, stream: &str) -> Result<bool, CacheError> {
        Ok(self.0.get(&posted_key(stream)).await?.is_some())
    }

    /// Records the `response_url` post (it is one-shot).
    pub async fn mark_posted(&self, stream: &str) -> Result<(), CacheError> {
        self.0.set(&posted_key(stream), "1", STATE_TTL).await
    }
}

fn encode(state: &StreamState) -> String {
    serde_json::to_string(state).expect("stream state serializes")
}

/// Splits an answer for the stream: what the stream shows (at most [`CONTENT_LIMIT`] bytes,
/// ending in [`CONTINUED`] when cut) and the rest, if any, for the `response_url`. A cut
/// falls on a line break near the limit when there is one.
pub fn fit(text: &str) -> (String, Option<&str>) {
    if text.len() <= CONTENT_LIMIT {
        return (text.to_string(), None);
    }
    let head = crate::split::truncate_bytes(text, CONTENT_LIMIT - CONTINUED.len());
    let cut = match head.rfind('\n') {
        Some(i) if i + 2048 >= head.len() => i,
        _ => head.len(),
    };
    (
        format!("{}{CONTINUED}", &text[..cut]),
        Some(text[cut..].trim_start()),
    )
}

/// `text` cut to what one `response_url` post carries.
pub fn fit_post(text: &str) -> &str {
    crate::split::truncate_bytes(text, CONTENT_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::memory::MemoryCache;

    #[test]
    fn stream_ids_are_stable_per_bot_and_message() {
        assert_eq!(stream_id("a", "m"), stream_id("a", "m"));
        assert_ne!(stream_id("a", "m"), stream_id("b", "m"));
        assert_ne!(stream_id("a", "bm"), stream_id("ab", "m"));
        assert_eq!(stream_id("a", "m").len(), 32);
    }

    #[test]
    fn long_answers_are_cut_for_the_stream_and_the_rest_kept() {
        let short = "好".repeat(100);
        assert_eq!(fit(&short), (short.clone(), None));
        let long = format!("{}\n{}", "好".repeat(6500), "尾".repeat(2000));
        let (shown, rest) = fit(&long);
        assert!(shown.len() <= CONTENT_LIMIT && shown.ends_with(CONTINUED));
        assert_eq!(rest, Some("尾".repeat(2000).as_str()));
        let unbroken = "长".repeat(10_000);
        let (shown, rest) = fit(&unbroken);
        assert!(shown.len() <= CONTENT_LIMIT);
        assert_eq!(
            shown.len() - CONTINUED.len() + rest.unwrap().len(),
            unbroken.len()
        );
    }

    #[tokio::test]
    async fn a_stream_begins_once_and_its_end_is_claimed_once() {
        let cache = MemoryCache::new();
        let s = Streams(&cache);
        assert!(s.begin("x", 5).await.unwrap());
        assert!(!s.begin("x", 6).await.unwrap());
        assert_eq!(s.read("x").await.unwrap().unwrap().started_ms, 5);
        assert_eq!(s.claimed("x").await.unwrap(), None);
        assert_eq!(s.claim("x", Claim::Stream).await.unwrap(), Claim::Stream);
        assert_eq!(
            s.claim("x", Claim::ResponseUrl).await.unwrap(),
            Claim::Stream
        );
        assert_eq!(s.claim("x", Claim::Stream).await.unwrap(), Claim::Stream);
        assert!(s.read("y").await.unwrap().is_none());
        s.abandon("x").await.unwrap();
        assert!(s.begin("x", 7).await.unwrap());
    }
}
