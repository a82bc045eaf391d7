//! Stream mode of the fake DingTalk (PROTOCOLS.md §d and "Additions: Stream mode, several
//! connections"): `POST /v1.0/gateway/connections/open` trades an app's credentials for a
//! one-use ticket (valid [`STREAM_TICKET_TTL`]) and the endpoint `ws://…/connect`; the
//! WebSocket at `endpoint?ticket=…` then carries downstream frames (`CALLBACK` bot messages,
//! `EVENT`s, `SYSTEM` `ping` / `disconnect`) and the client's acks. This file owns the
//! tickets, the connections (one task and one outbound channel each), the delivery of
//! pushed messages and their re-push, and the record of acks, pings and deliveries.
//!
//! Delivery rules (the platform's are only partly known; these are the fake's):
//! - A connection is *usable* for a message while it is open, has not been sent
//!   `disconnect`, belongs to the message's app and subscribed to it (`CALLBACK` frames need
//!   a `CALLBACK` subscription with the same topic, `EVENT` frames an `EVENT` subscription
//!   with the same topic or `*`; other types go to any connection).
//! - [`StreamDelivery::One`] (the default, what the official FAQ says): each message is one
//!   copy sent to one usable connection, round-robin; it is done when *any* connection acks
//!   it. [`StreamDelivery::Every`]: one copy per usable connection, each done when its
//!   connection acks it (or, once re-pushed elsewhere, the connection holding it).
//! - Ack codes: 200 = done; 4xx = done (the client refused it for good; still recorded);
//!   anything else (5xx, …) leaves the copy pending, so it is re-pushed on its timer.
//! - A copy not done within `repush_after` (default [`DEFAULT_STREAM_REPUSH_AFTER`]) of
//!   its last send is sent again with the same messageId and data: to the same connection
//!   if still usable, else to another usable one; after [`STREAM_MAX_ATTEMPTS`] sends it is
//!   abandoned. Copies on a connection that closes are *not* moved at once: like the
//!   platform they wait for their re-push timer.
//! - A message for which no connection is usable (none open, all disconnecting, or at
//!   re-push time none left) waits, and goes out as soon as a usable connection registers.
//!   In `Every` mode such a message becomes a single copy for the first usable connection.
//!
//! A `disconnect` frame marks its connection as disconnecting (no new deliveries; its acks
//! still count) and the server closes it after a grace ([`DEFAULT_STREAM_DISCONNECT_GRACE`])
//! unless the client closed first. Bad client frames are counted and ignored, never fatal.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{FromRequestParts, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use super::{
    CORP_ID, CallbackSpec, FakeDingTalk, Inner, Refusal, Reply, body_is_mandatory, gateway_error,
    invalid_parameter, json_object, missing_parameter, ok_json, required_str,
};
use crate::record::Recorder;

/// Route of the ticket API.
pub const STREAM_OPEN_PATH: &str = "/v1.0/gateway/connections/open";
/// Route of the WebSocket endpoint the ticket API hands out.
pub const STREAM_CONNECT_PATH: &str = "/connect";
/// Topic of bot messages (`CALLBACK` frames).
pub const BOT_MESSAGE_TOPIC: &str = "/v1.0/im/bot/messages/get";
/// How long an unused ticket stays valid.
pub const STREAM_TICKET_TTL: Duration = Duration::from_secs(90);
/// Default delay before an un-acked message is pushed again (~60 s, as observed).
pub const DEFAULT_STREAM_REPUSH_AFTER: Duration = Duration::from_secs(60);
/// Sends of one copy before the fake gives up on it.
pub const STREAM_MAX_ATTEMPTS: u32 = 10;
/// Default time between a `disconnect` frame and the server closing the socket.
pub const DEFAULT_STREAM_DISCONNECT_GRACE: Duration = Duration::from_secs(5);
/// HTTP 401 code of the ticket API for an unknown app or a wrong secret (observed).
pub const STREAM_AUTH_FAILED_CODE: &str = "authFailed";
/// HTTP 401 code of the WebSocket endpoint for a missing, unknown, used or expired ticket
/// (this fake's; the real one is not documented).
pub const STREAM_INVALID_TICKET_CODE: &str = "invalidTicket";

/// Control route: push a bot message (`{"app_key","text","conversation_id"?,"sender"?,
/// "group"?}` → `{"messageId","msgId"}`).
pub const SIM_STREAM_PUSH_PATH: &str = "/_sim/stream/push";
/// Control route: `POST ?app_key=…` sends `disconnect` to the app's connections.
pub const SIM_STREAM_DISCONNECT_PATH: &str = "/_sim/stream/disconnect";
/// Control route: `GET` every ack recorded so far.
pub const SIM_STREAM_ACKS_PATH: &str = "/_sim/stream/acks";
/// Control route: `GET ?app_key=…` the app's connections (every app's without it).
pub const SIM_STREAM_CONNECTIONS_PATH: &str = "/_sim/stream/connections";

/// How long a closing socket waits for the peer's Close reply before it is dropped.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);
/// Sender of messages pushed through [`SIM_STREAM_PUSH_PATH`] without one.
const SIM_SENDER: &str = "sim-user";
/// Group of group messages pushed through [`SIM_STREAM_PUSH_PATH`] without one.
const SIM_GROUP: &str = "cidSimGroup==";

/// How pushed messages are spread over an app's connections (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamDelivery {
    /// Each message to one usable connection, round-robin (the official FAQ's behaviour).
    #[default]
    One,
    /// A copy of each message to every usable connection (what some users report).
    Every,
}

/// Who ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StreamClosedBy {
    /// The client: a Close frame, end of stream or a socket error.
    Client,
    /// The fake, with a Close frame, after the `disconnect` grace ran out.
    Server,
    /// The fake dropped the socket without a close handshake ([`FakeDingTalk::stream_drop`]
    /// or shutdown).
    Dropped,
}

/// One WebSocket connection, open or closed.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct StreamConnection {
    /// The fake's id for it (the frames' `headers.connectionId`).
    pub id: String,
    /// App it belongs to.
    pub app_key: String,
    /// The ticket it was opened with (spent; not in the control route's JSON).
    #[serde(skip)]
    pub ticket: String,
    /// `(type, topic)` of each subscription of its `connections/open`.
    pub subscriptions: Vec<(String, String)>,
    /// When the WebSocket was established, ms since the Unix epoch.
    pub opened_at_ms: i64,
    /// When it closed (or was dropped), ms since the Unix epoch.
    pub closed_at_ms: Option<i64>,
    /// Who closed it, once closed.
    pub closed_by: Option<StreamClosedBy>,
    /// When it was sent `disconnect`, ms since the Unix epoch.
    pub disconnect_sent_at_ms: Option<i64>,
    /// When it was first sent a pushed message frame (a `CALLBACK`/`EVENT` from
    /// [`FakeDingTalk::stream_push`] or [`FakeDingTalk::stream_push_raw`], re-pushes
    /// included; pings and `disconnect` do not count).
    pub first_delivery_at_ms: Option<i64>,
}

impl StreamConnection {
    /// Not closed yet.
    pub fn is_open(&self) -> bool {
        self.closed_at_ms.is_none()
    }
}

impl std::fmt::Debug for StreamConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConnection")
            .field("id", &self.id)
            .field("app_key", &self.app_key)
            .field("ticket", &"<redacted>")
            .field("subscriptions", &self.subscriptions)
            .field("opened_at_ms", &self.opened_at_ms)
            .field("closed_at_ms", &self.closed_at_ms)
            .field("closed_by", &self.closed_by)
            .field("disconnect_sent_at_ms", &self.disconnect_sent_at_ms)
            .field("first_delivery_at_ms", &self.first_delivery_at_ms)
            .finish()
    }
}

/// One ack of a pushed message, whatever its code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAck {
    /// `headers.messageId`.
    pub message_id: String,
    /// Connection it came on.
    pub connection_id: String,
    /// `code` (200 OK; the SDKs also use 400, 404, 500).
    pub code: i64,
    /// `message`.
    pub message: String,
    /// `data` as sent (a JSON string, e.g. `{"response": "OK"}`).
    pub data: String,
    /// From the latest send of the message to this connection to the ack.
    pub latency: Duration,
    /// When it arrived, ms since the Unix epoch.
    pub received_at_ms: i64,
}

/// One send of a message frame to a connection (re-pushes included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamDeliveryRecord {
    /// The frame's `headers.messageId`.
    pub message_id: String,
    /// Connection it went to.
    pub connection_id: String,
    /// 1 for the first send of this copy, 2 for its first re-push, …
    pub attempt: u32,
    /// When it was sent, ms since the Unix epoch.
    pub at_ms: i64,
}

