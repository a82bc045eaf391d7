//! WeCom (企业微信) wire format. This module owns everything about how WeCom talks to us
//! on the wire: the callback encryption scheme shared by self-built app callbacks and
//! 智能机器人 (AI bot) callbacks (`crypto`: signatures, AES-256-CBC framing, passive-reply
//! envelopes), and the size-limited, DTD-free parsing of the XML bodies those callbacks
//! carry (`xml`). Those are pure and panic-free, so the ingress can feed them untrusted
//! bytes directly. `callback` turns a decrypted message into a Job; `client` is the
//! messenger that answers through `message/send`.

pub mod callback;
pub mod client;
pub mod crypto;
pub mod xml;

use crypto::{CryptoError, WecomCrypto};
use xml::{WecomMessage, XmlError};

/// Why an app callback body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The outer or inner XML.
    #[error("{0}")]
    Xml(#[from] XmlError),
    /// The signature or the ciphertext.
    #[error("{0}")]
    Crypto(#[from] CryptoError),
}

/// Opens an app callback POST: parses the envelope, checks the signature over its
/// `Encrypt`, decrypts, and parses the message. The whole untrusted-input path of the
/// ingress in one pure function, which is also what the fuzz target drives.
pub fn open_callback(
    crypto: &WecomCrypto,
    msg_signature: &str,
    timestamp: &str,
    nonce: &str,
    body: &[u8],
) -> Result<WecomMessage, OpenError> {
    let text = std::str::from_utf8(body).map_err(|_| XmlError::Malformed("not UTF-8".into()))?;
    let envelope = xml::parse_envelope(text)?;
    let plain = crypto.decrypt_verified(msg_signature, timestamp, nonce, &envelope.encrypt)?;
    Ok(xml::parse_message(&plain)?)
}
