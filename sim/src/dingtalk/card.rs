//! The AI card API of the fake DingTalk (PROTOCOLS.md §c and "Additions"): create a card
//! instance, deliver it into a group (`dtv1.card//IM_GROUP.<openConversationId>`) or a robot
//! 1:1 chat (`dtv1.card//IM_ROBOT.<staffId>`) — or both in one `createAndDeliver` — stream
//! text into one of its variables (`PUT /v1.0/card/streaming`) and update its parameters
//! (`PUT /v1.0/card/instances`). Response bodies have the shapes of the official SDK's
//! models (`card_1_0`): create answers `result: <outTrackId>`, deliver `result: [<deliver
//! result>]`, createAndDeliver `result: {outTrackId, deliverResults: [...]}`, streaming and
//! update `result: true`, all with `success: true`. Every card and every streaming update is
//! recorded as a [`FakeCard`]; refusals ([`CardFault`]) can be injected. Error codes the real
//! service documents (`param.outTrackIdDuplicated`, `param.templateUnpublished`, HTTP 500
//! `unknownError`) are used as is; the others are `param.*` codes of this fake, exported as
//! constants so a client test can match them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{
    FakeDingTalk, Inner, Refusal, Reply, body_is_mandatory, gateway_error, invalid_parameter,
    json_object, ok_json, query_key, required_str,
};

/// Route of card create (`POST`) and card update (`PUT`); also their key in the QPS limit
/// and [`FakeDingTalk::endpoint_stats`], which the two share.
pub const CARD_INSTANCES_PATH: &str = "/v1.0/card/instances";
/// Route of `POST` deliver.
pub const CARD_DELIVER_PATH: &str = "/v1.0/card/instances/deliver";
/// Route of `POST` createAndDeliver.
pub const CARD_CREATE_AND_DELIVER_PATH: &str = "/v1.0/card/instances/createAndDeliver";
/// Route of `PUT` streaming.
pub const CARD_STREAMING_PATH: &str = "/v1.0/card/streaming";

/// HTTP 400 code: a card with this `outTrackId` already exists (each card needs a fresh one).
pub const CARD_DUPLICATE_CODE: &str = "param.outTrackIdDuplicated";
/// HTTP 400 code: the card template is not published ([`CardFault::TemplateUnpublished`]).
pub const CARD_TEMPLATE_UNPUBLISHED_CODE: &str = "param.templateUnpublished";
/// HTTP 500 code peers report for missing `Card.*` permissions ([`CardFault::NoPermission`]).
pub const CARD_NO_PERMISSION_CODE: &str = "unknownError";
/// HTTP 503 code of [`CardFault::ServerError`].
pub const CARD_SERVER_ERROR_CODE: &str = "ServiceUnavailable";
/// HTTP 400 code: no card with this `outTrackId` (for the token's app).
pub const CARD_NOT_FOUND_CODE: &str = "param.cardNotExist";
/// HTTP 400 code: streaming into a card that was never delivered.
pub const CARD_NOT_DELIVERED_CODE: &str = "param.cardNotDelivered";
/// HTTP 400 code: `cardData.cardParamMap` missing, not an object, or with a non-string value.
pub const CARD_PARAM_MAP_INVALID_CODE: &str = "param.cardParamMapInvalid";
/// HTTP 400 code: `openSpaceId` malformed or naming a space type the fake does not serve.
pub const CARD_OPEN_SPACE_ID_INVALID_CODE: &str = "param.openSpaceIdInvalid";
/// HTTP 400 code: the deliver model the space type needs is missing or malformed.
pub const CARD_DELIVER_MODEL_INVALID_CODE: &str = "param.deliverModelInvalid";

/// A refusal injected into the card routes with [`FakeDingTalk::refuse_cards`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardFault {
    /// HTTP 400 `param.templateUnpublished` on create and createAndDeliver.
    TemplateUnpublished,
    /// HTTP 500 `unknownError` (missing `Card.Instance.Write`) on create, createAndDeliver
    /// and deliver.
    NoPermission,
    /// HTTP 503 `ServiceUnavailable` on create, createAndDeliver, deliver and streaming.
    ServerError,
}

/// One `PUT /v1.0/card/streaming` the fake accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CardUpdate {
    /// When it arrived, ms since the Unix epoch.
    pub at_ms: i64,
    /// `guid` as sent (clients send a fresh one per call).
    pub guid: String,
    /// The template variable written (`key`).
    pub key: String,
    /// `content` as sent.
    pub content: String,
    /// `isFull`: `content` replaces the variable instead of being appended.
    pub is_full: bool,
    /// `isFinalize`.
    pub is_finalize: bool,
    /// `isError`.
    pub is_error: bool,
}

/// A card instance as the fake holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FakeCard {
    /// The client's `outTrackId`.
    pub out_track_id: String,
    /// App (= robotCode) whose token created it.
    pub app_key: String,
    /// `cardTemplateId`.
    pub template_id: String,
    /// Spaces delivered to, one `dtv1.card//IM_GROUP.<cid>` / `dtv1.card//IM_ROBOT.<staffId>`
    /// each, in delivery order; empty until delivered.
    pub space_ids: Vec<String>,
    /// Staff ids of `imGroupOpenDeliverModel.atUserIds` (its keys; `@ALL` for everyone).
    pub at_user_ids: Vec<String>,
    /// `cardData.cardParamMap` after create and every update (e.g. `flowStatus`).
    pub params: BTreeMap<String, String>,
    /// Streamed text per variable, after every streaming update.
    pub content: BTreeMap<String, String>,
    /// Every streaming update, in arrival order (including any after a finalize).
    pub updates: Vec<CardUpdate>,
    /// A streaming update had `isFinalize: true`.
    pub finalized: bool,
    /// A streaming update had `isError: true`.
    pub errored: bool,
    /// When it was created, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// When it was first delivered, ms since the Unix epoch.
    pub delivered_at_ms: Option<i64>,
    /// When the first streaming update with non-empty content arrived.
    pub first_content_at_ms: Option<i64>,
}

