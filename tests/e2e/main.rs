//! End-to-end tests of the `parley` binary's serve path: the real application on random
//! ports, talking HTTP to the built-in protocol fakes of DingTalk and the model. One test
//! binary, so the fakes and the application are compiled once.

mod dingtalk;
mod helpers;
mod wecom;
