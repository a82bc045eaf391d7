#!/usr/bin/env bash
# Parley's WeCom AI bot (智能机器人) figures (issue 11).
#   bench/aibot.sh                   all figures (about 4 minutes)
#   SECTIONS="1 3" bench/aibot.sh    only the listed sections (1 refreshes at 1,000/s embedded,
#                                    2 the same distributed with Redis, 3 500 conversations at once
#                                    embedded, 4 the same distributed)
# `parley sim aibot-load` plays WeCom: it starts conversations at a fixed rate (open loop), each a
# message callback then stream refreshes every REFRESH ms until a reply says finish:true, checks
# every reply as WeCom does (signature over the callback's nonce, AES, receive id "", size), and
# serves the response_urls (the bot's api_base, 127.0.0.1:19410). Refresh latency is from the
# refresh callback's send to its whole reply (the generator's own encryption before and
# decryption after are outside it). A message is answered once when its stream finished and
# nothing was posted to its response_url, or it did not finish and one post arrived; the run
# waits 12 s after the last conversation for posts still due or late (Parley's worker waits up
# to 10 s for an unclaimed stream). The fake model streams every answer over ~10 s.
# Pinning: Parley (serve, or ingress + workers) on core 0; the generator, the fake model and the
# samplers on core 1. RabbitMQ and Redis (sections 2, 4) are the machine's shared servers and
# are NOT pinned. Needs taskset, python3, curl; sections 2 and 4 RabbitMQ on 127.0.0.1:5672
# (guest/guest) and Redis on 127.0.0.1:6379 (started as .ci/run does if down, and left running),
# redis-cli, rabbitmqctl. Loopback only. The distributed sections' queues and Redis keys carry
# the run id and are deleted after them and again on exit, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SECTIONS=${SECTIONS:-1 2 3 4}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
need_tools cargo taskset python3 curl
if want 2 || want 4; then need_tools redis-cli rabbitmqctl; fi
cargo build --release --quiet --bin parley
BIN=$PWD/target/release/parley
WORK=$(mktemp -d)
RUN_ID="bench-aibot-$(date +%s)-$$"
AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"
REDIS_URL="redis://127.0.0.1:6379/"
TOKEN=QDG6eK
AES_KEY=jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C
# Ports of this script only, so it can run beside the other bench scripts' defaults.
FAKE_AIBOT=127.0.0.1:19410 # the generator's response_url endpoint: the bot's api_base
MODEL_PORT=19220
PARLEY_PORT=18280          # ingress / serve; admin +1; workers 18282.. (admin +1)
PIDS=()
BROKERS=0

trap cleanup_run EXIT

# The rows of a `parley sim aibot-load --json` run: report.py KIND FILE; KIND is refresh (the
# p99 target) or burst (every one finished in the stream).
cat >"$WORK/report.py" <<'PY'
import json, sys
kind, path = sys.argv[1], sys.argv[2]
lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
if not lines:
    raise SystemExit(f"no JSON report in {path}:\n" + open(path).read())
r = json.loads(lines[-1])
def pct(p):
    return f"p50 {p['p50']:.2f} p90 {p['p90']:.2f} p99 {p['p99']:.2f} p99.9 {p['p999']:.2f} max {p['max']:.2f} ms"
err = f" (first: {r['first_error']})" if r["first_error"] else ""
print(f"   conversations {r['conversations']}: finished in the stream {r['finished_in_stream']}, via response_url {r['via_response_url']}, "
      f"lost {r['lost']}, duplicated {r['duplicated']}, wrong {r['wrong']}, errors {r['errors']}{err}")
print(f"   refreshes {r['refreshes']} (failed {r['failed_refreshes']}) at {r['refresh_rate_p50']}/s median, {r['refresh_rate_max']}/s peak over full seconds")
print(f"   refresh answered: {pct(r['refresh_ms'])}")
print(f"   message callback answered: {pct(r['message_reply_ms'])}")
print(f"   message -> finished stream: {pct(r['answer_ms'])}; refused posts {r['refused_posts']}, non-cumulative streams {r['not_cumulative']}")
once = r["lost"] == 0 and r["duplicated"] == 0 and r["wrong"] == 0 and r["errors"] == 0
if kind == "refresh":
    p99 = r["refresh_ms"]["p99"]
    ok = p99 < 10 and r["refresh_rate_p50"] >= 950 and r["failed_refreshes"] == 0 and once
    print(f"   refresh p99 {p99:.2f} ms at {r['refresh_rate_p50']}/s (target < 10 ms at 1,000/s), every message answered once: {'met' if ok else 'MISSED'}")
