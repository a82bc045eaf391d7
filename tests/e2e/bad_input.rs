//! The bad-input matrix: every public route fed forged, missing, duplicated and garbage
//! headers, timestamps far past and future, wrong content types, truncated, empty,
//! oversized and deeply nested bodies, invalid UTF-8, duplicate keys, XML with DTDs and
//! entities, bad base64 and padding, wrong receive ids, unknown bots, path tricks, huge
//! headers, chunked bodies over the limit, HTTP/1.0 and HTTP/2. Each must get a clear 4xx
//! and create no job; afterwards the server still answers a valid callback.

use crate::helpers::*;
use serde_json::json;
use shared::platform::wecom::crypto::WecomCrypto;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NOTIFY_TOKEN: &str = "matrix-token-0123456789";

/// One request of the matrix.
struct Case {
    name: String,
    method: reqwest::Method,
    /// Path and query.
    target: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Case {
    fn new(name: impl Into<String>, method: reqwest::Method, target: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            method,
            target: target.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    fn body(mut self, body: impl AsRef<[u8]>) -> Self {
        self.body = body.as_ref().to_vec();
        self
    }
}

fn post(name: impl Into<String>, target: impl Into<String>) -> Case {
    Case::new(name, reqwest::Method::POST, target)
}

fn get(name: impl Into<String>, target: impl Into<String>) -> Case {
    Case::new(name, reqwest::Method::GET, target)
}

/// A DingTalk callback with the given timestamp header, signed with `secret`.
fn dingtalk(name: &str, ts: &str, secret: &str, body: &[u8]) -> Case {
    post(name, "/dingtalk/main")
        .header("content-type", "application/json")
        .header("timestamp", ts)
        .header("sign", shared::platform::dingtalk::sign::sign(secret, ts))
        .body(body)
}

fn now_ms() -> String {
    shared::now_ms().to_string()
}

fn now_s() -> String {
    (shared::now_ms() / 1000).to_string()
}

fn form(b64: &str) -> String {
    b64.replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

/// A WeCom app callback whose `Encrypt` is `encrypt`, signed for it at `ts` by `crypto`.
fn wecom_with(name: &str, crypto: &WecomCrypto, ts: &str, encrypt: &str, envelope: &str) -> Case {
    let sig = crypto.signature(ts, "n1", encrypt);
    post(
        name,
        format!("/wecom/wx?msg_signature={sig}&timestamp={ts}&nonce=n1"),
    )
    .header("content-type", "text/xml")
    .body(envelope.replace("{E}", encrypt))
}

const ENVELOPE: &str = "<xml><ToUserName><![CDATA[ww1436e0e65a779aee]]></ToUserName><AgentID><![CDATA[1000002]]></AgentID><Encrypt><![CDATA[{E}]]></Encrypt></xml>";

/// A WeCom AI-bot callback whose `encrypt` is `encrypt`, signed at `ts`.
fn aibot_with(name: &str, crypto: &WecomCrypto, ts: &str, encrypt: &str, body: Vec<u8>) -> Case {
    let sig = crypto.signature(ts, "n2", encrypt);
    post(
        name,
        format!("/wecom/ai?msg_signature={sig}&timestamp={ts}&nonce=n2"),
    )
    .header("content-type", "application/json")
    .body(body)
}

fn cases(app: &TestApp) -> Vec<Case> {
    let mut v = Vec::new();
    let good = serde_json::to_vec(&app.body(&app.group("ok-1", "hi"))).unwrap();
    let good_json: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let with = |k: &str, val: serde_json::Value| {
        let mut b = good_json.clone();
        b[k] = val;
        serde_json::to_vec(&b).unwrap()
    };
    let without = |k: &str| {
        let mut b = good_json.clone();
        b.as_object_mut().unwrap().remove(k);
        serde_json::to_vec(&b).unwrap()
    };

    // ---- DingTalk: headers and timestamps
    let ts = now_ms();
    v.push(post("dt no headers", "/dingtalk/main").body(&good));
    v.push(
        post("dt no sign", "/dingtalk/main")
            .header("timestamp", &ts)
            .body(&good),
    );
    v.push(
        post("dt no timestamp", "/dingtalk/main")
            .header(
                "sign",
                shared::platform::dingtalk::sign::sign(APP_SECRET, &ts),
            )
            .body(&good),
    );
    v.push(dingtalk("dt forged sign", &ts, "not-the-secret", &good));
    v.push(dingtalk("dt empty secret sign", &ts, "", &good));
    v.push(
        post("dt garbage sign", "/dingtalk/main")
            .header("timestamp", &ts)
            .header("sign", "!!!not base64!!!")
            .body(&good),
    );
    v.push(
        post("dt empty sign", "/dingtalk/main")
            .header("timestamp", &ts)
            .header("sign", "")
            .body(&good),
    );
    v.push(
        post("dt sign not utf8", "/dingtalk/main")
            .header("timestamp", &ts)
            .header("sign", b"\xff\xfe\xfd")
            .body(&good),
    );
    v.push(dingtalk("dt duplicated timestamp", &ts, APP_SECRET, &good).header("timestamp", "1"));
    v.push(dingtalk("dt duplicated sign", &ts, APP_SECRET, &good).header("sign", "AAAA"));
    let far = |name: &str, ts: i64| dingtalk(name, &ts.to_string(), APP_SECRET, &good);
    let n = shared::now_ms();
    v.push(far("dt ts 1h+100s past", n - 3_700_000));
    v.push(far("dt ts 1h+100s future", n + 3_700_000));
    v.push(far("dt ts 30 days past", n - 30 * 86_400_000));
    v.push(far("dt ts year 2100", 4_102_444_800_000));
    v.push(far("dt ts zero", 0));
    v.push(far("dt ts negative", -1));
    v.push(far("dt ts i64 max", i64::MAX));
    v.push(far("dt ts i64 min", i64::MIN));
    v.push(far("dt ts i64 min plus now", i64::MIN + n));
    v.push(far("dt ts in seconds", n / 1000));
    for garbage in [
        "",
        "abc",
        "1.7e12",
        "0x1",
        "１７００",
        "-",
        "99999999999999999999999",
    ] {
        v.push(dingtalk(
            &format!("dt ts {garbage:?}"),
            garbage,
            APP_SECRET,
            &good,
        ));
    }
    // ---- DingTalk: content types and bodies
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "text/xml",
        "multipart/form-data; boundary=x",
    ] {
        let mut c = dingtalk(&format!("dt content-type {ct}"), &ts, APP_SECRET, &good);
        c.headers[0].1 = ct.as_bytes().to_vec();
        v.push(c);
    }
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("open brace", b"{".to_vec()),
        ("array", b"[]".to_vec()),
        ("null", b"null".to_vec()),
        ("string", b"\"hi\"".to_vec()),
        ("number", b"42".to_vec()),
        ("invalid utf8", b"{\"msgId\":\"\xff\xfe\"}".to_vec()),
        (
            "nested 10000",
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
        ),
        (
            "nested objects",
            format!("{}1{}", "{\"a\":".repeat(5_000), "}".repeat(5_000)).into_bytes(),
        ),
        ("duplicate msgId", {
            let s = String::from_utf8(good.clone()).unwrap();
            s.replacen('{', "{\"msgId\":\"dup-a\",", 1).into_bytes()
        }),
        ("no msgId", without("msgId")),
        ("empty msgId", with("msgId", json!(""))),
        ("msgId number", with("msgId", json!(5))),
        ("no conversationId", without("conversationId")),
        ("conversationType 3", with("conversationType", json!("3"))),
        (
            "conversationType number",
            with("conversationType", json!(2)),
        ),
        ("no msgtype", without("msgtype")),
        ("text not object", with("text", json!("hi"))),
        ("robotCode other", with("robotCode", json!("other-robot"))),
        ("robotCode missing", without("robotCode")),
        ("bom", [b"\xef\xbb\xbf".as_slice(), &good].concat()),
        ("trailing garbage", [good.as_slice(), b"xyz"].concat()),
        ("oversized", vec![b' '; 70 * 1024]),
    ];
    for (name, body) in bodies {
        v.push(dingtalk(&format!("dt body {name}"), &ts, APP_SECRET, &body));
    }
    // ---- DingTalk: bots and paths
    let mut unknown = dingtalk("dt unknown bot", &ts, APP_SECRET, &good);
    unknown.target = "/dingtalk/nobody".into();
    v.push(unknown);
    for path in [
        "/dingtalk/",
        "/dingtalk",
        "/dingtalk/main/extra",
        "/dingtalk/../wecom/wx",
        "/dingtalk/%2e%2e/wecom/wx",
        "/dingtalk/main%00",
        "/dingtalk/MAIN",
        "/dingtalk/main;x=1",
        "/DINGTALK/main",
        "//dingtalk/main",
    ] {
        let mut c = dingtalk(&format!("dt path {path}"), &ts, APP_SECRET, &good);
        c.target = path.into();
        v.push(c);
    }
    let mut long = dingtalk("dt 60 KB bot id", &ts, APP_SECRET, &good);
    long.target = format!("/dingtalk/{}", "b".repeat(60 * 1024));
    v.push(long);
    for method in [
        reqwest::Method::GET,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let mut c = dingtalk(&format!("dt method {method}"), &ts, APP_SECRET, &good);
        c.method = method;
        v.push(c);
    }
    v.push(get("root", "/"));
    v.push(get("unknown route", "/admin/metrics"));
    v.push(get("metrics on public", "/metrics"));

    // ---- WeCom app callbacks (POST)
    let crypto = WecomCrypto::new(WECOM_TOKEN, WECOM_AES_KEY, CORP_ID).unwrap();
    let other_corp = WecomCrypto::new(WECOM_TOKEN, WECOM_AES_KEY, "ww-other-corp").unwrap();
    let other_key = WecomCrypto::new(
        WECOM_TOKEN,
        "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C",
        CORP_ID,
    )
    .unwrap();
    let xml = sim::wecom::text_message(CORP_ID, AGENT_ID, "zhangsan", "9001", "hi");
    let enc = crypto.encrypt(&xml);
    let s = now_s();
    let sig = crypto.signature(&s, "n1", &enc);
    let q = |sig: &str, ts: &str, nonce: &str| {
        format!("/wecom/wx?msg_signature={sig}&timestamp={ts}&nonce={nonce}")
    };
    v.push(post("wx no query", "/wecom/wx").body(ENVELOPE.replace("{E}", &enc)));
    v.push(
        post(
            "wx no signature",
            format!("/wecom/wx?timestamp={s}&nonce=n1"),
        )
        .body(ENVELOPE.replace("{E}", &enc)),
    );
    v.push(
        post(
            "wx no timestamp",
            format!("/wecom/wx?msg_signature={sig}&nonce=n1"),
        )
        .body(ENVELOPE.replace("{E}", &enc)),
    );
    v.push(
        post(
            "wx no nonce",
            format!("/wecom/wx?msg_signature={sig}&timestamp={s}"),
        )
        .body(ENVELOPE.replace("{E}", &enc)),
    );
    v.push(
        post("wx forged signature", q(&"0".repeat(40), &s, "n1"))
            .body(ENVELOPE.replace("{E}", &enc)),
    );
    v.push(
        post("wx signature for other nonce", q(&sig, &s, "n9")).body(ENVELOPE.replace("{E}", &enc)),
    );
    v.push(post("wx garbage signature", q("%ff%fe", &s, "n1")).body(ENVELOPE.replace("{E}", &enc)));
    v.push(
        post(
            "wx duplicated signature",
            format!("{}&msg_signature={}", q(&sig, &s, "n1"), "0".repeat(40)),
        )
        .body(ENVELOPE.replace("{E}", &enc)),
    );
    for (name, ts) in [
        (
            "1h+100s past",
            (shared::now_ms() / 1000 - 3_700).to_string(),
        ),
        (
            "1h+100s future",
            (shared::now_ms() / 1000 + 3_700).to_string(),
        ),
        (
            "30 days past",
            (shared::now_ms() / 1000 - 30 * 86_400).to_string(),
        ),
        ("i64 min", i64::MIN.to_string()),
        ("i64 max", i64::MAX.to_string()),
        ("in ms", shared::now_ms().to_string()),
        ("garbage", "abc".to_string()),
        ("empty", String::new()),
    ] {
        v.push(wecom_with(
            &format!("wx ts {name}"),
            &crypto,
            &ts,
            &enc,
            ENVELOPE,
        ));
    }
    let mut bad_pad = crypto.encrypt(&xml).into_bytes();
    // Flip the last ciphertext block's last base64 characters: padding no longer valid.
    let len = bad_pad.len();
    bad_pad[len - 3] = if bad_pad[len - 3] == b'A' { b'B' } else { b'A' };
    let bad_pad = String::from_utf8(bad_pad).unwrap();
    for (name, e) in [
        ("not base64", "!!!!".to_string()),
        ("empty encrypt", String::new()),
        ("short ciphertext", "AAAA".to_string()),
        ("not block sized", "AAAAAAAAAAAAAAAAAAAAAAAAAA==".to_string()),
        ("bad padding", bad_pad.clone()),
        ("wrong receive id", other_corp.encrypt(&xml)),
        ("other key", other_key.encrypt(&xml)),
        ("plain not xml", crypto.encrypt("not xml at all")),
        ("plain truncated xml", crypto.encrypt(&xml[..xml.len() / 2])),
        ("plain with dtd", crypto.encrypt("<!DOCTYPE x [<!ENTITY a \"aaaaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;&a;&a;&a;&a;\">]><xml><Content>&b;</Content></xml>")),
        ("plain external entity", crypto.encrypt("<!DOCTYPE x [<!ENTITY e SYSTEM \"file:///etc/passwd\">]><xml><Content>&e;</Content></xml>")),
        ("plain ansi root", crypto.encrypt("<\u{1b}[31mroot></\u{1b}[31mroot>")),
        ("plain empty", crypto.encrypt("")),
    ] {
        v.push(wecom_with(&format!("wx encrypt {name}"), &crypto, &s, &e, ENVELOPE));
    }
    for (name, envelope) in [
        ("empty body", ""),
        ("not xml", "hello"),
        ("truncated", "<xml><Encrypt><![CDATA[{E}"),
        ("no Encrypt", "<xml><ToUserName>x</ToUserName></xml>"),
        (
            "two Encrypt",
            "<xml><Encrypt><![CDATA[{E}]]></Encrypt><Encrypt><![CDATA[{E}]]></Encrypt></xml>",
        ),
        (
            "dtd",
            "<!DOCTYPE xml [<!ENTITY x \"y\">]><xml><Encrypt><![CDATA[{E}]]></Encrypt></xml>",
        ),
        (
            "entity in Encrypt",
            "<!DOCTYPE xml [<!ENTITY e \"{E}\">]><xml><Encrypt>&e;</Encrypt></xml>",
        ),
        ("json", "{\"Encrypt\":\"{E}\"}"),
        ("invalid utf8", "<xml><Encrypt>\u{fffd}</Encrypt></xml>"),
        (
            "ansi root",
            "<\u{1b}[2Jxml><Encrypt><![CDATA[{E}]]></Encrypt></\u{1b}[2Jxml>",
        ),
    ] {
        v.push(wecom_with(
            &format!("wx envelope {name}"),
            &crypto,
            &s,
            &enc,
            envelope,
        ));
    }
    let mut raw_utf8 = wecom_with("wx envelope raw invalid utf8", &crypto, &s, &enc, ENVELOPE);
    raw_utf8.body = b"<xml><Encrypt>\xff\xfe</Encrypt></xml>".to_vec();
    v.push(raw_utf8);
    let mut big = wecom_with("wx oversized", &crypto, &s, &enc, ENVELOPE);
    big.body = format!("<xml><Pad>{}</Pad></xml>", "a".repeat(70 * 1024)).into_bytes();
    v.push(big);
    let mut nested = wecom_with("wx deeply nested", &crypto, &s, &enc, ENVELOPE);
    nested.body = format!("{}{}", "<a>".repeat(5_000), "</a>".repeat(5_000)).into_bytes();
    v.push(nested);
    let mut unknown = wecom_with("wx unknown bot", &crypto, &s, &enc, ENVELOPE);
    unknown.target = unknown.target.replace("/wecom/wx", "/wecom/nobody");
    v.push(unknown);
    let mut path = wecom_with("wx path trick", &crypto, &s, &enc, ENVELOPE);
    path.target = path.target.replace("/wecom/wx", "/wecom/wx/../ai");
    v.push(path);

    // ---- WeCom URL verification (GET)
    let echo = crypto.encrypt("1616140317555161061");
    let vq = |sig: &str, ts: &str, echostr: &str| {
        format!(
            "/wecom/wx?msg_signature={sig}&timestamp={ts}&nonce=n1&echostr={}",
            form(echostr)
        )
    };
    v.push(get(
        "verify no echostr",
        q(&crypto.signature(&s, "n1", &echo), &s, "n1"),
    ));
    v.push(get("verify forged", vq(&"0".repeat(40), &s, &echo)));
    let old = (shared::now_ms() / 1000 - 30 * 86_400).to_string();
    v.push(get(
        "verify 30 days old",
        vq(&crypto.signature(&old, "n1", &echo), &old, &echo),
    ));
    let fut = (shared::now_ms() / 1000 + 7_200).to_string();
    v.push(get(
        "verify future",
        vq(&crypto.signature(&fut, "n1", &echo), &fut, &echo),
    ));
    v.push(get(
        "verify i64 min",
        vq(
            &crypto.signature(&i64::MIN.to_string(), "n1", &echo),
            &i64::MIN.to_string(),
            &echo,
        ),
    ));
    v.push(get("verify message replayed", vq(&sig, &s, &enc)));
    let json_echo = crypto.encrypt("{\"msgid\":\"1\"}");
    v.push(get(
        "verify json echo",
        vq(&crypto.signature(&s, "n1", &json_echo), &s, &json_echo),
    ));
    v.push(get(
        "verify garbage echostr",
        vq(&crypto.signature(&s, "n1", "!!!"), &s, "!!!"),
    ));
    v.push(get(
        "verify bad padding",
        vq(&crypto.signature(&s, "n1", &bad_pad), &s, &bad_pad),
    ));
    let other = other_corp.encrypt("123");
    v.push(get(
        "verify wrong receive id",
        vq(&crypto.signature(&s, "n1", &other), &s, &other),
    ));
    v.push(get(
        "verify unknown bot",
        vq(&crypto.signature(&s, "n1", &echo), &s, &echo).replace("/wecom/wx", "/wecom/nobody"),
    ));

    // ---- WeCom AI bot (POST)
    let ai = WecomCrypto::new(AIBOT_TOKEN, AIBOT_AES_KEY, "").unwrap();
    let ai_plain = sim::wecom_aibot::text_message(
        &sim::wecom_aibot::new_msgid(),
        sim::wecom_aibot::Chat::Single,
        "zhangsan",
        "hi",
        &app.aibot.new_response_url(),
    );
    let mut ai_plain = ai_plain;
    ai_plain["aibotid"] = json!(AIBOT_ID);
    let ai_enc = ai.encrypt(&ai_plain.to_string());
    let ai_body = |e: &str| json!({ "encrypt": e }).to_string().into_bytes();
    let corp_enc = WecomCrypto::new(AIBOT_TOKEN, AIBOT_AES_KEY, CORP_ID)
        .unwrap()
        .encrypt(&ai_plain.to_string());
    for (name, e) in [
        ("not base64", "!!!!".to_string()),
        ("bad padding", {
            let mut b = ai_enc.clone().into_bytes();
            let l = b.len();
            b[l - 3] = if b[l - 3] == b'A' { b'B' } else { b'A' };
            String::from_utf8(b).unwrap()
        }),
        ("wrong receive id", corp_enc.clone()),
        ("plain not json", ai.encrypt("<xml/>")),
        (
            "plain truncated json",
            ai.encrypt(&ai_plain.to_string()[..20]),
        ),
        (
            "plain no msgid",
            ai.encrypt(&json!({"msgtype": "text"}).to_string()),
        ),
        (
            "plain nested",
            ai.encrypt(&format!("{}{}", "[".repeat(5000), "]".repeat(5000))),
        ),
    ] {
        v.push(aibot_with(
            &format!("ai encrypt {name}"),
            &ai,
            &s,
            &e,
            ai_body(&e),
        ));
    }
    for (name, body) in [
        ("empty", Vec::new()),
        ("not json", b"hello".to_vec()),
        ("no encrypt", b"{}".to_vec()),
        ("encrypt number", b"{\"encrypt\":5}".to_vec()),
        ("array", b"[]".to_vec()),
        ("xml", ENVELOPE.replace("{E}", &ai_enc).into_bytes()),
        (
            "duplicate encrypt",
            format!("{{\"encrypt\":\"{ai_enc}\",\"encrypt\":\"{ai_enc}\"}}").into_bytes(),
        ),
        ("invalid utf8", b"{\"encrypt\":\"\xff\"}".to_vec()),
        (
            "nested",
            format!("{}{}", "{\"a\":".repeat(5000), "}".repeat(5000)).into_bytes(),
        ),
        (
            "oversized",
            format!("{{\"encrypt\":\"{}\"}}", "A".repeat(70 * 1024)).into_bytes(),
        ),
    ] {
        v.push(aibot_with(
            &format!("ai body {name}"),
            &ai,
            &s,
            &ai_enc,
            body,
        ));
    }
    v.push(aibot_with("ai forged", &ai, &s, &ai_enc, ai_body(&ai_enc)).header("x", "y"));
    let last = v.len() - 1;
    v[last].target = format!(
        "/wecom/ai?msg_signature={}&timestamp={s}&nonce=n2",
        "0".repeat(40)
    );
    let stale = (shared::now_ms() / 1000 - 7_200).to_string();
    v.push(aibot_with(
        "ai stale",
        &ai,
        &stale,
        &ai_enc,
        ai_body(&ai_enc),
    ));
    v.push(aibot_with(
        "ai ts i64 min",
        &ai,
        &i64::MIN.to_string(),
        &ai_enc,
        ai_body(&ai_enc),
    ));
    v.push(post("ai no query", "/wecom/ai").body(ai_body(&ai_enc)));

    // ---- Notifications
    let n = |name: &str| post(name, "/notify/wx").header("content-type", "application/json");
    v.push(n("notify no auth").body(b"{\"text\":\"x\"}"));
    v.push(
        n("notify wrong token")
            .header("authorization", "Bearer nope")
            .body(b"{\"text\":\"x\"}"),
    );
    v.push(
        n("notify basic auth")
            .header("authorization", "Basic dXNlcjpwYXNz")
            .body(b"{\"text\":\"x\"}"),
    );
    v.push(
        n("notify token prefix")
            .header("authorization", format!("Bearer {}", &NOTIFY_TOKEN[..10]))
            .body(b"{\"text\":\"x\"}"),
    );
    v.push(
        n("notify token not utf8")
            .header("authorization", b"Bearer \xff\xfe")
            .body(b"{\"text\":\"x\"}"),
    );
    v.push(
        n("notify duplicated auth")
            .header("authorization", "Bearer nope")
            .header("authorization", format!("Bearer {NOTIFY_TOKEN}"))
            .body(b"{\"text\":\"x\"}"),
    );
    let authed = |name: &str| n(name).header("authorization", format!("Bearer {NOTIFY_TOKEN}"));
    for (name, body) in [
        ("empty", Vec::new()),
        ("not json", b"hello".to_vec()),
        ("truncated", b"{\"text\":\"x".to_vec()),
        ("array", b"[]".to_vec()),
        ("text number", b"{\"text\":5}".to_vec()),
        ("empty text", b"{\"text\":\"\"}".to_vec()),
        ("no text", b"{\"title\":\"t\"}".to_vec()),
        ("invalid utf8", b"{\"text\":\"\xff\"}".to_vec()),
        (
            "nested",
            format!("{}{}", "{\"a\":".repeat(5000), "}".repeat(5000)).into_bytes(),
        ),
        (
            "oversized",
            format!("{{\"text\":\"{}\"}}", "a".repeat(70 * 1024)).into_bytes(),
        ),
        (
            "alertmanager no alerts",
            b"{\"version\":\"4\",\"status\":\"firing\"}".to_vec(),
        ),
        (
            "alertmanager alerts not array",
            b"{\"version\":\"4\",\"status\":\"firing\",\"alerts\":5}".to_vec(),
        ),
    ] {
        v.push(authed(&format!("notify body {name}")).body(body));
    }
    for key in ["", "has space", "中文"] {
        v.push(
            authed(&format!("notify idempotency {key:?}"))
                .header("idempotency-key", key)
                .body(b"{\"text\":\"x\"}"),
        );
    }
    v.push(
        authed("notify idempotency too long")
            .header("idempotency-key", "k".repeat(129))
            .body(b"{\"text\":\"x\"}"),
    );
    v.push(
        authed("notify idempotency twice")
            .header("idempotency-key", "a")
            .header("idempotency-key", "b")
            .body(b"{\"text\":\"x\"}"),
    );
    let mut unknown = authed("notify unknown channel").body(b"{\"text\":\"x\"}");
    unknown.target = "/notify/nobody".into();
    v.push(unknown);
    let mut getn = authed("notify get").body(b"");
    getn.method = reqwest::Method::GET;
    v.push(getn);
    v
}

/// Sends `head` and `body` on a fresh TCP connection; returns the status line.
async fn raw(app: &TestApp, bytes: Vec<u8>) -> String {
    let mut conn = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let _ = conn.write_all(&bytes).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(15), conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(2).any(|w| w == b"\r\n") {
                    break;
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn every_bad_request_on_every_public_route_is_a_clear_4xx_and_makes_no_job() {
    let app = TestApp::spawn_opts(Options {
        extra: format!(
            "[[channels]]\nid = \"wx\"\nkind = \"wecom_robot\"\nurl = \"http://127.0.0.1:9/cgi-bin/webhook/send?key=k\"\ntoken = \"{NOTIFY_TOKEN}\"\n"
        ),
        ..Options::default()
    })
    .await;
    let cases = cases(&app);
    let mut failures = Vec::new();
    let mut count = 0;
    for case in &cases {
        count += 1;
        let mut req = app.client.request(
            case.method.clone(),
            format!("http://{}{}", app.addr, case.target),
        );
        for (k, v) in &case.headers {
            req = req.header(
                k.as_str(),
                reqwest::header::HeaderValue::from_bytes(v).unwrap(),
            );
        }
        let status = match req.body(case.body.clone()).send().await {
            Ok(r) => r.status().as_u16(),
            Err(e) => {
                failures.push(format!("{}: request failed: {e}", case.name));
                continue;
            }
        };
        if std::env::var_os("MATRIX_PRINT").is_some() {
            eprintln!("{status} {}", case.name);
        }
        if !(400..500).contains(&status) {
            failures.push(format!("{}: {status}", case.name));
        }
    }
    // What reqwest cannot send: raw bytes on the wire.
    let ts = now_ms();
    let sign = shared::platform::dingtalk::sign::sign(APP_SECRET, &ts);
    let good = serde_json::to_vec(&app.body(&app.group("raw-1", "hi"))).unwrap();
    let raw_cases: Vec<(&str, Vec<u8>)> = vec![
        ("500 KB header", format!("POST /dingtalk/main HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\n\r\n", "a".repeat(500 * 1024)).into_bytes()),
        ("many headers", format!("POST /dingtalk/main HTTP/1.1\r\nhost: x\r\n{}\r\n", "x-h: 1\r\n".repeat(200)).into_bytes()),
        ("chunked over the limit", {
            let mut b = format!("POST /dingtalk/main HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntimestamp: {ts}\r\nsign: {sign}\r\ntransfer-encoding: chunked\r\n\r\n").into_bytes();
            for _ in 0..20 {
                b.extend_from_slice(format!("1000\r\n{}\r\n", " ".repeat(4096)).as_bytes());
            }
            b.extend_from_slice(b"0\r\n\r\n");
            b
        }),
        ("announced 10 GB", format!("POST /dingtalk/main HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntimestamp: {ts}\r\nsign: {sign}\r\ncontent-length: 10000000000\r\n\r\n").into_bytes()),
        ("content-length and chunked", format!("POST /dingtalk/main HTTP/1.1\r\nhost: x\r\ntimestamp: {ts}\r\nsign: {sign}\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes()),
        ("two content-lengths", format!("POST /dingtalk/main HTTP/1.1\r\nhost: x\r\ntimestamp: {ts}\r\nsign: {sign}\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!").into_bytes()),
        ("HTTP/1.0 forged", [format!("POST /dingtalk/main HTTP/1.0\r\ncontent-type: application/json\r\ntimestamp: {ts}\r\nsign: AAAA\r\ncontent-length: {}\r\n\r\n", good.len()).into_bytes(), good.clone()].concat()),
        ("HTTP/1.0 unknown bot", [format!("POST /dingtalk/nobody HTTP/1.0\r\ncontent-type: application/json\r\ntimestamp: {ts}\r\nsign: {sign}\r\ncontent-length: {}\r\n\r\n", good.len()).into_bytes(), good.clone()].concat()),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec()),
        ("bad method", b"P@ST /dingtalk/main HTTP/1.1\r\nhost: x\r\n\r\n".to_vec()),
        ("header without colon", b"POST /dingtalk/main HTTP/1.1\r\nhost x\r\n\r\n".to_vec()),
        ("bare LF and NUL", b"POST /dingtalk/main HTTP/1.1\nhost: \x00\n\n".to_vec()),
    ];
    for (name, bytes) in raw_cases {
        count += 1;
        let line = raw(&app, bytes).await;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if std::env::var_os("MATRIX_PRINT").is_some() {
            eprintln!("{status} raw {name}");
        }
        if !(400..500).contains(&status) {
            failures.push(format!("raw {name}: {line:?}"));
        }
    }
    // HTTP/2 (prior knowledge): forged, unknown bot, oversized.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for (name, path, sign, body) in [
        (
            "h2 forged",
            "/dingtalk/main",
            "AAAA".to_string(),
            good.clone(),
        ),
        (
            "h2 unknown bot",
            "/dingtalk/nobody",
            sign.clone(),
            good.clone(),
        ),
        (
            "h2 oversized",
            "/dingtalk/main",
            sign.clone(),
            vec![b' '; 70 * 1024],
        ),
        (
            "h2 truncated",
            "/dingtalk/main",
            sign.clone(),
            good[..10].to_vec(),
        ),
    ] {
        count += 1;
        let resp = h2
            .post(format!("http://{}{path}", app.addr))
            .header("content-type", "application/json")
            .header("timestamp", &ts)
            .header("sign", sign)
            .body(body)
            .send()
            .await;
        match resp {
            Ok(r) if r.version() == reqwest::Version::HTTP_2 && r.status().is_client_error() => {}
            Ok(r) => failures.push(format!("{name}: {:?} {}", r.version(), r.status())),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(count >= 150, "only {count} cases");
    assert!(
        failures.is_empty(),
        "{} of {count} cases not a 4xx:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // No job came of any of it, and the server is healthy.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.llm.request_count(),
        0,
        "a bad request reached the model"
    );
    assert!(app.dingtalk.sent().is_empty());
    assert!(app.wecom.sent().is_empty());
    assert_eq!(app.admin_get("/healthz").await.status(), 200);
    assert_eq!(app.admin_get("/readyz").await.status(), 200);
    assert_eq!(
        app.send(&app.group("after-matrix", "still there?"))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.replies(1).await[0].content,
        "Echo: still there? (turn 1)"
    );
}