impl FakeCard {
    /// Finalized or errored: the client is done with it.
    pub fn is_finished(&self) -> bool {
        self.finalized || self.errored
    }
}

/// Every card, in creation order, with an index by `outTrackId`.
#[derive(Debug, Default)]
pub(super) struct CardStore {
    cards: Vec<FakeCard>,
    index: HashMap<String, usize>,
    pub(super) fault: Option<CardFault>,
}

impl CardStore {
    pub(super) fn clear(&mut self) {
        self.cards.clear();
        self.index.clear();
    }

    /// The card `out_track_id` of `app`; another app's card is as good as absent.
    fn get_mut(&mut self, app: &str, out_track_id: &str) -> Result<&mut FakeCard, Refusal> {
        self.index
            .get(out_track_id)
            .and_then(|i| self.cards.get_mut(*i))
            .filter(|card| card.app_key == app)
            .ok_or_else(|| {
                gateway_error(
                    StatusCode::BAD_REQUEST,
                    CARD_NOT_FOUND_CODE,
                    &format!("卡片不存在: outTrackId {out_track_id}"),
                )
            })
    }

    fn insert(&mut self, app: &str, new: NewCard) -> Result<&mut FakeCard, Refusal> {
        if self.index.contains_key(&new.out_track_id) {
            return Err(gateway_error(
                StatusCode::BAD_REQUEST,
                CARD_DUPLICATE_CODE,
                "outTrackId 重复",
            ));
        }
        let i = self.cards.len();
        self.index.insert(new.out_track_id.clone(), i);
        self.cards.push(FakeCard {
            out_track_id: new.out_track_id,
            app_key: app.to_owned(),
            template_id: new.template_id,
            space_ids: Vec::new(),
            at_user_ids: Vec::new(),
            params: new.params,
            content: BTreeMap::new(),
            updates: Vec::new(),
            finalized: false,
            errored: false,
            created_at_ms: shared::now_ms(),
            delivered_at_ms: None,
            first_content_at_ms: None,
        });
        Ok(&mut self.cards[i])
    }
}

impl FakeDingTalk {
    /// Injects `fault` into the card routes from now on (`None` lifts it); see [`CardFault`]
    /// for which routes each fault hits. The card update route is never refused.
    pub fn refuse_cards(&self, fault: Option<CardFault>) {
        self.inner.lock().cards.fault = fault;
    }

    /// Every card created so far, in creation order.
    pub fn cards(&self) -> Vec<FakeCard> {
        self.inner.lock().cards.cards.clone()
    }

    /// The card with this `outTrackId`, if created.
    pub fn card(&self, out_track_id: &str) -> Option<FakeCard> {
        let state = self.inner.lock();
        let i = *state.cards.index.get(out_track_id)?;
        state.cards.cards.get(i).cloned()
    }

    /// Waits until at least `n` cards are finished (finalized or errored) or `timeout`
    /// passes, then returns the finished cards, in creation order.
    pub async fn wait_for_finished_cards(&self, n: usize, timeout: Duration) -> Vec<FakeCard> {
        let finished = || -> Vec<FakeCard> {
            let state = self.inner.lock();
            state
                .cards
                .cards
                .iter()
                .filter(|c| c.is_finished())
                .cloned()
                .collect()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.cards_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = finished();
            if now.len() >= n {
                return now;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return finished();
            }
        }
    }
}

/// Which card operation a fault is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CardOp {
    Create,
    Deliver,
    Stream,
}

impl Inner {
    /// The injected refusal for `op`, if any.
    fn card_fault(&self, op: CardOp) -> Result<(), Refusal> {
        let fault = self.lock().cards.fault;
        match (fault, op) {
            (Some(CardFault::TemplateUnpublished), CardOp::Create) => Err(gateway_error(
                StatusCode::BAD_REQUEST,
                CARD_TEMPLATE_UNPUBLISHED_CODE,
                "卡片模板未发布",
            )),
            (Some(CardFault::NoPermission), CardOp::Create | CardOp::Deliver) => {
                Err(gateway_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    CARD_NO_PERMISSION_CODE,
                    "unknownError",
                ))
            }
            (Some(CardFault::ServerError), _) => Err(gateway_error(
                StatusCode::SERVICE_UNAVAILABLE,
                CARD_SERVER_ERROR_CODE,
                "The request has failed due to a temporary failure of the server.",
            )),
            _ => Ok(()),
        }
    }
}

/// The create half of a body.
#[derive(Debug)]
struct NewCard {
    out_track_id: String,
    template_id: String,
    params: BTreeMap<String, String>,
}

/// Kind of space a card is delivered into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpaceKind {
    /// `IM_GROUP.<openConversationId>`.
    Group,
    /// `IM_ROBOT.<staffId>`: the robot's 1:1 chat with that user.
    Robot,
}

impl SpaceKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Group => "IM_GROUP",
            Self::Robot => "IM_ROBOT",
        }
    }
}

/// The deliver half of a body, validated.
#[derive(Debug)]
struct Delivery {
    spaces: Vec<(SpaceKind, String)>,
    at_user_ids: Vec<String>,
}

fn param_map_invalid(message: &str) -> Refusal {
    gateway_error(
        StatusCode::BAD_REQUEST,
        CARD_PARAM_MAP_INVALID_CODE,
        message,
    )
}

fn deliver_model_invalid(message: &str) -> Refusal {
    gateway_error(
        StatusCode::BAD_REQUEST,
        CARD_DELIVER_MODEL_INVALID_CODE,
        message,
    )
}

/// `cardData.cardParamMap`: an object of strings (the real API takes no other value type).
fn card_param_map(obj: &Map<String, Value>) -> Result<BTreeMap<String, String>, Refusal> {
    let card_data = match obj.get("cardData") {
        None | Some(Value::Null) => return Err(super::missing_parameter("cardData")),
        Some(Value::Object(data)) => data,
        Some(_) => return Err(param_map_invalid("cardData 必须是对象")),
    };
    let Some(Value::Object(map)) = card_data.get("cardParamMap") else {
        return Err(param_map_invalid("cardData.cardParamMap 必须是对象"));
    };
    map.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(param_map_invalid(&format!(
                "cardData.cardParamMap.{k} 必须是字符串"
            ))),
        })
        .collect()
}

