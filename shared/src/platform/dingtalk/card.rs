//! DingTalk AI cards (PROTOCOLS.md §c): the answer as a card that fills in while the model
//! writes. Opened with `createAndDeliver` into the group (`dtv1.card//IM_GROUP.{cid}`, with
//! an @ of the asker) or the one-to-one chat (`dtv1.card//IM_ROBOT.{staffId}`), updated with
//! `PUT /v1.0/card/streaming` carrying the full text so far (`isFull`), ended by one with
//! `isFinalize` (or `isError` and the friendly failure text). The card's `outTrackId` comes
//! from the job id, so a redelivered job finishes the card it opened instead of a second.
//!
//! Calls are paced by the app's governor: opens and final updates first, intermediate
//! updates with what is left. A card is opened only when the monthly budget still covers
//! one ([`CARD_RESERVE`]); once open, updates stop before the budget would lose the final.

use super::client::DingTalkMessenger;
use crate::job::{Job, ReplyTarget};
use crate::platform::governor::Priority;
use crate::platform::{LiveReply, SendError, Stage};
use async_trait::async_trait;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tokio::time::Instant;

/// Metered calls a card needs left in the month before one is opened: the open, the final
/// update and a few in between.
pub const CARD_RESERVE: u64 = 10;
/// Calls kept back for the final update once a card is open.
const FINAL_RESERVE: u64 = 1;
/// The longest first text put in the create call: DingTalk is reported to refuse
/// `cardParamMap` values over about 1 KB; the rest follows in the first update.
const OPEN_TEXT_BYTES: usize = 900;

/// The card's `outTrackId` for `job`: the same for every delivery of the job.
pub fn out_track_id(job: &Job) -> String {
    let digest = Sha256::digest(job.id.as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("parley-{hex}")
}

/// Whether a create was refused because the card exists: an earlier delivery of the job
/// opened it and died before recording so.
fn already_exists(e: &SendError) -> bool {
    let SendError::Permanent(reason) = e else {
        return false;
    };
    let r = reason.to_ascii_lowercase();
    r.contains("outtrackid") && (r.contains("duplicat") || r.contains("exist"))
}

impl DingTalkMessenger {
    fn open_body(&self, job: &Job, text: &str) -> Result<Value, SendError> {
        let ReplyTarget::DingTalk(target) = &job.reply else {
            return Err(SendError::Permanent("not a DingTalk conversation".into()));
        };
        let robot_code = target
            .robot_code
            .as_deref()
            .unwrap_or(self.bot.robot_code());
        let first = crate::split::truncate_bytes(text, OPEN_TEXT_BYTES);
        let mut body = json!({
            "cardTemplateId": self.bot.card_template_id,
            "outTrackId": out_track_id(job),
            "cardData": {"cardParamMap": {self.bot.card_content_key.as_str(): first}},
            "callbackType": "STREAM",
            "imGroupOpenSpaceModel": {"supportForward": true},
            "imRobotOpenSpaceModel": {"supportForward": true},
            "userIdType": 1,
        });
        if target.group {
            let mut at = serde_json::Map::new();
            if let Some(staff) = &target.sender_staff_id {
                let nick = job.sender.nick.clone().unwrap_or_else(|| staff.clone());
                at.insert(staff.clone(), Value::String(nick));
            }
            body["openSpaceId"] = json!(format!("dtv1.card//IM_GROUP.{}", target.conversation_id));
            body["imGroupOpenDeliverModel"] = json!({"robotCode": robot_code, "atUserIds": at});
        } else {
            let Some(staff) = &target.sender_staff_id else {
                return Err(SendError::Permanent(
                    "no staffId for a one-to-one card".into(),
                ));
            };
            body["openSpaceId"] = json!(format!("dtv1.card//IM_ROBOT.{staff}"));
            body["imRobotOpenDeliverModel"] =
                json!({"spaceType": "IM_ROBOT", "robotCode": robot_code});
        }
        Ok(body)
    }

    async fn open_card(&self, job: &Job, text: &str) -> Result<(), SendError> {
        let body = self.open_body(job, text)?;
        let created = self
            .openapi_call(
                reqwest::Method::POST,
                "card_create",
                "/v1.0/card/instances/createAndDeliver",
                &body,
            )
            .await;
        let v = match created {
            Ok(v) => v,
            Err(e) if already_exists(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let results = v["result"]["deliverResults"].as_array();
        if let Some(failed) = results.and_then(|r| r.iter().find(|d| d["success"] == false)) {
            let why = failed["errorMsg"].as_str().unwrap_or("no reason given");
            return Err(SendError::Permanent(format!("card not delivered: {why}")));
        }
        Ok(())
    }

    async fn stream_card(&self, job: &Job, text: &str, stage: Stage) -> Result<(), SendError> {
        let (finalize, error) = match stage {
            Stage::Final { failed } => (true, failed),
            _ => (false, false),
        };
        let body = json!({
            "outTrackId": out_track_id(job),
            "guid": format!("{:032x}", rand::random::<u128>()),
            "key": self.bot.card_content_key,
            "content": text,
            "isFull": true,
            "isFinalize": finalize,
            "isError": error,
        });
        self.openapi_call(
            reqwest::Method::PUT,
            "card_stream",
            "/v1.0/card/streaming",
            &body,
        )
        .await
        .map(drop)
    }
}

#[async_trait]
impl LiveReply for DingTalkMessenger {
    fn interval(&self) -> Duration {
        Duration::from_millis(self.bot.card_update_interval_ms)
    }

    async fn pace(&self, stage: Stage, deadline: Option<Instant>) -> Result<(), SendError> {
        let (api, priority, reserve) = match stage {
            Stage::Open => ("card_create", Priority::First, CARD_RESERVE),
            Stage::Update => ("card_stream", Priority::Later, FINAL_RESERVE + 1),
            Stage::Final { .. } => ("card_stream", Priority::First, 0),
        };
        if reserve > 0
            && let Some(left) = self.governor.budget_left(&self.bot.id).await
            && left < reserve
        {
            return Err(SendError::Permanent(format!(
                "monthly API budget: {left} calls left"
            )));
        }
        self.governor
            .acquire(api, priority, deadline)
            .await
            .map_err(|e| SendError::Retryable {
                reason: e.to_string(),
                after: None,
            })
    }

    async fn show(&self, job: &Job, text: &str, stage: Stage) -> Result<(), SendError> {
        match stage {
            Stage::Open => self.open_card(job, text).await,
            _ => self.stream_card(job, text, stage).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_keeps_its_card() {
        let a = crate::job::tests::sample_job("m1", "hi");
        let again = a.clone();
        let b = crate::job::tests::sample_job("m2", "hi");
        assert_eq!(out_track_id(&a), out_track_id(&again));
        assert_ne!(out_track_id(&a), out_track_id(&b));
        assert!(out_track_id(&a).len() < 64);
    }

    #[test]
    fn a_duplicate_create_reads_as_open() {
        let dup =
            SendError::Permanent("card_create failed (400, param.outTrackIdDuplicated)".into());
        assert!(already_exists(&dup));
        assert!(!already_exists(&SendError::Permanent(
            "card_create failed (400, param.templateUnpublished)".into()
        )));
    }
}
