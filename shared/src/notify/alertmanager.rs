//! Prometheus Alertmanager webhook payloads (version 4) and their rendering into one
//! readable markdown message per notification, for DingTalk and WeCom group robots.
//!
//! Alertmanager POSTs a JSON document per alert group (`groupKey`) with every alert of the
//! group in `alerts`; Parley turns it into a single markdown message through a minijinja
//! template: [`DEFAULT_TEMPLATE`] unless the user configured their own
//! (`notify.alertmanager_template`, validated at start-up with [`check_template`]). The
//! payload types are tolerant: unknown fields are ignored and absent or `null` fields take
//! their empty value, so newer Alertmanager versions and hand-written payloads still render.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// The longest [`Rendered::title`], in characters (DingTalk shows it in the chat list and
/// the notification, where long titles are cut anyway).
pub const TITLE_MAX_CHARS: usize = 64;

/// An Alertmanager webhook notification (`"version": "4"`), one alert group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Payload {
    /// Payload format version, `"4"`.
    #[serde(default, deserialize_with = "null_default")]
    pub version: String,
    /// Identifies the alert group (e.g. `{}:{alertname="HighLatency"}`).
    #[serde(default, deserialize_with = "null_default")]
    pub group_key: String,
    /// How many alerts Alertmanager left out because of the receiver's `max_alerts`.
    #[serde(default, deserialize_with = "null_default")]
    pub truncated_alerts: u64,
    /// `firing` while at least one alert of the group fires, else `resolved`.
    #[serde(default, deserialize_with = "null_default")]
    pub status: String,
    /// Name of the Alertmanager receiver that sent this.
    #[serde(default, deserialize_with = "null_default")]
    pub receiver: String,
    /// The labels the group is grouped by (`group_by`).
    #[serde(default, deserialize_with = "null_default")]
    pub group_labels: BTreeMap<String, String>,
    /// Labels every alert of the group shares.
    #[serde(default, deserialize_with = "null_default")]
    pub common_labels: BTreeMap<String, String>,
    /// Annotations every alert of the group shares.
    #[serde(default, deserialize_with = "null_default")]
    pub common_annotations: BTreeMap<String, String>,
    /// Link back to the Alertmanager that sent this.
    #[serde(
        default,
        rename = "externalURL",
        alias = "externalUrl",
        deserialize_with = "null_default"
    )]
    pub external_url: String,
    /// The alerts of the group, firing and resolved.
    #[serde(default, deserialize_with = "null_default")]
    pub alerts: Vec<Alert>,
}

/// One alert of a [`Payload`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    /// `firing` or `resolved`.
    #[serde(default, deserialize_with = "null_default")]
    pub status: String,
    /// Identifying labels (`alertname`, `severity`, `instance`, …).
    #[serde(default, deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
    /// Informational annotations (`summary`, `description`, `runbook_url`, …).
    #[serde(default, deserialize_with = "null_default")]
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339 time the alert started firing.
    #[serde(default, deserialize_with = "null_default")]
    pub starts_at: String,
    /// RFC 3339 time the alert resolved; `0001-01-01T00:00:00Z` while it fires.
    #[serde(default, deserialize_with = "null_default")]
    pub ends_at: String,
    /// Link to the expression in the system that generated the alert (Prometheus).
    #[serde(
        default,
        rename = "generatorURL",
        alias = "generatorUrl",
        deserialize_with = "null_default"
    )]
    pub generator_url: String,
    /// Alertmanager's identifier of the alert.
    #[serde(default, deserialize_with = "null_default")]
    pub fingerprint: String,
}

impl Alert {
    /// Whether the alert is resolved (anything else counts as firing).
    pub fn is_resolved(&self) -> bool {
        self.status.eq_ignore_ascii_case("resolved")
    }
}

impl Payload {
    /// Whether the whole group is resolved.
    pub fn is_resolved(&self) -> bool {
        self.status.eq_ignore_ascii_case("resolved")
    }