else:
    ok = once and r["finished_in_stream"] == r["conversations"]
    print(f"   all {r['conversations']} finished in the stream, 0 lost, 0 duplicated: {'met' if ok else 'MISSED'}")
PY

# The fake model on core 1 (with an unused fake DingTalk of its own): each answer streamed one
# character every 190 ms after 500 ms, ~10 s for "Echo: hello from the AI bot load generator (turn 1)".
start_model() {
  taskset -c 1 "$BIN" sim serve --dingtalk-listen 127.0.0.1:19121 --openai-listen "127.0.0.1:$MODEL_PORT" \
    --robots-listen 127.0.0.1:19321 --api-key sk-bench --llm-first-token-ms 500 --llm-chunk-chars 1 \
    --llm-chunk-interval-ms 190 >"$WORK/sim.log" 2>&1 &
  MODEL=$!
  PIDS+=("$MODEL")
  wait_http -H "Authorization: Bearer sk-bench" "http://127.0.0.1:$MODEL_PORT/v1/models"
}
# config FILE [EXTRA_TOML]: Parley's configuration, the AI bot's api_base the generator's fake.
config() {
  cat >"$1" <<TOML
[server]
listen = "127.0.0.1:$PARLEY_PORT"
admin_listen = "127.0.0.1:$((PARLEY_PORT + 1))"
${2:-}
[llm]
base_url = "http://127.0.0.1:$MODEL_PORT/v1"
api_key = "sk-bench"
model = "bench"
requests_per_minute = 1000000
max_concurrency = 1500
[[bots]]
id = "ai"
platform = "wecom_aibot"
token = "$TOKEN"
encoding_aes_key = "$AES_KEY"
api_base = "http://$FAKE_AIBOT"
TOML
}
brokers_toml() {
  printf '[queue]\nurl = "%s"\nprefix = "%s"\n[cache]\nurl = "%s"\nkey_prefix = "%s"\n' \
    "$AMQP_URL" "$1" "$REDIS_URL" "$1"
}
# load OUT [aibot-load options]: the generator on core 1, in the background; sets LOAD.
load() {
  local out=$1; shift
  taskset -c 1 "$BIN" sim aibot-load --target "http://127.0.0.1:$PARLEY_PORT/wecom/ai" --token "$TOKEN" \
    --encoding-aes-key "$AES_KEY" --fake-listen "$FAKE_AIBOT" --json "$@" >"$out" 2>&1 &
  LOAD=$!
}
# Parley's own view of the refreshes (parley_aibot_refreshes_total by outcome): refreshes ADMIN...
refreshes() {
  for port in "$@"; do curl -sf "http://127.0.0.1:$port/metrics"; done |
    awk -F'[{}"]' '/^parley_aibot_refreshes_total\{/ {n[$3] += $NF} END {for (k in n) printf "%s %d, ", k, n[k]}' |
    sed 's/, $//'
}
# Steady load: 50 new conversations a second for 40 s, each refreshed every 500 ms for its ~10 s
# answer: ~500 streams in flight and ~1,000 refreshes a second.
STEADY="--rate 50 --duration-secs 40 --refresh-interval-ms 500"
# A burst: 500 conversations within 1 s, refreshed at the fake's default cadence (1 s).
BURST="--rate 500 --duration-secs 1 --refresh-interval-ms 1000"

echo "== load before: $(uptime)"
echo "   $(nproc) cores; Parley on core 0, sim aibot-load and the fake model on core 1"
start_model

if want 1; then
echo "== 1. Refreshes at ~1,000/s, embedded (parley serve): 50 conversations/s for 40 s, refresh every 500 ms, ~10 s answers"
config "$WORK/s1.toml"
start_parley serve "$WORK/s1.toml"; P=$PARLEY
load "$WORK/s1.out" $STEADY
taskset -c 1 python3 bench/cpuwin.py 15 20 parley="$P" load="$LOAD" model="$MODEL" >"$WORK/cpu.out"
finish_load "$WORK/s1.out"
echo "   CPU in the steady window (15-35 s):"; cat "$WORK/cpu.out"
echo "   Parley's refresh outcomes: $(refreshes $((PARLEY_PORT + 1)))"
echo "   parley peak RSS $(rss_mb "$P") MB"
stop "$P"
python3 "$WORK/report.py" refresh "$WORK/s1.out"
fi

