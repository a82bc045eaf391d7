//! WeCom's callback encryption ("WXBizMsgCrypt"), used for self-built app callbacks (XML
//! bodies, receive id = CorpID) and 智能机器人 callbacks (JSON bodies, receive id = "").
//!
//! The scheme has several traps that a generic AES/PKCS#7 stack gets wrong, which is why
//! the framing is done by hand here rather than with the `block-padding` helpers:
//!
//! * The 43-character EncodingAESKey is base64 without its final `=`, and Tencent's own
//!   sample key has non-zero trailing bits, which a canonical decoder rejects. The key is
//!   therefore decoded with a lenient engine; message payloads are still decoded strictly.
//! * PKCS#7 padding is computed over 32-byte blocks (pad byte 1..=32) although AES works
//!   on 16-byte blocks, so AES runs without padding and the pad is checked separately.
//! * The IV is the first 16 bytes of the key, so the same plaintext prefix always yields
//!   the same ciphertext prefix; the 16 random bytes in front of every message are what
//!   keeps ciphertexts distinct.
//! * There is no MAC: the only integrity check is the SHA-1 `msg_signature` over the
//!   token and the ciphertext. It must be verified before decrypting, otherwise the
//!   distinct padding / length / receive-id errors form a padding oracle. Use
//!   [`WecomCrypto::decrypt_verified`] (or [`WecomCrypto::verify_url`]) on untrusted input.
//!
//! Checks run in a fixed order, matching the reference vectors: signature, base64,
//! ciphertext length, padding, message length, receive id, UTF-8.

use std::borrow::Cow;
use std::fmt;

use aes::Aes256;
use base64::Engine;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use cbc::cipher::{Block, BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

/// Length of an EncodingAESKey as shown in the WeCom admin console.
const ENCODING_AES_KEY_LEN: usize = 43;
/// AES block size; the ciphertext must be a whole number of these.
const AES_BLOCK: usize = 16;
/// Block size WeCom uses for its PKCS#7 padding (not the AES block size).
const PAD_BLOCK: usize = 32;
/// Bytes of random prefix in front of every framed message.
const RANDOM_LEN: usize = 16;
/// Random prefix plus the big-endian u32 message length.
const HEADER_LEN: usize = RANDOM_LEN + 4;

/// Decodes the EncodingAESKey. Tencent generates keys whose last character carries
/// non-zero padding bits, so a canonical decoder would refuse valid console keys.
const KEY_ENGINE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

type Aes256CbcEnc = cbc::Encryptor<Aes256>;
type Aes256CbcDec = cbc::Decryptor<Aes256>;

/// Why a WeCom callback could not be authenticated or decrypted. Messages are short,
/// fixed strings and never include the token, key or payload, so they are safe to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The EncodingAESKey is not 43 base64 characters decoding to 32 bytes.
    #[error("invalid EncodingAESKey")]
    InvalidAesKey,
    /// `msg_signature` does not match SHA-1 over the sorted token, timestamp, nonce and payload.
    #[error("msg_signature mismatch")]
    SignatureMismatch,
    /// The encrypted payload is not canonical standard base64.
    #[error("payload is not valid base64")]
    BadBase64,
    /// The decoded ciphertext is empty or not a multiple of the AES block size.
    #[error("ciphertext length is not a positive multiple of 16")]
    BadCiphertextLength,
    /// The decrypted data does not end in valid 32-byte-block PKCS#7 padding.
    #[error("invalid padding")]
    BadPadding,
    /// The embedded message length points past the end of the decrypted data.
    #[error("invalid message length")]
    BadMsgLen,
    /// The bytes after the message are not exactly the configured receive id.
    #[error("receive id mismatch")]
    ReceiveIdMismatch,
    /// The decrypted message is not valid UTF-8.
    #[error("message is not valid UTF-8")]
    NotUtf8,
    /// A URL verification's `echostr` decrypted to something other than a verification
    /// token (a captured message's `Encrypt` replayed to have it decrypted).
    #[error("echostr is not a verification token")]
    NotAnEchostr,
}

/// Longest verification token answered, in characters.
const MAX_ECHOSTR_CHARS: usize = 128;

/// Signs, verifies, encrypts and decrypts WeCom callback payloads for one app or bot.
///
/// Holds the callback token, the 32-byte AES key and the receive id (the CorpID for
/// self-built apps, `""` for 智能机器人). Cheap to clone; the secrets never appear in
/// its `Debug` output.
#[derive(Clone)]
pub struct WecomCrypto {
    token: String,
    key: [u8; 32],
    iv: [u8; 16],
    receive_id: String,
}

