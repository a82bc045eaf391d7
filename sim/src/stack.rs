//! [`FakeStack`]: the fakes a Parley needs, started together, and the configuration that
//! points a Parley at them. `parley demo`, the end-to-end tests and `parley sim serve` all
//! start their fakes here, so a new platform fake is wired in once.

use std::fmt::Write as _;
use std::net::SocketAddr;

use anyhow::Context;

use crate::{
    FakeAibot, FakeAibotApp, FakeApp, FakeDingTalk, FakeLlm, FakeLlmOptions, FakeRobots, FakeWecom,
    FakeWecomApp,
};

/// One bot of the configuration: its id, the fake app behind it and extra TOML lines for
/// its `[[bots]]` table.
#[derive(Debug, Clone)]
struct Bot<A> {
    id: String,
    app: A,
    extra: String,
}

/// What [`FakeStack::builder`] will start; every fake binds `127.0.0.1:0` unless given an
/// address.
#[derive(Debug, Default)]
pub struct FakeStackBuilder {
    dingtalk_bots: Vec<Bot<FakeApp>>,
    wecom_bots: Vec<Bot<FakeWecomApp>>,
    aibot_bots: Vec<Bot<FakeAibotApp>>,
    llm: FakeLlmOptions,
    model: Option<String>,
    llm_toml: String,
    robots: bool,
    dingtalk_listen: Option<SocketAddr>,
    wecom_listen: Option<SocketAddr>,
    aibot_listen: Option<SocketAddr>,
    llm_listen: Option<SocketAddr>,
    robots_listen: Option<SocketAddr>,
}

impl FakeStackBuilder {
    /// Adds a DingTalk bot `id` served by the fake DingTalk (which starts once there is one).
    pub fn dingtalk_bot(self, id: impl Into<String>, app: FakeApp) -> Self {
        self.dingtalk_bot_with(id, app, "")
    }

    /// As [`Self::dingtalk_bot`], with `extra` TOML lines in its `[[bots]]` table.
    pub fn dingtalk_bot_with(
        mut self,
        id: impl Into<String>,
        app: FakeApp,
        extra: impl Into<String>,
    ) -> Self {
        self.dingtalk_bots.push(Bot {
            id: id.into(),
            app,
            extra: extra.into(),
        });
        self
    }

    /// Adds a WeCom app bot `id` served by the fake WeCom (which starts once there is one),
    /// with `extra` TOML lines in its `[[bots]]` table.
    pub fn wecom_bot(
        mut self,
        id: impl Into<String>,
        app: FakeWecomApp,
        extra: impl Into<String>,
    ) -> Self {
        self.wecom_bots.push(Bot {
            id: id.into(),
            app,
            extra: extra.into(),
        });
        self
    }

    /// Adds a WeCom AI bot (智能机器人) `id` whose `response_url`s the fake AI-bot platform
    /// serves (it starts once there is one), with `extra` TOML lines in its `[[bots]]` table.
    pub fn wecom_aibot(
        mut self,
        id: impl Into<String>,
        app: FakeAibotApp,
        extra: impl Into<String>,
    ) -> Self {
        self.aibot_bots.push(Bot {
            id: id.into(),
            app,
            extra: extra.into(),
        });
        self
    }

    /// How the fake model behaves; its `api_key` goes into `[llm]`.
    pub fn llm(mut self, options: FakeLlmOptions) -> Self {
        self.llm = options;
        self
    }

    /// The `[llm] model` name (default `fake-model`) and extra TOML lines for `[llm]`.
    pub fn model(mut self, name: impl Into<String>, llm_toml: impl Into<String>) -> Self {
        self.model = Some(name.into());
        self.llm_toml = llm_toml.into();
        self
    }

    /// Also starts the fake group robots (their robots are added on the running fake).
    pub fn robots(mut self) -> Self {
        self.robots = true;
        self
    }

    /// Binds the fake DingTalk to `addr`.
    pub fn dingtalk_listen(mut self, addr: SocketAddr) -> Self {
        self.dingtalk_listen = Some(addr);
        self
    }