    /// The alerts still firing.
    pub fn firing(&self) -> impl Iterator<Item = &Alert> {
        self.alerts.iter().filter(|a| !a.is_resolved())
    }

    /// The alerts that resolved.
    pub fn resolved(&self) -> impl Iterator<Item = &Alert> {
        self.alerts.iter().filter(|a| a.is_resolved())
    }
}

/// `null` deserialises to the type's default, like an absent field.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Whether `v` is an Alertmanager webhook payload: an `alerts` array together with
/// `"version": "4"` or a `groupKey`.
pub fn is_alertmanager(v: &serde_json::Value) -> bool {
    let has_alerts = v.get("alerts").is_some_and(serde_json::Value::is_array);
    let v4 = match v.get("version") {
        Some(serde_json::Value::String(s)) => s.trim() == "4",
        Some(serde_json::Value::Number(n)) => n.as_u64() == Some(4),
        _ => false,
    };
    has_alerts && (v4 || v.get("groupKey").is_some())
}

/// A rendered notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Short title, e.g. `[FIRING:2] HighLatency prod` (at most [`TITLE_MAX_CHARS`]
    /// characters): DingTalk's `markdown.title`, shown in the chat list and notification.
    pub title: String,
    /// The markdown message.
    pub markdown: String,
}

/// Why an Alertmanager template could not produce a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The template does not parse.
    #[error("alertmanager template syntax error: {0}")]
    Syntax(String),
    /// The template failed while rendering this payload (bad filter argument, type error…).
    #[error("alertmanager template failed to render: {0}")]
    Render(String),
    /// The template rendered only whitespace.
    #[error("alertmanager template rendered an empty message")]
    Empty,
}

/// The built-in template: a `###` heading with the status marker (`[FIRING:2]`,
/// `[RESOLVED]`) and the group's name and labels; then, per alert, its severity and summary,
/// the description as a quote, the labels the heading does not already show, other
/// annotations, start (and for resolved alerts end and duration) times and a link to its
/// source; a note when Alertmanager truncated alerts; a link to Alertmanager last. Firing
/// and resolved alerts of one group get their own sections.
pub const DEFAULT_TEMPLATE: &str = r#"### {{ marker }} {{ group_name }}
{% for k, v in group_labels|items if k != "alertname" %}
{% if loop.first %}

{% endif %}
{{ k }}={{ v }}{{ ", " if not loop.last }}
{%- endfor %}


{% for section, list in [["Firing", firing], ["Resolved", resolved]] if list %}
{% if firing and resolved %}
#### {{ section }} ({{ list|length }})

{% endif %}
{% for alert in list %}
**{% if list|length > 1 %}{{ loop.index }}. {% endif %}{% if alert.labels.severity %}[{{ alert.labels.severity|upper }}] {% endif %}{{ alert.annotations.summary or alert.annotations.message or alert.labels.alertname or group_name }}**

{% if alert.annotations.description %}
> {{ alert.annotations.description|trim|replace("\n", "\n> ") }}

{% endif %}
{% for k, v in alert.labels|items if k not in group_labels and k != "severity" and not (k == "alertname" and v == group_name) %}
- {{ k }}: {{ v }}
{% endfor %}
{% for k, v in alert.annotations|items if k not in ["summary", "message", "description", "runbook_url"] %}
- {{ k }}: {{ v }}
{% endfor %}
- Started: {{ alert.starts_at|datetime }}
{% if alert.status == "resolved" and alert.ends_at|datetime %}
- Ended: {{ alert.ends_at|datetime }}{% if alert.duration %} (lasted {{ alert.duration }}){% endif %}

{% endif %}
{% if alert.annotations.runbook_url %}
- [Runbook]({{ alert.annotations.runbook_url }})
{% endif %}
{% if alert.generator_url %}
- [Source]({{ alert.generator_url }})
{% endif %}

