//! Group robots (DingTalk custom robots, WeCom group robots), the platform notices travel
//! on: the messenger (`messenger`: DingTalk signing and keywords, @-mentions, each robot's
//! error table) and the cluster-wide 20-per-minute window every robot send waits for
//! (`ratelimit`). DingTalk's signature itself lives with DingTalk, in
//! [`crate::platform::dingtalk::sign`].

pub mod messenger;
pub mod ratelimit;