    /// Binds the fake WeCom to `addr`.
    pub fn wecom_listen(mut self, addr: SocketAddr) -> Self {
        self.wecom_listen = Some(addr);
        self
    }

    /// Binds the fake AI-bot platform (its `response_url` endpoint) to `addr`.
    pub fn aibot_listen(mut self, addr: SocketAddr) -> Self {
        self.aibot_listen = Some(addr);
        self
    }

    /// Binds the fake model to `addr`.
    pub fn llm_listen(mut self, addr: SocketAddr) -> Self {
        self.llm_listen = Some(addr);
        self
    }

    /// Binds the fake group robots to `addr` (and starts them).
    pub fn robots_listen(mut self, addr: SocketAddr) -> Self {
        self.robots_listen = Some(addr);
        self.robots = true;
        self
    }

    /// Starts the fakes and writes the configuration pointing at them.
    pub async fn start(self) -> anyhow::Result<FakeStack> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let dingtalk = if self.dingtalk_bots.is_empty() {
            None
        } else {
            let addr = self.dingtalk_listen.unwrap_or(any);
            let apps = self.dingtalk_bots.iter().map(|b| b.app.clone()).collect();
            let fake = FakeDingTalk::start(addr, apps)
                .await
                .with_context(|| format!("starting the fake DingTalk on {addr}"))?;
            Some(fake)
        };
        let wecom = if self.wecom_bots.is_empty() {
            None
        } else {
            let addr = self.wecom_listen.unwrap_or(any);
            let apps = self.wecom_bots.iter().map(|b| b.app.clone()).collect();
            let fake = FakeWecom::start(addr, apps)
                .await
                .with_context(|| format!("starting the fake WeCom on {addr}"))?;
            Some(fake)
        };
        let aibot = if self.aibot_bots.is_empty() {
            None
        } else {
            let addr = self.aibot_listen.unwrap_or(any);
            let apps = self.aibot_bots.iter().map(|b| b.app.clone()).collect();
            let fake = FakeAibot::start(addr, apps)
                .await
                .with_context(|| format!("starting the fake WeCom AI-bot platform on {addr}"))?;
            Some(fake)
        };
        let addr = self.llm_listen.unwrap_or(any);
        let api_key = self.llm.api_key.clone();
        let llm = FakeLlm::start(addr, self.llm)
            .await
            .with_context(|| format!("starting the fake model on {addr}"))?;
        let robots = if self.robots {
            let addr = self.robots_listen.unwrap_or(any);
            let fake = FakeRobots::start(addr)
                .await
                .with_context(|| format!("starting the fake robots on {addr}"))?;
            Some(fake)
        } else {
            None
        };

        let model = self.model.as_deref().unwrap_or("fake-model");
        let mut toml = format!(
            "[llm]\nbase_url = {}\napi_key = {}\nmodel = {}\n{}\n",
            quoted(&llm.base_url()),
            quoted(&api_key),
            quoted(model),
            self.llm_toml
        );
        if let Some(fake) = &dingtalk {
            for bot in &self.dingtalk_bots {
                let _ = write!(
                    toml,
                    "\n[[bots]]\nid = {}\nplatform = \"dingtalk\"\napp_key = {}\napp_secret = {}\napi_base = {}\n{}\n",
                    quoted(&bot.id),
                    quoted(&bot.app.app_key),
                    quoted(&bot.app.app_secret),
                    quoted(&fake.base_url()),
                    bot.extra
                );
            }
        }
        if let Some(fake) = &wecom {
            for bot in &self.wecom_bots {
                let app = &bot.app;
                let _ = write!(
                    toml,
                    "\n[[bots]]\nid = {}\nplatform = \"wecom\"\ncorp_id = {}\ncorp_secret = {}\nagent_id = {}\ntoken = {}\nencoding_aes_key = {}\napi_base = {}\n{}\n",
                    quoted(&bot.id),
                    quoted(&app.corp_id),
                    quoted(&app.corp_secret),
                    app.agent_id,
                    quoted(&app.token),
                    quoted(&app.encoding_aes_key),
                    quoted(&fake.base_url()),
                    bot.extra
                );
            }
        }
        if let Some(fake) = &aibot {
            for bot in &self.aibot_bots {
                let _ = write!(
                    toml,
                    "\n[[bots]]\nid = {}\nplatform = \"wecom_aibot\"\ntoken = {}\nencoding_aes_key = {}\napi_base = {}\n{}\n",
                    quoted(&bot.id),
                    quoted(&bot.app.token),
                    quoted(&bot.app.encoding_aes_key),
                    quoted(&fake.base_url()),
                    bot.extra
                );
            }
        }
        Ok(FakeStack {
            dingtalk,
            wecom,
            aibot,
            llm,
            robots,
            toml,
        })
    }
}

