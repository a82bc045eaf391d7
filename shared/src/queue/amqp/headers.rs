//! What a message carries besides the job: its properties and our headers.
//!
//! Messages are persistent JSON with `message_id` = job id and the attempt number in the
//! [`ATTEMPT_HEADER`] header; a retry or a dead letter is a *new* message (published with a
//! confirm, then the original is acked), never a broker dead-letter cycle, so the attempt
//! count is ours and the broker's cycle detection never drops a retry.

use super::DeadLetter;
use crate::job::Job;
use lapin::BasicProperties;
use lapin::message::Delivery as AmqpDelivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Header with the attempt number of a job message: 1 for the first delivery, +1 per retry.
pub const ATTEMPT_HEADER: &str = "parley-attempt";
/// Header of a dead letter: why the job was given up.
pub const REASON_HEADER: &str = "parley-reason";
/// Header of a dead letter: when it was given up (ms since epoch).
pub const DEAD_AT_HEADER: &str = "parley-dead-at-ms";

/// Reasons longer than this are cut (they travel in a header frame).
pub(super) const MAX_REASON_BYTES: usize = 1024;

pub(super) const JSON: &str = "application/json";

pub(super) fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

pub(super) fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

pub(super) fn message_properties(
    message_id: Option<&str>,
    content_type: &str,
    headers: FieldTable,
) -> BasicProperties {
    let now_secs = u64::try_from(crate::now_ms() / 1000).unwrap_or(0);
    let mut p = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::try_new(content_type).unwrap_or_else(|_| JSON.into()))
        .with_timestamp(now_secs)
        .with_headers(headers);
    // A message id longer than a short string is left out rather than failing the publish.
    if let Some(id) = message_id.and_then(|id| ShortString::try_new(id).ok()) {
        p = p.with_message_id(id);
    }
    p
}

pub(super) fn job_properties(job_id: &str, attempt: u32) -> BasicProperties {
    let headers = table(vec![(
        ATTEMPT_HEADER,
        AMQPValue::LongLongInt(attempt.into()),
    )]);
    message_properties(Some(job_id), JSON, headers)
}

pub(super) fn dead_headers(attempt: u32, reason: &str, at_ms: i64) -> FieldTable {
    table(vec![
        (ATTEMPT_HEADER, AMQPValue::LongLongInt(attempt.into())),
        (REASON_HEADER, text(truncate(reason, MAX_REASON_BYTES))),
        (DEAD_AT_HEADER, AMQPValue::LongLongInt(at_ms)),
    ])
}

pub(super) fn truncate(s: &str, max: usize) -> &str {
    crate::split::truncate_bytes(s, max)
}

pub(super) fn header<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref()?.inner().get(name)
}

pub(super) fn as_i64(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(n) => Some((*n).into()),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => Some((*n).into()),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

pub(super) fn as_text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The attempt number of a message; 1 when absent or nonsense.
pub(super) fn attempt_of(p: &BasicProperties) -> u32 {
    header(p, ATTEMPT_HEADER)
        .and_then(as_i64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// Rebuilds a dead letter from a message of the dead queue: ours carry the reason headers;
/// one the broker dead-lettered (delivery limit) carries `x-death` instead.
pub(super) fn dead_letter_of(delivery: &AmqpDelivery) -> Option<DeadLetter> {
    let job = Job::from_bytes(&delivery.data).ok()?;
    let p = &delivery.properties;
    let reason = header(p, REASON_HEADER)
        .and_then(as_text)
        .or_else(|| {
            header(p, "x-first-death-reason")
                .and_then(as_text)
                .map(|why| format!("dead-lettered by the broker ({why})"))
        })
        .unwrap_or_else(|| "unknown".into());
    let at_ms = header(p, DEAD_AT_HEADER)
        .and_then(as_i64)
        .or_else(|| broker_death_ms(p))
        .unwrap_or(0);
    Some(DeadLetter {
        job,
        attempts: attempt_of(p),
        reason,
        at_ms,
    })
}

/// `time` of the newest `x-death` entry, in ms.
pub(super) fn broker_death_ms(p: &BasicProperties) -> Option<i64> {
    let AMQPValue::FieldArray(deaths) = header(p, "x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get("time")? {
        AMQPValue::Timestamp(secs) => i64::try_from(*secs).ok()?.checked_mul(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_header_is_read_whatever_the_integer_type() {
        let with = |v| BasicProperties::default().with_headers(table(vec![(ATTEMPT_HEADER, v)]));
        assert_eq!(attempt_of(&with(AMQPValue::LongLongInt(3))), 3);
        assert_eq!(attempt_of(&with(AMQPValue::ShortShortUInt(2))), 2);
        assert_eq!(attempt_of(&with(AMQPValue::LongLongInt(0))), 1);
        assert_eq!(attempt_of(&with(text("2"))), 1);
        assert_eq!(attempt_of(&BasicProperties::default()), 1);
        assert_eq!(attempt_of(&job_properties("j", 4)), 4);
    }

    #[test]
    fn job_properties_are_persistent_json_with_the_id() {
        let p = job_properties("j1", 1);
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.content_type().as_ref().map(ShortString::as_str),
            Some(JSON)
        );
        assert_eq!(p.message_id().as_ref().map(ShortString::as_str), Some("j1"));
        let long = "x".repeat(300);
        assert!(job_properties(&long, 1).message_id().is_none());
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON_BYTES);
        let cut = truncate(&reason, MAX_REASON_BYTES);
        assert!(cut.len() <= MAX_REASON_BYTES && cut.chars().all(|c| c == 'é'));
    }
}
