//! A string that never prints. App secrets, AES keys, API keys and access tokens live in
//! `Secret` so that a stray `{:?}` in a log line or an error message shows `***` instead.

use serde::{Deserialize, Deserializer};
use std::fmt;

/// A secret string: `Debug` and `Display` print `***`; read it with [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret value, for the one place that must send or sign with it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Removes a connection URL and its password from text bound for a log line or an error,
/// since client libraries quote the URL in some errors.
#[derive(Clone, Default)]
pub struct Scrubber {
    secrets: Vec<String>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrubber(***)")
    }
}

impl Scrubber {
    /// Scrubs `url`, and its password both as written and percent-decoded.
    pub fn for_url(url: &Secret) -> Self {
        let mut scrub = Self::default();
        scrub.add(url.expose());
        if let Ok(parsed) = url::Url::parse(url.expose())
            && let Some(password) = parsed.password()
        {
            scrub.add(password);
            scrub.add(&percent_decode(password));
        }
        scrub
    }

    /// Adds one more string to remove.
    pub fn add(&mut self, secret: &str) {
        if !secret.is_empty() && !self.secrets.iter().any(|s| s == secret) {
            self.secrets.push(secret.to_string());
            // Longest first, so the URL goes before the password inside it.
            self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    /// `text` with every secret replaced by `***`.
    pub fn clean(&self, text: impl fmt::Display) -> String {
        let mut text = text.to_string();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        text
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_formats_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn scrubber_removes_url_and_password_in_both_spellings() {
        let url = Secret::new("amqp://user:p%40ss%2Fw0rd@broker:5672/%2f");
        let s = Scrubber::for_url(&url);
        let cleaned = s.clean(format!(
            "Invalid URL: '{}' (p@ss/w0rd, p%40ss%2Fw0rd)",
            url.expose()
        ));
        assert_eq!(cleaned, "Invalid URL: '***' (***, ***)");
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