/// The running fakes and the configuration that points a Parley at them.
#[derive(Debug)]
pub struct FakeStack {
    /// The fake DingTalk, if a DingTalk bot was asked for.
    pub dingtalk: Option<FakeDingTalk>,
    /// The fake WeCom, if a WeCom bot was asked for.
    pub wecom: Option<FakeWecom>,
    /// The fake WeCom AI-bot platform, if an AI bot was asked for.
    pub aibot: Option<FakeAibot>,
    /// The fake model.
    pub llm: FakeLlm,
    /// The fake group robots, if asked for.
    pub robots: Option<FakeRobots>,
    toml: String,
}

impl FakeStack {
    /// Describes which fakes to start.
    pub fn builder() -> FakeStackBuilder {
        FakeStackBuilder::default()
    }

    /// The `[llm]` table and one `[[bots]]` table per bot, pointing at the fakes; the
    /// caller adds `[server]`, `[queue]`, `[cache]` and `[[channels]]` as it needs.
    pub fn config_toml(&self) -> &str {
        &self.toml
    }

    /// Stops every fake.
    pub fn shutdown(&self) {
        if let Some(fake) = &self.dingtalk {
            fake.shutdown();
        }
        if let Some(fake) = &self.wecom {
            fake.shutdown();
        }
        if let Some(fake) = &self.aibot {
            fake.shutdown();
        }
        self.llm.shutdown();
        if let Some(fake) = &self.robots {
            fake.shutdown();
        }
    }
}

/// `s` as a TOML basic string.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn config_points_at_the_started_fakes() {
        let stack = FakeStack::builder()
            .dingtalk_bot("dt", FakeApp::new("key", "se\"cret"))
            .wecom_aibot(
                "ai",
                FakeAibotApp {
                    token: "tok".into(),
                    encoding_aes_key: "N8B4UnzjCKzzClkMWRyzUHfn9JfHNSBEJKSD8pQ3WCA".into(),
                    aibot_id: "AIBOTID".into(),
                },
                "welcome = \"hi\"",
            )
            .model("m", "max_retries = 1")
            .start()
            .await
            .unwrap();
        let toml: toml::Value = toml::from_str(stack.config_toml()).unwrap();
        let dingtalk = stack.dingtalk.as_ref().unwrap();
        assert_eq!(
            toml["llm"]["base_url"].as_str(),
            Some(&*stack.llm.base_url())
        );
        assert_eq!(toml["llm"]["max_retries"].as_integer(), Some(1));
        assert_eq!(toml["bots"][0]["app_secret"].as_str(), Some("se\"cret"));
        assert_eq!(
            toml["bots"][0]["api_base"].as_str(),
            Some(&*dingtalk.base_url())
        );
        let aibot = stack.aibot.as_ref().unwrap();
        assert_eq!(toml["bots"][1]["id"].as_str(), Some("ai"));
        assert_eq!(toml["bots"][1]["platform"].as_str(), Some("wecom_aibot"));
        assert_eq!(toml["bots"][1]["token"].as_str(), Some("tok"));
        assert_eq!(
            toml["bots"][1]["api_base"].as_str(),
            Some(&*aibot.base_url())
        );
        assert_eq!(toml["bots"][1]["welcome"].as_str(), Some("hi"));
        assert!(stack.wecom.is_none() && stack.robots.is_none());
        stack.shutdown();
    }
}