impl fmt::Debug for WecomCrypto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WecomCrypto")
            .field("receive_id", &self.receive_id)
            .finish_non_exhaustive()
    }
}

impl WecomCrypto {
    /// Builds a codec from the callback settings of the WeCom admin console.
    ///
    /// `encoding_aes_key` is the 43-character EncodingAESKey; `receive_id` is the CorpID
    /// for self-built apps or `""` for 智能机器人. Fails with
    /// [`CryptoError::InvalidAesKey`] if the key does not decode to exactly 32 bytes.
    pub fn new(token: &str, encoding_aes_key: &str, receive_id: &str) -> Result<Self, CryptoError> {
        if encoding_aes_key.len() != ENCODING_AES_KEY_LEN {
            return Err(CryptoError::InvalidAesKey);
        }
        let decoded = KEY_ENGINE
            .decode(format!("{encoding_aes_key}="))
            .map_err(|_| CryptoError::InvalidAesKey)?;
        let key: [u8; 32] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| CryptoError::InvalidAesKey)?;
        // WeCom derives the IV from the key instead of sending one.
        let iv: [u8; 16] = std::array::from_fn(|i| key[i]);
        Ok(Self {
            token: token.to_owned(),
            key,
            iv,
            receive_id: receive_id.to_owned(),
        })
    }

    /// The receive id this codec expects after every message (CorpID or `""`).
    pub fn receive_id(&self) -> &str {
        &self.receive_id
    }

    /// Lower-case hex SHA-1 of the byte-wise sorted concatenation of token, `timestamp`,
    /// `nonce` and `encrypt`: the `msg_signature` WeCom sends and expects back.
    pub fn signature(&self, timestamp: &str, nonce: &str, encrypt: &str) -> String {
        let mut parts = [self.token.as_str(), timestamp, nonce, encrypt];
        // `str`'s `Ord` is byte-wise, which is what WeCom's reference code does.
        parts.sort_unstable();
        let mut hasher = Sha1::new();
        for part in parts {
            hasher.update(part.as_bytes());
        }
        hex_lower(&hasher.finalize())
    }

    /// Checks `msg_signature` in constant time. The comparison is exact: WeCom always
    /// sends lower-case hex, and the reference vectors reject an upper-cased digest.
    pub fn verify_signature(
        &self,
        msg_signature: &str,
        timestamp: &str,
        nonce: &str,
        encrypt: &str,
    ) -> Result<(), CryptoError> {
        let expected = self.signature(timestamp, nonce, encrypt);
        if bool::from(expected.as_bytes().ct_eq(msg_signature.as_bytes())) {
            Ok(())
        } else {
            Err(CryptoError::SignatureMismatch)
        }
    }

    /// Decrypts a base64 payload (the `Encrypt` element, JSON `encrypt` or `echostr`)
    /// WITHOUT checking its signature. Only for payloads already authenticated by
    /// [`Self::verify_signature`]; on untrusted input use [`Self::decrypt_verified`].
    pub fn decrypt(&self, encrypt_b64: &str) -> Result<String, CryptoError> {
        let mut data = STANDARD
            .decode(encrypt_b64)
            .map_err(|_| CryptoError::BadBase64)?;
        if data.is_empty() || !data.len().is_multiple_of(AES_BLOCK) {
            return Err(CryptoError::BadCiphertextLength);
        }
        let (blocks, _) = Block::<Aes256>::slice_as_chunks_mut(&mut data);
        Aes256CbcDec::new(&self.key.into(), &self.iv.into()).decrypt_blocks(blocks);

        let framed = strip_pkcs7(&data)?;
        let (msg, receive_id) = split_frame(framed)?;
        if !bool::from(receive_id.ct_eq(self.receive_id.as_bytes())) {
            return Err(CryptoError::ReceiveIdMismatch);
        }
        std::str::from_utf8(msg)
            .map(str::to_owned)
            .map_err(|_| CryptoError::NotUtf8)
    }

    /// Verifies `msg_signature` over `encrypt`, then decrypts it. The signature is checked
    /// first so that unauthenticated senders learn nothing from the decryption errors.
    pub fn decrypt_verified(
        &self,
        msg_signature: &str,
        timestamp: &str,
        nonce: &str,
        encrypt: &str,
    ) -> Result<String, CryptoError> {
        self.verify_signature(msg_signature, timestamp, nonce, encrypt)?;
        self.decrypt(encrypt)
    }

    /// Answers the GET URL-verification request: verifies the signature over `echostr`,
    /// decrypts it and returns the plaintext to echo back as the raw response body.
    ///
    /// `echostr` must already be percent-decoded, with `+` kept as `+`: form-decoding it
    /// into a space breaks both the signature and the base64.
    pub fn verify_url(
        &self,
        msg_signature: &str,
        timestamp: &str,
        nonce: &str,
        echostr: &str,
    ) -> Result<String, CryptoError> {
        let plain = self.decrypt_verified(msg_signature, timestamp, nonce, echostr)?;
        // A verification token is a short line of text (WeCom's are ~20 digits). A message
        // is XML (apps) or JSON (AI bots): its ciphertext replayed as a verification must
        // never come back decrypted.
        let message = matches!(
            plain.trim_start().as_bytes().first(),
            Some(b'<' | b'{' | b'[')
        );
        let token = !plain.is_empty()
            && plain.chars().count() <= MAX_ECHOSTR_CHARS
            && !message
            && !plain.chars().any(char::is_control);
        if token {
            Ok(plain)
        } else {
            Err(CryptoError::NotAnEchostr)
        }
    }

    /// Encrypts `msg` with a caller-chosen 16-byte prefix. Deterministic, so tests can
    /// compare against known answers; production code should call [`Self::encrypt`].
    pub fn encrypt_with_random(&self, random16: [u8; 16], msg: &str) -> String {
        let mut data = self.frame(random16, msg.as_bytes());
        let (blocks, _) = Block::<Aes256>::slice_as_chunks_mut(&mut data);
        Aes256CbcEnc::new(&self.key.into(), &self.iv.into()).encrypt_blocks(blocks);
        STANDARD.encode(&data)
    }

    /// Encrypts `msg` behind 16 fresh random bytes and returns it base64-encoded.
    pub fn encrypt(&self, msg: &str) -> String {
        self.encrypt_with_random(rand::random(), msg)
    }

    /// Encrypts a passive reply and signs it: returns `(encrypt, msg_signature)`.
    /// `nonce` should be the nonce of the callback being answered. Wrap the result with
    /// [`render_reply_xml`] for app callbacks; 智能机器人 expects the same values as JSON.
    pub fn encrypt_reply(&self, msg: &str, timestamp: &str, nonce: &str) -> (String, String) {
        let encrypt = self.encrypt(msg);
        let signature = self.signature(timestamp, nonce, &encrypt);
        (encrypt, signature)
    }

    /// Lays out `random | be32(len) | msg | receive_id` and pads it to 32-byte blocks.
    fn frame(&self, random16: [u8; 16], msg: &[u8]) -> Vec<u8> {
        // A &str over 4 GiB cannot be framed. Saturating keeps this total; the receiver
        // then sees trailing bytes that do not equal the receive id and rejects it.
        let msg_len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
        let unpadded = HEADER_LEN + msg.len() + self.receive_id.len();
        let pad = PAD_BLOCK - unpadded % PAD_BLOCK;
        let mut data = Vec::with_capacity(unpadded + pad);
        data.extend_from_slice(&random16);
        data.extend_from_slice(&msg_len.to_be_bytes());
        data.extend_from_slice(msg);
        data.extend_from_slice(self.receive_id.as_bytes());
        // `pad` is in 1..=32, so the cast cannot truncate.
        data.resize(unpadded + pad, pad as u8);
        data
    }
}