{% endfor %}
{% endfor %}
{% if truncated_alerts > 0 %}
*{{ truncated_alerts }} more alert{{ "s" if truncated_alerts > 1 }} not shown (truncated by Alertmanager).*

{% endif %}
{% if external_url %}
[Alertmanager]({{ external_url }})
{% endif %}
"#;

/// Renders `payload` to markdown with `template`, or [`DEFAULT_TEMPLATE`] when `None`.
///
/// The template sees these variables (the payload in snake_case plus a few helpers):
///
/// - `version`, `group_key`, `truncated_alerts` (integer), `status` (`firing`/`resolved`),
///   `receiver`, `external_url`, and the maps `group_labels`, `common_labels`,
///   `common_annotations`;
/// - `alerts`: every alert, each with `status`, `labels`, `annotations` (maps),
///   `starts_at`, `ends_at` (RFC 3339 strings as sent; `ends_at` is
///   `0001-01-01T00:00:00Z` while firing), `generator_url`, `fingerprint`, and the helper
///   `duration` (`"1h 5m"` for a resolved alert, else empty);
/// - `firing`, `resolved`: the alerts of `alerts` in that state;
/// - `marker`: `[FIRING:N]` (N = firing alerts) or `[RESOLVED]`;
/// - `group_name`: the `alertname` of the group labels, else of the common labels, else
///   the one every alert has, else the receiver;
/// - `title`: the short title of [`Rendered::title`].
///
/// Besides minijinja's built-in filters there is `datetime`: `{{ alert.starts_at|datetime }}`
/// gives `2024-05-13 08:51:25 UTC` (the offset of the input is kept),
/// `datetime("+08:00")` converts to that offset; the zero time and empty strings give an
/// empty string, unparseable ones come back unchanged.
///
/// Output is not HTML-escaped; runs of blank lines are collapsed to one and the result is
/// trimmed. The title is computed by Parley (not by the template): the marker and the
/// group label values (alertname first), cut to [`TITLE_MAX_CHARS`].
pub fn render(payload: &Payload, template: Option<&str>) -> Result<Rendered, RenderError> {
    let source = template.unwrap_or(DEFAULT_TEMPLATE);
    let env = environment();
    let tmpl = env
        .template_from_named_str(TEMPLATE_NAME, source)
        .map_err(|e| RenderError::Syntax(e.to_string()))?;
    let title = title(payload);
    let view = View::new(payload, title.clone());
    let out = tmpl
        .render(&view)
        .map_err(|e| RenderError::Render(e.to_string()))?;
    let markdown = tidy(&out);
    if markdown.is_empty() {
        return Err(RenderError::Empty);
    }
    Ok(Rendered { title, markdown })
}

/// Checks that `template` parses (start-up validation of a user template). Errors that
/// depend on the payload surface only in [`render`].
pub fn check_template(template: &str) -> Result<(), RenderError> {
    environment()
        .template_from_named_str(TEMPLATE_NAME, template)
        .map(|_| ())
        .map_err(|e| RenderError::Syntax(e.to_string()))
}

const TEMPLATE_NAME: &str = "alertmanager";

fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.add_filter("datetime", datetime_filter);
    env
}

fn datetime_filter(value: String, offset: Option<String>) -> Result<String, minijinja::Error> {
    let target = match offset.as_deref() {
        None => None,
        Some(o) => Some(parse_offset(o).ok_or_else(|| {
            minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("datetime: offset {o:?} is not UTC or ±HH:MM"),
            )
        })?),
    };
    Ok(format_datetime(&value, target))
}

/// What the template sees.
#[derive(Serialize)]
struct View<'a> {
    version: &'a str,
    group_key: &'a str,
    truncated_alerts: u64,
    status: &'a str,
    receiver: &'a str,
    group_labels: &'a BTreeMap<String, String>,
    common_labels: &'a BTreeMap<String, String>,
    common_annotations: &'a BTreeMap<String, String>,
    external_url: &'a str,
    alerts: Vec<AlertView<'a>>,
    firing: Vec<AlertView<'a>>,
    resolved: Vec<AlertView<'a>>,
    marker: String,
    group_name: &'a str,
    title: String,
}

