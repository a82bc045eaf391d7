//! `parley sim notify-load`: queues many notifications at once through `POST /notify/{id}`
//! and watches them reach fake group robots, to show that delivery runs at each robot's
//! allowed rate (20 messages in any 60 s) with nothing lost, duplicated or refused.
//!
//! It runs [`FakeRobots`] in-process — alternately a signed DingTalk custom robot and a
//! WeCom group robot — so the robots' own limit check, not Parley's account of itself,
//! decides what counts. `--print-config` prints the matching `[[channels]]` for Parley's
//! configuration; the robots, channel ids and bearer tokens follow from `--robots` alone.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use super::robots::{FakeRobots, MESSAGES_PER_WINDOW, RATE_WINDOW, RobotKind, max_in_any_window};

/// Options of `parley sim notify-load`.
#[derive(clap::Args, Debug, Clone)]
pub struct NotifyLoadArgs {
    /// Base URL of Parley's public listener, e.g. `http://127.0.0.1:8080`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// Where the fake robots listen (the channels' webhook URLs point here).
    #[arg(long, default_value = "127.0.0.1:9300")]
    pub robots_listen: SocketAddr,
    /// How many robots (one channel each): even ones DingTalk (signed), odd ones WeCom.
    #[arg(long, default_value_t = 3)]
    pub robots: usize,
    /// Messages in all, dealt round-robin to the channels and all posted at the start.
    #[arg(long, default_value_t = 300)]
    pub messages: usize,
    /// Stop waiting for deliveries after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub wait_secs: u64,
    /// Print the `[[channels]]` of these robots for Parley's configuration, and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Also print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
}

/// One robot and the channel that feeds it.
struct Robot {
    channel: String,
    kind: RobotKind,
    /// The DingTalk `access_token` or WeCom `key`: how the fake names the robot.
    name: String,
    url: String,
    secret: Option<String>,
    bearer: String,
}