/// One `ping` SYSTEM frame and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamPing {
    /// Its `headers.messageId`.
    pub message_id: String,
    /// Connection it went to.
    pub connection_id: String,
    /// Its `data` (`{"opaque":"…"}`).
    pub data: String,
    /// When it was sent, ms since the Unix epoch.
    pub sent_at_ms: i64,
    /// A frame with its messageId came back.
    pub answered: bool,
    /// That answer had code 200, came on the same connection and carried the same data
    /// (compared as parsed JSON).
    pub answer_matches: bool,
    /// When the (first) answer arrived.
    pub answered_at_ms: Option<i64>,
}

/// The stream parts of [`Inner`] that live outside the state lock.
#[derive(Debug, Default)]
pub(super) struct StreamHub {
    acks: Recorder<StreamAck>,
    /// Woken when a connection opens or closes or a ping is answered.
    changed: Notify,
    /// Wakes the re-push timer (`notify_one`, so a wake between two waits is kept).
    wake: Notify,
}

/// The stream state, under the fake's state lock.
pub(super) struct StreamStore {
    delivery: StreamDelivery,
    repush_after: Duration,
    grace: Duration,
    ping_interval: Option<Duration>,
    next_ping_at: Option<Instant>,
    /// ticket → what it opens.
    tickets: HashMap<String, Ticket>,
    tickets_issued: usize,
    open_refusals: usize,
    connect_refusals: usize,
    bad_client_frames: usize,
    stray_acks: usize,
    /// Acks of messages still to be discarded as lost in transit.
    lose_acks: usize,
    lost_acks: usize,
    links: Links,
    /// Copies not done yet, in push order.
    pending: Vec<Parcel>,
    abandoned: Vec<String>,
    pings: Vec<StreamPing>,
    ping_index: HashMap<String, usize>,
    /// messageIds of `disconnect` frames (their acks are expected and ignored).
    disconnects: HashMap<String, String>,
}

impl Default for StreamStore {
    fn default() -> Self {
        Self {
            delivery: StreamDelivery::default(),
            repush_after: DEFAULT_STREAM_REPUSH_AFTER,
            grace: DEFAULT_STREAM_DISCONNECT_GRACE,
            ping_interval: None,
            next_ping_at: None,
            tickets: HashMap::new(),
            tickets_issued: 0,
            open_refusals: 0,
            connect_refusals: 0,
            bad_client_frames: 0,
            stray_acks: 0,
            lose_acks: 0,
            lost_acks: 0,
            links: Links::default(),
            pending: Vec::new(),
            abandoned: Vec::new(),
            pings: Vec::new(),
            ping_index: HashMap::new(),
            disconnects: HashMap::new(),
        }
    }
}

/// What an issued ticket opens.
struct Ticket {
    app_key: String,
    subscriptions: Vec<(String, String)>,
    expires_at: Instant,
}

/// The connections and what was sent on them.
#[derive(Default)]
struct Links {
    /// Every connection, in open order.
    conns: Vec<Conn>,
    index: HashMap<String, usize>,
    /// app → round-robin counter.
    rr: HashMap<String, usize>,
    deliveries: Vec<StreamDeliveryRecord>,
}

struct Conn {
    info: StreamConnection,
    /// Outbound frames and commands to the connection's task; `None` once closed.
    tx: Option<mpsc::UnboundedSender<Outbound>>,
    disconnecting: bool,
    /// messageId → latest send on this connection (for ack latency; stray-ack check).
    sent_at: HashMap<String, Instant>,
}

/// A pushed message: what every copy of it sends.
struct Pushed {
    message_id: String,
    app_key: String,
    frame_type: String,
    topic: String,
    data: String,
    /// `eventId` / `eventBornTime` of `EVENT` frames, the same on every re-push.
    event_id: String,
    born_ms: i64,
}

/// One copy of a message that is not done yet.
struct Parcel {
    msg: Arc<Pushed>,
    /// The connection an `Every` copy is for; `None` = whichever connection acks it.
    slot: Option<String>,
    /// Connection it was last sent to; `None` while waiting for a usable connection.
    conn: Option<String>,
    attempts: u32,
    /// When it is pushed again; `None` while waiting.
    due: Option<Instant>,
}

/// What the fake tells a connection's task.
#[derive(Debug)]
enum Outbound {
    Text(String),
    /// Close from the server side after this long unless the client closes first.
    CloseAfter(Duration),
    /// Drop the socket, no close handshake.
    Drop,
}

/// A downstream frame; `event` adds the `EVENT` headers.
struct Frame<'a> {
    frame_type: &'a str,
    app_key: &'a str,
    message_id: &'a str,
    topic: &'a str,
    data: &'a str,
    event: Option<(&'a str, i64)>,
}

impl Frame<'_> {
    fn render(&self, connection_id: &str) -> String {
        let mut headers = json!({
            "appId": self.app_key,
            "connectionId": connection_id,
            "contentType": "application/json",
            "messageId": self.message_id,
            "time": shared::now_ms().to_string(),
            "topic": self.topic,
        });
        if let (Some((event_id, born_ms)), Value::Object(map)) = (self.event, &mut headers) {
            map.insert("eventId".into(), json!(event_id));
            map.insert("eventBornTime".into(), json!(born_ms.to_string()));
            map.insert("eventCorpId".into(), json!(CORP_ID));
            map.insert("eventType".into(), json!(self.topic));
            map.insert("eventUnifiedAppId".into(), json!(self.app_key));
        }
        json!({
            "specVersion": "1.0",
            "type": self.frame_type,
            "headers": headers,
            "data": self.data,
        })
        .to_string()
    }
}

impl Pushed {
    fn frame(&self) -> Frame<'_> {
        Frame {
            frame_type: &self.frame_type,
            app_key: &self.app_key,
            message_id: &self.message_id,
            topic: &self.topic,
            data: &self.data,
            event: (self.frame_type == "EVENT").then_some((self.event_id.as_str(), self.born_ms)),
        }
    }
}

/// Whether `subs` covers a frame of this type and topic (see the module doc).
fn subscribed(subs: &[(String, String)], frame_type: &str, topic: &str) -> bool {
    match frame_type {
        "CALLBACK" => subs.iter().any(|(t, p)| t == "CALLBACK" && p == topic),
        "EVENT" => subs
            .iter()
            .any(|(t, p)| t == "EVENT" && (p == topic || p == "*")),
        _ => true,
    }
}

/// The fields of an upstream frame that make it an ack.
struct ParsedAck {
    message_id: String,
    code: i64,
    message: String,
    data: String,
}

/// Parses an ack; `None` for a frame that is not JSON, not an object, has no
/// `headers.messageId` or no integer `code` (an ack without a code is no ack).
fn parse_ack(text: &str) -> Option<ParsedAck> {
    let Value::Object(obj) = serde_json::from_str::<Value>(text).ok()? else {
        return None;
    };
    let message_id = obj
        .get("headers")?
        .get("messageId")?
        .as_str()
        .filter(|id| !id.is_empty())?
        .to_owned();
    let code = obj.get("code")?.as_i64()?;
    let message = obj
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let data = match obj.get("data") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    Some(ParsedAck {
        message_id,
        code,
        message,
        data,
    })
}

/// Ack codes after which a copy is done (see the module doc).
fn settles(code: i64) -> bool {
    code == 200 || (400..500).contains(&code)
}

fn fresh_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl Links {
    fn usable(&self, ci: usize, msg: &Pushed) -> bool {
        let conn = &self.conns[ci];
        conn.tx.is_some()
            && !conn.disconnecting
            && conn.info.app_key == msg.app_key
            && subscribed(&conn.info.subscriptions, &msg.frame_type, &msg.topic)
    }

    fn all_usable(&self, msg: &Pushed) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|ci| self.usable(*ci, msg))
            .collect()
    }

    /// The next usable connection of the message's app, round-robin.
    fn pick(&mut self, msg: &Pushed) -> Option<usize> {
        let usable = self.all_usable(msg);
        if usable.is_empty() {
            return None;
        }
        let turn = self.rr.entry(msg.app_key.clone()).or_default();
        let ci = usable[*turn % usable.len()];
        *turn = turn.wrapping_add(1);
        Some(ci)
    }

    /// Sends `frame` to connection `ci`; false if it is closed.
    fn send_text(&mut self, ci: usize, frame: &Frame<'_>) -> bool {
        let conn = &mut self.conns[ci];
        let Some(tx) = &conn.tx else {
            return false;
        };
        tx.send(Outbound::Text(frame.render(&conn.info.id))).is_ok()
    }

    /// Sends a message frame to `ci` and records it as attempt `attempt`.
    fn deliver(&mut self, ci: usize, msg: &Pushed, attempt: u32, now: Instant) -> bool {
        if !self.send_text(ci, &msg.frame()) {
            return false;
        }
        let at_ms = shared::now_ms();
        let conn = &mut self.conns[ci];
        conn.sent_at.insert(msg.message_id.clone(), now);
        conn.info.first_delivery_at_ms.get_or_insert(at_ms);
        self.deliveries.push(StreamDeliveryRecord {
            message_id: msg.message_id.clone(),
            connection_id: conn.info.id.clone(),
            attempt,
            at_ms,
        });
        true
    }

    fn open_of(&self, app_key: Option<&str>) -> Vec<usize> {
        (0..self.conns.len())
            .filter(|ci| {
                let conn = &self.conns[*ci];
                conn.tx.is_some() && app_key.is_none_or(|app| conn.info.app_key == app)
            })
            .collect()
    }
}

