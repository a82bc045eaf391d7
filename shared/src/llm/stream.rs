//! Reading a streamed chat completion (PROTOCOLS.md §h): each event's data is a
//! `chat.completion.chunk` whose `choices[0].delta.content` adds to the answer, or the
//! `include_usage` chunk (`choices: []`, `usage`), or a mid-stream `{"error": …}` (the HTTP
//! status was already 200), or `[DONE]`. `reasoning_content` deltas and `<think>` blocks are
//! never part of the visible text, not even for a moment while a tag is half received.

use super::{Completion, LlmError, strip_reasoning};
use serde::Deserialize;

/// What one event meant.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// More may follow.
    More,
    /// `[DONE]`: the stream is complete.
    Done,
}

/// The answer as far as the stream has come.
#[derive(Debug, Default)]
pub struct StreamState {
    /// Content deltas as received, reasoning tags included.
    raw: String,
    /// A choice reported its `finish_reason`.
    finished: bool,
    prompt_tokens: u64,
    completion_tokens: u64,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<super::Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

impl StreamState {
    /// Takes one event's data.
    pub fn on_data(&mut self, data: &str) -> Result<Step, LlmError> {
        let data = data.trim();
        if data == "[DONE]" {
            return Ok(Step::Done);
        }
        let chunk: Chunk = serde_json::from_str(data)
            .map_err(|e| LlmError::Malformed(format!("stream chunk: {e}")))?;
        if let Some(error) = chunk.error {
            let message = error["message"].as_str().unwrap_or("no message");
            return Err(LlmError::Interrupted(super::trimmed(message)));
        }
        if let Some(u) = chunk.usage {
            self.prompt_tokens = u.prompt_tokens;
            self.completion_tokens = u.completion_tokens;
        }
        if let Some(choice) = chunk.choices.into_iter().next() {
            if let Some(text) = choice.delta.and_then(|d| d.content) {
                self.raw.push_str(&text);
            }
            self.finished |= choice.finish_reason.is_some();
        }
        Ok(Step::More)
    }

    /// The text a chatter may see now: reasoning removed, and a trailing fragment that may
    /// be the start of a `<think>` tag held back until it is known not to be one.
    pub fn visible(&self) -> String {
        let raw = self.raw.as_str();
        let cut = (1.."<think>".len())
            .rev()
            .find(|&n| raw.ends_with(&"<think>"[..n]))
            .map_or(raw.len(), |n| raw.len() - n);
        strip_reasoning(&raw[..cut])
    }

    /// Whether a choice said it finished.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// The whole answer once the stream is over.
    pub fn into_completion(self) -> Result<Completion, LlmError> {
        let text = strip_reasoning(&self.raw);
        if text.is_empty() {
            return Err(LlmError::Malformed("empty answer".into()));
        }
        Ok(Completion {
            upstream: String::new(),
            text,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str) -> String {
        serde_json::json!({"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":content},"finish_reason":null}]}).to_string()
    }

    #[test]
    fn content_accumulates_and_reasoning_stays_hidden() {
        let mut s = StreamState::default();
        let reasoning = r#"{"choices":[{"index":0,"delta":{"reasoning_content":"secret"}}]}"#;
        assert_eq!(s.on_data(reasoning), Ok(Step::More));
        assert_eq!(s.visible(), "");
        for piece in ["Hel", "lo <th", "ink>hidden</th", "ink> world"] {
            s.on_data(&chunk(piece)).unwrap();
            assert!(!s.visible().contains('<'), "{:?}", s.visible());
            assert!(!s.visible().contains("hidden"));
        }
        assert_eq!(s.visible(), "Hello  world");
        s.on_data(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#)
            .unwrap();
        s.on_data(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#)
            .unwrap();
        assert!(s.finished());
        assert_eq!(s.on_data("[DONE]"), Ok(Step::Done));
        let c = s.into_completion().unwrap();
        assert_eq!(
            (c.text.as_str(), c.prompt_tokens, c.completion_tokens),
            ("Hello  world", 5, 2)
        );
    }

    #[test]
    fn a_mid_stream_error_object_ends_the_answer() {
        let mut s = StreamState::default();
        s.on_data(&chunk("partial")).unwrap();
        let e = s
            .on_data(r#"{"error":{"message":"overloaded","type":"server_error"}}"#)
            .unwrap_err();
        assert_eq!(e, LlmError::Interrupted("overloaded".into()));
    }

    #[test]
    fn malformed_chunks_and_empty_answers_are_errors() {
        let mut s = StreamState::default();
        assert!(matches!(s.on_data("{nope"), Err(LlmError::Malformed(_))));
        assert!(StreamState::default().into_completion().is_err());
    }
}
