//! Parley's worker. It owns what happens between a queued [`Job`](shared::job::Job) and the
//! answer in the chat, as an [`Engine`] plus job kinds. The engine takes jobs from a lane's
//! queue and keeps conversation order, the intake and work budgets, the per-job records in
//! the cache (answer, parts sent, answered marker — so a job delivered again never composes
//! its answer twice or repeats a part), splitting and delivery, settlement and shutdown; a
//! [`Handler`] says what the answer to a job is: [`ChatHandler`] (commands, history, the
//! model) on the chat lane, [`NoticeHandler`] (the notice as given) on the notify lane.
//! Every job runs inside one `job` span, so each line logged for it carries the job.

mod chat;
mod claim;
mod engine;
mod handler;
mod live;
mod notice;
mod order;
mod settle;
mod texts;

pub use chat::{ChatHandler, ChatSettings};
pub use engine::{Engine, EngineSettings, Messengers, deliver_answer, intake_limit, job_span};
pub use handler::{Answer, Handler, Shown};
pub use notice::NoticeHandler;
pub use settle::{Outcome, retry_delay, settlement};

#[cfg(test)]
mod tests;
