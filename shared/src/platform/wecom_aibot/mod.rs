//! WeCom AI bots (智能机器人, API mode): WeCom's way into group chats. Callbacks are the
//! app callbacks' crypto (`wecom::crypto`, receive id `""`) around JSON instead of XML;
//! answers are passive replies: the message callback is answered at once with a `stream`
//! id, and WeCom then keeps asking ("refresh" callbacks) for the text so far until a reply
//! says `finish`. `callback` parses a decrypted callback and turns a message into a Job;
//! `stream` is the answer's progress in the cache, written by the worker and read by
//! whichever ingress WeCom asks, and who delivers the final answer (the stream or the
//! `response_url`); `client` is the worker's side (the live reply and the `response_url`).

pub mod callback;
pub mod client;
pub mod stream;

use crate::platform::wecom::crypto::{CryptoError, WecomCrypto};
use callback::Callback;
use serde::Deserialize;

/// Why an AI bot callback body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AibotError {
    /// The envelope or the decrypted JSON is not what WeCom sends. The detail names the
    /// place, never the content.
    #[error("malformed callback: {0}")]
    Malformed(String),
    /// The signature or the ciphertext.
    #[error("{0}")]
    Crypto(#[from] CryptoError),
}

impl AibotError {
    pub(crate) fn json(e: &serde_json::Error) -> Self {
        // serde_json's messages quote the offending input; keep only where it was.
        AibotError::Malformed(format!(
            "{:?} JSON at line {} column {}",
            e.classify(),
            e.line(),
            e.column()
        ))
    }
}

#[derive(Deserialize)]
struct Envelope {
    encrypt: String,
}

/// Opens an AI bot callback POST: parses the `{"encrypt": …}` envelope, checks the
/// signature over it, decrypts (receive id `""`), and parses the callback strictly. The
/// whole untrusted-input path of the ingress in one pure function, which is also what the
/// fuzz target drives.
pub fn open_callback(
    crypto: &WecomCrypto,
    msg_signature: &str,
    timestamp: &str,
    nonce: &str,
    body: &[u8],
) -> Result<Callback, AibotError> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(|e| AibotError::json(&e))?;
    let plain = crypto.decrypt_verified(msg_signature, timestamp, nonce, &envelope.encrypt)?;
    callback::parse(&plain)
}

/// The encrypted passive-reply body for the plain JSON `reply`: `encrypt`, `msgsignature`,
/// `timestamp` (integer seconds) and the callback's `nonce`, which WeCom expects back.
pub fn reply_body(
    crypto: &WecomCrypto,
    reply: &serde_json::Value,
    nonce: &str,
    now_ms: i64,
) -> String {
    let timestamp = now_ms.div_euclid(1000);
    let (encrypt, signature) =
        crypto.encrypt_reply(&reply.to_string(), &timestamp.to_string(), nonce);
    serde_json::json!({
        "encrypt": encrypt,
        "msgsignature": signature,
        "timestamp": timestamp,
        "nonce": nonce,
    })
    .to_string()
}

/// The plain reply showing `content` in stream `id`; `finish` ends the stream.
pub fn stream_reply(id: &str, finish: bool, content: &str) -> serde_json::Value {
    serde_json::json!({"msgtype": "stream", "stream": {"id": id, "finish": finish, "content": content}})
}

/// The plain text reply (only for `enter_chat`: the welcome text).
pub fn text_reply(content: &str) -> serde_json::Value {
    serde_json::json!({"msgtype": "text", "text": {"content": content}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/vectors/wecom_aibot.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn the_vector_callbacks_open() {
        let doc = vectors();
        for case in doc["cases"].as_array().unwrap() {
            if case["direction"] != "callback" {
                continue;
            }
            let s = |k: &str| case[k].as_str().unwrap();
            let crypto = WecomCrypto::new(s("token"), s("encoding_aes_key"), "").unwrap();
            let opened = open_callback(
                &crypto,
                s("msg_signature"),
                s("timestamp"),
                s("nonce"),
                s("body_json").as_bytes(),
            );
            assert!(opened.is_ok(), "{}: {opened:?}", s("id"));
            let bad = open_callback(
                &crypto,
                &"0".repeat(40),
                s("timestamp"),
                s("nonce"),
                s("body_json").as_bytes(),
            );
            assert_eq!(
                bad.unwrap_err(),
                AibotError::Crypto(CryptoError::SignatureMismatch)
            );
        }
    }

    #[test]
    fn replies_are_signed_over_the_callbacks_nonce_and_decrypt() {
        let crypto =
            WecomCrypto::new("tok", "N8B4UnzjCKzzClkMWRyzUHfn9JfHNSBEJKSD8pQ3WCA", "").unwrap();
        let body = reply_body(
            &crypto,
            &stream_reply("s1", false, "你好"),
            "777",
            1_750_000_102_345,
        );
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["timestamp"], 1_750_000_102);
        assert_eq!(v["nonce"], "777");
        let plain = crypto
            .decrypt_verified(
                v["msgsignature"].as_str().unwrap(),
                "1750000102",
                "777",
                v["encrypt"].as_str().unwrap(),
            )
            .unwrap();
        let plain: Value = serde_json::from_str(&plain).unwrap();
        assert_eq!(plain, stream_reply("s1", false, "你好"));
    }

    #[test]
    fn malformed_envelopes_are_refused_without_quoting_them() {
        let crypto =
            WecomCrypto::new("tok", "N8B4UnzjCKzzClkMWRyzUHfn9JfHNSBEJKSD8pQ3WCA", "").unwrap();
        for body in [
            &b"not json secret-words"[..],
            b"{}",
            b"{\"encrypt\": 5}",
            b"[]",
        ] {
            match open_callback(&crypto, "x", "1", "2", body) {
                Err(AibotError::Malformed(d)) => assert!(!d.contains("secret"), "{d}"),
                other => panic!("{other:?}"),
            }
        }
    }
}
