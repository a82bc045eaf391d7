//! The XML WeCom sends to app callbacks: the outer envelope of a POST body (which only
//! carries `Encrypt` plus routing hints) and the decrypted message inside it.
//!
//! The envelope arrives unauthenticated, so parsing is deliberately narrow. Bodies over
//! 64 KiB are refused before any parsing; document type declarations are refused
//! outright (WeCom never sends one, and they are the vehicle for XXE and entity-expansion
//! bombs); the only entity references resolved are the five predefined by XML and
//! numeric character references. quick-xml is a streaming, non-recursive reader, so
//! deep nesting costs a counter, not stack.
//!
//! Both formats are a flat `<xml>` root whose direct children each hold one value as
//! text or CDATA, so parsing collects exactly those. Elements nested inside a direct
//! child (some events carry small structures) are skipped without failing the parse.

use std::collections::BTreeMap;
use std::fmt;

use quick_xml::escape::resolve_xml_entity;
use quick_xml::events::{BytesStart, Event};
use quick_xml::reader::Reader;

/// Largest body accepted, in bytes. Real callbacks are a few KiB; the biggest message
/// WeCom documents (a 2048-byte text) stays far below this even after encryption.
pub const MAX_XML_BYTES: usize = 64 * 1024;

/// Longest excerpt of a parser diagnostic kept in [`XmlError::Malformed`], so that
/// hostile input cannot turn an error into a log flood.
const MAX_ERROR_CHARS: usize = 160;

/// Why a WeCom XML body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// The body is larger than [`MAX_XML_BYTES`].
    #[error("XML body larger than 64 KiB")]
    TooLarge,
    /// The body contains a document type or entity declaration.
    #[error("XML DTD or entity declaration not allowed")]
    Forbidden,
    /// The body is not a well-formed `<xml>` document of the expected shape.
    #[error("malformed XML: {0}")]
    Malformed(String),
    /// A required element is absent.
    #[error("missing <{0}> element")]
    MissingField(&'static str),
}

/// The outer XML of an encrypted app callback POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// `ToUserName`: the CorpID the callback is addressed to, if present.
    pub to_user_name: Option<String>,
    /// `AgentID`: the app the callback belongs to, if present.
    pub agent_id: Option<String>,
    /// `Encrypt`: the base64 ciphertext, exactly as sent (possibly empty; the crypto
    /// layer rejects that after checking the signature).
    pub encrypt: String,
}

/// A decrypted app callback: a user message or an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WecomMessage {
    /// `ToUserName`: the receiving CorpID.
    pub to_user_name: String,
    /// `FromUserName`: the sender's UserID.
    pub from_user_name: String,
    /// `CreateTime` in Unix seconds, or 0 when absent.
    pub create_time: i64,
    /// `MsgType`: `text`, `image`, `voice`, `event`, ...
    pub msg_type: String,
    /// `AgentID`: the app that received the message.
    pub agent_id: Option<String>,
    /// `MsgId`: the message id, absent for events; the natural deduplication key.
    pub msg_id: Option<String>,
    /// `Content`: the text of a `text` message.
    pub content: Option<String>,
    /// `Event`: the event name when `msg_type` is `event`.
    pub event: Option<String>,
    /// `EventKey`: the event's key, e.g. the menu item of a `click` event.
    pub event_key: Option<String>,
    /// Every direct child of `<xml>` by element name, including the ones above, so
    /// handlers can read type-specific fields (`PicUrl`, `MediaId`, `Format`, ...).
    pub fields: BTreeMap<String, String>,
}

/// Parses the envelope of an encrypted app callback POST body. Elements may come in
/// any order, as text or CDATA; only `Encrypt` is required.
pub fn parse_envelope(body: &str) -> Result<Envelope, XmlError> {
    let mut fields = parse_fields(body)?;
    let encrypt = fields
        .remove("Encrypt")
        .ok_or(XmlError::MissingField("Encrypt"))?;
    Ok(Envelope {
        to_user_name: fields.remove("ToUserName"),
        agent_id: fields.remove("AgentID"),
        encrypt,
    })
}