impl StreamStore {
    /// Sends `copy` to connection `ci` (or leaves it waiting if that fails).
    fn assign(
        links: &mut Links,
        repush_after: Duration,
        copy: &mut Parcel,
        ci: usize,
        now: Instant,
    ) {
        if links.deliver(ci, &copy.msg, copy.attempts + 1, now) {
            copy.attempts += 1;
            copy.conn = Some(links.conns[ci].info.id.clone());
            copy.due = Some(now + repush_after);
        } else {
            copy.conn = None;
            copy.due = None;
        }
    }

    fn push(&mut self, msg: Pushed, now: Instant) {
        let msg = Arc::new(msg);
        let copy = |slot: Option<String>| Parcel {
            msg: msg.clone(),
            slot,
            conn: None,
            attempts: 0,
            due: None,
        };
        let targets = match self.delivery {
            StreamDelivery::One => self.links.pick(&msg).into_iter().collect(),
            StreamDelivery::Every => self.links.all_usable(&msg),
        };
        if targets.is_empty() {
            self.pending.push(copy(None));
            return;
        }
        for ci in targets {
            let slot = match self.delivery {
                StreamDelivery::One => None,
                StreamDelivery::Every => Some(self.links.conns[ci].info.id.clone()),
            };
            let mut c = copy(slot);
            Self::assign(&mut self.links, self.repush_after, &mut c, ci, now);
            self.pending.push(c);
        }
    }

    /// Sends every waiting copy that now has a usable connection.
    fn dispatch_waiting(&mut self, now: Instant) {
        for copy in self.pending.iter_mut().filter(|c| c.conn.is_none()) {
            if let Some(ci) = self.links.pick(&copy.msg) {
                Self::assign(&mut self.links, self.repush_after, copy, ci, now);
            }
        }
    }

    /// Runs the timers due at `now`; returns when they are next due.
    fn tick(&mut self, now: Instant) -> Option<Instant> {
        if let (Some(interval), Some(at)) = (self.ping_interval, self.next_ping_at)
            && at <= now
        {
            self.ping(None);
            self.next_ping_at = Some(now + interval);
        }
        let mut i = 0;
        while i < self.pending.len() {
            let copy = &mut self.pending[i];
            if copy.due.is_none_or(|due| due > now) {
                i += 1;
                continue;
            }
            if copy.attempts >= STREAM_MAX_ATTEMPTS {
                let gone = self.pending.remove(i);
                self.abandoned.push(gone.msg.message_id.clone());
                continue;
            }
            let same = copy
                .conn
                .as_ref()
                .and_then(|id| self.links.index.get(id).copied())
                .filter(|ci| self.links.usable(*ci, &copy.msg));
            match same.or_else(|| self.links.pick(&copy.msg)) {
                Some(ci) => Self::assign(&mut self.links, self.repush_after, copy, ci, now),
                None => {
                    copy.conn = None;
                    copy.due = None;
                }
            }
            i += 1;
        }
        self.dispatch_waiting(now);
        self.pending
            .iter()
            .filter_map(|c| c.due)
            .chain(self.next_ping_at)
            .min()
    }

    /// Sends a `ping` to every open connection of `app_key` (of every app for `None`).
    fn ping(&mut self, app_key: Option<&str>) -> Vec<String> {
        let mut ids = Vec::new();
        for ci in self.links.open_of(app_key) {
            let message_id = fresh_id();
            let data = json!({ "opaque": fresh_id() }).to_string();
            let app = self.links.conns[ci].info.app_key.clone();
            let frame = Frame {
                frame_type: "SYSTEM",
                app_key: &app,
                message_id: &message_id,
                topic: "ping",
                data: &data,
                event: None,
            };
            if !self.links.send_text(ci, &frame) {
                continue;
            }
            self.ping_index.insert(message_id.clone(), self.pings.len());
            self.pings.push(StreamPing {
                message_id: message_id.clone(),
                connection_id: self.links.conns[ci].info.id.clone(),
                data,
                sent_at_ms: shared::now_ms(),
                answered: false,
                answer_matches: false,
                answered_at_ms: None,
            });
            ids.push(message_id);
        }
        ids
    }

    /// Handles a text frame from connection `conn_id`. Returns the ack to record, if it is
    /// one, and whether a ping was answered.
    fn client_frame(
        &mut self,
        conn_id: &str,
        text: &str,
        now: Instant,
    ) -> (Option<StreamAck>, bool) {
        let parsed = parse_ack(text);
        let Some(ParsedAck {
            message_id,
            code,
            message,
            data,
        }) = parsed
        else {
            self.bad_client_frames += 1;
            return (None, false);
        };
        if let Some(&pi) = self.ping_index.get(&message_id) {
            let ping = &mut self.pings[pi];
            if ping.answered {
                return (None, false);
            }
            ping.answered = true;
            ping.answered_at_ms = Some(shared::now_ms());
            ping.answer_matches = code == 200
                && ping.connection_id == conn_id
                && serde_json::from_str::<Value>(&ping.data).ok()
                    == serde_json::from_str::<Value>(&data).ok();
            return (None, true);
        }
        if self.disconnects.contains_key(&message_id) {
            return (None, false);
        }
        if self.lose_acks > 0 {
            // Lost on the way: the fake never saw it, so the copy stays pending.
            self.lose_acks -= 1;
            self.lost_acks += 1;
            return (None, false);
        }
        let sent = self
            .links
            .index
            .get(conn_id)
            .and_then(|ci| self.links.conns[*ci].sent_at.get(&message_id))
            .copied();
        let Some(sent) = sent else {
            // Never sent this message on this connection: a confused client.
            self.stray_acks += 1;
            return (None, false);
        };
        if settles(code) {
            // The copy on this connection, else this connection's `Every` copy (re-pushed
            // elsewhere), else a `One` copy wherever it is now.
            let of_message = |c: &Parcel| c.msg.message_id == message_id;
            let find = |pred: &dyn Fn(&Parcel) -> bool| {
                self.pending.iter().position(|c| of_message(c) && pred(c))
            };
            let found = find(&|c| c.conn.as_deref() == Some(conn_id))
                .or_else(|| find(&|c| c.slot.as_deref() == Some(conn_id)))
                .or_else(|| find(&|c| c.slot.is_none()));
            if let Some(i) = found {
                self.pending.remove(i);
            }
        }
        let ack = StreamAck {
            message_id,
            connection_id: conn_id.to_owned(),
            code,
            message,
            data,
            latency: now.saturating_duration_since(sent),
            received_at_ms: shared::now_ms(),
        };
        (Some(ack), false)
    }

    fn connections(&self, app_key: Option<&str>) -> Vec<StreamConnection> {
        self.links
            .conns
            .iter()
            .filter(|c| app_key.is_none_or(|app| c.info.app_key == app))
            .map(|c| c.info.clone())
            .collect()
    }

    fn ticket_is_valid(&self, ticket: &str, now: Instant) -> bool {
        self.tickets.get(ticket).is_some_and(|t| t.expires_at > now)
    }
}

impl FakeDingTalk {
    /// Sets how later pushes are spread over an app's connections (default
    /// [`StreamDelivery::One`]).
    pub fn set_stream_delivery(&self, delivery: StreamDelivery) {
        self.inner.lock().stream.delivery = delivery;
    }

    /// Sets how long a copy waits for its ack before it is pushed again (default
    /// [`DEFAULT_STREAM_REPUSH_AFTER`]); applies to sends from now on.
    pub fn set_stream_repush_after(&self, after: Duration) {
        self.inner.lock().stream.repush_after = after;
    }

    /// Sets the time between a `disconnect` frame and the server closing the socket
    /// (default [`DEFAULT_STREAM_DISCONNECT_GRACE`]); applies to later disconnects.
    pub fn set_stream_disconnect_grace(&self, grace: Duration) {
        self.inner.lock().stream.grace = grace;
    }

    /// Pings every open connection of every app each `interval` (`None`, the default, = off).
    pub fn set_stream_ping_interval(&self, interval: Option<Duration>) {
        {
            let mut state = self.inner.lock();
            state.stream.ping_interval = interval;
            state.stream.next_ping_at = interval.map(|i| Instant::now() + i);
        }
        self.inner.stream.wake.notify_one();
    }

