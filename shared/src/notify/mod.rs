//! Notifications pushed into group robots (DingTalk custom robots, WeCom group robots) on
//! behalf of ops and business systems: the Alertmanager payload and its rendering
//! (`alertmanager`), the request body of `POST /notify/{channel}` turned into a Job
//! (`request`), the robot messenger (`robot`) and the cluster-wide per-robot rate limit
//! (`ratelimit`).

pub mod alertmanager;
pub mod ratelimit;
pub mod request;
pub mod robot;