/// Parses a decrypted callback message. `ToUserName`, `FromUserName` and `MsgType` are
/// required; `CreateTime` defaults to 0 when absent but must be an integer if present.
pub fn parse_message(xml: &str) -> Result<WecomMessage, XmlError> {
    let fields = parse_fields(xml)?;
    let required = |name: &'static str| {
        fields
            .get(name)
            .cloned()
            .ok_or(XmlError::MissingField(name))
    };
    let optional = |name: &str| fields.get(name).cloned();
    let create_time = match fields.get("CreateTime") {
        None => 0,
        Some(t) => t
            .trim()
            .parse()
            .map_err(|_| malformed("CreateTime is not an integer"))?,
    };
    Ok(WecomMessage {
        to_user_name: required("ToUserName")?,
        from_user_name: required("FromUserName")?,
        create_time,
        msg_type: required("MsgType")?,
        agent_id: optional("AgentID"),
        msg_id: optional("MsgId"),
        content: optional("Content"),
        event: optional("Event"),
        event_key: optional("EventKey"),
        fields,
    })
}

/// A direct child of `<xml>` whose value is being collected.
struct Child {
    name: String,
    text: String,
    has_elements: bool,
}

impl Child {
    fn value(self) -> String {
        // A container's own text is just the indentation between its children.
        if self.has_elements {
            self.text.trim().to_owned()
        } else {
            self.text
        }
    }
}

/// Collects the text of every direct child of the `<xml>` root.
fn parse_fields(xml: &str) -> Result<BTreeMap<String, String>, XmlError> {
    if xml.len() > MAX_XML_BYTES {
        return Err(XmlError::TooLarge);
    }
    if declares_dtd(xml) {
        return Err(XmlError::Forbidden);
    }

    let mut reader = Reader::from_str(xml);
    let mut fields = BTreeMap::new();
    // 0: outside the root, 1: inside <xml>, 2: inside a direct child, 3+: nested deeper.
    let mut depth = 0usize;
    let mut seen_root = false;
    let mut child: Option<Child> = None;

    loop {
        let event = reader
            .read_event()
            .map_err(|e| malformed(format_args!("{e} (at byte {})", reader.error_position())))?;
        match event {
            Event::Start(start) => {
                let name = element_name(&start)?;
                match depth {
                    0 => open_root(&name, &mut seen_root)?,
                    1 => {
                        child = Some(Child {
                            name,
                            text: String::new(),
                            has_elements: false,
                        });
                    }
                    _ => mark_nested(&mut child),
                }
                depth += 1;
            }
            Event::Empty(start) => {
                let name = element_name(&start)?;
                match depth {
                    0 => open_root(&name, &mut seen_root)?,
                    1 => insert_field(&mut fields, name, String::new())?,
                    _ => mark_nested(&mut child),
                }
            }
            Event::End(_) => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| malformed("unmatched end tag"))?;
                if depth == 1
                    && let Some(done) = child.take()
                {
                    let name = done.name.clone();
                    insert_field(&mut fields, name, done.value())?;
                }
            }
            Event::Text(text) => {
                let text = text.xml10_content();
                if depth == 2 {
                    push_text(&mut child, &text);
                } else if depth == 0 && !is_xml_whitespace(&text) {
                    return Err(malformed("text outside the root element"));
                }
            }
            Event::CData(cdata) => match depth {
                0 => return Err(malformed("CDATA outside the root element")),
                2 => push_text(&mut child, &cdata.xml10_content()),
                _ => {}
            },
            Event::GeneralRef(reference) => {
                if depth == 0 {
                    return Err(malformed("reference outside the root element"));
                }
                let resolved = match reference.resolve_char_ref() {
                    Ok(Some(ch)) => ch.to_string(),
                    Ok(None) => resolve_xml_entity(&reference)
                        .ok_or_else(|| malformed("undefined entity reference"))?
                        .to_owned(),
                    Err(_) => return Err(malformed("invalid character reference")),
                };
                if depth == 2 {
                    push_text(&mut child, &resolved);
                }
            }
            // Also caught by the pre-scan; kept so the guarantee does not hinge on it.
            Event::DocType(_) => return Err(XmlError::Forbidden),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }

    if depth != 0 {
        return Err(malformed("unexpected end of document"));
    }
    if !seen_root {
        return Err(malformed("no <xml> root element"));
    }
    Ok(fields)
}

