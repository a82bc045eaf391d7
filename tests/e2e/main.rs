//! End-to-end tests of the `parley` binary's serve path: the real application on random
//! ports, talking HTTP to the built-in protocol fakes of DingTalk, WeCom and the model. One
//! test binary, so the fakes and the application are compiled once. Every scenario runs
//! twice from one definition: on the embedded queue and cache, and on the real RabbitMQ
//! and Redis of this machine (unique queue and key prefixes per test).

/// Generates, for each scenario `async fn name(backend: Backend)`, one test per backend:
/// `embedded::name` and `brokers::name`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(crate::helpers::Backend::Embedded).await;
                }
            )*
        }
        mod brokers {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(crate::helpers::Backend::Brokers).await;
                }
            )*
        }
    };
}

mod aibot;
mod bad_input;
mod brokers;
mod cards;
mod dingtalk;
mod durable;
mod helpers;
mod limits;
mod listener;
mod notify;
mod stream;
mod wecom;