    /// Pushes the bot message of `spec` (its [`Self::callback_body`]) as a `CALLBACK` frame
    /// on [`BOT_MESSAGE_TOPIC`] to app `spec.robot_code`; returns the frame's messageId.
    pub fn stream_push(&self, spec: &CallbackSpec) -> String {
        let data = self.callback_body(spec).to_string();
        self.stream_push_raw(&spec.robot_code, "CALLBACK", BOT_MESSAGE_TOPIC, &data)
    }

    /// Pushes a frame of any type and topic with `data` sent verbatim as its `data` string
    /// (for malformed-data tests); delivered, tracked and re-pushed like a bot message.
    /// Returns its messageId.
    pub fn stream_push_raw(
        &self,
        app_key: &str,
        frame_type: &str,
        topic: &str,
        data: &str,
    ) -> String {
        let message_id = fresh_id();
        self.inner.lock().stream.push(
            Pushed {
                message_id: message_id.clone(),
                app_key: app_key.to_owned(),
                frame_type: frame_type.to_owned(),
                topic: topic.to_owned(),
                data: data.to_owned(),
                event_id: fresh_id(),
                born_ms: shared::now_ms(),
            },
            Instant::now(),
        );
        self.inner.stream.wake.notify_one();
        message_id
    }

    /// Sends a `ping` SYSTEM frame (data `{"opaque":"…"}`) to every open connection of the
    /// app; returns their messageIds. Answers show in [`Self::stream_pings`].
    pub fn stream_ping(&self, app_key: &str) -> Vec<String> {
        self.inner.lock().stream.ping(Some(app_key))
    }

    /// Every ping sent so far, in send order, with whether it was answered correctly.
    pub fn stream_pings(&self) -> Vec<StreamPing> {
        self.inner.lock().stream.pings.clone()
    }

    /// Waits until at least `n` pings are answered or `timeout` passes; returns the
    /// answered ones.
    pub async fn wait_for_stream_ping_answers(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Vec<StreamPing> {
        let answered = || -> Vec<StreamPing> {
            let state = self.inner.lock();
            state
                .stream
                .pings
                .iter()
                .filter(|p| p.answered)
                .cloned()
                .collect()
        };
        self.wait_stream_change(timeout, || {
            let now = answered();
            (now.len() >= n).then_some(now)
        })
        .await
        .unwrap_or_else(answered)
    }

    /// Sends a `disconnect` SYSTEM frame to every open connection of the app not yet told,
    /// marks them disconnecting (no new deliveries; their acks still count) and closes
    /// each from the server side after the grace unless the client closes it first.
    /// Returns how many were told.
    pub fn stream_disconnect(&self, app_key: &str) -> usize {
        let mut state = self.inner.lock();
        let stream = &mut state.stream;
        let grace = stream.grace;
        let mut told = 0;
        for ci in stream.links.open_of(Some(app_key)) {
            if stream.links.conns[ci].disconnecting {
                continue;
            }
            let message_id = fresh_id();
            let frame = Frame {
                frame_type: "SYSTEM",
                app_key,
                message_id: &message_id,
                topic: "disconnect",
                data: r#"{"reason":"server maintenance"}"#,
                event: None,
            };
            if !stream.links.send_text(ci, &frame) {
                continue;
            }
            let conn = &mut stream.links.conns[ci];
            if let Some(tx) = &conn.tx {
                let _ = tx.send(Outbound::CloseAfter(grace));
            }
            conn.disconnecting = true;
            conn.info.disconnect_sent_at_ms = Some(shared::now_ms());
            stream.disconnects.insert(message_id, conn.info.id.clone());
            told += 1;
        }
        told
    }

    /// Drops every open connection of the app at once: no `disconnect` frame, no close
    /// handshake. Returns how many were dropped.
    pub fn stream_drop(&self, app_key: &str) -> usize {
        let dropped = {
            let mut state = self.inner.lock();
            let links = &mut state.stream.links;
            let now_ms = shared::now_ms();
            let open = links.open_of(Some(app_key));
            for ci in &open {
                let conn = &mut links.conns[*ci];
                if let Some(tx) = conn.tx.take() {
                    let _ = tx.send(Outbound::Drop);
                }
                conn.info.closed_at_ms = Some(now_ms);
                conn.info.closed_by = Some(StreamClosedBy::Dropped);
                conn.sent_at.clear();
            }
            open.len()
        };
        self.inner.stream.changed.notify_waiters();
        dropped
    }

    /// Every connection of the app, open or closed, in open order.
    pub fn stream_connections(&self, app_key: &str) -> Vec<StreamConnection> {
        self.inner.lock().stream.connections(Some(app_key))
    }

    /// How many connections of the app are open (disconnecting ones included).
    pub fn open_stream_connections(&self, app_key: &str) -> usize {
        self.inner.lock().stream.links.open_of(Some(app_key)).len()
    }

    /// Waits until at least `open` connections of the app are open or `timeout` passes;
    /// returns whether they are.
    pub async fn wait_for_stream_connections(
        &self,
        app_key: &str,
        open: usize,
        timeout: Duration,
    ) -> bool {
        self.wait_stream_change(timeout, || {
            (self.open_stream_connections(app_key) >= open).then_some(())
        })
        .await
        .is_some()
    }

    /// Every ack of a pushed message so far (any code), in arrival order. Ping answers are
    /// in [`Self::stream_pings`]; acks of `disconnect` frames are not recorded.
    pub fn stream_acks(&self) -> Vec<StreamAck> {
        self.inner.stream.acks.all()
    }

    /// Waits until at least `n` acks are recorded or `timeout` passes; returns what is there.
    pub async fn wait_for_stream_acks(&self, n: usize, timeout: Duration) -> Vec<StreamAck> {
        self.inner.stream.acks.wait_for(n, timeout).await
    }

    /// Every send of a message frame so far (re-pushes included), in send order.
    pub fn stream_deliveries(&self) -> Vec<StreamDeliveryRecord> {
        self.inner.lock().stream.links.deliveries.clone()
    }

    /// Copies of the app's messages not done yet (sent and waiting for an ack, or waiting
    /// for a connection).
    pub fn stream_pending(&self, app_key: &str) -> usize {
        let state = self.inner.lock();
        state
            .stream
            .pending
            .iter()
            .filter(|c| c.msg.app_key == app_key)
            .count()
    }

    /// messageIds of copies given up after [`STREAM_MAX_ATTEMPTS`] sends, in order.
    pub fn stream_abandoned(&self) -> Vec<String> {
        self.inner.lock().stream.abandoned.clone()
    }

    /// `connections/open` calls refused with 401 `authFailed`.
    pub fn stream_open_refusals(&self) -> usize {
        self.inner.lock().stream.open_refusals
    }

    /// WebSocket connects refused with 401 `invalidTicket`.
    pub fn stream_connect_refusals(&self) -> usize {
        self.inner.lock().stream.connect_refusals
    }

    /// Client frames ignored as malformed: not JSON, not an object, no
    /// `headers.messageId`, no integer `code`, or binary.
    pub fn stream_bad_client_frames(&self) -> usize {
        self.inner.lock().stream.bad_client_frames
    }

    /// Acks naming a messageId never sent on their connection (ignored).
    pub fn stream_stray_acks(&self) -> usize {
        self.inner.lock().stream.stray_acks
    }

    /// Discards the next `n` acks of pushed messages (ping answers and `disconnect` acks are
    /// not counted) as if lost on the way: not recorded, the copy stays pending and is
    /// pushed again on its timer.
    pub fn stream_lose_acks(&self, n: usize) {
        self.inner.lock().stream.lose_acks = n;
    }

    /// Acks discarded by [`Self::stream_lose_acks`] so far.
    pub fn stream_lost_acks(&self) -> usize {
        self.inner.lock().stream.lost_acks
    }

    /// Tickets issued by `connections/open`.
    pub fn stream_tickets_issued(&self) -> usize {
        self.inner.lock().stream.tickets_issued
    }

    /// Waits on stream changes until `check` gives something or `timeout` passes.
    async fn wait_stream_change<T>(
        &self,
        timeout: Duration,
        check: impl Fn() -> Option<T>,
    ) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.stream.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = check() {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return check();
            }
        }
    }
}

