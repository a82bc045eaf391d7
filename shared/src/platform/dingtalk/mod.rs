//! DingTalk (钉钉): the robot callback (signature check and parsing into a Job) and the
//! messenger that answers through the sessionWebhook or the OpenAPI robot sends.

pub mod callback;
pub mod card;
pub mod client;
pub mod sign;
