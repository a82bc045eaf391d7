//! The new gateway's call limits (PROTOCOLS.md §b "Errors", §c "Rate limits bite here"): at most
//! N calls per app per API in any one-second window (HTTP 403 `QpsLimitForAppkeyAndApi`) and a
//! monthly call budget for the whole org (HTTP 403 `ApiCountLimitForOrg`), plus per-endpoint
//! statistics for assertions.
//!
//! The QPS window slides: a call is admitted only if fewer than N admitted calls of the same
//! (app, API) started in the second before it. That is stricter than fixed one-second buckets
//! (which let 2N through around a bucket edge), so a client that passes here passes the real
//! gateway however it counts. Refused calls do not take a slot in the window.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde::Serialize;

use super::{Refusal, gateway_error};

/// Default per-app, per-API limit, as on the standard edition (20 QPS).
pub const DEFAULT_API_QPS: u32 = 20;
/// `code` of the HTTP 403 a call over the per-app, per-API QPS limit gets.
pub const QPS_LIMIT_CODE: &str = "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi";
/// `code` of the HTTP 403 a call gets once the org's monthly budget is used up.
pub const ORG_QUOTA_CODE: &str = "Forbidden.AccessDenied.ApiCountLimitForOrg";

/// The length of the sliding QPS window.
const QPS_WINDOW: Duration = Duration::from_secs(1);

/// What one endpoint saw from one app (see [`super::FakeDingTalk::endpoint_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EndpointStats {
    /// Every authenticated arrival, refused ones (QPS, quota) included.
    pub calls: u64,
    /// Arrivals refused by the QPS limit.
    pub throttled: u64,
    /// Most arrivals (admitted or throttled) that started within any one-second window.
    pub peak_per_second: u64,
}

/// Limits and counters, kept under the fake's state lock.
#[derive(Debug)]
pub(super) struct Meters {
    /// Per-(app, API) limit; 0 = unlimited.
    pub(super) qps: u32,
    /// Org-wide budget of metered calls; `None` = unlimited.
    pub(super) monthly_quota: Option<u64>,
    /// Metered calls executed so far (refused ones not counted).
    pub(super) metered: u64,
    endpoints: HashMap<(String, &'static str), EndpointMeter>,
}

#[derive(Debug, Default)]
struct EndpointMeter {
    stats: EndpointStats,
    /// Start times of the admitted calls of the last window, oldest first.
    admitted: VecDeque<Instant>,
    /// Arrival times of the last window, oldest first (for `peak_per_second`).
    arrivals: VecDeque<Instant>,
}

impl Default for Meters {
    fn default() -> Self {
        Self {
            qps: DEFAULT_API_QPS,
            monthly_quota: None,
            metered: 0,
            endpoints: HashMap::new(),
        }
    }
}

/// Drops the times that are a full window or more before `now`.
fn prune(times: &mut VecDeque<Instant>, now: Instant) {
    while times
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) >= QPS_WINDOW)
    {
        times.pop_front();
    }
}

impl Meters {
    /// Counts an arrival of `app` at `path` at `now` and decides whether it may run: the QPS
    /// window first (a throttled call is neither executed nor metered), then the monthly
    /// budget. An admitted call is metered whatever its outcome later (a 400 is a call too).
    pub(super) fn admit(
        &mut self,
        app: &str,
        path: &'static str,
        now: Instant,
    ) -> Result<(), Refusal> {
        let meter = self.endpoints.entry((app.to_owned(), path)).or_default();
        meter.stats.calls += 1;
        prune(&mut meter.arrivals, now);
        meter.arrivals.push_back(now);
        let in_window = u64::try_from(meter.arrivals.len()).unwrap_or(u64::MAX);
        meter.stats.peak_per_second = meter.stats.peak_per_second.max(in_window);
        prune(&mut meter.admitted, now);
        let qps = usize::try_from(self.qps).unwrap_or(usize::MAX);
        if self.qps > 0 && meter.admitted.len() >= qps {
            meter.stats.throttled += 1;
            return Err(gateway_error(
                StatusCode::FORBIDDEN,
                QPS_LIMIT_CODE,
                "该应用调用接口的QPS超过限制，请降低调用频率",
            ));
        }
        meter.admitted.push_back(now);
        if self
            .monthly_quota
            .is_some_and(|quota| self.metered >= quota)
        {
            return Err(gateway_error(
                StatusCode::FORBIDDEN,
                ORG_QUOTA_CODE,
                "企业调用接口的次数超过限制，请升级版本或下月再试",
            ));
        }
        self.metered += 1;
        Ok(())
    }

    /// Statistics keyed by (app key, route path).
    pub(super) fn stats(&self) -> BTreeMap<(String, String), EndpointStats> {
        self.endpoints
            .iter()
            .map(|((app, path), m)| ((app.clone(), (*path).to_owned()), m.stats))
            .collect()
    }

    /// Forgets the counters, windows and statistics (limits stay).
    pub(super) fn reset(&mut self) {
        self.metered = 0;
        self.endpoints.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(r: Result<(), Refusal>) -> Option<String> {
        match r {
            Ok(()) => None,
            Err(Refusal::Gateway { code, .. }) => Some(code),
            Err(other) => Some(format!("{other:?}")),
        }
    }

    #[test]
    fn window_slides_and_refused_calls_take_no_slot() {
        let mut m = Meters {
            qps: 2,
            ..Meters::default()
        };
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(code(m.admit("a", "/x", at(0))), None);
        assert_eq!(code(m.admit("a", "/x", at(600))), None);
        // A fixed bucket would admit this one (new second); the sliding window does not.
        assert_eq!(
            code(m.admit("a", "/x", at(999))).as_deref(),
            Some(QPS_LIMIT_CODE)
        );
        assert_eq!(code(m.admit("b", "/x", at(999))), None, "per app");
        assert_eq!(code(m.admit("a", "/y", at(999))), None, "per API");
        assert_eq!(code(m.admit("a", "/x", at(1000))), None, "first one left");
        assert_eq!(
            code(m.admit("a", "/x", at(1500))).as_deref(),
            Some(QPS_LIMIT_CODE)
        );
        assert_eq!(code(m.admit("a", "/x", at(1600))), None);
        let stats = m.stats();
        let x = stats[&("a".to_owned(), "/x".to_owned())];
        assert_eq!(
            x,
            EndpointStats {
                calls: 6,
                throttled: 2,
                // 600, 999, 1000 and 1500 all started within one second.
                peak_per_second: 4,
            }
        );
        assert_eq!(m.metered, 6);
    }

    #[test]
    fn quota_refuses_without_counting_and_zero_qps_is_unlimited() {
        let mut m = Meters {
            qps: 0,
            monthly_quota: Some(3),
            ..Meters::default()
        };
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(code(m.admit("a", "/x", now)), None);
        }
        assert_eq!(
            code(m.admit("a", "/y", now)).as_deref(),
            Some(ORG_QUOTA_CODE)
        );
        assert_eq!(m.metered, 3);
        m.monthly_quota = None;
        for _ in 0..100 {
            assert_eq!(code(m.admit("a", "/x", now)), None);
        }
        assert_eq!(m.stats()[&("a".to_owned(), "/x".to_owned())].calls, 103);
    }
}