/// The element's name, after checking its attributes are well-formed. quick-xml parses
/// attributes lazily, so without this `<Encrypt a=>` would pass unnoticed.
fn element_name(start: &BytesStart<'_>) -> Result<String, XmlError> {
    for attribute in start.attributes() {
        attribute.map_err(|e| malformed(format_args!("bad attribute: {e}")))?;
    }
    Ok(start.name().as_ref().to_owned())
}

fn open_root(name: &str, seen_root: &mut bool) -> Result<(), XmlError> {
    if *seen_root {
        return Err(malformed("more than one root element"));
    }
    if name != "xml" {
        return Err(malformed(format_args!(
            "root element is <{name}>, not <xml>"
        )));
    }
    *seen_root = true;
    Ok(())
}

fn mark_nested(child: &mut Option<Child>) {
    if let Some(child) = child {
        child.has_elements = true;
    }
}

fn push_text(child: &mut Option<Child>, text: &str) {
    if let Some(child) = child {
        child.text.push_str(text);
    }
}

/// Refuses repeated elements: WeCom never sends them, and silently picking one would
/// leave the meaning of the document up to the parser.
fn insert_field(
    fields: &mut BTreeMap<String, String>,
    name: String,
    value: String,
) -> Result<(), XmlError> {
    if fields.contains_key(&name) {
        return Err(malformed(format_args!("duplicate <{name}> element")));
    }
    fields.insert(name, value);
    Ok(())
}