#[derive(Serialize, Clone)]
struct AlertView<'a> {
    status: &'a str,
    labels: &'a BTreeMap<String, String>,
    annotations: &'a BTreeMap<String, String>,
    starts_at: &'a str,
    ends_at: &'a str,
    generator_url: &'a str,
    fingerprint: &'a str,
    duration: String,
}

impl<'a> AlertView<'a> {
    fn new(a: &'a Alert) -> Self {
        let duration = if a.is_resolved() {
            match (parse_rfc3339(&a.starts_at), parse_rfc3339(&a.ends_at)) {
                (Some((start, _)), Some((end, _))) if end >= start && !is_zero_time(end) => {
                    format_duration(end - start)
                }
                _ => String::new(),
            }
        } else {
            String::new()
        };
        Self {
            status: &a.status,
            labels: &a.labels,
            annotations: &a.annotations,
            starts_at: &a.starts_at,
            ends_at: &a.ends_at,
            generator_url: &a.generator_url,
            fingerprint: &a.fingerprint,
            duration,
        }
    }
}

impl<'a> View<'a> {
    fn new(p: &'a Payload, title: String) -> Self {
        let alerts: Vec<AlertView<'a>> = p.alerts.iter().map(AlertView::new).collect();
        let firing = p.firing().map(AlertView::new).collect();
        let resolved = p.resolved().map(AlertView::new).collect();
        Self {
            version: &p.version,
            group_key: &p.group_key,
            truncated_alerts: p.truncated_alerts,
            status: &p.status,
            receiver: &p.receiver,
            group_labels: &p.group_labels,
            common_labels: &p.common_labels,
            common_annotations: &p.common_annotations,
            external_url: &p.external_url,
            alerts,
            firing,
            resolved,
            marker: marker(p),
            group_name: group_name(p),
            title,
        }
    }
}

/// `[FIRING:N]`, `[RESOLVED]`, or the upper-cased status of an unknown one.
fn marker(p: &Payload) -> String {
    if p.is_resolved() {
        return "[RESOLVED]".into();
    }
    if p.status.is_empty() || p.status.eq_ignore_ascii_case("firing") {
        let n = match p.firing().count() {
            0 => p.alerts.len(),
            n => n,
        };
        return format!("[FIRING:{n}]");
    }
    format!("[{}]", p.status.to_uppercase())
}

fn group_name(p: &Payload) -> &str {
    let shared_by_alerts = || {
        let first = p.alerts.first()?.labels.get("alertname")?;
        p.alerts
            .iter()
            .all(|a| a.labels.get("alertname") == Some(first))
            .then_some(first)
    };
    p.group_labels
        .get("alertname")
        .or_else(|| p.common_labels.get("alertname"))
        .or_else(shared_by_alerts)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or(&p.receiver)
}

/// The marker and the group label values (alertname first), or the group name when the
/// group has no labels; cut to [`TITLE_MAX_CHARS`].
fn title(p: &Payload) -> String {
    let mut parts = vec![marker(p)];
    match p.group_labels.get("alertname") {
        Some(name) => parts.push(name.clone()),
        None => {
            let name = group_name(p);
            if !name.is_empty() {
                parts.push(name.to_string());
            }
        }
    }
    parts.extend(
        p.group_labels
            .iter()
            .filter(|(k, v)| k.as_str() != "alertname" && !v.is_empty())
            .map(|(_, v)| v.clone()),
    );
    let full = parts.join(" ");
    let full = full.split_whitespace().collect::<Vec<_>>().join(" ");
    if full.chars().count() <= TITLE_MAX_CHARS {
        return full;
    }
    let mut cut: String = full.chars().take(TITLE_MAX_CHARS - 1).collect();
    cut.truncate(cut.trim_end().len());
    cut.push('…');
    cut
}

