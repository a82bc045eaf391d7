//! DingTalk's HMAC-SHA256 signatures: the `sign` header of robot callbacks and the
//! `&timestamp=&sign=` query of custom group robots. Both sign `timestamp + "\n" + secret`
//! with the secret as key; they differ only in how the result is carried. Pure functions
//! that take `now`, so tests control time.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// How far a callback's timestamp may be from our clock (DingTalk: one hour, inclusive).
pub const MAX_SKEW_MS: i64 = 3_600_000;

/// Why a DingTalk callback signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The `timestamp` or `sign` header is absent.
    #[error("missing timestamp or sign header")]
    MissingHeader,
    /// The `timestamp` header is not a decimal number of milliseconds.
    #[error("timestamp is not a number")]
    MalformedTimestamp,
    /// The timestamp is more than an hour away from now.
    #[error("timestamp outside the one-hour window")]
    StaleTimestamp,
    /// The signature does not match the app secret.
    #[error("signature mismatch")]
    SignatureMismatch,
}

/// Base64(HMAC-SHA256(key = secret, msg = timestamp + "\n" + secret)).
pub fn sign(secret: &str, timestamp: &str) -> String {
    STANDARD.encode(raw_sign(secret, timestamp))
}

fn raw_sign(secret: &str, timestamp: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(timestamp.as_bytes());
    mac.update(b"\n");
    mac.update(secret.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// Checks a robot callback's `timestamp` and `sign` headers against `secret` at `now_ms`.
/// The timestamp window is checked first (cheap), then the signature in constant time.
pub fn verify_callback(
    secret: &str,
    timestamp: Option<&str>,
    sign_header: Option<&str>,
    now_ms: i64,
) -> Result<(), SignError> {
    let (Some(timestamp), Some(sign_header)) = (timestamp, sign_header) else {
        return Err(SignError::MissingHeader);
    };
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignError::MalformedTimestamp)?;
    // abs_diff: `now - ts` overflows (and `abs` wraps) for timestamps near i64::MIN.
    if now_ms.abs_diff(ts) > MAX_SKEW_MS.unsigned_abs() {
        return Err(SignError::StaleTimestamp);
    }
    let expected = sign(secret, timestamp);
    if expected.as_bytes().ct_eq(sign_header.as_bytes()).into() {
        Ok(())
    } else {
        Err(SignError::SignatureMismatch)
    }
}

/// The query suffix `timestamp=…&sign=…` (sign percent-encoded) for a custom group robot.
pub fn webhook_query(secret: &str, timestamp_ms: i64) -> String {
    let ts = timestamp_ms.to_string();
    let sig = sign(secret, &ts);
    format!("timestamp={ts}&sign={}", percent_encode_b64(&sig))
}

/// Percent-encodes the three characters standard base64 may contain besides alphanumerics.
fn percent_encode_b64(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '+' => out.push_str("%2B"),
            '/' => out.push_str("%2F"),
            '=' => out.push_str("%3D"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors(name: &str) -> Value {
        let path = format!("{}/../tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn callback_sign_matches_every_vector() {
        let v = vectors("dingtalk_callback_sign.json");
        let cases = v["cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let secret = case["app_secret"].as_str().unwrap();
            let ts = case["timestamp"].as_str().unwrap();
            let expected = case["expected_sign"].as_str().unwrap();
            assert_eq!(sign(secret, ts), expected, "case {}", case["id"]);
            let now = ts.parse::<i64>().unwrap();
            assert_eq!(
                verify_callback(secret, Some(ts), Some(expected), now),
                Ok(())
            );
        }
    }

    #[test]
    fn callback_window_cases_match_vectors() {
        let v = vectors("dingtalk_callback_sign.json");
        let cases = v["timestamp_window_cases"]["cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let ts = case["timestamp"].as_str().unwrap();
            let now = case["now_ms"].as_i64().unwrap();
            let valid = case["expect_valid"].as_bool().unwrap();
            let sig = sign("window-secret", ts);
            let got = verify_callback("window-secret", Some(ts), Some(&sig), now);
            assert_eq!(got.is_ok(), valid, "case {} got {got:?}", case["id"]);
        }
    }

    #[test]
    fn webhook_sign_matches_every_vector() {
        let v = vectors("dingtalk_webhook_sign.json");
        for case in v["cases"].as_array().unwrap() {
            let secret = case["secret"].as_str().unwrap();
            let ts: i64 = case["timestamp"].as_str().unwrap().parse().unwrap();
            let q = webhook_query(secret, ts);
            let expected = format!(
                "timestamp={ts}&sign={}",
                case["expected_sign_urlencoded"].as_str().unwrap()
            );
            assert_eq!(q, expected, "case {}", case["id"]);
        }
    }

    #[test]
    fn forged_signature_is_a_mismatch() {
        let ts = "1700000000000";
        let good = sign("secret", ts);
        assert_eq!(
            verify_callback("other", Some(ts), Some(&good), 1_700_000_000_000),
            Err(SignError::SignatureMismatch)
        );
        assert_eq!(
            verify_callback("secret", Some("abc"), Some(&good), 1_700_000_000_000),
            Err(SignError::MalformedTimestamp)
        );
        assert_eq!(
            verify_callback("secret", None, Some(&good), 0),
            Err(SignError::MissingHeader)
        );
    }

    #[test]
    fn timestamps_at_the_ends_of_i64_are_stale_not_wrapped() {
        let now = 1_700_000_000_000_i64;
        for ts in [i64::MIN, i64::MIN + now, i64::MAX, -now] {
            let ts = ts.to_string();
            assert_eq!(
                verify_callback("secret", Some(&ts), Some(&sign("secret", &ts)), now),
                Err(SignError::StaleTimestamp),
                "{ts}"
            );
        }
    }
}