fn is_xml_whitespace(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// Builds [`XmlError::Malformed`], truncated so input echoed by the parser stays short.
fn malformed(detail: impl fmt::Display) -> XmlError {
    let detail = detail.to_string();
    match detail.char_indices().nth(MAX_ERROR_CHARS) {
        Some((cut, _)) => XmlError::Malformed(format!("{}...", &detail[..cut])),
        None => XmlError::Malformed(detail),
    }
}

/// Whether `xml` contains a `<!DOCTYPE` or `<!ENTITY` declaration (ASCII case-insensitive)
/// outside CDATA sections. CDATA is skipped because message text arrives in CDATA, and a
/// user pasting `<!DOCTYPE html>` into a chat is data, not a declaration.
fn declares_dtd(xml: &str) -> bool {
    const CDATA_OPEN: &[u8] = b"[CDATA[";
    const CDATA_CLOSE: &[u8] = b"]]>";
    let bytes = xml.as_bytes();
    let mut pos = 0;
    while let Some(found) = bytes.get(pos..).and_then(|rest| find(rest, b"<!")) {
        let after = pos + found + 2;
        let rest = bytes.get(after..).unwrap_or_default();
        if rest.starts_with(CDATA_OPEN) {
            let body = after + CDATA_OPEN.len();
            match bytes.get(body..).and_then(|b| find(b, CDATA_CLOSE)) {
                Some(end) => pos = body + end + CDATA_CLOSE.len(),
                // Unterminated CDATA: nothing after it can be markup, and the parser
                // rejects the document anyway.
                None => return false,
            }
            continue;
        }
        if starts_with_ignore_case(rest, b"DOCTYPE") || starts_with_ignore_case(rest, b"ENTITY") {
            return true;
        }
        pos = after;
    }
    false
}

/// Substring search; SIMD-accelerated, because the scan runs over every callback body.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

fn starts_with_ignore_case(haystack: &[u8], prefix: &[u8]) -> bool {
    haystack
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vectors/");

    fn load(file: &str) -> Value {
        let path = format!("{VECTORS}{file}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

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

    /// The text between `open` and `close` in `xml`, with a CDATA wrapper removed.
    fn raw_between<'a>(xml: &'a str, open: &str, close: &str) -> Option<&'a str> {
        let start = xml.find(open)? + open.len();
        let len = xml[start..].find(close)?;
        let inner = &xml[start..start + len];
        Some(
            inner
                .strip_prefix("<![CDATA[")
                .and_then(|i| i.strip_suffix("]]>"))
                .unwrap_or(inner),
        )
    }

    #[test]
    fn decrypted_vector_messages_parse() {
        let doc = load("wecom_decrypt.json");
        for case in cases(&doc, "cases") {
            let id = &case["id"];
            let xml = s(case, "expected_plain_xml");
            let msg = parse_message(xml).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(msg.msg_type, s(case, "msg_type"), "{id}");
            assert_eq!(msg.to_user_name, s(case, "corp_id"), "{id}");
            assert_eq!(msg.create_time.to_string(), s(case, "timestamp"), "{id}");
            assert!(!msg.from_user_name.is_empty(), "{id}");
            assert_eq!(msg.fields["MsgType"], msg.msg_type, "{id}");
            assert_eq!(
                msg.agent_id.as_deref(),
                raw_between(xml, "<AgentID>", "</AgentID>")
            );
            match msg.msg_type.as_str() {
                "text" => {
                    let content = raw_between(xml, "<Content>", "</Content>");
                    assert!(content.is_some(), "{id}");
                    assert_eq!(msg.content.as_deref(), content, "{id}");
                    assert!(msg.msg_id.is_some(), "{id}");
                }
                "event" => {
                    assert!(msg.event.is_some(), "{id}");
                    assert_eq!(
                        msg.event_key.as_deref(),
                        raw_between(xml, "<EventKey>", "</EventKey>"),
                        "{id}"
                    );
                }
                "image" => assert!(msg.fields.contains_key("PicUrl"), "{id}"),
                "voice" => assert!(msg.fields.contains_key("MediaId"), "{id}"),
                other => panic!("{id}: unexpected msg_type {other}"),
            }
        }
    }

    #[test]
    fn vector_envelopes_parse() {
        let doc = load("wecom_decrypt.json");
        for key in ["cases", "negative_cases", "extra_negative_cases"] {
            for case in cases(&doc, key) {
                let id = &case["id"];
                let body = s(case, "body_xml");
                let env = parse_envelope(body).unwrap_or_else(|e| panic!("{id}: {e}"));
                assert_eq!(env.encrypt, s(case, "encrypt"), "{id}");
                assert_eq!(
                    env.to_user_name.as_deref(),
                    Some(s(case, "corp_id")),
                    "{id}"
                );
                assert_eq!(
                    env.agent_id.as_deref(),
                    raw_between(body, "<AgentID>", "</AgentID>"),
                    "{id}"
                );
            }
        }
        let doc = load("wecom_encrypt_reply.json");
        for case in cases(&doc, "cases") {
            let env = parse_envelope(s(case, "expected_response_xml")).expect("reply envelope");
            assert_eq!(env.encrypt, s(case, "expected_encrypt"), "{}", case["id"]);
            assert_eq!(env.to_user_name, None);
        }
    }

    #[test]
    fn envelope_accepts_any_order_and_plain_text() {
        let env = parse_envelope(
            "<?xml version=\"1.0\"?>\n<xml>\r\n\t<!-- hi --><AgentID>1000002</AgentID>\n\
             <Encrypt>abc+/=</Encrypt><ToUserName>ww1</ToUserName></xml>\n",
        )
        .expect("parses");
        assert_eq!(env.encrypt, "abc+/=");
        assert_eq!(env.agent_id.as_deref(), Some("1000002"));
        assert_eq!(env.to_user_name.as_deref(), Some("ww1"));
        let env = parse_envelope("<xml><Encrypt/></xml>").expect("parses");
        assert_eq!(env.encrypt, "");
    }

    #[test]
    fn missing_fields_are_reported() {
        assert_eq!(
            parse_envelope("<xml><ToUserName>ww1</ToUserName></xml>"),
            Err(XmlError::MissingField("Encrypt"))
        );
        assert_eq!(
            parse_envelope("<xml/>"),
            Err(XmlError::MissingField("Encrypt"))
        );
        assert_eq!(
            parse_envelope("<xml><Wrapper><Encrypt>abc</Encrypt></Wrapper></xml>"),
            Err(XmlError::MissingField("Encrypt")),
            "only direct children count"
        );
        let base =
            "<ToUserName>a</ToUserName><FromUserName>b</FromUserName><MsgType>text</MsgType>";
        assert!(parse_message(&format!("<xml>{base}</xml>")).is_ok());
        for (field, name) in [
            ("<ToUserName>a</ToUserName>", "ToUserName"),
            ("<FromUserName>b</FromUserName>", "FromUserName"),
            ("<MsgType>text</MsgType>", "MsgType"),
        ] {
            let xml = format!("<xml>{}</xml>", base.replace(field, ""));
            assert_eq!(parse_message(&xml), Err(XmlError::MissingField(name)));
        }
    }

    #[test]
    fn create_time_defaults_to_zero_and_must_be_numeric() {
        let base =
            "<ToUserName>a</ToUserName><FromUserName>b</FromUserName><MsgType>text</MsgType>";
        let msg = parse_message(&format!("<xml>{base}</xml>")).expect("parses");
        assert_eq!(msg.create_time, 0);
        let msg = parse_message(&format!("<xml>{base}<CreateTime> 42 </CreateTime></xml>"))
            .expect("parses");
        assert_eq!(msg.create_time, 42);
        for bad in ["", "abc", "1.5", "99999999999999999999"] {
            let xml = format!("<xml>{base}<CreateTime>{bad}</CreateTime></xml>");
            assert!(
                matches!(parse_message(&xml), Err(XmlError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn text_cdata_and_references_are_decoded() {
        let msg = parse_message(
            "<xml><ToUserName>a</ToUserName><FromUserName>b</FromUserName>\
             <MsgType>text</MsgType><Content>1 &lt; 2 &amp;&#x20;&#51; <![CDATA[<b>&amp;]]>\r\n!</Content>\
             </xml>",
        )
        .expect("parses");
        assert_eq!(msg.content.as_deref(), Some("1 < 2 & 3 <b>&amp;\n!"));
    }

    #[test]
    fn nested_elements_are_skipped() {
        let msg = parse_message(
            "<xml><ToUserName>a</ToUserName><FromUserName>b</FromUserName>\
             <MsgType>event</MsgType><Event>scancode_push</Event>\
             <ScanCodeInfo>\n  <ScanType>qrcode</ScanType>\n  <ScanResult><![CDATA[x]]></ScanResult>\n\
               <Deeper><Deepest a=\"1\"/></Deeper>\n</ScanCodeInfo>\
             <EventKey>k</EventKey></xml>",
        )
        .expect("parses");
        assert_eq!(msg.event.as_deref(), Some("scancode_push"));
        assert_eq!(msg.event_key.as_deref(), Some("k"));
        assert_eq!(msg.fields["ScanCodeInfo"], "");
        assert!(!msg.fields.contains_key("ScanType"));
    }

    #[test]
    fn dtd_and_entities_are_forbidden() {
        let bomb = "<?xml version=\"1.0\"?>\n<!DOCTYPE lolz [\n<!ENTITY lol \"lol\">\n\
                    <!ENTITY lol2 \"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;\">\n]>\n\
                    <xml><Encrypt>&lol2;</Encrypt></xml>";
        let xxe = "<!DOCTYPE xml [<!ENTITY xxe SYSTEM \"file:///etc/passwd\">]>\
                   <xml><Encrypt>&xxe;</Encrypt></xml>";
        for body in [
            bomb,
            xxe,
            "<!doctype xml><xml><Encrypt>a</Encrypt></xml>",
            "<!DOCTYPE xml SYSTEM \"http://example.com/x.dtd\"><xml><Encrypt>a</Encrypt></xml>",
            "<xml><!ENTITY x \"y\"><Encrypt>a</Encrypt></xml>",
            "<xml><Encrypt>a</Encrypt><![CDATA[ok]]></xml><!DOCTYPE x>",
        ] {
            assert_eq!(parse_envelope(body), Err(XmlError::Forbidden), "{body}");
            assert_eq!(parse_message(body), Err(XmlError::Forbidden), "{body}");
        }
    }

    #[test]
    fn dtd_text_inside_cdata_is_data() {
        let msg = parse_message(
            "<xml><ToUserName>a</ToUserName><FromUserName>b</FromUserName>\
             <MsgType>text</MsgType>\
             <Content><![CDATA[<!DOCTYPE html><!ENTITY x \"y\"> ]]]]></Content></xml>",
        )
        .expect("parses");
        assert_eq!(
            msg.content.as_deref(),
            Some("<!DOCTYPE html><!ENTITY x \"y\"> ]]")
        );
    }

    #[test]
    fn undefined_entities_are_rejected() {
        for body in [
            "<xml><Encrypt>&xxe;</Encrypt></xml>",
            "<xml><Encrypt>&nbsp;</Encrypt></xml>",
            "<xml><Encrypt>&#0;</Encrypt></xml>",
            "<xml><Encrypt>&#xZZ;</Encrypt></xml>",
        ] {
            assert!(
                matches!(parse_envelope(body), Err(XmlError::Malformed(_))),
                "{body}"
            );
        }
    }

    #[test]
    fn oversized_bodies_are_rejected() {
        let filler = "a".repeat(MAX_XML_BYTES);
        let body = format!("<xml><Encrypt>{filler}</Encrypt></xml>");
        assert_eq!(parse_envelope(&body), Err(XmlError::TooLarge));
        assert_eq!(parse_message(&body), Err(XmlError::TooLarge));

        let wrap = "<xml><Encrypt></Encrypt></xml>".len();
        let body = format!("<xml><Encrypt>{}</Encrypt></xml>", &filler[wrap..]);
        assert_eq!(body.len(), MAX_XML_BYTES);
        assert!(parse_envelope(&body).is_ok());
    }

    #[test]
    fn malformed_bodies_are_rejected() {
        for body in [
            "",
            "   ",
            "not xml",
            "{\"encrypt\": \"abc\"}",
            "<xml>",
            "<xml><Encrypt>abc</Encrypt>",
            "<xml><Encrypt>abc</xml>",
            "<xml><Encrypt>abc</Wrong></xml>",
            "<xml><Encrypt>abc</Encrypt></xml></xml>",
            "<xml><Encrypt>abc</Encrypt></xml><xml></xml>",
            "<xml><Encrypt>abc</Encrypt></xml>trailing",
            "leading<xml><Encrypt>abc</Encrypt></xml>",
            "<root><Encrypt>abc</Encrypt></root>",
            "<xml><Encrypt>a</Encrypt><Encrypt>b</Encrypt></xml>",
            "<xml><Encrypt><![CDATA[abc</Encrypt></xml>",
            "<xml><Encrypt a=>abc</Encrypt></xml>",
            "<xml><Encrypt>a & b</Encrypt></xml>",
            "<xml><Encrypt>a < b</Encrypt></xml>",
        ] {
            let result = parse_envelope(body);
            assert!(
                matches!(result, Err(XmlError::Malformed(_))),
                "{body:?}: {result:?}"
            );
        }
    }

    #[test]
    fn error_details_are_bounded() {
        let name = "N".repeat(10_000);
        let body = format!("<xml><{name}>x</{name}x></xml>");
        match parse_envelope(&body) {
            Err(XmlError::Malformed(detail)) => assert!(detail.len() < 200 * 4, "{detail}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut inputs = vec![
            "<".to_owned(),
            "<!".to_owned(),
            "<![CDATA[".to_owned(),
            "<!DOCTYPE".to_owned(),
            "<?xml".to_owned(),
            "&".to_owned(),
            "<xml>&".to_owned(),
            "<xml>&#".to_owned(),
            "<xml>&#x110000;</xml>".to_owned(),
            "<xml><a><b><c></c></b></a></xml>".to_owned(),
            "\u{0}<xml>\u{0}</xml>".to_owned(),
            "<xml>🤖<🤖>🤖</🤖></xml>".to_owned(),
            format!("<xml>{}</xml>", "<a>".repeat(5000)),
            format!("<xml>{}{}</xml>", "<a>".repeat(5000), "</a>".repeat(5000)),
        ];
        let base = "<xml><ToUserName>a</ToUserName><Encrypt><![CDATA[x]]></Encrypt></xml>";
        for cut in 0..=base.len() {
            inputs.push(base[..cut].to_owned());
            inputs.push(base[cut..].to_owned());
        }
        for input in &inputs {
            let _ = parse_envelope(input);
            let _ = parse_message(input);
        }
        assert!(
            parse_envelope(&format!(
                "<xml>{}{}<Encrypt>e</Encrypt></xml>",
                "<a>".repeat(5000),
                "</a>".repeat(5000)
            ))
            .is_ok()
        );
    }
}