/// Collapses runs of blank lines to one blank line and trims the ends.
fn tidy(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank_run = 0;
    for line in s.lines() {
        if line.trim().is_empty() {
            blank_run += 1;
            if blank_run > 1 {
                continue;
            }
            out.push('\n');
        } else {
            blank_run = 0;
            out.push_str(line);
            out.push('\n');
        }
    }
    out.trim().to_string()
}

/// Seconds since the epoch and the UTC offset (seconds) of an RFC 3339 timestamp
/// (`2024-05-13T08:51:25.123456789Z`, `…+08:00`); `None` when it is not one.
fn parse_rfc3339(s: &str) -> Option<(i64, i32)> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = s.get(19..)?;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = parse_offset(rest)?;
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - i64::from(offset);
    Some((secs, offset))
}

/// `Z`/`UTC` → 0, `±HH:MM` or `±HHMM` → seconds east of UTC.
fn parse_offset(s: &str) -> Option<i32> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("z") || s.eq_ignore_ascii_case("utc") {
        return Some(0);
    }
    let sign = match s.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits: String = s[1..].chars().filter(|c| *c != ':').collect();
    if digits.len() != 4 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let hours: i32 = digits[..2].parse().ok()?;
    let minutes: i32 = digits[2..].parse().ok()?;
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some(sign * (hours * 3600 + minutes * 60))
}

/// Alertmanager's "not set" time, `0001-01-01T00:00:00Z` (and anything before year 2).
fn is_zero_time(secs: i64) -> bool {
    secs < days_from_civil(2, 1, 1) * 86_400
}

/// `2024-05-13 08:51:25 UTC` in the input's own offset or `target`; empty for the zero time
/// or an empty string; unparseable input unchanged.
fn format_datetime(value: &str, target: Option<i32>) -> String {
    if value.trim().is_empty() {
        return String::new();
    }
    let Some((secs, own)) = parse_rfc3339(value) else {
        return value.to_string();
    };
    if is_zero_time(secs) {
        return String::new();
    }
    let offset = target.unwrap_or(own);
    let local = secs + i64::from(offset);
    let (y, m, d) = civil_from_days(local.div_euclid(86_400));
    let tod = local.rem_euclid(86_400);
    let zone = if offset == 0 {
        "UTC".to_string()
    } else {
        let sign = if offset < 0 { '-' } else { '+' };
        let a = offset.abs();
        format!("{sign}{:02}:{:02}", a / 3600, a % 3600 / 60)
    };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} {zone}",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

