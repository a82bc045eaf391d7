//! A server-sent-events decoder (the WHATWG event-stream rules) for model streams: bytes
//! arrive split anywhere, even inside a UTF-8 character; lines end in `\n`, `\r\n` or `\r`;
//! lines starting with `:` are comments (providers' keep-alives); `data:` lines of one event
//! are joined with `\n`; `event:`, `id:` and `retry:` are accepted and ignored; a blank line
//! ends an event. Only the `data` of each event matters to a chat completion stream.

/// Turns a byte stream into the `data` of each complete event.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of the line not yet ended.
    line: Vec<u8>,
    /// `data` lines of the event being read.
    data: Option<String>,
    /// The last byte was `\r`: a following `\n` belongs to the same line end.
    after_cr: bool,
}

/// Longest line kept: a provider sending more without a line end is broken, and a stream
/// must not grow memory without bound.
const MAX_LINE_BYTES: usize = 4 << 20;

/// The stream broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event stream line longer than {MAX_LINE_BYTES} bytes")]
pub struct LineTooLong;

impl SseDecoder {
    /// Feeds the next bytes; returns the data of every event they complete, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<String>, LineTooLong> {
        let mut events = Vec::new();
        for &b in bytes {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(data) = self.line_ended(&line) {
                        events.push(data);
                    }
                }
                _ => {
                    self.after_cr = false;
                    if self.line.len() >= MAX_LINE_BYTES {
                        return Err(LineTooLong);
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(events)
    }

    /// The data of an event left unterminated when the stream ended (the spec discards
    /// it; a provider that closes right after its last `data:` line still meant it).
    pub fn finish(&mut self) -> Option<String> {
        let line = std::mem::take(&mut self.line);
        if !line.is_empty() {
            self.line_ended(&line);
        }
        self.data.take()
    }

    fn line_ended(&mut self, line: &[u8]) -> Option<String> {
        if line.is_empty() {
            return self.data.take();
        }
        if line[0] == b':' {
            return None;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(input: &[u8], piece: usize) -> Vec<String> {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            out.extend(d.feed(chunk).unwrap());
        }
        out.extend(d.finish());
        out
    }

    #[test]
    fn events_survive_any_split_and_any_line_end() {
        let input = ": keep-alive\n\nevent: message\nid: 7\ndata: {\"a\":\r\ndata: \"é\"}\r\n\r\nretry: 10\ndata:[DONE]\r\r";
        let want = vec!["{\"a\":\n\"é\"}".to_string(), "[DONE]".to_string()];
        for piece in 1..input.len() {
            assert_eq!(
                decode_in_pieces(input.as_bytes(), piece),
                want,
                "piece {piece}"
            );
        }
    }

    #[test]
    fn comments_and_unknown_fields_make_no_event() {
        assert!(decode_in_pieces(b": ping\n\n:\n\nevent: x\n\n", 3).is_empty());
    }

    #[test]
    fn an_unterminated_last_event_is_kept() {
        assert_eq!(decode_in_pieces(b"data: last", 4), vec!["last".to_string()]);
    }

    #[test]
    fn an_endless_line_is_refused() {
        let mut d = SseDecoder::default();
        let big = vec![b'x'; MAX_LINE_BYTES + 1];
        assert_eq!(d.feed(&big), Err(LineTooLong));
    }
}