/// An optional field that must be an object when present.
fn optional_object<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, Refusal> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => Err(invalid_parameter(key, &format!("{key} 必须是对象"))),
    }
}

/// An optional boolean flag, `false` when absent.
fn optional_bool(obj: &Map<String, Value>, key: &str) -> Result<bool, Refusal> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid_parameter(key, &format!("{key} 必须是布尔值"))),
    }
}

fn parse_create(obj: &Map<String, Value>) -> Result<NewCard, Refusal> {
    let template_id = required_str(obj, "cardTemplateId")?;
    let out_track_id = required_str(obj, "outTrackId")?;
    let params = card_param_map(obj)?;
    match obj.get("callbackType") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "STREAM" || t == "HTTP" => {}
        Some(_) => {
            return Err(invalid_parameter(
                "callbackType",
                "callbackType 只能是 STREAM 或 HTTP",
            ));
        }
    }
    optional_object(obj, "imGroupOpenSpaceModel")?;
    optional_object(obj, "imRobotOpenSpaceModel")?;
    Ok(NewCard {
        out_track_id: out_track_id.to_owned(),
        template_id: template_id.to_owned(),
        params,
    })
}

/// Parses `dtv1.card//TYPE.id[;TYPE.id…]` (the SDK's example lists several spaces joined
/// by `;`; the type is case-insensitive there too).
fn parse_open_space_id(raw: &str) -> Result<Vec<(SpaceKind, String)>, Refusal> {
    let invalid = |why: &str| {
        gateway_error(
            StatusCode::BAD_REQUEST,
            CARD_OPEN_SPACE_ID_INVALID_CODE,
            &format!("openSpaceId 不合法 ({why}): {raw}"),
        )
    };
    let rest = raw
        .strip_prefix("dtv1.card//")
        .ok_or_else(|| invalid("expected the dtv1.card// prefix"))?;
    let mut spaces = Vec::new();
    for part in rest.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (kind, id) = part
            .split_once('.')
            .ok_or_else(|| invalid("expected TYPE.id"))?;
        let kind = match kind.to_ascii_uppercase().as_str() {
            "IM_GROUP" => SpaceKind::Group,
            "IM_ROBOT" => SpaceKind::Robot,
            _ => return Err(invalid("only IM_GROUP and IM_ROBOT spaces are served")),
        };
        if id.is_empty() {
            return Err(invalid("empty space id"));
        }
        spaces.push((kind, id.to_owned()));
    }
    if spaces.is_empty() {
        return Err(invalid("no space"));
    }
    Ok(spaces)
}

fn parse_deliver(inner: &Inner, app: &str, obj: &Map<String, Value>) -> Result<Delivery, Refusal> {
    let spaces = parse_open_space_id(required_str(obj, "openSpaceId")?)?;
    match obj.get("userIdType") {
        None | Some(Value::Null) => {}
        Some(v) if matches!(v.as_i64(), Some(1 | 2)) => {}
        Some(_) => {
            return Err(invalid_parameter(
                "userIdType",
                "userIdType 只能是 1 (userId) 或 2 (unionId)",
            ));
        }
    }
    let mut at_user_ids = Vec::new();
    if spaces.iter().any(|(k, _)| *k == SpaceKind::Group) {
        let model = optional_object(obj, "imGroupOpenDeliverModel")?
            .ok_or_else(|| deliver_model_invalid("群聊投放需要 imGroupOpenDeliverModel"))?;
        let robot_code = required_str(model, "robotCode")?;
        inner.check_robot(app, robot_code)?;
        if let Some(at) = optional_object(model, "atUserIds")? {
            for (staff_id, nick) in at {
                if !nick.is_string() {
                    return Err(deliver_model_invalid(
                        "imGroupOpenDeliverModel.atUserIds 的值必须是字符串",
                    ));
                }
                at_user_ids.push(staff_id.clone());
            }
        }
        match model.get("recipients") {
            None | Some(Value::Null) => {}
            Some(Value::Array(ids)) if ids.iter().all(Value::is_string) => {}
            Some(_) => {
                return Err(deliver_model_invalid(
                    "imGroupOpenDeliverModel.recipients 必须是字符串数组",
                ));
            }
        }
    }
    if spaces.iter().any(|(k, _)| *k == SpaceKind::Robot) {
        let model = optional_object(obj, "imRobotOpenDeliverModel")?
            .ok_or_else(|| deliver_model_invalid("单聊投放需要 imRobotOpenDeliverModel"))?;
        if model.get("spaceType").and_then(Value::as_str) != Some("IM_ROBOT") {
            return Err(deliver_model_invalid(
                "imRobotOpenDeliverModel.spaceType 必须是 IM_ROBOT",
            ));
        }
        match model.get("robotCode") {
            None | Some(Value::Null) => {}
            Some(_) => inner.check_robot(app, required_str(model, "robotCode")?)?,
        }
    }
    Ok(Delivery {
        spaces,
        at_user_ids,
    })
}

/// Delivers `card` into `delivery`'s spaces; returns the SDK's deliver results.
fn deliver(card: &mut FakeCard, delivery: Delivery) -> Vec<Value> {
    let now = shared::now_ms();
    card.delivered_at_ms.get_or_insert(now);
    for staff_id in delivery.at_user_ids {
        if !card.at_user_ids.contains(&staff_id) {
            card.at_user_ids.push(staff_id);
        }
    }
    delivery
        .spaces
        .into_iter()
        .map(|(kind, id)| {
            let open_space_id = format!("dtv1.card//{}.{id}", kind.as_str());
            if !card.space_ids.contains(&open_space_id) {
                card.space_ids.push(open_space_id);
            }
            json!({
                "spaceType": kind.as_str(),
                "spaceId": id,
                "success": true,
                "carrierId": query_key(),
            })
        })
        .collect()
}

// ---- handlers ------------------------------------------------------------------------------