/// What one robot received.
#[derive(Debug, Serialize)]
pub struct RobotReport {
    /// Channel id.
    pub channel: String,
    /// Platform of the robot.
    pub kind: RobotKind,
    /// Messages posted to the channel (each got a 202).
    pub queued: usize,
    /// Distinct messages the robot accepted.
    pub delivered: usize,
    /// Queued messages the robot never accepted.
    pub lost: usize,
    /// Messages the robot accepted more than once.
    pub duplicates: usize,
    /// Requests the robot refused (rate limit, signature, …).
    pub refused: usize,
    /// Whether the messages arrived in the order they were posted.
    pub in_order: bool,
    /// Most messages accepted within any 60 s.
    pub max_in_any_60s: usize,
    /// Seconds from the first post to the first and the last accepted message.
    pub first_s: f64,
    /// See `first_s`.
    pub last_s: f64,
    /// The sending rate the robot saw: the fastest schedule its limit allows delivers n
    /// messages as a burst of 20 per window, the last burst `ceil(n / 20) - 1` windows
    /// after the first; this is `20 * (ceil(n / 20) - 1)` messages per minute between the
    /// first and the last accepted message (`None` for 20 messages or fewer).
    pub rate_per_minute: Option<f64>,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct NotifyLoadReport {
    /// Per robot, in channel order.
    pub robots: Vec<RobotReport>,
    /// Seconds spent posting every message (all answered 202).
    pub post_s: f64,
    /// The robots' allowed rate per minute.
    pub allowed_per_minute: f64,
}

fn robots_of(fake: &FakeRobots, n: usize) -> Vec<Robot> {
    (0..n)
        .map(|i| {
            let channel = format!("load-{i}");
            let bearer = format!("notify-load-bearer-{i:04}");
            if i % 2 == 0 {
                let name = format!("load-dingtalk-{i}");
                let secret = format!("SECload{i:061}");
                let url = fake.add_dingtalk_robot(&name, Some(&secret), &[]);
                Robot {
                    channel,
                    kind: RobotKind::DingTalk,
                    name,
                    url,
                    secret: Some(secret),
                    bearer,
                }
            } else {
                let name = format!("load-wecom-{i}");
                let url = fake.add_wecom_robot(&name);
                Robot {
                    channel,
                    kind: RobotKind::Wecom,
                    name,
                    url,
                    secret: None,
                    bearer,
                }
            }
        })
        .collect()
}

fn channels_toml(robots: &[Robot]) -> String {
    let mut out = String::new();
    for r in robots {
        let kind = match r.kind {
            RobotKind::DingTalk => "dingtalk_robot",
            RobotKind::Wecom => "wecom_robot",
        };
        out.push_str(&format!(
            "[[channels]]\nid = \"{}\"\nkind = \"{kind}\"\nurl = \"{}\"\ntoken = \"{}\"\n",
            r.channel, r.url, r.bearer
        ));
        if let Some(secret) = &r.secret {
            out.push_str(&format!("secret = \"{secret}\"\n"));
        }
    }
    out
}

/// The text of message `seq` of a channel: unique, so losses and duplicates show.
fn message_text(channel: &str, seq: usize) -> String {
    format!("notify-load {channel} #{seq}")
}

fn seq_of(content: &str, channel: &str) -> Option<usize> {
    content
        .strip_prefix(&format!("notify-load {channel} #"))?
        .parse()
        .ok()
}

/// Runs `parley sim notify-load`.
pub async fn run_notify_load(args: NotifyLoadArgs) -> anyhow::Result<()> {
    if args.robots == 0 || args.messages == 0 {
        bail!("--robots and --messages must be at least 1");
    }
    let fake = FakeRobots::start(args.robots_listen)
        .await
        .with_context(|| format!("starting the fake robots on {}", args.robots_listen))?;
    let robots = robots_of(&fake, args.robots);
    if args.print_config {
        print!("{}", channels_toml(&robots));
        fake.shutdown();
        return Ok(());
    }
    let http = reqwest::Client::new();
    let base = args.target.trim_end_matches('/').to_string();
    let start = Instant::now();
    let start_ms = shared::now_ms();
    // Each channel's messages are posted one after another (their order is the order the
    // robot must show); channels in parallel.
    let per_channel: Vec<usize> = (0..args.robots)
        .map(|i| args.messages / args.robots + usize::from(i < args.messages % args.robots))
        .collect();
    let robots = Arc::new(robots);
    let mut posting = tokio::task::JoinSet::new();
    for (i, &count) in per_channel.iter().enumerate() {
        let (http, base, robots) = (http.clone(), base.clone(), robots.clone());
        posting.spawn(async move {
            let r = &robots[i];
            for seq in 0..count {
                let resp = http
                    .post(format!("{base}/notify/{}", r.channel))
                    .bearer_auth(&r.bearer)
                    .json(&json!({"text": message_text(&r.channel, seq)}))
                    .send()
                    .await
                    .with_context(|| format!("posting to {base}/notify/{}", r.channel))?;
                let status = resp.status();
                if status.as_u16() != 202 {
                    let body = resp.text().await.unwrap_or_default();
                    bail!("/notify/{} answered {status}: {body}", r.channel);
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = posting.join_next().await {
        done.context("posting task")??;
    }
    let post_s = start.elapsed().as_secs_f64();
    eprintln!(
        "queued {} messages on {} channels in {post_s:.1} s; waiting for the robots",
        args.messages, args.robots
    );
    fake.wait_for(args.messages, Duration::from_secs(args.wait_secs))
        .await;
    // Listen a little longer for late duplicates.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = fake.received();
    let refused = fake.refused();
    fake.shutdown();
    let reports = robots
        .iter()
        .zip(&per_channel)
        .map(|(r, &queued)| {
            let mine: Vec<_> = received.iter().filter(|m| m.robot == r.name).collect();
            let seqs: Vec<usize> = mine
                .iter()
                .filter_map(|m| seq_of(&m.content, &r.channel))
                .collect();
            let distinct: HashSet<usize> = seqs.iter().copied().collect();
            let times: Vec<i64> = mine.iter().map(|m| m.received_at_ms).collect();
            let (first, last) = (
                times.iter().min().copied().unwrap_or(start_ms),
                times.iter().max().copied().unwrap_or(start_ms),
            );
            // The fastest schedule the limit allows sends a burst of N every window, the
            // last one (ceil(n / N) - 1) windows after the first.
            let windows = mine.len().div_ceil(MESSAGES_PER_WINDOW).saturating_sub(1);
            let rate_per_minute = (windows > 0 && last > first)
                .then(|| (windows * MESSAGES_PER_WINDOW) as f64 * 60_000.0 / (last - first) as f64);
            RobotReport {
                channel: r.channel.clone(),
                kind: r.kind,
                queued,
                delivered: distinct.len(),
                lost: (0..queued).filter(|s| !distinct.contains(s)).count(),
                duplicates: seqs.len() - distinct.len(),
                refused: refused.iter().filter(|x| x.robot == r.name).count(),
                in_order: seqs.windows(2).all(|w| w[0] < w[1]),
                max_in_any_60s: max_in_any_window(&received, &r.name, RATE_WINDOW),
                first_s: (first - start_ms) as f64 / 1000.0,
                last_s: (last - start_ms) as f64 / 1000.0,
                rate_per_minute,
            }
        })
        .collect();
    let report = NotifyLoadReport {
        robots: reports,
        post_s,
        allowed_per_minute: MESSAGES_PER_WINDOW as f64 * 60.0 / RATE_WINDOW.as_secs_f64(),
    };
    print_report(&report);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn print_report(r: &NotifyLoadReport) {
    for robot in &r.robots {
        let rate = robot
            .rate_per_minute
            .map(|v| {
                format!(
                    "{v:.2}/min ({:+.1}% of {:.0}/min)",
                    100.0 * (v / r.allowed_per_minute - 1.0),
                    r.allowed_per_minute
                )
            })
            .unwrap_or_else(|| "n/a".into());
        println!(
            "{} ({:?}): queued {} delivered {} lost {} duplicates {} refused {} in order {}; \
             max in any 60 s {}; first {:.1} s, last {:.1} s; rate {rate}",
            robot.channel,
            robot.kind,
            robot.queued,
            robot.delivered,
            robot.lost,
            robot.duplicates,
            robot.refused,
            if robot.in_order { "yes" } else { "NO" },
            robot.max_in_any_60s,
            robot.first_s,
            robot.last_s,
        );
    }
    println!("posted in {:.1} s to {} robots", r.post_s, r.robots.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_numbers_round_trip_and_stay_per_channel() {
        assert_eq!(seq_of(&message_text("load-1", 17), "load-1"), Some(17));
        assert_eq!(seq_of(&message_text("load-1", 17), "load-10"), None);
    }
}