impl Inner {
    /// Registers an upgraded socket; returns its connection id and outbound channel.
    fn stream_register(
        &self,
        ticket: String,
        issued: Ticket,
    ) -> (String, mpsc::UnboundedReceiver<Outbound>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = uuid::Uuid::new_v4().hyphenated().to_string();
        {
            let mut state = self.lock();
            let stream = &mut state.stream;
            let links = &mut stream.links;
            links.index.insert(id.clone(), links.conns.len());
            links.conns.push(Conn {
                info: StreamConnection {
                    id: id.clone(),
                    app_key: issued.app_key,
                    ticket,
                    subscriptions: issued.subscriptions,
                    opened_at_ms: shared::now_ms(),
                    closed_at_ms: None,
                    closed_by: None,
                    disconnect_sent_at_ms: None,
                    first_delivery_at_ms: None,
                },
                tx: Some(tx),
                disconnecting: false,
                sent_at: HashMap::new(),
            });
            // Messages that found no connection go out now, not on the next timer.
            stream.dispatch_waiting(Instant::now());
        }
        self.stream.changed.notify_waiters();
        self.stream.wake.notify_one();
        (id, rx)
    }

    /// Marks a connection closed (unless already marked, e.g. by [`FakeDingTalk::stream_drop`]).
    fn stream_closed(&self, id: &str, by: StreamClosedBy) {
        {
            let mut state = self.lock();
            let links = &mut state.stream.links;
            if let Some(&ci) = links.index.get(id) {
                let conn = &mut links.conns[ci];
                conn.tx = None;
                conn.sent_at.clear();
                conn.info.closed_at_ms.get_or_insert_with(shared::now_ms);
                conn.info.closed_by.get_or_insert(by);
            }
        }
        self.stream.changed.notify_waiters();
    }

    fn stream_client_frame(&self, id: &str, text: &str) {
        let (ack, pinged) = self.lock().stream.client_frame(id, text, Instant::now());
        if let Some(ack) = ack {
            self.stream.acks.push(ack);
        }
        if pinged {
            self.stream.changed.notify_waiters();
        }
    }

    fn stream_bad_frame(&self) {
        self.lock().stream.bad_client_frames += 1;
    }
}

/// Runs the re-push and ping timers until the fake stops: sleeps until the next one is due
/// or something is scheduled.
pub(super) fn spawn_timers(inner: &Arc<Inner>) {
    let inner = inner.clone();
    tokio::spawn(async move {
        loop {
            let next = inner.lock().stream.tick(Instant::now());
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = inner.stop.cancelled() => return,
                _ = inner.stream.wake.notified() => {}
                _ = sleep => {}
            }
        }
    });
}

/// Serves one upgraded socket until it closes: writes what the fake sends, reads acks.
async fn serve_connection(
    inner: Arc<Inner>,
    mut socket: WebSocket,
    id: String,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
) {
    // Server close after a `disconnect` grace, and the wait for the peer's Close reply.
    let mut close_at: Option<tokio::time::Instant> = None;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let mut closed_by = StreamClosedBy::Client;
    loop {
        let deadline = drain_until.or(close_at);
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = inner.stop.cancelled() => {
                closed_by = StreamClosedBy::Dropped;
                break;
            }
            _ = timer => {
                if drain_until.is_some() {
                    break;
                }
                close_at = None;
                closed_by = StreamClosedBy::Server;
                let close = Message::Close(Some(CloseFrame {
                    code: close_code::NORMAL,
                    reason: "disconnect".into(),
                }));
                if socket.send(close).await.is_err() {
                    break;
                }
                drain_until = Some(tokio::time::Instant::now() + CLOSE_REPLY_WAIT);
            }
            out = rx.recv(), if drain_until.is_none() => match out {
                Some(Outbound::Text(text)) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Some(Outbound::CloseAfter(grace)) => {
                    let at = tokio::time::Instant::now() + grace;
                    close_at = Some(close_at.map_or(at, |c| c.min(at)));
                }
                Some(Outbound::Drop) | None => {
                    closed_by = StreamClosedBy::Dropped;
                    break;
                }
            },
            frame = socket.recv() => match frame {
                Some(Ok(Message::Text(text))) => inner.stream_client_frame(&id, text.as_str()),
                Some(Ok(Message::Binary(_))) => inner.stream_bad_frame(),
                // Pongs to client pings are sent by the WebSocket layer itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) => {
                    // Keep reading: that flushes the Close reply and then ends the stream.
                    drain_until.get_or_insert(tokio::time::Instant::now() + CLOSE_REPLY_WAIT);
                }
                Some(Err(_)) | None => break,
            },
        }
    }
    drop(socket);
    inner.stream_closed(&id, closed_by);
}

// ---- handlers ------------------------------------------------------------------------------

/// `subscriptions`: an array of `{type, topic}` string pairs.
fn parse_subscriptions(
    obj: &serde_json::Map<String, Value>,
) -> Result<Vec<(String, String)>, Refusal> {
    let invalid = || invalid_parameter("subscriptions", "subscriptions 必须是 {type, topic} 数组");
    match obj.get("subscriptions") {
        None | Some(Value::Null) => Err(missing_parameter("subscriptions")),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let field = |key: &str| {
                    item.get(key)
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                };
                Some((field("type")?, field("topic")?))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(invalid),
        Some(_) => Err(invalid()),
    }
}

fn accepts_json(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("application/json"))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `POST /v1.0/gateway/connections/open` → `{"endpoint","ticket"}` (XML without an
/// `Accept: application/json`, as the real gateway may answer).
pub(super) async fn open(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let obj = json_object(&headers, &body).ok_or_else(body_is_mandatory)?;
    let client_id = required_str(&obj, "clientId")?;
    let client_secret = required_str(&obj, "clientSecret")?;
    let subscriptions = parse_subscriptions(&obj)?;
    let now = Instant::now();
    if inner
        .apps
        .get(client_id)
        .is_none_or(|secret| secret != client_secret)
    {
        inner.lock().stream.open_refusals += 1;
        return Err(gateway_error(
            StatusCode::UNAUTHORIZED,
            STREAM_AUTH_FAILED_CODE,
            "鉴权失败",
        ));
    }
    let ticket = uuid::Uuid::new_v4().hyphenated().to_string();
    {
        let mut state = inner.lock();
        let stream = &mut state.stream;
        stream.tickets.retain(|_, t| t.expires_at > now);
        stream.tickets.insert(
            ticket.clone(),
            Ticket {
                app_key: client_id.to_owned(),
                subscriptions,
                expires_at: now + STREAM_TICKET_TTL,
            },
        );
        stream.tickets_issued += 1;
    }
    let base = &inner.base_url;
    let ws_base = match base.strip_prefix("https://") {
        Some(rest) => format!("wss://{rest}"),
        None => format!("ws://{}", base.strip_prefix("http://").unwrap_or(base)),
    };
    let endpoint = format!("{ws_base}{STREAM_CONNECT_PATH}");
    if accepts_json(&headers) {
        return Ok(ok_json(json!({ "endpoint": endpoint, "ticket": ticket })));
    }
    let xml = format!(
        "<OpenConnectionResponse><endpoint>{}</endpoint><ticket>{}</ticket></OpenConnectionResponse>",
        xml_escape(&endpoint),
        xml_escape(&ticket)
    );
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/xml")],
        xml,
    )
        .into_response())
}

fn invalid_ticket(inner: &Inner) -> Response {
    inner.lock().stream.connect_refusals += 1;
    gateway_error(
        StatusCode::UNAUTHORIZED,
        STREAM_INVALID_TICKET_CODE,
        "ticket 无效或已过期",
    )
    .into_response()
}

/// `GET /connect?ticket=…`: the WebSocket upgrade; a bad ticket gets HTTP 401 before it.
pub(super) async fn connect(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let (mut parts, _body) = request.into_parts();
    let ticket = query_param(parts.uri.query(), "ticket").unwrap_or_default();
    if !inner.lock().stream.ticket_is_valid(&ticket, Instant::now()) {
        return invalid_ticket(&inner);
    }
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    // Spent only now, so a plain GET with a good ticket does not burn it.
    let issued = {
        let mut state = inner.lock();
        let valid = state.stream.ticket_is_valid(&ticket, Instant::now());
        state.stream.tickets.remove(&ticket).filter(|_| valid)
    };
    let Some(issued) = issued else {
        return invalid_ticket(&inner);
    };
    upgrade.on_upgrade(move |socket| async move {
        let (id, rx) = inner.stream_register(ticket, issued);
        serve_connection(inner, socket, id, rx).await;
    })
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    crate::query_param(query, name).filter(|v| !v.is_empty())
}