/// `45s`, `5m 3s`, `2h 5m`, `3d 4h`.
fn format_duration(secs: i64) -> String {
    let secs = secs.max(0);
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if s == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) if m == 0 => format!("{h}h"),
        (0, _, _) => format!("{h}h {m}m"),
        _ if h == 0 => format!("{d}d"),
        _ => format!("{d}d {h}h"),
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Two firing alerts of one group, shaped like Alertmanager 0.27's webhook body.
    fn firing_json() -> serde_json::Value {
        json!({
            "receiver": "parley-ops",
            "status": "firing",
            "alerts": [
                {
                    "status": "firing",
                    "labels": {
                        "alertname": "HighLatency",
                        "env": "prod",
                        "instance": "api-1:9100",
                        "job": "api",
                        "severity": "critical"
                    },
                    "annotations": {
                        "description": "p99 latency is 730ms on api-1\nfor the last 5 minutes.",
                        "runbook_url": "https://runbooks.example.com/high-latency",
                        "summary": "API latency above 500ms"
                    },
                    "startsAt": "2024-05-13T08:51:25.123456789Z",
                    "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus:9090/graph?g0.expr=histogram_quantile%280.99%29&g0.tab=1",
                    "fingerprint": "1a2b3c4d5e6f7a8b"
                },
                {
                    "status": "firing",
                    "labels": {
                        "alertname": "HighLatency",
                        "env": "prod",
                        "instance": "api-2:9100",
                        "job": "api",
                        "severity": "warning"
                    },
                    "annotations": {
                        "summary": "API latency above 300ms"
                    },
                    "startsAt": "2024-05-13T08:53:10Z",
                    "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prometheus:9090/graph?g0.expr=x",
                    "fingerprint": "9f8e7d6c5b4a3921"
                }
            ],
            "groupLabels": {"alertname": "HighLatency", "env": "prod"},
            "commonLabels": {"alertname": "HighLatency", "env": "prod", "job": "api"},
            "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093",
            "version": "4",
            "groupKey": "{}/{severity=~\"critical|warning\"}:{alertname=\"HighLatency\", env=\"prod\"}",
            "truncatedAlerts": 0,
            "someFutureField": {"ignored": true}
        })
    }

    fn resolved_json() -> serde_json::Value {
        json!({
            "receiver": "parley-ops",
            "status": "resolved",
            "alerts": [{
                "status": "resolved",
                "labels": {"alertname": "DiskFull", "instance": "db-1", "severity": "warning"},
                "annotations": {"summary": "Disk /data above 90%"},
                "startsAt": "2024-05-13T08:00:00Z",
                "endsAt": "2024-05-13T09:05:30Z",
                "generatorURL": "http://prometheus:9090/graph?g0.expr=disk",
                "fingerprint": "aaaabbbbccccdddd"
            }],
            "groupLabels": {"alertname": "DiskFull"},
            "commonLabels": {"alertname": "DiskFull", "instance": "db-1", "severity": "warning"},
            "commonAnnotations": {"summary": "Disk /data above 90%"},
            "externalURL": "http://alertmanager:9093",
            "version": "4",
            "groupKey": "{}:{alertname=\"DiskFull\"}",
            "truncatedAlerts": 0
        })
    }

    fn payload(v: serde_json::Value) -> Payload {
        assert!(is_alertmanager(&v));
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn parses_the_wire_format() {
        let p = payload(firing_json());
        assert_eq!(p.version, "4");
        assert_eq!(p.external_url, "http://alertmanager:9093");
        assert_eq!(p.alerts.len(), 2);
        assert_eq!(p.alerts[0].labels["instance"], "api-1:9100");
        assert!(
            p.alerts[0]
                .generator_url
                .starts_with("http://prometheus:9090/graph")
        );
        assert_eq!(p.alerts[1].fingerprint, "9f8e7d6c5b4a3921");
        assert_eq!(p.firing().count(), 2);
        // Serialises back to the wire names.
        let back = serde_json::to_value(&p).unwrap();
        assert!(back.get("externalURL").is_some());
        assert!(back["alerts"][0].get("generatorURL").is_some());
    }

    #[test]
    fn tolerates_missing_and_null_fields() {
        let p: Payload = serde_json::from_value(json!({
            "version": "4", "alerts": [{"labels": {"alertname": "X"}, "annotations": null}],
            "truncatedAlerts": null, "groupLabels": null
        }))
        .unwrap();
        assert_eq!(p.truncated_alerts, 0);
        assert!(p.alerts[0].annotations.is_empty());
        let r = render(&p, None).unwrap();
        assert_eq!(r.title, "[FIRING:1] X");
        assert!(r.markdown.starts_with("### [FIRING:1] X"), "{}", r.markdown);
    }

    #[test]
    fn detects_alertmanager_payloads() {
        assert!(is_alertmanager(&json!({"version": "4", "alerts": []})));
        assert!(is_alertmanager(&json!({"groupKey": "g", "alerts": []})));
        assert!(!is_alertmanager(&json!({"version": "4"})));
        assert!(!is_alertmanager(&json!({"alerts": "no", "version": "4"})));
        assert!(!is_alertmanager(&json!({"text": "hello"})));
        assert!(!is_alertmanager(&json!({"version": "3", "alerts": []})));
        assert!(!is_alertmanager(&json!([1, 2])));
    }

    #[test]
    fn renders_two_firing_alerts_in_one_message() {
        let r = render(&payload(firing_json()), None).unwrap();
        let md = &r.markdown;
        assert_eq!(r.title, "[FIRING:2] HighLatency prod");
        assert!(
            md.starts_with("### [FIRING:2] HighLatency\n\nenv=prod\n\n**1. "),
            "{md}"
        );
        assert!(
            md.contains("**1. [CRITICAL] API latency above 500ms**"),
            "{md}"
        );
        assert!(
            md.contains("**2. [WARNING] API latency above 300ms**"),
            "{md}"
        );
        assert!(
            md.contains("> p99 latency is 730ms on api-1\n> for the last 5 minutes."),
            "{md}"
        );
        assert!(md.contains("- instance: api-1:9100"), "{md}");
        assert!(md.contains("- job: api"), "{md}");
        assert!(md.contains("- Started: 2024-05-13 08:51:25 UTC"), "{md}");
        assert!(md.contains("- Started: 2024-05-13 08:53:10 UTC"), "{md}");
        assert!(md.contains("- [Runbook](https://runbooks.example.com/high-latency)"));
        assert!(md.contains("- [Source](http://prometheus:9090/graph?g0.expr=x)"));
        assert!(
            md.trim_end()
                .ends_with("[Alertmanager](http://alertmanager:9093)")
        );
        // Group labels and severity are in the heading / alert line, not repeated as labels.
        assert!(!md.contains("alertname"), "{md}");
        assert!(!md.contains("- env:"), "{md}");
        assert!(!md.contains("- severity"), "{md}");
        assert!(!md.contains("Ended"), "{md}");
        assert!(!md.contains("truncated"), "{md}");
        assert!(!md.contains("\n\n\n"), "{md}");
    }

    #[test]
    fn renders_resolved_with_end_time_and_duration() {
        let r = render(&payload(resolved_json()), None).unwrap();
        let md = &r.markdown;
        assert_eq!(r.title, "[RESOLVED] DiskFull");
        assert!(md.starts_with("### [RESOLVED] DiskFull\n\n"), "{md}");
        assert!(md.contains("**[WARNING] Disk /data above 90%**"), "{md}");
        assert!(md.contains("- instance: db-1"), "{md}");
        assert!(md.contains("- Started: 2024-05-13 08:00:00 UTC"), "{md}");
        assert!(
            md.contains("- Ended: 2024-05-13 09:05:30 UTC (lasted 1h 5m)"),
            "{md}"
        );
        assert!(!md.contains("Firing"), "{md}");
    }

    #[test]
    fn mixed_group_gets_sections_and_truncation_note() {
        let mut v = firing_json();
        v["alerts"][1]["status"] = json!("resolved");
        v["alerts"][1]["endsAt"] = json!("2024-05-13T09:00:10Z");
        v["truncatedAlerts"] = json!(3);
        let r = render(&payload(v), None).unwrap();
        let md = &r.markdown;
        assert_eq!(r.title, "[FIRING:1] HighLatency prod");
        assert!(md.contains("#### Firing (1)"), "{md}");
        assert!(md.contains("#### Resolved (1)"), "{md}");
        assert!(md.contains("(lasted 7m)"), "{md}");
        assert!(md.contains("*3 more alerts not shown"), "{md}");
    }

    #[test]
    fn custom_template_sees_the_documented_variables() {
        let t = "{{ title }}|{{ marker }}|{{ group_name }}|{{ status }}|{{ receiver }}|\
                 {{ alerts|length }}|{{ firing|length }}|{{ resolved|length }}|\
                 {% for a in alerts %}{{ a.labels.instance }}@{{ a.starts_at|datetime(\"+08:00\") }};{% endfor %}\
                 {{ common_labels.job }}|{{ external_url }}|{{ truncated_alerts }}|{{ version }}";
        let r = render(&payload(firing_json()), Some(t)).unwrap();
        assert_eq!(
            r.markdown,
            "[FIRING:2] HighLatency prod|[FIRING:2]|HighLatency|firing|parley-ops|2|2|0|\
             api-1:9100@2024-05-13 16:51:25 +08:00;api-2:9100@2024-05-13 16:53:10 +08:00;\
             api|http://alertmanager:9093|0|4"
        );
        assert_eq!(r.title, "[FIRING:2] HighLatency prod");
    }

    #[test]
    fn bad_templates_are_errors_not_panics() {
        let err = check_template("{% for a in alerts %}{{ a.labels }").unwrap_err();
        assert!(matches!(err, RenderError::Syntax(_)), "{err:?}");
        assert!(err.to_string().contains("alertmanager:1"), "{err}");
        assert!(matches!(
            render(&Payload::default(), Some("{% if %}")),
            Err(RenderError::Syntax(_))
        ));
        assert_eq!(check_template(DEFAULT_TEMPLATE), Ok(()));
        // Fails only at render time: a bad filter argument.
        let err = render(
            &payload(firing_json()),
            Some("{{ alerts[0].starts_at|datetime(\"Mars\") }}"),
        )
        .unwrap_err();
        assert!(matches!(err, RenderError::Render(_)), "{err:?}");
        let err = render(&payload(firing_json()), Some("{{ 1 + 'a' }}")).unwrap_err();
        assert!(matches!(err, RenderError::Render(_)), "{err:?}");
        assert_eq!(
            render(&payload(firing_json()), Some("  {{ receiver[:0] }} \n")),
            Err(RenderError::Empty)
        );
    }

    #[test]
    fn empty_payload_still_renders() {
        let r = render(&Payload::default(), None).unwrap();
        assert_eq!(r.title, "[FIRING:0]");
        assert_eq!(r.markdown, "### [FIRING:0]");
    }

    #[test]
    fn long_titles_are_cut() {
        let mut p = payload(firing_json());
        p.group_labels.insert("service".into(), "x".repeat(100));
        let r = render(&p, None).unwrap();
        assert_eq!(r.title.chars().count(), TITLE_MAX_CHARS);
        assert!(r.title.ends_with('…'));
    }

    #[test]
    fn time_helpers() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(
            parse_rfc3339("2024-02-29T23:59:59.5+08:00"),
            Some((1_709_222_399, 28_800))
        );
        assert_eq!(parse_rfc3339("2023-02-29T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2024-05-13T08:51:25"), None);
        assert_eq!(parse_rfc3339("garbage"), None);
        assert_eq!(parse_rfc3339("2024-05-13T08:51:25.Z"), None);
        assert_eq!(parse_rfc3339("2024-05-13T08:5é:25Z"), None);
        assert_eq!(format_datetime("0001-01-01T00:00:00Z", None), "");
        assert_eq!(format_datetime("", None), "");
        assert_eq!(format_datetime("yesterday", None), "yesterday");
        assert_eq!(
            format_datetime("2024-12-31T20:00:00-05:00", None),
            "2024-12-31 20:00:00 -05:00"
        );
        assert_eq!(
            format_datetime("2024-12-31T20:00:00-05:00", Some(0)),
            "2025-01-01 01:00:00 UTC"
        );
        for days in [-800_000, -1, 0, 59, 60, 19_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(format_duration(45), "45s");
        assert_eq!(format_duration(303), "5m 3s");
        assert_eq!(format_duration(7500), "2h 5m");
        assert_eq!(format_duration(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
        assert_eq!(format_duration(86_400), "1d");
        assert_eq!(parse_offset("+0800"), Some(28_800));
        assert_eq!(parse_offset("+08"), None);
        assert_eq!(parse_offset("-0é:00"), None);
    }
}
