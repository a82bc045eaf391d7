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
