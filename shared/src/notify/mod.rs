//! What a notice is: notifications pushed into group robots (DingTalk custom robots, WeCom
//! group robots) on behalf of ops and business systems. The Alertmanager payload and its
//! rendering (`alertmanager`) and the request body of `POST /notify/{channel}` turned into
//! a Job (`request`). Delivering a notice (the robot messenger and its per-robot rate
//! limit) belongs to the platform, in [`crate::platform::robots`].

pub mod alertmanager;
pub mod request;