/// `POST /v1.0/card/instances` → `{"success":true,"result":"<outTrackId>"}`.
pub(super) async fn create(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let app = inner.open_api(&headers, CARD_INSTANCES_PATH)?;
    let obj = json_object(&headers, &body).ok_or_else(body_is_mandatory)?;
    let new = parse_create(&obj)?;
    inner.card_fault(CardOp::Create)?;
    let out_track_id = inner.lock().cards.insert(&app, new)?.out_track_id.clone();
    inner.cards_changed.notify_waiters();
    Ok(ok_json(json!({ "success": true, "result": out_track_id })))
}

/// `POST /v1.0/card/instances/deliver` → `{"success":true,"result":[<deliver result>…]}`.
pub(super) async fn deliver_card(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let app = inner.open_api(&headers, CARD_DELIVER_PATH)?;
    let obj = json_object(&headers, &body).ok_or_else(body_is_mandatory)?;
    let out_track_id = required_str(&obj, "outTrackId")?;
    let delivery = parse_deliver(&inner, &app, &obj)?;
    inner.card_fault(CardOp::Deliver)?;
    let results = {
        let mut state = inner.lock();
        let card = state.cards.get_mut(&app, out_track_id)?;
        deliver(card, delivery)
    };
    inner.cards_changed.notify_waiters();
    Ok(ok_json(json!({ "success": true, "result": results })))
}

/// `POST /v1.0/card/instances/createAndDeliver` →
/// `{"success":true,"result":{"outTrackId","deliverResults":[…]}}`. Nothing is created
/// unless the whole body is valid.
pub(super) async fn create_and_deliver(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let app = inner.open_api(&headers, CARD_CREATE_AND_DELIVER_PATH)?;
    let obj = json_object(&headers, &body).ok_or_else(body_is_mandatory)?;
    let new = parse_create(&obj)?;
    let delivery = parse_deliver(&inner, &app, &obj)?;
    inner.card_fault(CardOp::Create)?;
    inner.card_fault(CardOp::Deliver)?;
    let (out_track_id, results) = {
        let mut state = inner.lock();
        let card = state.cards.insert(&app, new)?;
        let results = deliver(card, delivery);
        (card.out_track_id.clone(), results)
    };
    inner.cards_changed.notify_waiters();
    Ok(ok_json(json!({
        "success": true,
        "result": { "outTrackId": out_track_id, "deliverResults": results },
    })))
}

/// `PUT /v1.0/card/streaming` → `{"success":true,"result":true}`.
pub(super) async fn streaming(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let app = inner.open_api(&headers, CARD_STREAMING_PATH)?;
    let obj = json_object(&headers, &body).ok_or_else(body_is_mandatory)?;
    let out_track_id = required_str(&obj, "outTrackId")?;
    let guid = required_str(&obj, "guid")?;
    let key = required_str(&obj, "key")?;
    let content = match obj.get("content") {
        None | Some(Value::Null) => "",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(invalid_parameter("content", "content 必须是字符串")),
    };
    let update = CardUpdate {
        at_ms: shared::now_ms(),
        guid: guid.to_owned(),
        key: key.to_owned(),
        content: content.to_owned(),
        is_full: optional_bool(&obj, "isFull")?,
        is_finalize: optional_bool(&obj, "isFinalize")?,
        is_error: optional_bool(&obj, "isError")?,
    };
    inner.card_fault(CardOp::Stream)?;
    {
        let mut state = inner.lock();
        let card = state.cards.get_mut(&app, out_track_id)?;
        if card.space_ids.is_empty() {
            return Err(gateway_error(
                StatusCode::BAD_REQUEST,
                CARD_NOT_DELIVERED_CODE,
                "卡片未投放，不能流式更新",
            ));
        }
        let text = card.content.entry(update.key.clone()).or_default();
        if update.is_full {
            text.clone_from(&update.content);
        } else {
            text.push_str(&update.content);
        }
        if !update.content.is_empty() {
            card.first_content_at_ms.get_or_insert(update.at_ms);
        }
        card.finalized |= update.is_finalize;
        card.errored |= update.is_error;
        card.updates.push(update);
    }
    inner.cards_changed.notify_waiters();
    Ok(ok_json(json!({ "success": true, "result": true })))
}

/// `PUT /v1.0/card/instances` → `{"success":true,"result":true}`. With
/// `cardUpdateOptions.updateCardDataByKey: true` the given keys are merged into the card's
/// parameters, otherwise they replace them.
pub(super) async fn update(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let app = inner.open_api(&headers, CARD_INSTANCES_PATH)?;
    let obj = json_object(&headers, &body).ok_or_else(body_is_mandatory)?;
    let out_track_id = required_str(&obj, "outTrackId")?;
    let params = card_param_map(&obj)?;
    let by_key = match optional_object(&obj, "cardUpdateOptions")? {
        Some(options) => optional_bool(options, "updateCardDataByKey")?,
        None => false,
    };
    {
        let mut state = inner.lock();
        let card = state.cards.get_mut(&app, out_track_id)?;
        if by_key {
            card.params.extend(params);
        } else {
            card.params = params;
        }
    }
    inner.cards_changed.notify_waiters();
    Ok(ok_json(json!({ "success": true, "result": true })))
}

#[cfg(test)]
mod tests {
    use super::super::{
        ACCESS_TOKEN_HEADER, EndpointStats, GROUP_SEND_PATH, ORG_QUOTA_CODE, QPS_LIMIT_CODE,
    };
    use super::*;
    use reqwest::Method;

    const TEMPLATE: &str = "382e4302-551d-4880-bf29-a30acfab2e71.schema";

    use crate::dingtalk::two_app_fake as fake;

    /// A client with app1's token.
    struct Api {
        dt: FakeDingTalk,
        client: reqwest::Client,
        token: String,
    }