/// `POST /_sim/stream/push` (the fake's own, for benchmarks in another process).
pub(super) async fn sim_push(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let obj = json_object(&headers, &body).ok_or_else(body_is_mandatory)?;
    let app_key = required_str(&obj, "app_key")?;
    let text = required_str(&obj, "text")?;
    if !inner.apps.contains_key(app_key) {
        return Err(invalid_parameter("app_key", "no such app"));
    }
    let optional = |key: &str| {
        obj.get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let sender = optional("sender").unwrap_or(SIM_SENDER);
    let group = obj.get("group").and_then(Value::as_bool).unwrap_or(false);
    let spec = if group {
        CallbackSpec::group(
            app_key,
            optional("conversation_id").unwrap_or(SIM_GROUP),
            sender,
            text,
        )
    } else {
        let mut spec = CallbackSpec::one_to_one(app_key, sender, text);
        if let Some(cid) = optional("conversation_id") {
            cid.clone_into(&mut spec.conversation_id);
        }
        spec
    };
    let dt = FakeDingTalk { inner };
    let message_id = dt.stream_push(&spec);
    Ok(ok_json(
        json!({ "messageId": message_id, "msgId": spec.msg_id }),
    ))
}

/// `POST /_sim/stream/disconnect?app_key=…` → `{"disconnecting": n}`.
pub(super) async fn sim_disconnect(
    State(inner): State<Arc<Inner>>,
    RawQuery(query): RawQuery,
) -> Reply {
    let app_key =
        query_param(query.as_deref(), "app_key").ok_or_else(|| missing_parameter("app_key"))?;
    let told = FakeDingTalk { inner }.stream_disconnect(&app_key);
    Ok(ok_json(json!({ "disconnecting": told })))
}

/// `GET /_sim/stream/acks` → `[{message_id, connection_id, code, message, latency_us,
/// received_at_ms}…]`.
pub(super) async fn sim_acks(State(inner): State<Arc<Inner>>) -> Response {
    let acks: Vec<Value> = inner
        .stream
        .acks
        .all()
        .into_iter()
        .map(|a| {
            json!({
                "message_id": a.message_id,
                "connection_id": a.connection_id,
                "code": a.code,
                "message": a.message,
                "latency_us": u64::try_from(a.latency.as_micros()).unwrap_or(u64::MAX),
                "received_at_ms": a.received_at_ms,
            })
        })
        .collect();
    ok_json(Value::Array(acks))
}

/// `GET /_sim/stream/connections?app_key=…` → the connections (tickets left out).
pub(super) async fn sim_connections(
    State(inner): State<Arc<Inner>>,
    RawQuery(query): RawQuery,
) -> Response {
    let app_key = query_param(query.as_deref(), "app_key");
    let conns = inner.lock().stream.connections(app_key.as_deref());
    ok_json(serde_json::to_value(conns).unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    const WAIT: Duration = Duration::from_secs(3);

    use crate::dingtalk::two_app_fake as fake;

    fn open_body(key: &str, secret: &str) -> Value {
        json!({
            "clientId": key, "clientSecret": secret,
            "subscriptions": [{ "type": "CALLBACK", "topic": BOT_MESSAGE_TOPIC }],
            "ua": "parley-test", "localIp": "127.0.0.1",
        })
    }

    async fn open_with(dt: &FakeDingTalk, body: &Value) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .post(format!("{}{STREAM_OPEN_PATH}", dt.base_url()))
            .header(reqwest::header::ACCEPT, "application/json")
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A fresh `(endpoint, ticket)` for app1.
    async fn ticket(dt: &FakeDingTalk) -> (String, String) {
        let (status, v) = open_with(dt, &open_body("app1", "secret1")).await;
        assert_eq!(status, 200, "{v}");
        (
            v["endpoint"].as_str().unwrap().to_owned(),
            v["ticket"].as_str().unwrap().to_owned(),
        )
    }

    async fn connect_with(endpoint: &str, ticket: &str) -> Result<Ws, tungstenite::Error> {
        let url = format!("{endpoint}?ticket={}", urlencode(ticket));
        tokio_tungstenite::connect_async(url)
            .await
            .map(|(ws, _)| ws)
    }

    fn urlencode(s: &str) -> String {
        url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
    }

    /// A new app1 connection, registered with the fake when this returns.
    async fn dial(dt: &FakeDingTalk) -> Ws {
        let before = dt.open_stream_connections("app1");
        let (endpoint, ticket) = ticket(dt).await;
        let ws = connect_with(&endpoint, &ticket).await.unwrap();
        assert!(
            dt.wait_for_stream_connections("app1", before + 1, WAIT)
                .await
        );
        ws
    }

    fn status_of(err: tungstenite::Error) -> u16 {
        match err {
            tungstenite::Error::Http(resp) => resp.status().as_u16(),
            other => panic!("expected an HTTP refusal, got {other}"),
        }
    }

    /// The next text frame within `wait`, parsed; `None` on timeout.
    async fn next_within(ws: &mut Ws, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::time::timeout_at(deadline, ws.next()).await.ok()?;
            match msg {
                Some(Ok(WsMessage::Text(text))) => {
                    return Some(serde_json::from_str(&text).unwrap());
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    async fn next_frame(ws: &mut Ws) -> Value {
        next_within(ws, WAIT).await.expect("a frame")
    }

    /// Acks `frame` the way the official SDK does for a CALLBACK.
    async fn ack(ws: &mut Ws, frame: &Value, code: i64) {
        let ack = json!({
            "code": code,
            "headers": {
                "contentType": "application/json",
                "messageId": frame["headers"]["messageId"],
            },
            "message": "OK",
            "data": json!({ "response": "OK" }).to_string(),
        });
        ws.send(WsMessage::Text(ack.to_string().into()))
            .await
            .unwrap();
    }

    /// Answers a ping like the SDK: same headers, same data, code 200.
    async fn answer_ping(ws: &mut Ws, ping: &Value) {
        let answer = json!({
            "code": 200, "headers": ping["headers"], "message": "OK", "data": ping["data"],
        });
        ws.send(WsMessage::Text(answer.to_string().into()))
            .await
            .unwrap();
    }

    fn message_id(frame: &Value) -> String {
        frame["headers"]["messageId"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn stream_open_checks_credentials_and_body() {
        let dt = fake().await;
        let (status, v) = open_with(&dt, &open_body("app1", "wrong")).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (401, Some(STREAM_AUTH_FAILED_CODE))
        );
        assert_eq!(v["message"], "鉴权失败");
        let (status, _) = open_with(&dt, &open_body("nobody", "secret1")).await;
        assert_eq!(status, 401);
        assert_eq!(dt.stream_open_refusals(), 2);

        let mut no_subs = open_body("app1", "secret1");
        no_subs.as_object_mut().unwrap().remove("subscriptions");
        let (status, v) = open_with(&dt, &no_subs).await;
        assert_eq!(status, 400);
        assert!(v["code"].as_str().unwrap().starts_with("Missing"), "{v}");
        let (status, _) = open_with(&dt, &json!({ "clientId": "app1", "subscriptions": [] })).await;
        assert_eq!(status, 400);
        let malformed = reqwest::Client::new()
            .post(format!("{}{STREAM_OPEN_PATH}", dt.base_url()))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body("{\"clientId\":")
            .send()
            .await
            .unwrap();
        assert_eq!(malformed.status(), 400);
        assert_eq!(dt.stream_open_refusals(), 2);
        assert_eq!(dt.stream_tickets_issued(), 0);

        let (endpoint, ticket) = ticket(&dt).await;
        let ws_base = dt.base_url().replace("http://", "ws://");
        assert_eq!(endpoint, format!("{ws_base}/connect"));
        assert!(!ticket.is_empty());

        // Without `Accept: application/json` the gateway may answer XML.
        let xml = reqwest::Client::new()
            .post(format!("{}{STREAM_OPEN_PATH}", dt.base_url()))
            .json(&open_body("app1", "secret1"))
            .send()
            .await
            .unwrap();
        assert_eq!(xml.status(), 200);
        assert_eq!(
            xml.headers()[reqwest::header::CONTENT_TYPE],
            "application/xml"
        );
        let text = xml.text().await.unwrap();
        assert!(
            text.starts_with("<OpenConnectionResponse><endpoint>ws://"),
            "{text}"
        );
        assert!(text.contains("</endpoint><ticket>"), "{text}");
        assert_eq!(dt.stream_tickets_issued(), 2);
    }

    #[tokio::test]
    async fn stream_ticket_is_single_use_and_checked_before_upgrade() {
        let dt = fake().await;
        let (endpoint, ticket) = ticket(&dt).await;
        // A plain GET is no upgrade: refused, but the ticket is not spent.
        let plain = reqwest::get(format!("{endpoint}?ticket={ticket}").replace("ws://", "http://"))
            .await
            .unwrap();
        assert!(plain.status().is_client_error());
        let ws = connect_with(&endpoint, &ticket).await.unwrap();
        assert!(dt.wait_for_stream_connections("app1", 1, WAIT).await);
        let again = connect_with(&endpoint, &ticket).await.unwrap_err();
        assert_eq!(status_of(again), 401);
        let unknown = connect_with(&endpoint, "no-such-ticket").await.unwrap_err();
        assert_eq!(status_of(unknown), 401);
        let none = tokio_tungstenite::connect_async(endpoint.clone())
            .await
            .unwrap_err();
        assert_eq!(status_of(none), 401);
        assert_eq!(dt.stream_connect_refusals(), 3);
        let conns = dt.stream_connections("app1");
        assert_eq!(conns.len(), 1);
        assert_eq!(conns[0].ticket, ticket);
        assert_eq!(
            conns[0].subscriptions,
            vec![("CALLBACK".to_owned(), BOT_MESSAGE_TOPIC.to_owned())]
        );
        assert!(!format!("{:?}", conns[0]).contains(&ticket));
        drop(ws);
    }

    #[tokio::test]
    async fn stream_push_has_the_platform_frame_shape_and_ack_settles_it() {
        let dt = fake().await;
        let mut ws = dial(&dt).await;
        let spec = CallbackSpec::one_to_one("app1", "staff1", "hello");
        let id = dt.stream_push(&spec);
        let frame = next_frame(&mut ws).await;
        let conn = dt.stream_connections("app1").remove(0);
        assert_eq!(frame["specVersion"], "1.0");
        assert_eq!(frame["type"], "CALLBACK");
        let headers = &frame["headers"];
        assert_eq!(headers["appId"], "app1");
        assert_eq!(headers["connectionId"], conn.id.as_str());
        assert_eq!(headers["contentType"], "application/json");
        assert_eq!(headers["messageId"], id.as_str());
        assert_eq!(headers["topic"], BOT_MESSAGE_TOPIC);
        let time: i64 = headers["time"].as_str().unwrap().parse().unwrap();
        assert!((shared::now_ms() - time).abs() < 5_000);
        let body: Value = serde_json::from_str(frame["data"].as_str().unwrap()).unwrap();
        assert_eq!(body["msgId"], spec.msg_id.as_str());
        assert_eq!(body["text"]["content"], " hello");
        assert_eq!(dt.stream_pending("app1"), 1);

        ack(&mut ws, &frame, 200).await;
        let acks = dt.wait_for_stream_acks(1, WAIT).await;
        assert_eq!(acks.len(), 1);
        assert_eq!(acks[0].message_id, id);
        assert_eq!(acks[0].connection_id, conn.id);
        assert_eq!(acks[0].code, 200);
        assert_eq!(acks[0].data, r#"{"response":"OK"}"#);
        assert!(acks[0].latency > Duration::ZERO && acks[0].latency < WAIT);
        assert_eq!(dt.stream_pending("app1"), 0);
        let deliveries = dt.stream_deliveries();
        assert_eq!(deliveries.len(), 1);
        assert_eq!(
            (deliveries[0].attempt, deliveries[0].message_id.as_str()),
            (1, id.as_str())
        );
        assert!(
            dt.stream_connections("app1")[0]
                .first_delivery_at_ms
                .is_some()
        );

        // An ack for something never sent here is stray, not an ack.
        let stray = json!({ "headers": { "messageId": "never-sent" } });
        ack(&mut ws, &stray, 200).await;
        // Frames are handled in order: once a later ping is answered, the stray is counted.
        dt.stream_ping("app1");
        let ping = next_frame(&mut ws).await;
        answer_ping(&mut ws, &ping).await;
        dt.wait_for_stream_ping_answers(1, WAIT).await;
        assert_eq!(dt.stream_stray_acks(), 1);
        assert_eq!(dt.stream_acks().len(), 1);
    }

    #[tokio::test]
    async fn stream_unacked_message_is_pushed_again_with_the_same_id() {
        let dt = fake().await;
        dt.set_stream_repush_after(Duration::from_millis(200));
        let mut ws = dial(&dt).await;
        let id = dt.stream_push(&CallbackSpec::one_to_one("app1", "staff1", "again"));
        let first = next_frame(&mut ws).await;
        let sent = Instant::now();
        let second = next_frame(&mut ws).await;
        assert!(
            sent.elapsed() >= Duration::from_millis(150),
            "{:?}",
            sent.elapsed()
        );
        assert_eq!(message_id(&second), id);
        assert_eq!(second["data"], first["data"]);
        // A 5xx ack leaves it pending: pushed once more.
        ack(&mut ws, &second, 500).await;
        let third = next_frame(&mut ws).await;
        assert_eq!(message_id(&third), id);
        assert_eq!(dt.stream_pending("app1"), 1);
        ack(&mut ws, &third, 200).await;
        let acks = dt.wait_for_stream_acks(2, WAIT).await;
        assert_eq!(
            acks.iter().map(|a| a.code).collect::<Vec<_>>(),
            vec![500, 200]
        );
        assert_eq!(dt.stream_pending("app1"), 0);
        let attempts: Vec<u32> = dt.stream_deliveries().iter().map(|d| d.attempt).collect();
        assert_eq!(attempts, vec![1, 2, 3]);
        assert!(
            next_within(&mut ws, Duration::from_millis(400))
                .await
                .is_none()
        );

        // A 4xx ack is final: the client refused it for good.
        dt.stream_push(&CallbackSpec::one_to_one("app1", "staff1", "refused"));
        let frame = next_frame(&mut ws).await;
        ack(&mut ws, &frame, 404).await;
        dt.wait_for_stream_acks(3, WAIT).await;
        assert_eq!(dt.stream_pending("app1"), 0);
        assert!(
            next_within(&mut ws, Duration::from_millis(400))
                .await
                .is_none()
        );

        // A lost ack is as good as none: the message comes again.
        dt.stream_lose_acks(1);
        let id = dt.stream_push(&CallbackSpec::one_to_one("app1", "staff1", "lost"));
        let frame = next_frame(&mut ws).await;
        ack(&mut ws, &frame, 200).await;
        let again = next_frame(&mut ws).await;
        assert_eq!(message_id(&again), id);
        assert_eq!(dt.stream_lost_acks(), 1);
        ack(&mut ws, &again, 200).await;
        dt.wait_for_stream_acks(4, WAIT).await;
        assert_eq!(dt.stream_pending("app1"), 0);
        assert_eq!(dt.stream_acks().len(), 4);
    }

    #[tokio::test]
    async fn stream_copy_is_abandoned_after_max_attempts() {
        let dt = fake().await;
        dt.set_stream_repush_after(Duration::from_millis(20));
        let mut ws = dial(&dt).await;
        let id = dt.stream_push(&CallbackSpec::one_to_one("app1", "staff1", "ignored"));
        for _ in 0..STREAM_MAX_ATTEMPTS {
            assert_eq!(message_id(&next_frame(&mut ws).await), id);
        }
        let deadline = Instant::now() + WAIT;
        while dt.stream_abandoned().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(dt.stream_abandoned(), vec![id]);
        assert_eq!(dt.stream_pending("app1"), 0);
        assert_eq!(dt.stream_deliveries().len(), STREAM_MAX_ATTEMPTS as usize);
        assert!(
            next_within(&mut ws, Duration::from_millis(100))
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn stream_one_goes_to_one_connection_every_to_all() {
        let dt = fake().await;
        let mut a = dial(&dt).await;
        let mut b = dial(&dt).await;
        for i in 0..4 {
            dt.stream_push(&CallbackSpec::one_to_one(
                "app1",
                "staff1",
                &format!("m{i}"),
            ));
        }
        for ws in [&mut a, &mut b] {
            for _ in 0..2 {
                let frame = next_frame(ws).await;
                ack(ws, &frame, 200).await;
            }
            assert!(next_within(ws, Duration::from_millis(200)).await.is_none());
        }
        dt.wait_for_stream_acks(4, WAIT).await;
        assert_eq!(dt.stream_pending("app1"), 0);

        dt.set_stream_delivery(StreamDelivery::Every);
        let id = dt.stream_push(&CallbackSpec::one_to_one("app1", "staff1", "all"));
        let fa = next_frame(&mut a).await;
        let fb = next_frame(&mut b).await;
        assert_eq!((message_id(&fa), message_id(&fb)), (id.clone(), id.clone()));
        assert_ne!(fa["headers"]["connectionId"], fb["headers"]["connectionId"]);
        assert_eq!(dt.stream_pending("app1"), 2);
        ack(&mut a, &fa, 200).await;
        dt.wait_for_stream_acks(5, WAIT).await;
        assert_eq!(dt.stream_pending("app1"), 1);
        ack(&mut b, &fb, 200).await;
        dt.wait_for_stream_acks(6, WAIT).await;
        assert_eq!(dt.stream_pending("app1"), 0);
        // app2 has no connection: its message waits without touching app1's.
        dt.stream_push(&CallbackSpec::one_to_one("app2", "staff1", "elsewhere"));
        assert_eq!(dt.stream_pending("app2"), 1);
        assert!(
            next_within(&mut a, Duration::from_millis(100))
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn stream_ping_is_answered_with_its_data() {
        let dt = fake().await;
        let mut ws = dial(&dt).await;
        let ids = dt.stream_ping("app1");
        assert_eq!(ids.len(), 1);
        let frame = next_frame(&mut ws).await;
        assert_eq!(
            (frame["type"].as_str(), frame["headers"]["topic"].as_str()),
            (Some("SYSTEM"), Some("ping"))
        );
        assert_eq!(message_id(&frame), ids[0]);
        let data: Value = serde_json::from_str(frame["data"].as_str().unwrap()).unwrap();
        assert!(data["opaque"].is_string());
        // Answered like the SDK: same headers, same data (re-serialised).
        let answer = json!({
            "code": 200, "headers": frame["headers"], "message": "OK", "data": data.to_string(),
        });
        ws.send(WsMessage::Text(answer.to_string().into()))
            .await
            .unwrap();
        let answered = dt.wait_for_stream_ping_answers(1, WAIT).await;
        assert_eq!(answered.len(), 1);
        assert!(answered[0].answer_matches);

        dt.stream_ping("app1");
        let frame = next_frame(&mut ws).await;
        let wrong =
            json!({ "code": 200, "headers": frame["headers"], "message": "OK", "data": "{}" });
        ws.send(WsMessage::Text(wrong.to_string().into()))
            .await
            .unwrap();
        let answered = dt.wait_for_stream_ping_answers(2, WAIT).await;
        assert!(answered[1].answered && !answered[1].answer_matches);
        assert!(dt.stream_acks().is_empty());

        dt.set_stream_ping_interval(Some(Duration::from_millis(100)));
        let frame = next_frame(&mut ws).await;
        assert_eq!(frame["headers"]["topic"], "ping");
        dt.set_stream_ping_interval(None);
    }

    #[tokio::test]
    async fn stream_disconnect_then_server_close_after_the_grace() {
        let dt = fake().await;
        dt.set_stream_disconnect_grace(Duration::from_millis(300));
        let mut a = dial(&dt).await;
        let id1 = dt.stream_push(&CallbackSpec::one_to_one("app1", "staff1", "before"));
        let m1 = next_frame(&mut a).await;
        assert_eq!(dt.stream_disconnect("app1"), 1);
        let told = Instant::now();
        let bye = next_frame(&mut a).await;
        assert_eq!(
            (bye["type"].as_str(), bye["headers"]["topic"].as_str()),
            (Some("SYSTEM"), Some("disconnect"))
        );
        // No new deliveries to a disconnecting connection, but its acks still count.
        let id2 = dt.stream_push(&CallbackSpec::one_to_one("app1", "staff1", "after"));
        ack(&mut a, &m1, 200).await;
        ack(&mut a, &bye, 200).await;
        let acks = dt.wait_for_stream_acks(1, WAIT).await;
        assert_eq!(acks[0].message_id, id1);
        assert_eq!(dt.stream_pending("app1"), 1);
        // The client stays: the server closes after the grace.
        match tokio::time::timeout(WAIT, a.next()).await.unwrap() {
            Some(Ok(WsMessage::Close(Some(close)))) => assert_eq!(u16::from(close.code), 1000),
            other => panic!("expected a Close frame, got {other:?}"),
        }
        assert!(told.elapsed() >= Duration::from_millis(250));
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, a.next()).await {}
        let deadline = Instant::now() + WAIT;
        while dt.open_stream_connections("app1") > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let conns = dt.stream_connections("app1");
        assert_eq!(conns[0].closed_by, Some(StreamClosedBy::Server));
        assert!(conns[0].disconnect_sent_at_ms.is_some());
        assert_eq!(dt.stream_acks().len(), 1);

        let mut b = dial(&dt).await;
        let m2 = next_frame(&mut b).await;
        assert_eq!(message_id(&m2), id2);
    }

    #[tokio::test]
    async fn stream_message_pushed_without_connection_is_delivered_on_connect() {
        let dt = fake().await;
        let id = dt.stream_push(&CallbackSpec::one_to_one("app1", "staff1", "early"));
        assert_eq!(dt.stream_pending("app1"), 1);
        assert!(dt.stream_deliveries().is_empty());
        let mut ws = dial(&dt).await;
        let frame = next_frame(&mut ws).await;
        assert_eq!(message_id(&frame), id);
        let conn = dt.stream_connections("app1").remove(0);
        assert!(conn.first_delivery_at_ms.unwrap() >= conn.opened_at_ms);
        ack(&mut ws, &frame, 200).await;
        dt.wait_for_stream_acks(1, WAIT).await;
        assert_eq!(dt.stream_pending("app1"), 0);
    }

    #[tokio::test]
    async fn stream_drop_and_bad_frames_never_break_the_fake() {
        let dt = fake().await;
        dt.set_stream_repush_after(Duration::from_millis(200));
        let mut a = dial(&dt).await;
        for bad in [
            "not json",
            "[1,2]",
            r#"{"code":200}"#,
            r#"{"headers":{"messageId":"x"}}"#,
        ] {
            a.send(WsMessage::Text(bad.into())).await.unwrap();
        }
        a.send(WsMessage::Binary(vec![0, 1, 2].into()))
            .await
            .unwrap();
        a.send(WsMessage::Ping(vec![7].into())).await.unwrap();
        // Frames are handled in order: once this ping is answered, the bad ones are counted.
        dt.stream_ping("app1");
        let ping = next_frame(&mut a).await;
        answer_ping(&mut a, &ping).await;
        assert!(dt.wait_for_stream_ping_answers(1, WAIT).await[0].answer_matches);
        assert_eq!(dt.stream_bad_client_frames(), 5);

        let id = dt.stream_push(&CallbackSpec::one_to_one("app1", "staff1", "lost"));
        next_frame(&mut a).await;
        assert_eq!(dt.stream_drop("app1"), 1);
        // No Close frame: the stream just ends.
        match tokio::time::timeout(WAIT, a.next()).await.unwrap() {
            None | Some(Err(_)) => {}
            other => panic!("expected the socket to drop, got {other:?}"),
        }
        let conns = dt.stream_connections("app1");
        assert_eq!(conns[0].closed_by, Some(StreamClosedBy::Dropped));
        // The copy on the dropped connection waits for its re-push timer, then goes to b.
        let mut b = dial(&dt).await;
        let frame = next_frame(&mut b).await;
        assert_eq!(message_id(&frame), id);
        let last = dt.stream_deliveries().pop().unwrap();
        assert_eq!(last.attempt, 2);
        assert_eq!(
            last.connection_id,
            frame["headers"]["connectionId"].as_str().unwrap()
        );
    }

    #[tokio::test]
    async fn stream_control_routes_push_list_and_disconnect() {
        let dt = fake().await;
        let client = reqwest::Client::new();
        let mut ws = dial(&dt).await;
        let v: Value = client
            .post(format!("{}{SIM_STREAM_PUSH_PATH}", dt.base_url()))
            .json(&json!({ "app_key": "app1", "text": "hi", "group": true, "sender": "staff9" }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let frame = next_frame(&mut ws).await;
        assert_eq!(frame["headers"]["messageId"], v["messageId"]);
        let body: Value = serde_json::from_str(frame["data"].as_str().unwrap()).unwrap();
        assert_eq!(body["msgId"], v["msgId"]);
        assert_eq!(body["conversationType"], "2");
        assert_eq!(body["senderStaffId"], "staff9");
        ack(&mut ws, &frame, 200).await;
        dt.wait_for_stream_acks(1, WAIT).await;

        let acks: Value = client
            .get(format!("{}{SIM_STREAM_ACKS_PATH}", dt.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(acks[0]["message_id"], v["messageId"]);
        assert_eq!(acks[0]["code"], 200);
        assert!(acks[0]["latency_us"].as_u64().unwrap() > 0);
        let conns: Value = client
            .get(format!(
                "{}{SIM_STREAM_CONNECTIONS_PATH}?app_key=app1",
                dt.base_url()
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(conns.as_array().unwrap().len(), 1);
        assert!(conns[0].get("ticket").is_none());
        assert_eq!(conns[0]["subscriptions"][0][1], BOT_MESSAGE_TOPIC);
        let told: Value = client
            .post(format!(
                "{}{SIM_STREAM_DISCONNECT_PATH}?app_key=app1",
                dt.base_url()
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(told["disconnecting"], 1);
        assert_eq!(next_frame(&mut ws).await["headers"]["topic"], "disconnect");

        let unknown = client
            .post(format!("{}{SIM_STREAM_PUSH_PATH}", dt.base_url()))
            .json(&json!({ "app_key": "nope", "text": "hi" }))
            .send()
            .await
            .unwrap();
        assert_eq!(unknown.status(), 400);
    }
}