if want 2 || want 4; then
  BROKERS=1
  ensure_brokers
  BEAM=$(pgrep -o -x beam.smp)
  REDIS=$(pgrep -o -x redis-server)
  echo "== RabbitMQ $(rmq version 2>/dev/null) (pid $BEAM) and Redis (pid $REDIS): unpinned, shared with the machine's other tenants"
fi

if want 2; then
echo "== 2. Refreshes at ~1,000/s, distributed: 1 ingress + 1 worker (core 0), RabbitMQ + Redis; the ingress answers refreshes from Redis"
PREFIX="$RUN_ID-r"
config "$WORK/s2.toml" "$(brokers_toml "$PREFIX")"
start_parley ingress "$WORK/s2.toml" "$PARLEY_PORT"; INGRESS=$PARLEY
start_parley worker "$WORK/s2.toml" $((PARLEY_PORT + 2)); WORKER=$PARLEY
load "$WORK/s2.out" $STEADY
taskset -c 1 python3 bench/cpuwin.py 15 20 ingress="$INGRESS" worker="$WORKER" rabbitmq="$BEAM" redis="$REDIS" \
  load="$LOAD" model="$MODEL" >"$WORK/cpu.out"
finish_load "$WORK/s2.out"
echo "   CPU in the steady window (15-35 s):"; cat "$WORK/cpu.out"
echo "   Parley's refresh outcomes: $(refreshes $((PARLEY_PORT + 1)))"
echo "   peak RSS: ingress $(rss_mb "$INGRESS") MB, worker $(rss_mb "$WORKER") MB"
stop "$INGRESS"; stop "$WORKER"
python3 "$WORK/report.py" refresh "$WORK/s2.out"
drop_run "$PREFIX"
fi

if want 3; then
echo "== 3. 500 conversations at once (500 messages within 1 s), embedded, ~10 s streamed answers, refresh every 1 s"
config "$WORK/s3.toml"
start_parley serve "$WORK/s3.toml"; P=$PARLEY
load "$WORK/s3.out" $BURST
taskset -c 1 python3 bench/cpuwin.py 0 13 parley="$P" load="$LOAD" model="$MODEL" >"$WORK/cpu.out"
finish_load "$WORK/s3.out"
cat "$WORK/cpu.out"
echo "   Parley's refresh outcomes: $(refreshes $((PARLEY_PORT + 1)))"
echo "   parley peak RSS $(rss_mb "$P") MB"
stop "$P"
python3 "$WORK/report.py" burst "$WORK/s3.out"
fi

if want 4; then
echo "== 4. 500 conversations at once, distributed: 1 ingress + 2 workers (core 0), RabbitMQ + Redis"
PREFIX="$RUN_ID-b"
config "$WORK/s4.toml" "$(brokers_toml "$PREFIX")"
start_parley ingress "$WORK/s4.toml" "$PARLEY_PORT"; INGRESS=$PARLEY
start_parley worker "$WORK/s4.toml" $((PARLEY_PORT + 2)); WORKER1=$PARLEY
start_parley worker "$WORK/s4.toml" $((PARLEY_PORT + 4)); WORKER2=$PARLEY
load "$WORK/s4.out" $BURST
taskset -c 1 python3 bench/cpuwin.py 0 13 ingress="$INGRESS" worker1="$WORKER1" worker2="$WORKER2" \
  rabbitmq="$BEAM" redis="$REDIS" load="$LOAD" model="$MODEL" >"$WORK/cpu.out"
finish_load "$WORK/s4.out"
cat "$WORK/cpu.out"
echo "   Parley's refresh outcomes: $(refreshes $((PARLEY_PORT + 1)))"
echo "   peak RSS: ingress $(rss_mb "$INGRESS") MB, worker1 $(rss_mb "$WORKER1") MB, worker2 $(rss_mb "$WORKER2") MB"
stop "$INGRESS"; stop "$WORKER1"; stop "$WORKER2"
python3 "$WORK/report.py" burst "$WORK/s4.out"
drop_run "$PREFIX"
fi
stop "$MODEL"
echo "== load after: $(uptime)"