    impl Api {
        async fn new(dt: &FakeDingTalk, app: &str, secret: &str) -> Api {
            let client = reqwest::Client::new();
            let v: Value = client
                .post(format!("{}/v1.0/oauth2/accessToken", dt.base_url()))
                .json(&json!({ "appKey": app, "appSecret": secret }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            Api {
                dt: dt.clone(),
                client,
                token: v["accessToken"].as_str().unwrap().to_owned(),
            }
        }

        async fn call(&self, method: Method, path: &str, body: &Value) -> (u16, Value) {
            let resp = self
                .client
                .request(method, format!("{}{path}", self.dt.base_url()))
                .header(ACCESS_TOKEN_HEADER, &self.token)
                .json(body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json().await.unwrap_or(Value::Null))
        }

        async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
            self.call(Method::POST, path, body).await
        }

        async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
            self.call(Method::PUT, path, body).await
        }

        async fn stream(
            &self,
            id: &str,
            content: impl Into<String>,
            full: bool,
            fin: bool,
        ) -> (u16, Value) {
            let content: String = content.into();
            self.put(
                CARD_STREAMING_PATH,
                &json!({
                    "outTrackId": id, "guid": uuid::Uuid::new_v4().to_string(),
                    "key": "msgContent", "content": content,
                    "isFull": full, "isFinalize": fin, "isError": false,
                }),
            )
            .await
        }
    }

    fn create_body(id: &str) -> Value {
        json!({
            "cardTemplateId": TEMPLATE, "outTrackId": id, "callbackType": "STREAM",
            "cardData": { "cardParamMap": { "flowStatus": "1", "msgContent": "" } },
            "imGroupOpenSpaceModel": { "supportForward": true },
            "imRobotOpenSpaceModel": { "supportForward": true },
        })
    }

    fn group_deliver(id: &str, cid: &str) -> Value {
        json!({
            "outTrackId": id, "userIdType": 1,
            "openSpaceId": format!("dtv1.card//IM_GROUP.{cid}"),
            "imGroupOpenDeliverModel": {
                "robotCode": "app1", "atUserIds": { "staff1": "Nick 1" }, "recipients": ["staff1"],
            },
        })
    }

    fn robot_create_and_deliver(id: &str, staff: &str) -> Value {
        let mut body = create_body(id);
        body["openSpaceId"] = json!(format!("dtv1.card//IM_ROBOT.{staff}"));
        body["imRobotOpenDeliverModel"] = json!({ "spaceType": "IM_ROBOT", "robotCode": "app1" });
        body
    }

    #[tokio::test]
    async fn create_deliver_to_a_group_stream_and_finish() {
        let dt = fake().await;
        let api = Api::new(&dt, "app1", "secret1").await;
        let (status, v) = api.post(CARD_INSTANCES_PATH, &create_body("c1")).await;
        assert_eq!(
            (status, &v),
            (200, &json!({ "success": true, "result": "c1" }))
        );
        let (status, v) = api
            .post(CARD_DELIVER_PATH, &group_deliver("c1", "cidG=="))
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["success"], true);
        let results = v["result"].as_array().unwrap();
        assert_eq!(results.len(), 1);
        assert_eq!(results[0]["spaceType"], "IM_GROUP");
        assert_eq!(results[0]["spaceId"], "cidG==");
        assert_eq!(results[0]["success"], true);
        assert!(results[0]["carrierId"].is_string());

        assert_eq!(
            api.stream("c1", "Hel", false, false).await,
            (200, json!({ "success": true, "result": true }))
        );
        api.stream("c1", "lo", false, false).await;
        assert_eq!(dt.card("c1").unwrap().content["msgContent"], "Hello");
        api.stream("c1", "Hello world", true, false).await;
        assert_eq!(dt.card("c1").unwrap().content["msgContent"], "Hello world");
        assert!(
            dt.wait_for_finished_cards(1, Duration::ZERO)
                .await
                .is_empty()
        );
        api.stream("c1", "Hello world!", true, true).await;
        let (status, _) = api
            .put(
                CARD_INSTANCES_PATH,
                &json!({
                    "outTrackId": "c1",
                    "cardData": { "cardParamMap": { "flowStatus": "3" } },
                    "cardUpdateOptions": { "updateCardDataByKey": true },
                }),
            )
            .await;
        assert_eq!(status, 200);

        let finished = dt.wait_for_finished_cards(1, Duration::from_secs(1)).await;
        assert_eq!(finished.len(), 1);
        let card = &finished[0];
        assert_eq!(card.out_track_id, "c1");
        assert_eq!(card.app_key, "app1");
        assert_eq!(card.template_id, TEMPLATE);
        assert_eq!(
            card.space_ids,
            vec!["dtv1.card//IM_GROUP.cidG==".to_owned()]
        );
        assert_eq!(card.at_user_ids, vec!["staff1".to_owned()]);
        assert_eq!(card.content["msgContent"], "Hello world!");
        assert_eq!(card.params["flowStatus"], "3");
        assert_eq!(card.params["msgContent"], "", "merged by key");
        assert!(card.finalized && !card.errored);
        assert_eq!(card.updates.len(), 4);
        assert!(card.updates[3].is_finalize && card.updates[3].is_full);
        assert!(card.updates.iter().all(|u| u.key == "msgContent"));
        assert_eq!(card.first_content_at_ms, Some(card.updates[0].at_ms));
        assert!(card.delivered_at_ms.is_some());
        assert!(card.created_at_ms <= card.updates[0].at_ms);

        // Without updateCardDataByKey the map replaces the card's parameters.
        api.put(
            CARD_INSTANCES_PATH,
            &json!({ "outTrackId": "c1", "cardData": { "cardParamMap": { "flowStatus": "5" } } }),
        )
        .await;
        let params = dt.card("c1").unwrap().params;
        assert_eq!(params, BTreeMap::from([("flowStatus".into(), "5".into())]));
        // A late update is accepted but recorded, for tests to catch.
        assert_eq!(api.stream("c1", "late", false, false).await.0, 200);
        assert_eq!(dt.card("c1").unwrap().updates.len(), 5);

