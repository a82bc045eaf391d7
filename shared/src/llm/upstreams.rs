//! Several upstreams behind one [`LlmClient`]: a call goes to the first healthy upstream in
//! order (a route's preferred one first), each upstream retrying on its own as
//! [`OpenAiClient`] does; when it still fails, the next is asked — unless part of a streamed
//! answer was already shown, which another upstream would start over. Each upstream has a
//! circuit breaker: after [`FAILURES_TO_OPEN`] calls in a row failed for the upstream's sake
//! (5xx, timeouts, connection errors, broken streams — not 4xx about the request, not 429)
//! it is skipped for `[llm] breaker_cooldown_secs`, then one call probes it (half-open) and
//! its result closes or reopens it. When every breaker is open, the first upstream in order is
//! asked anyway: trying beats refusing. Breakers are per process.

use super::{ChatMessage, Completion, LlmClient, LlmError, OpenAiClient, Route};
use crate::config::LlmSettings;
use async_trait::async_trait;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Failed calls in a row that open an upstream's breaker.
pub const FAILURES_TO_OPEN: u32 = 5;

/// An upstream's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Calls go through; `failures` in a row so far.
    Closed { failures: u32 },
    /// Skipped until `until`.
    Open { until: Instant },
    /// One probe is out; others skip it until it reports.
    HalfOpen,
}

impl State {
    /// `parley_llm_breaker_state` value.
    fn gauge(self) -> i64 {
        match self {
            State::Closed { .. } => 0,
            State::Open { .. } => 1,
            State::HalfOpen => 2,
        }
    }
}

struct Member {
    client: OpenAiClient,
    name: String,
    state: Mutex<State>,
}

impl Member {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, state: &mut State, next: State) {
        *state = next;
        crate::metrics::get()
            .llm_breaker
            .with_label_values(&[self.name.as_str()])
            .set(next.gauge());
    }

    /// Whether a call may go to this upstream now (taking the probe when half-opening).
    fn admit(&self, now: Instant) -> bool {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                self.set(&mut state, State::HalfOpen);
                true
            }
            State::Open { .. } | State::HalfOpen => false,
        }
    }

    /// Records how a call went; `cooldown` is the open period after a failure that counts.
    fn report(&self, result: &Result<Completion, LlmError>, cooldown: Duration) {
        let mut state = self.lock();
        let counts = matches!(
            result,
            Err(LlmError::Timeout
                | LlmError::Network(_)
                | LlmError::Server(_)
                | LlmError::Interrupted(_))
        );
        let next = match (*state, result.is_ok(), counts) {
            (_, true, _) => State::Closed { failures: 0 },
            // A 4xx or 429 says nothing about the upstream's health.
            (s @ State::Closed { .. }, false, false) => s,
            (State::HalfOpen, false, false) => State::Closed { failures: 0 },
            (State::Closed { failures }, false, true) if failures + 1 < FAILURES_TO_OPEN => {
                State::Closed {
                    failures: failures + 1,
                }
            }
            (_, false, _) => {
                tracing::warn!(
                    upstream = %self.name,
                    cooldown_s = cooldown.as_secs(),
                    "model upstream keeps failing; skipping it for a while"
                );
                State::Open {
                    until: Instant::now() + cooldown,
                }
            }
        };
        if next != *state {
            self.set(&mut state, next);
        }
    }
}

/// The upstreams of `[llm]`, in order, each with its breaker.
pub struct Upstreams {
    members: Vec<Member>,
    cooldown: Duration,
}

impl fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
        f.debug_struct("Upstreams")
            .field("names", &names)
            .finish_non_exhaustive()
    }
}

impl Upstreams {
    /// A client for every upstream of `settings`.
    pub fn new(settings: &LlmSettings) -> Result<Self, reqwest::Error> {
        let members = settings
            .upstream_list()
            .iter()
            .map(|u| {
                crate::metrics::get()
                    .llm_breaker
                    .with_label_values(&[u.name.as_str()])
                    .set(0);
                Ok(Member {
                    client: OpenAiClient::for_upstream(u, settings)?,
                    name: u.name.clone(),
                    state: Mutex::new(State::Closed { failures: 0 }),
                })
            })
            .collect::<Result<_, reqwest::Error>>()?;
        Ok(Self {
            members,
            cooldown: Duration::from_secs(settings.breaker_cooldown_secs),
        })
    }

    /// The members in the order a call with `route` tries them.
    fn order(&self, route: Route<'_>) -> Vec<&Member> {
        let mut order: Vec<&Member> = self.members.iter().collect();
        if let Some(i) = route
            .upstream
            .and_then(|u| order.iter().position(|m| m.name == u))
        {
            let preferred = order.remove(i);
            order.insert(0, preferred);
        }
        order
    }

    async fn call(
        &self,
        route: Route<'_>,
        messages: &[ChatMessage],
        shown: Option<&watch::Sender<String>>,
    ) -> Result<Completion, LlmError> {
        let order = self.order(route);
        let now = Instant::now();
        let mut admitted: Vec<&Member> = order.iter().copied().filter(|m| m.admit(now)).collect();
        if admitted.is_empty() {
            admitted.push(order[0]);
        }
        let mut last = None;
        for (i, m) in admitted.iter().enumerate() {
            let result = match shown {
                Some(shown) => m.client.chat_streaming(route, messages, shown).await,
                None => m.client.chat(route, messages).await,
            };
            m.report(&result, self.cooldown);
            match result {
                Ok(c) => return Ok(c),
                Err(e) => {
                    let started_showing = shown.is_some_and(|s| !s.borrow().is_empty());
                    if started_showing || i + 1 == admitted.len() {
                        return Err(e);
                    }
                    tracing::warn!(upstream = %m.name, error = %e, "model upstream failed; asking the next");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(LlmError::Network("no model upstream".into())))
    }
}

#[async_trait]
impl LlmClient for Upstreams {
    async fn chat(
        &self,
        route: Route<'_>,
        messages: &[ChatMessage],
    ) -> Result<Completion, LlmError> {
        self.call(route, messages, None).await
    }

    async fn chat_streaming(
        &self,
        route: Route<'_>,
        messages: &[ChatMessage],
        shown: &watch::Sender<String>,
    ) -> Result<Completion, LlmError> {
        self.call(route, messages, Some(shown)).await
    }

    fn health(&self) -> Vec<(String, &'static str)> {
        self.members
            .iter()
            .map(|m| {
                let state = match *m.lock() {
                    State::Closed { .. } => "healthy",
                    State::Open { .. } => "open",
                    State::HalfOpen => "probing",
                };
                (m.name.clone(), state)
            })
            .collect()
    }
}
