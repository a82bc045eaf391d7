//! Splitting long answers into parts a platform accepts, none of it lost. Limits are in
//! characters (DingTalk) or UTF-8 bytes (WeCom); cuts prefer a paragraph break, then a line
//! break, then a sentence end or space, and never fall inside a character. A fenced code
//! block cut in two is closed and reopened so both parts render.

/// How a platform measures message length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// At most this many Unicode scalar values.
    Chars(usize),
    /// At most this many UTF-8 bytes.
    Bytes(usize),
}

impl Limit {
    fn measure(self, s: &str) -> usize {
        match self {
            Limit::Chars(_) => s.chars().count(),
            Limit::Bytes(_) => s.len(),
        }
    }

    fn max(self) -> usize {
        match self {
            Limit::Chars(n) | Limit::Bytes(n) => n,
        }
    }

    /// Byte index of the longest prefix of `s` within `budget`, on a char boundary.
    fn prefix_end(self, s: &str, budget: usize) -> usize {
        match self {
            Limit::Chars(_) => s
                .char_indices()
                .nth(budget)
                .map(|(i, _)| i)
                .unwrap_or(s.len()),
            Limit::Bytes(_) => {
                let mut end = budget.min(s.len());
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                end
            }
        }
    }
}

const FENCE: &str = "```";

/// The longest prefix of `s` of at most `max` UTF-8 bytes that ends on a character boundary.
pub fn truncate_bytes(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Splits `text` into parts that each fit `limit`. Joining the parts (minus the fence
/// markers added to keep code blocks balanced) gives back the text.
pub fn split(text: &str, limit: Limit) -> Vec<String> {
    // Room for a closing and a reopening fence, so fixing code blocks never overflows.
    let reserve = FENCE.len() + 1;
    let max = limit.max().max(reserve + 16);
    if limit.measure(text) <= limit.max() {
        return vec![text.to_string()];
    }
    let mut parts = Vec::new();
    let mut rest = text;
    let mut reopen = false;
    while !rest.is_empty() {
        let prefix = if reopen { "```\n" } else { "" };
        let budget = max - limit.measure(prefix) - reserve;
        if limit.measure(rest) + limit.measure(prefix) <= max {
            parts.push(format!("{prefix}{rest}"));
            break;
        }
        let hard = limit.prefix_end(rest, budget);
        let cut = best_cut(&rest[..hard]);
        let (head, tail) = rest.split_at(cut);
        let mut part = format!("{prefix}{}", head.trim_end());
        let open_fences = part.matches(FENCE).count() % 2 == 1;
        if open_fences {
            if !part.ends_with('\n') {
                part.push('\n');
            }
            part.push_str(FENCE);
        }
        reopen = open_fences;
        parts.push(part);
        rest = tail.trim_start_matches(['\n']);
    }
    parts
}

/// Where to cut inside `window`: the last paragraph break in its second half, else line
/// break, else sentence end, else space, else the whole window.
fn best_cut(window: &str) -> usize {
    let half = window.len() / 2;
    let after_half = |i: &usize| *i >= half;
    if let Some(i) = window.rfind("\n\n").filter(after_half) {
        return i + 2;
    }
    if let Some(i) = window.rfind('\n').filter(after_half) {
        return i + 1;
    }
    for end in ["。", "！", "？", ". ", "! ", "? ", "；", "; "] {
        if let Some(i) = window.rfind(end).filter(after_half) {
            return i + end.len();
        }
    }
    if let Some(i) = window.rfind(' ').filter(after_half) {
        return i + 1;
    }
    window.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip_fences(parts: &[String]) -> String {
        parts
            .concat()
            .replace("```\n```\n", "")
            .replace("\n```", "")
    }

    #[test]
    fn short_text_is_one_part() {
        assert_eq!(split("hello", Limit::Chars(10)), vec!["hello"]);
    }

    #[test]
    fn paragraphs_are_preferred_and_nothing_is_lost() {
        let para = "word ".repeat(30);
        let text = format!("{para}\n\n{para}\n\n{para}");
        let parts = split(&text, Limit::Chars(200));
        assert!(parts.len() >= 2);
        for p in &parts {
            assert!(p.chars().count() <= 200, "{}", p.len());
        }
        let words: usize = parts.iter().map(|p| p.matches("word").count()).sum();
        assert_eq!(words, 90);
    }

    #[test]
    fn byte_limit_never_cuts_inside_a_character() {
        let text = "中文字符".repeat(600);
        let parts = split(&text, Limit::Bytes(2048));
        for p in &parts {
            assert!(p.len() <= 2048);
        }
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn unbroken_text_is_cut_hard() {
        let text = "x".repeat(1000);
        let parts = split(&text, Limit::Chars(300));
        assert_eq!(parts.concat(), text);
        assert!(parts.iter().all(|p| p.len() <= 300));
    }

    #[test]
    fn code_blocks_stay_balanced() {
        let code: String = (0..80).map(|i| format!("let x{i} = {i};\n")).collect();
        let text = format!("Here:\n```rust\n{code}```\nDone.");
        let parts = split(&text, Limit::Chars(400));
        assert!(parts.len() > 1);
        for p in &parts {
            assert_eq!(p.matches("```").count() % 2, 0, "{p}");
            assert!(p.chars().count() <= 400);
        }
        for i in 0..80 {
            assert!(strip_fences(&parts).contains(&format!("let x{i} = {i};")));
        }
    }
}