        dt.clear();
        assert!(dt.cards().is_empty());
        assert!(dt.card("c1").is_none());
    }

    #[tokio::test]
    async fn create_and_deliver_to_a_one_to_one_chat_then_error() {
        let dt = fake().await;
        let api = Api::new(&dt, "app1", "secret1").await;
        let (status, v) = api
            .post(
                CARD_CREATE_AND_DELIVER_PATH,
                &robot_create_and_deliver("c2", "staff9"),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["success"], true);
        assert_eq!(v["result"]["outTrackId"], "c2");
        let results = v["result"]["deliverResults"].as_array().unwrap();
        assert_eq!(results.len(), 1);
        assert_eq!(results[0]["spaceType"], "IM_ROBOT");
        assert_eq!(results[0]["spaceId"], "staff9");
        assert_eq!(results[0]["success"], true);

        // Empty content does not count as the first content.
        api.stream("c2", "", true, false).await;
        assert_eq!(dt.card("c2").unwrap().first_content_at_ms, None);
        let (status, _) = api
            .put(
                CARD_STREAMING_PATH,
                &json!({
                    "outTrackId": "c2", "guid": "g-err", "key": "msgContent",
                    "content": "出错了", "isFull": true, "isError": true,
                }),
            )
            .await;
        assert_eq!(status, 200);
        let finished = dt.wait_for_finished_cards(1, Duration::from_secs(1)).await;
        assert_eq!(finished.len(), 1);
        assert!(finished[0].errored && !finished[0].finalized);
        assert_eq!(
            finished[0].space_ids,
            vec!["dtv1.card//IM_ROBOT.staff9".to_owned()]
        );
        assert_eq!(finished[0].updates[1].guid, "g-err");
        assert!(finished[0].first_content_at_ms.is_some());

        // Several spaces in one openSpaceId, lower-case types as in the SDK's example.
        let mut body = create_body("c3");
        body["openSpaceId"] = json!("dtv1.card//im_group.cidA==;im_robot.staff1;");
        body["imGroupOpenDeliverModel"] = json!({ "robotCode": "app1" });
        body["imRobotOpenDeliverModel"] = json!({ "spaceType": "IM_ROBOT" });
        let (status, v) = api.post(CARD_CREATE_AND_DELIVER_PATH, &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["result"]["deliverResults"].as_array().unwrap().len(), 2);
        assert_eq!(
            dt.card("c3").unwrap().space_ids,
            vec![
                "dtv1.card//IM_GROUP.cidA==".to_owned(),
                "dtv1.card//IM_ROBOT.staff1".to_owned()
            ]
        );
    }

    #[tokio::test]
    async fn duplicates_unknown_and_undelivered_cards_are_refused() {
        let dt = fake().await;
        let api = Api::new(&dt, "app1", "secret1").await;
        assert_eq!(
            api.post(CARD_INSTANCES_PATH, &create_body("d1")).await.0,
            200
        );
        let (status, v) = api.post(CARD_INSTANCES_PATH, &create_body("d1")).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (400, Some(CARD_DUPLICATE_CODE))
        );
        assert!(v["requestid"].is_string() && v["message"].is_string());
        let (status, v) = api
            .post(
                CARD_CREATE_AND_DELIVER_PATH,
                &robot_create_and_deliver("d1", "staff1"),
            )
            .await;
        assert_eq!(
            (status, v["code"].as_str()),
            (400, Some(CARD_DUPLICATE_CODE))
        );
        assert!(dt.card("d1").unwrap().space_ids.is_empty(), "not delivered");

        let (status, v) = api.stream("d1", "x", true, false).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (400, Some(CARD_NOT_DELIVERED_CODE))
        );
        for (method, path, body) in [
            (
                Method::POST,
                CARD_DELIVER_PATH,
                group_deliver("nope", "cid=="),
            ),
            (
                Method::PUT,
                CARD_STREAMING_PATH,
                json!({ "outTrackId": "nope", "guid": "g", "key": "msgContent", "content": "x" }),
            ),
            (
                Method::PUT,
                CARD_INSTANCES_PATH,
                json!({ "outTrackId": "nope", "cardData": { "cardParamMap": {} } }),
            ),
        ] {
            let (status, v) = api.call(method, path, &body).await;
            assert_eq!(
                (status, v["code"].as_str()),
                (400, Some(CARD_NOT_FOUND_CODE)),
                "{path}"
            );
        }
        // Another app's card is not found either.
        let other = Api::new(&dt, "app2", "secret2").await;
        let mut body = group_deliver("d1", "cid==");
        body["imGroupOpenDeliverModel"]["robotCode"] = json!("app2");
        let (status, v) = other.post(CARD_DELIVER_PATH, &body).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (400, Some(CARD_NOT_FOUND_CODE))
        );
        assert_eq!(dt.cards().len(), 1);
    }

    #[tokio::test]
    async fn bad_bodies_and_bad_tokens_get_400s() {
        let dt = fake().await;
        let api = Api::new(&dt, "app1", "secret1").await;
        let mut cases: Vec<(&str, Value, &str)> = Vec::new();
        let mut b = create_body("b1");
        b["cardData"]["cardParamMap"]["flowStatus"] = json!(1);
        cases.push((CARD_INSTANCES_PATH, b, CARD_PARAM_MAP_INVALID_CODE));
        let mut b = create_body("b1");
        b["cardData"] = json!({ "cardParamMap": "{}" });
        cases.push((CARD_INSTANCES_PATH, b, CARD_PARAM_MAP_INVALID_CODE));
        let mut b = create_body("b1");
        b.as_object_mut().unwrap().remove("cardData");
        cases.push((CARD_INSTANCES_PATH, b, "MissingcardData"));
        let mut b = create_body("b1");
        b["outTrackId"] = json!("");
        cases.push((CARD_INSTANCES_PATH, b, "MissingoutTrackId"));
        let mut b = create_body("b1");
        b.as_object_mut().unwrap().remove("cardTemplateId");
        cases.push((CARD_INSTANCES_PATH, b, "MissingcardTemplateId"));
        let mut b = create_body("b1");
        b["callbackType"] = json!("EMAIL");
        cases.push((CARD_INSTANCES_PATH, b, "InvalidParameter.callbackType"));
        for bad_space in [
            "cid==",
            "dtv1.card//",
            "dtv1.card//IM_GROUP.",
            "dtv1.card//DOC.x",
        ] {
            let mut b = robot_create_and_deliver("b1", "s");
            b["openSpaceId"] = json!(bad_space);
            cases.push((
                CARD_CREATE_AND_DELIVER_PATH,
                b,
                CARD_OPEN_SPACE_ID_INVALID_CODE,
            ));
        }
        let mut b = robot_create_and_deliver("b1", "s");
        b["imRobotOpenDeliverModel"] = json!({ "spaceType": "IM_GROUP" });
        cases.push((
            CARD_CREATE_AND_DELIVER_PATH,
            b,
            CARD_DELIVER_MODEL_INVALID_CODE,
        ));
        let mut b = robot_create_and_deliver("b1", "s");
        b["openSpaceId"] = json!("dtv1.card//IM_GROUP.cid==");
        cases.push((
            CARD_CREATE_AND_DELIVER_PATH,
            b,
            CARD_DELIVER_MODEL_INVALID_CODE,
        ));
        let mut b = robot_create_and_deliver("b1", "s");
        b["userIdType"] = json!(7);
        cases.push((
            CARD_CREATE_AND_DELIVER_PATH,
            b,
            "InvalidParameter.userIdType",
        ));
        let mut b = robot_create_and_deliver("b1", "s");
        b["imRobotOpenDeliverModel"]["robotCode"] = json!("ghost");
        cases.push((
            CARD_CREATE_AND_DELIVER_PATH,
            b,
            "invalidParameter.robotCode.notExist",
        ));
        let mut b = group_deliver("b1", "cid==");
        b["imGroupOpenDeliverModel"]["atUserIds"] = json!(["staff1"]);
        let mut b2 = create_body("b1");
        b2.as_object_mut()
            .unwrap()
            .extend(b.as_object().unwrap().clone());
        cases.push((
            CARD_CREATE_AND_DELIVER_PATH,
            b2,
            "InvalidParameter.atUserIds",
        ));
        for (path, body, code) in cases {
            let (status, v) = api.post(path, &body).await;
            assert_eq!((status, v["code"].as_str()), (400, Some(code)), "{body}");
        }
        assert!(dt.cards().is_empty(), "nothing created by a bad body");

        // The robotCode of another app is forbidden to this token.
        let mut b = robot_create_and_deliver("b1", "s");
        b["imRobotOpenDeliverModel"]["robotCode"] = json!("app2");
        let (status, v) = api.post(CARD_CREATE_AND_DELIVER_PATH, &b).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (
                403,
                Some("Forbidden.AccessDenied.AccessTokenPermissionDenied")
            )
        );

        assert_eq!(
            api.post(
                CARD_CREATE_AND_DELIVER_PATH,
                &robot_create_and_deliver("b2", "s")
            )
            .await
            .0,
            200
        );
        for (body, code) in [
            (
                json!({ "outTrackId": "b2", "key": "k", "content": "x" }),
                "Missingguid",
            ),
            (
                json!({ "outTrackId": "b2", "guid": "g", "content": "x" }),
                "Missingkey",
            ),
            (
                json!({ "outTrackId": "b2", "guid": "g", "key": "k", "content": 5 }),
                "InvalidParameter.content",
            ),
            (
                json!({ "outTrackId": "b2", "guid": "g", "key": "k", "isFull": "yes" }),
                "InvalidParameter.isFull",
            ),
        ] {
            let (status, v) = api.put(CARD_STREAMING_PATH, &body).await;
            assert_eq!((status, v["code"].as_str()), (400, Some(code)), "{body}");
        }
        assert!(dt.card("b2").unwrap().updates.is_empty());

        let resp = reqwest::Client::new()
            .put(format!("{}{CARD_STREAMING_PATH}", dt.base_url()))
            .header(ACCESS_TOKEN_HEADER, "forged")
            .json(&json!({ "outTrackId": "b2", "guid": "g", "key": "k", "content": "x" }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["code"], "InvalidAuthentication");
        let resp = reqwest::Client::new()
            .post(format!("{}{CARD_INSTANCES_PATH}", dt.base_url()))
            .header(ACCESS_TOKEN_HEADER, &api.token)
            .body("outTrackId=x")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        // A wrong method is an unknown API, as on the gateway.
        let (status, v) = api.post(CARD_STREAMING_PATH, &json!({})).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (404, Some("InvalidAction.NotFound"))
        );
    }

    #[tokio::test]
    async fn injected_faults_hit_the_documented_routes() {
        let dt = fake().await;
        let api = Api::new(&dt, "app1", "secret1").await;
        api.post(CARD_INSTANCES_PATH, &create_body("f0")).await;

        dt.refuse_cards(Some(CardFault::TemplateUnpublished));
        for (path, body) in [
            (CARD_INSTANCES_PATH, create_body("f1")),
            (
                CARD_CREATE_AND_DELIVER_PATH,
                robot_create_and_deliver("f1", "s"),
            ),
        ] {
            let (status, v) = api.post(path, &body).await;
            assert_eq!(
                (status, v["code"].as_str()),
                (400, Some(CARD_TEMPLATE_UNPUBLISHED_CODE))
            );
        }
        assert_eq!(
            api.post(CARD_DELIVER_PATH, &group_deliver("f0", "cid=="))
                .await
                .0,
            200
        );

        dt.refuse_cards(Some(CardFault::NoPermission));
        for (path, body) in [
            (CARD_INSTANCES_PATH, create_body("f1")),
            (
                CARD_CREATE_AND_DELIVER_PATH,
                robot_create_and_deliver("f1", "s"),
            ),
            (CARD_DELIVER_PATH, group_deliver("f0", "cid2==")),
        ] {
            let (status, v) = api.post(path, &body).await;
            assert_eq!(
                (status, v["code"].as_str()),
                (500, Some(CARD_NO_PERMISSION_CODE))
            );
        }
        assert_eq!(api.stream("f0", "ok", true, false).await.0, 200);

        dt.refuse_cards(Some(CardFault::ServerError));
        let (status, v) = api.stream("f0", "no", true, false).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (503, Some(CARD_SERVER_ERROR_CODE))
        );
        assert_eq!(
            api.post(CARD_INSTANCES_PATH, &create_body("f1")).await.0,
            503
        );
        let update =
            json!({ "outTrackId": "f0", "cardData": { "cardParamMap": { "flowStatus": "5" } } });
        assert_eq!(
            api.put(CARD_INSTANCES_PATH, &update).await.0,
            200,
            "update never refused"
        );

        dt.refuse_cards(None);
        assert_eq!(
            api.post(CARD_INSTANCES_PATH, &create_body("f1")).await.0,
            200
        );
        let cards = dt.cards();
        assert_eq!(cards.len(), 2);
        assert_eq!(
            cards[0].updates.len(),
            1,
            "refused updates are not recorded"
        );
        assert_eq!(cards[0].space_ids.len(), 1);
    }

    #[tokio::test]
    async fn qps_limit_is_per_app_and_endpoint_and_counted_in_stats() {
        let dt = fake().await;
        let api = Api::new(&dt, "app1", "secret1").await;
        api.post(
            CARD_CREATE_AND_DELIVER_PATH,
            &robot_create_and_deliver("q1", "s"),
        )
        .await;
        dt.set_api_qps(5);
        dt.reset_meters();
        let calls = (0..10).map(|i| api.stream("q1", format!("{i}"), false, false));
        let results = futures::future::join_all(calls).await;
        let ok = results.iter().filter(|(s, _)| *s == 200).count();
        let throttled: Vec<&Value> = results
            .iter()
            .filter(|(s, _)| *s == 403)
            .map(|(_, v)| v)
            .collect();
        assert_eq!((ok, throttled.len()), (5, 5), "{results:?}");
        assert!(throttled.iter().all(|v| v["code"] == QPS_LIMIT_CODE));
        assert_eq!(
            dt.card("q1").unwrap().updates.len(),
            5,
            "throttled calls not executed"
        );

        // Another endpoint of the same app, and the same endpoint of another app, are free.
        let update =
            json!({ "outTrackId": "q1", "cardData": { "cardParamMap": { "flowStatus": "2" } } });
        assert_eq!(api.put(CARD_INSTANCES_PATH, &update).await.0, 200);
        let other = Api::new(&dt, "app2", "secret2").await;
        let (status, v) = other.stream("q1", "x", false, false).await;
        assert_eq!(
            (status, v["code"].as_str()),
            (400, Some(CARD_NOT_FOUND_CODE))
        );
        // Robot sends are limited the same way.
        let send = json!({
            "robotCode": "app1", "openConversationId": "cid1==", "msgKey": "sampleText",
            "msgParam": "{\"content\":\"hi\"}",
        });
        let sends = (0..7).map(|_| api.post(GROUP_SEND_PATH, &send));
        let statuses: Vec<u16> = futures::future::join_all(sends)
            .await
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(
            statuses.iter().filter(|s| **s == 403).count(),
            2,
            "{statuses:?}"
        );

        let stats = dt.endpoint_stats();
        let streaming = stats[&("app1".to_owned(), CARD_STREAMING_PATH.to_owned())];
        assert_eq!(
            streaming,
            EndpointStats {
                calls: 10,
                throttled: 5,
                peak_per_second: 10
            }
        );
        assert_eq!(dt.endpoint_stats_for("app2", CARD_STREAMING_PATH).calls, 1);
        assert_eq!(dt.endpoint_stats_for("app1", GROUP_SEND_PATH).throttled, 2);
        assert_eq!(
            dt.endpoint_stats_for("app1", "/nowhere"),
            EndpointStats::default()
        );
        // 5 streaming + 1 update + 1 (app2) + 5 sends; the token API is not metered.
        assert_eq!(dt.metered_calls(), 12);

        // A second later the window has room again.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(api.stream("q1", "again", false, false).await.0, 200);
        dt.set_api_qps(0);
        let results = futures::future::join_all(
            (0..30).map(|i| api.stream("q1", format!("{i}"), false, false)),
        )
        .await;
        assert!(results.iter().all(|(s, _)| *s == 200));
    }

    #[tokio::test]
    async fn monthly_quota_refuses_metered_calls_only() {
        let dt = fake().await;
        let api = Api::new(&dt, "app1", "secret1").await;
        api.post(
            CARD_CREATE_AND_DELIVER_PATH,
            &robot_create_and_deliver("m1", "s"),
        )
        .await;
        assert_eq!(dt.metered_calls(), 1);
        dt.set_monthly_quota(Some(3));
        assert_eq!(api.stream("m1", "a", false, false).await.0, 200);
        // A 400 is a call too.
        assert_eq!(api.post(CARD_DELIVER_PATH, &json!({})).await.0, 400);
        assert_eq!(dt.metered_calls(), 3);
        let (status, v) = api.stream("m1", "b", false, false).await;
        assert_eq!((status, v["code"].as_str()), (403, Some(ORG_QUOTA_CODE)));
        let (status, v) = api.post(CARD_INSTANCES_PATH, &create_body("m2")).await;
        assert_eq!((status, v["code"].as_str()), (403, Some(ORG_QUOTA_CODE)));
        assert_eq!(dt.metered_calls(), 3, "refused calls are not counted");
        assert_eq!(dt.card("m1").unwrap().content["msgContent"], "a");

        // Tokens and sessionWebhooks still work.
        let again = Api::new(&dt, "app1", "secret1").await;
        assert_eq!(again.token, api.token);
        let (url, _) = dt.session_webhook("cid==", Duration::from_secs(60));
        let v: Value = api
            .client
            .post(url)
            .json(&json!({ "msgtype": "text", "text": { "content": "hi" } }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["errcode"], 0);
        assert_eq!(dt.metered_calls(), 3);
        assert_eq!(dt.endpoint_stats_for("app1", CARD_STREAMING_PATH).calls, 2);

        dt.set_monthly_quota(None);
        assert_eq!(api.stream("m1", "c", false, false).await.0, 200);
        assert_eq!(dt.metered_calls(), 4);
    }
}