/// Renders the passive-reply body for app callbacks, byte-identical to Tencent's
/// libraries. Values go into CDATA (split around any `]]>`) or are escaped, so an odd
/// nonce or timestamp cannot inject markup.
pub fn render_reply_xml(
    encrypt: &str,
    msg_signature: &str,
    timestamp: &str,
    nonce: &str,
) -> String {
    format!(
        "<xml>\n<Encrypt><![CDATA[{}]]></Encrypt>\n\
         <MsgSignature><![CDATA[{}]]></MsgSignature>\n\
         <TimeStamp>{}</TimeStamp>\n\
         <Nonce><![CDATA[{}]]></Nonce>\n</xml>",
        cdata_body(encrypt),
        cdata_body(msg_signature),
        quick_xml::escape::escape(timestamp),
        cdata_body(nonce),
    )
}

/// Makes `s` safe inside `<![CDATA[...]]>` by closing and reopening the section
/// around every `]]>`, which XML parsers reassemble into the original text.
fn cdata_body(s: &str) -> Cow<'_, str> {
    if s.contains("]]>") {
        Cow::Owned(s.replace("]]>", "]]]]><![CDATA[>"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Strips WeCom's PKCS#7 padding (32-byte blocks). Strict: every pad byte must equal
/// the pad length, unlike Tencent's libraries which only read the last byte.
fn strip_pkcs7(data: &[u8]) -> Result<&[u8], CryptoError> {
    let &last = data.last().ok_or(CryptoError::BadPadding)?;
    let pad = usize::from(last);
    if pad == 0 || pad > PAD_BLOCK {
        return Err(CryptoError::BadPadding);
    }
    let body_len = data.len().checked_sub(pad).ok_or(CryptoError::BadPadding)?;
    let (body, padding) = data.split_at(body_len);
    if padding.iter().any(|&b| b != last) {
        return Err(CryptoError::BadPadding);
    }
    Ok(body)
}

/// Splits `random | be32(len) | msg | receive_id` into `(msg, receive_id)`.
fn split_frame(framed: &[u8]) -> Result<(&[u8], &[u8]), CryptoError> {
    let len_bytes: [u8; 4] = framed
        .get(RANDOM_LEN..HEADER_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(CryptoError::BadMsgLen)?;
    let msg_len =
        usize::try_from(u32::from_be_bytes(len_bytes)).map_err(|_| CryptoError::BadMsgLen)?;
    let rest = framed.get(HEADER_LEN..).ok_or(CryptoError::BadMsgLen)?;
    if msg_len > rest.len() {
        return Err(CryptoError::BadMsgLen);
    }
    Ok(rest.split_at(msg_len))
}

fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use rand::{Rng, SeedableRng};
    use serde_json::Value;

    use super::super::xml::{parse_envelope, parse_message};
    use super::*;

    const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vectors/");

    fn load(file: &str) -> Value {
        let path = format!("{VECTORS}{file}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The cases under `key`, refusing an empty or missing list so that a misread
    /// schema cannot make a test pass without checking anything.
    fn cases<'a>(doc: &'a Value, key: &str) -> &'a [Value] {
        let list = doc[key]
            .as_array()
            .unwrap_or_else(|| panic!("vector file has no `{key}` array"));
        assert!(!list.is_empty(), "`{key}` has no cases");
        list
    }

    fn s<'a>(case: &'a Value, key: &str) -> &'a str {
        case[key]
            .as_str()
            .unwrap_or_else(|| panic!("case {} has no string `{key}`", case["id"]))
    }

    fn unhex(hex: &str) -> Vec<u8> {
        assert!(hex.len().is_multiple_of(2), "odd hex length");
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
            .collect()
    }

    fn random16(case: &Value) -> [u8; 16] {
        unhex(s(case, "random_hex")).try_into().expect("16 bytes")
    }

    /// App-callback vectors name the receive id `corp_id`, AI-bot vectors `receive_id`.
    fn crypto_for(case: &Value) -> WecomCrypto {
        let receive_id = case["corp_id"]
            .as_str()
            .or_else(|| case["receive_id"].as_str())
            .expect("corp_id or receive_id");
        WecomCrypto::new(s(case, "token"), s(case, "encoding_aes_key"), receive_id)
            .unwrap_or_else(|e| panic!("case {}: {e}", case["id"]))
    }

    fn expected_error(kind: &str) -> CryptoError {
        match kind {
            "bad_signature" => CryptoError::SignatureMismatch,
            "bad_base64" => CryptoError::BadBase64,
            "bad_ciphertext_length" => CryptoError::BadCiphertextLength,
            "bad_padding" => CryptoError::BadPadding,
            "bad_msg_len" => CryptoError::BadMsgLen,
            "wrong_receiveid" => CryptoError::ReceiveIdMismatch,
            other => panic!("unknown error kind {other:?} in vectors"),
        }
    }

    #[test]
    fn verify_url_never_echoes_a_message() {
        let c = WecomCrypto::new(
            "token",
            "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt",
            "ww1",
        )
        .unwrap();
        for plain in [
            "<xml><Content>secret</Content></xml>",
            "  <xml/>",
            "{\"msgid\":\"1\"}",
            "[1]",
            "line\nbreak",
            "",
        ] {
            let enc = c.encrypt(plain);
            let sig = c.signature("1", "n", &enc);
            assert_eq!(
                c.verify_url(&sig, "1", "n", &enc),
                Err(CryptoError::NotAnEchostr),
                "{plain:?}"
            );
        }
        let long = "9".repeat(MAX_ECHOSTR_CHARS + 1);
        let enc = c.encrypt(&long);
        let sig = c.signature("1", "n", &enc);
        assert_eq!(
            c.verify_url(&sig, "1", "n", &enc),
            Err(CryptoError::NotAnEchostr)
        );
        let enc = c.encrypt("1616140317555161061");
        let sig = c.signature("1", "n", &enc);
        assert_eq!(
            c.verify_url(&sig, "1", "n", &enc).as_deref(),
            Ok("1616140317555161061")
        );
    }

    #[test]
    fn verify_url_vectors() {
        let doc = load("wecom_verify_url.json");
        for case in cases(&doc, "cases") {
            let c = crypto_for(case);
            let (sig, ts, nonce, echostr) = (
                s(case, "msg_signature"),
                s(case, "timestamp"),
                s(case, "nonce"),
                s(case, "echostr"),
            );
            assert_eq!(c.signature(ts, nonce, echostr), sig, "{}", case["id"]);
            assert_eq!(
                c.verify_url(sig, ts, nonce, echostr).as_deref(),
                Ok(s(case, "expected_plain_echostr")),
                "{}",
                case["id"]
            );
            if case["random_hex"].is_string() {
                let echo = s(case, "expected_plain_echostr");
                assert_eq!(
                    c.encrypt_with_random(random16(case), echo),
                    echostr,
                    "{}",
                    case["id"]
                );
            }
        }
    }

    #[test]
    fn flagged_keys_need_the_lenient_key_decoder() {
        let doc = load("wecom_verify_url.json");
        let mut flagged = 0;
        for case in cases(&doc, "cases") {
            if case["encoding_aes_key_has_nonzero_trailing_bits"] == Value::Bool(true) {
                flagged += 1;
                let padded = format!("{}=", s(case, "encoding_aes_key"));
                assert!(STANDARD.decode(padded).is_err(), "{}", case["id"]);
                crypto_for(case);
            }
        }
        assert!(flagged > 0, "no trailing-bits key among the vectors");
    }

    #[test]
    fn decrypt_positive_vectors() {
        let doc = load("wecom_decrypt.json");
        for case in cases(&doc, "cases") {
            let id = &case["id"];
            assert_eq!(s(case, "expect"), "ok", "{id}");
            let c = crypto_for(case);
            let (sig, ts, nonce, encrypt) = (
                s(case, "msg_signature"),
                s(case, "timestamp"),
                s(case, "nonce"),
                s(case, "encrypt"),
            );
            let expected = s(case, "expected_plain_xml");
            assert_eq!(c.signature(ts, nonce, encrypt), sig, "{id}");
            assert_eq!(
                c.decrypt_verified(sig, ts, nonce, encrypt).as_deref(),
                Ok(expected),
                "{id}"
            );
            if let Some(len) = case["msg_len"].as_u64() {
                assert_eq!(expected.len() as u64, len, "{id}");
            }
            if case["random_hex"].is_string() {
                assert_eq!(
                    c.encrypt_with_random(random16(case), expected),
                    encrypt,
                    "{id}"
                );
            }

            // The whole POST path: envelope -> verify + decrypt -> message.
            let envelope = parse_envelope(s(case, "body_xml")).expect("envelope");
            assert_eq!(envelope.encrypt, encrypt, "{id}");
            let plain = c
                .decrypt_verified(sig, ts, nonce, &envelope.encrypt)
                .expect("decrypt");
            let msg = parse_message(&plain).expect("message");
            assert_eq!(msg.msg_type, s(case, "msg_type"), "{id}");
        }
    }

    #[test]
    fn full_pad_block_vector_is_present() {
        // The 32-byte pad is the case most likely to break a 16-byte PKCS#7 unpadder.
        let doc = load("wecom_decrypt.json");
        assert!(
            cases(&doc, "cases")
                .iter()
                .any(|c| c["pad_len"].as_u64() == Some(32))
        );
    }

    #[test]
    fn decrypt_negative_vectors() {
        let doc = load("wecom_decrypt.json");
        let mut kinds = BTreeSet::new();
        for key in ["negative_cases", "extra_negative_cases"] {
            for case in cases(&doc, key) {
                let id = &case["id"];
                let kind = s(case, "expect");
                kinds.insert(kind.to_owned());
                let want = Err(expected_error(kind));
                let c = crypto_for(case);
                let (sig, ts, nonce) = (
                    s(case, "msg_signature"),
                    s(case, "timestamp"),
                    s(case, "nonce"),
                );
                let encrypt = s(case, "encrypt");
                assert_eq!(c.decrypt_verified(sig, ts, nonce, encrypt), want, "{id}");
                assert_eq!(c.verify_url(sig, ts, nonce, encrypt), want, "{id}");
                // The signature is checked before anything else, whatever else is wrong.
                assert_eq!(
                    c.decrypt_verified(&"0".repeat(40), ts, nonce, encrypt),
                    Err(CryptoError::SignatureMismatch),
                    "{id}"
                );

                let envelope = parse_envelope(s(case, "body_xml")).expect("envelope");
                assert_eq!(envelope.encrypt, encrypt, "{id}");
                assert_eq!(
                    c.decrypt_verified(sig, ts, nonce, &envelope.encrypt),
                    want,
                    "{id}"
                );
            }
        }
        let all: BTreeSet<String> = [
            "bad_signature",
            "bad_base64",
            "bad_ciphertext_length",
            "bad_padding",
            "bad_msg_len",
            "wrong_receiveid",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        assert_eq!(kinds, all, "every error kind is exercised");
    }

    #[test]
    fn encrypt_reply_vectors() {
        let doc = load("wecom_encrypt_reply.json");
        for case in cases(&doc, "cases") {
            let id = &case["id"];
            let c = crypto_for(case);
            let (ts, nonce, plain) = (
                s(case, "timestamp"),
                s(case, "nonce"),
                s(case, "reply_plain_xml"),
            );
            assert_eq!(
                c.frame(random16(case), plain.as_bytes()),
                unhex(s(case, "padded_plaintext_hex")),
                "{id}"
            );
            let encrypt = c.encrypt_with_random(random16(case), plain);
            assert_eq!(encrypt, s(case, "expected_encrypt"), "{id}");
            let sig = c.signature(ts, nonce, &encrypt);
            assert_eq!(sig, s(case, "expected_msg_signature"), "{id}");
            assert_eq!(
                render_reply_xml(&encrypt, &sig, ts, nonce),
                s(case, "expected_response_xml"),
                "{id}"
            );
            assert_eq!(
                c.decrypt_verified(&sig, ts, nonce, &encrypt).as_deref(),
                Ok(plain),
                "{id}"
            );

            // Random prefix: not comparable byte-wise, but must round-trip and verify.
            let (encrypt, sig) = c.encrypt_reply(plain, ts, nonce);
            assert_ne!(encrypt, s(case, "expected_encrypt"), "{id}");
            assert_eq!(
                c.decrypt_verified(&sig, ts, nonce, &encrypt).as_deref(),
                Ok(plain),
                "{id}"
            );
            let envelope = parse_envelope(&render_reply_xml(&encrypt, &sig, ts, nonce))
                .expect("own reply parses");
            assert_eq!(envelope.encrypt, encrypt, "{id}");
        }
    }

    #[test]
    fn aibot_vectors() {
        let doc = load("wecom_aibot.json");
        let mut directions = BTreeSet::new();
        for case in cases(&doc, "cases") {
            let id = &case["id"];
            let c = crypto_for(case);
            assert_eq!(c.receive_id(), "", "{id}");
            let (ts, nonce) = (s(case, "timestamp"), s(case, "nonce"));
            let direction = s(case, "direction");
            directions.insert(direction.to_owned());
            match direction {
                "callback" => {
                    let body: Value = serde_json::from_str(s(case, "body_json")).expect("json");
                    let encrypt = body["encrypt"].as_str().expect("encrypt");
                    let sig = s(case, "msg_signature");
                    let plain = s(case, "expected_plain_json");
                    assert_eq!(c.signature(ts, nonce, encrypt), sig, "{id}");
                    assert_eq!(
                        c.decrypt_verified(sig, ts, nonce, encrypt).as_deref(),
                        Ok(plain),
                        "{id}"
                    );
                    assert_eq!(
                        c.encrypt_with_random(random16(case), plain),
                        encrypt,
                        "{id}"
                    );
                    // The app codec (CorpID as receive id) must refuse bot payloads.
                    let app = WecomCrypto::new(
                        s(case, "token"),
                        s(case, "encoding_aes_key"),
                        "ww1436e0e65a779aee",
                    )
                    .expect("key");
                    assert_eq!(
                        app.decrypt_verified(sig, ts, nonce, encrypt),
                        Err(CryptoError::ReceiveIdMismatch),
                        "{id}"
                    );
                }
                "reply" => {
                    let plain = s(case, "reply_plain_json");
                    let encrypt = c.encrypt_with_random(random16(case), plain);
                    assert_eq!(encrypt, s(case, "expected_encrypt"), "{id}");
                    let sig = c.signature(ts, nonce, &encrypt);
                    assert_eq!(sig, s(case, "expected_msg_signature"), "{id}");
                    let response = serde_json::json!({
                        "encrypt": encrypt,
                        "msgsignature": sig,
                        "timestamp": ts.parse::<i64>().expect("numeric timestamp"),
                        "nonce": nonce,
                    });
                    let expected: Value =
                        serde_json::from_str(s(case, "expected_response_json")).expect("json");
                    assert_eq!(response, expected, "{id}");
                    let (encrypt, sig) = c.encrypt_reply(plain, ts, nonce);
                    assert_eq!(
                        c.decrypt_verified(&sig, ts, nonce, &encrypt).as_deref(),
                        Ok(plain),
                        "{id}"
                    );
                }
                other => panic!("unknown direction {other:?}"),
            }
        }
        assert!(directions.contains("callback") && directions.contains("reply"));
    }

    const TOKEN: &str = "QDG6eK";
    const KEY: &str = "N8B4UnzjCKzzClkMWRyzUHfn9JfHNSBEJKSD8pQ3WCA";
    const CORP: &str = "wwa1b2c3d4e5f60718";

    fn sample() -> WecomCrypto {
        WecomCrypto::new(TOKEN, KEY, CORP).expect("valid key")
    }

    /// Encrypts raw bytes (already padded) with `c`'s key, for hand-built bad frames.
    fn seal(c: &WecomCrypto, mut data: Vec<u8>) -> String {
        let (blocks, _) = Block::<Aes256>::slice_as_chunks_mut(&mut data);
        Aes256CbcEnc::new(&c.key.into(), &c.iv.into()).encrypt_blocks(blocks);
        STANDARD.encode(&data)
    }

    fn pad32(mut data: Vec<u8>) -> Vec<u8> {
        let pad = PAD_BLOCK - data.len() % PAD_BLOCK;
        data.resize(data.len() + pad, pad as u8);
        data
    }

    #[test]
    fn rejects_bad_keys() {
        for key in [
            "",
            "short",
            &KEY[..42],
            &format!("{KEY}A"),
            &format!("{}=", &KEY[..42]),
            &format!("{}*", &KEY[..42]),
            &format!("{}-", &KEY[..42]),
            "ééééééééééééééééééééé\u{41}",
        ] {
            assert_eq!(
                WecomCrypto::new(TOKEN, key, CORP).map(|_| ()),
                Err(CryptoError::InvalidAesKey),
                "{key:?}"
            );
        }
    }

    #[test]
    fn debug_and_errors_do_not_leak_secrets() {
        let c = sample();
        let debug = format!("{c:?}");
        assert!(debug.contains(CORP), "{debug}");
        assert!(!debug.contains(TOKEN) && !debug.contains("key"), "{debug}");
        assert!(!debug.contains(&format!("{:?}", c.key)), "{debug}");
        for e in [
            CryptoError::InvalidAesKey,
            CryptoError::SignatureMismatch,
            CryptoError::BadBase64,
            CryptoError::BadCiphertextLength,
            CryptoError::BadPadding,
            CryptoError::BadMsgLen,
            CryptoError::ReceiveIdMismatch,
            CryptoError::NotUtf8,
        ] {
            let text = e.to_string();
            assert!(!text.is_empty() && !text.contains(TOKEN) && !text.contains(KEY));
        }
    }

    #[test]
    fn signature_sorts_bytewise_and_compares_exactly() {
        let c = sample();
        let sig = c.signature("1700000000", "nonce", "payload");
        assert_eq!(sig.len(), 40);
        // The same four strings in any argument order sign identically.
        assert_eq!(sig, c.signature("nonce", "payload", "1700000000"));
        assert!(
            c.verify_signature(&sig, "1700000000", "nonce", "payload")
                .is_ok()
        );
        for bad in [
            String::new(),
            sig.to_uppercase(),
            sig[..39].to_owned(),
            format!("{sig}0"),
        ] {
            assert_eq!(
                c.verify_signature(&bad, "1700000000", "nonce", "payload"),
                Err(CryptoError::SignatureMismatch)
            );
        }
    }

    #[test]
    fn rejects_hand_built_bad_frames() {
        let c = sample();
        let frame = |msg: &[u8], receive_id: &[u8], claimed_len: u32| {
            let mut d = vec![7u8; RANDOM_LEN];
            d.extend_from_slice(&claimed_len.to_be_bytes());
            d.extend_from_slice(msg);
            d.extend_from_slice(receive_id);
            pad32(d)
        };
        let good = seal(&c, frame(b"hi", CORP.as_bytes(), 2));
        assert_eq!(c.decrypt(&good).as_deref(), Ok("hi"));

        // Shorter than the 20-byte header once unpadded.
        assert_eq!(
            c.decrypt(&seal(&c, pad32(vec![1; 10]))),
            Err(CryptoError::BadMsgLen)
        );
        // A whole block of padding and nothing else.
        assert_eq!(
            c.decrypt(&seal(&c, vec![32; 32])),
            Err(CryptoError::BadMsgLen)
        );
        // Claimed length one past the data.
        let over = frame(b"hi", CORP.as_bytes(), 3 + CORP.len() as u32);
        assert_eq!(c.decrypt(&seal(&c, over)), Err(CryptoError::BadMsgLen));
        assert_eq!(
            c.decrypt(&seal(&c, frame(b"hi", CORP.as_bytes(), u32::MAX))),
            Err(CryptoError::BadMsgLen)
        );
        // Claimed length too short: part of the message is read as receive id.
        assert_eq!(
            c.decrypt(&seal(&c, frame(b"hi", CORP.as_bytes(), 1))),
            Err(CryptoError::ReceiveIdMismatch)
        );
        assert_eq!(
            c.decrypt(&seal(&c, frame(b"hi", b"", 2))),
            Err(CryptoError::ReceiveIdMismatch)
        );
        assert_eq!(
            c.decrypt(&seal(&c, frame(&[0xff, 0xfe], CORP.as_bytes(), 2))),
            Err(CryptoError::NotUtf8)
        );
        // Padding bytes that disagree with the pad length.
        let mut bad_pad = frame(b"hi", CORP.as_bytes(), 2);
        let n = bad_pad.len();
        bad_pad[n - 2] ^= 1;
        assert_eq!(c.decrypt(&seal(&c, bad_pad)), Err(CryptoError::BadPadding));
        // 16-byte aligned but padded to 16 rather than 32 is still fine if the pad is valid.
        let mut d = vec![0u8; RANDOM_LEN];
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend_from_slice(b"hi");
        d.extend_from_slice(CORP.as_bytes());
        let pad = 48 - d.len();
        d.resize(48, pad as u8);
        assert_eq!(c.decrypt(&seal(&c, d)).as_deref(), Ok("hi"));
    }

    #[test]
    fn encrypt_round_trips_edge_lengths() {
        for receive_id in [CORP, ""] {
            let c = WecomCrypto::new(TOKEN, KEY, receive_id).expect("key");
            for len in [0usize, 1, 11, 12, 13, 31, 32, 33, 100, 5000] {
                let msg: String = "é".repeat(len / 2) + &"x".repeat(len % 2);
                let encrypt = c.encrypt(&msg);
                let raw = STANDARD.decode(&encrypt).expect("base64");
                assert!(raw.len().is_multiple_of(PAD_BLOCK));
                assert_eq!(c.decrypt(&encrypt).as_deref(), Ok(msg.as_str()));
                assert_ne!(encrypt, c.encrypt(&msg), "prefix must be random");
            }
        }
    }

    #[test]
    fn reply_xml_cannot_be_broken_by_values() {
        let xml = render_reply_xml("E", "S", "1<2&", "a]]>b");
        let envelope = parse_envelope(&xml).expect("still well-formed");
        assert_eq!(envelope.encrypt, "E");
        assert!(xml.contains("<TimeStamp>1&lt;2&amp;</TimeStamp>"));
    }

    #[test]
    fn garbage_never_panics() {
        let c = sample();
        let mut inputs: Vec<String> = [
            "",
            "=",
            "====",
            "A",
            "AA==",
            "AAAAAAAAAAAAAAAAAAAAAA==",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "\u{0}\u{0}\u{0}\u{0}",
            "🤖🤖🤖🤖",
            "%2B%2F%3D",
            "<xml></xml>",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for blocks in 1..=8 {
            for _ in 0..64 {
                let mut bytes = vec![0u8; blocks * AES_BLOCK];
                rng.fill(&mut bytes[..]);
                inputs.push(STANDARD.encode(&bytes));
            }
        }
        for input in &inputs {
            let _ = c.decrypt(input);
            let _ = c.verify_url("", "", "", input);
            let sig = c.signature("1", "2", input);
            let _ = c.decrypt_verified(&sig, "1", "2", input);
            let _ = WecomCrypto::new(input, input, input);
        }
    }
}
