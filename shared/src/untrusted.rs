//! Untrusted text on its way into a log line: cut to a bound and with control characters
//! escaped, so a 60 KB bot id or an ANSI escape in a frame cannot flood or forge the logs.

/// `text` cut to at most `max` characters (then `…`), control characters escaped.
pub fn clip(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 4);
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn cuts_and_escapes() {
        assert_eq!(clip("abc", 5), "abc");
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("a\u{1b}[31mb\n", 20), "a\\u{1b}[31mb\\n");
        assert_eq!(clip("钉钉钉", 2), "钉钉…");
    }
}
