#!/usr/bin/env bash
# Parley's DingTalk Stream-mode figures (issue 13).
#   bench/stream.sh                  all figures (about 3 minutes)
#   SECTIONS="1" bench/stream.sh     only the listed sections (1 frame -> ack at 500 messages/s,
#                                    2 disconnect -> new connection under load, 3 two ingresses
#                                    with every-connection delivery)
# `parley sim stream-load` plays DingTalk's Stream gateway (the bot's api_base,
# 127.0.0.1:19130): it waits for the ingresses' connections, pushes bot-message CALLBACK frames
# at a fixed rate (open loop), sends `disconnect` at the given seconds, and measures each frame
# from its send to its ack on the socket (Parley acks only after RabbitMQ confirmed the job).
# Answers come back on the fake's sessionWebhook; each message must be answered exactly once.
# Beside Parley's figure, the broker's own confirm latency in the same window (bare_publish at
# 50 msgs/s on a queue of its own), so a broker stall shows as the broker's.
# Pinning: Parley (ingresses + worker) on core 0; the generator, the fake model, the probe and
# the samplers on core 1. RabbitMQ and Redis are the machine's shared servers and are NOT pinned.
# Needs RabbitMQ on 127.0.0.1:5672 (guest/guest) and Redis on 127.0.0.1:6379 (started as
# .ci/run does if down, and left running), taskset, python3, curl, rabbitmqctl, redis-cli.
# Loopback only. The run's queues and Redis keys carry the run id and are deleted after each
# section and again on exit, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
SECTIONS=${SECTIONS:-1 2 3}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
need_tools cargo taskset python3 curl redis-cli rabbitmqctl
cargo build --release --quiet --bin parley --examples
BIN=$PWD/target/release/parley
BARE_PUBLISH=$PWD/target/release/examples/bare_publish
WORK=$(mktemp -d)
RUN_ID="bench-stream-$(date +%s)-$$"
AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"
REDIS_URL="redis://127.0.0.1:6379/"
FAKE=127.0.0.1:19130 # the generator's fake DingTalk: the bot's api_base
APP=stream-app
SECRET=stream-secret
MODEL_PORT=19230
PARLEY_PORT=18380 # ingress; admin +1; a second ingress 18384, the worker 18382 (admin +1)
PIDS=()
BROKERS=1
trap cleanup_run EXIT
ensure_brokers
BEAM=$(pgrep -o -x beam.smp)
REDIS=$(pgrep -o -x redis-server)

cat >"$WORK/report.py" <<'PY'
import json, sys
kind, path = sys.argv[1], sys.argv[2]
lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
if not lines:
    raise SystemExit(f"no JSON report in {path}:\n" + open(path).read())
r = json.loads(lines[-1])
p = r["ack_ms"]
print(f"   pushed {r['pushed']} at {r['push_rate_p50']}/s median; acked {r['acked']} ({r['acks']} acks, {r['error_acks']} not 200), re-pushed {r['repushes']}")
print(f"   frame -> ack: p50 {p['p50']:.2f} p90 {p['p90']:.2f} p99 {p['p99']:.2f} p99.9 {p['p999']:.2f} max {p['max']:.2f} ms")
print(f"   answered once {r['answered_once']}, lost {r['lost']}, duplicated {r['duplicated']}; connections opened during the run {r['connections_opened']}")
once = r["lost"] == 0 and r["duplicated"] == 0 and r["answered_once"] == r["pushed"]
if kind == "ack":
    ok = p["p99"] < 25 and r["push_rate_p50"] >= 490 and once
    print(f"   frame -> ack p99 {p['p99']:.2f} ms at {r['push_rate_p50']}/s (target < 25 ms at 500/s), every message answered once: {'met' if ok else 'MISSED'}")
elif kind == "reconnect":
    worst = max(r["reconnect_ms"]) if r["reconnect_ms"] else None
    ok = worst is not None and worst <= 2000 and once
    print(f"   disconnect -> a new connection receiving: {r['reconnect_ms']} ms (target <= 2,000 ms), every message answered once: {'met' if ok else 'MISSED'}")
else:
    print(f"   every message answered once with two copies delivered: {'met' if once else 'MISSED'}")
PY

# The fake model on core 1 (with an unused fake DingTalk of its own): immediate answers.
taskset -c 1 "$BIN" sim serve --dingtalk-listen 127.0.0.1:19131 --openai-listen "127.0.0.1:$MODEL_PORT" \
  --robots-listen 127.0.0.1:19331 --api-key sk-bench >"$WORK/sim.log" 2>&1 &
PIDS+=("$!")
wait_http -H "Authorization: Bearer sk-bench" "http://127.0.0.1:$MODEL_PORT/v1/models"

config() { # config FILE PREFIX
  cat >"$1" <<TOML
[server]
listen = "127.0.0.1:$PARLEY_PORT"
admin_listen = "127.0.0.1:$((PARLEY_PORT + 1))"
[queue]
url = "$AMQP_URL"
prefix = "$2"
[cache]
url = "$REDIS_URL"
key_prefix = "$2"
[llm]
base_url = "http://127.0.0.1:$MODEL_PORT/v1"
api_key = "sk-bench"
model = "bench"
requests_per_minute = 1000000
max_concurrency = 256
[[bots]]
id = "stream"
platform = "dingtalk"
app_key = "$APP"
app_secret = "$SECRET"
api_base = "http://$FAKE"
ingress = "stream"
TOML
}
# load OUT [stream-load options]: the generator on core 1, in the background; sets LOAD.
load() {
  local out=$1; shift
  taskset -c 1 "$BIN" sim stream-load --fake-listen "$FAKE" --app "$APP:$SECRET" --json "$@" >"$out" 2>&1 &
  LOAD=$!
  PIDS+=("$LOAD")
  for _ in $(seq 1 100); do curl -s -o /dev/null "http://$FAKE/" && return 0; sleep 0.1; done
  echo "stream-load did not start" >&2; cat "$out" >&2; return 1
}
probe() { # the broker's own confirm latency in the same window: probe QUEUE SECS
  taskset -c 1 "$BARE_PUBLISH" --url "$AMQP_URL" --queue "$1" --rate 50 --secs "$2" >"$WORK/probe.out" 2>&1 &
  PROBE=$!; PIDS+=("$PROBE")
}
acks() { # Parley's own ack histogram: p99 from parley_stream_ack_seconds of ADMIN ports
  for port in "$@"; do curl -sf "http://127.0.0.1:$port/metrics"; done | python3 -c '
import sys, collections
b = collections.Counter()
for l in sys.stdin:
    if l.startswith("parley_stream_ack_seconds_bucket"):
        le = l.split("le=\"")[1].split("\"")[0]; b[float(le)] += float(l.split()[-1])
tot = b[float("inf")]
if not tot: print("none"); sys.exit()
for le in sorted(b):
    if b[le] >= 0.99 * tot: print(f"p99 <= {le*1000:g} ms ({int(tot)} acks)"); break'
}

echo "== load before: $(uptime)"
echo "   $(nproc) cores; Parley on core 0, stream-load, the fake model and the probe on core 1"
echo "   RabbitMQ $(rmq version 2>/dev/null) (pid $BEAM) and Redis (pid $REDIS): unpinned"

if want 1; then
echo "== 1. Frame -> ack at 500 messages/s for 30 s: 1 ingress + 1 worker (core 0), RabbitMQ + Redis"
PREFIX="$RUN_ID-a"
config "$WORK/s1.toml" "$PREFIX"
load "$WORK/s1.out" --rate 500 --duration-secs 30 --connections 1
start_parley ingress "$WORK/s1.toml" "$PARLEY_PORT"; INGRESS=$PARLEY
start_parley worker "$WORK/s1.toml" $((PARLEY_PORT + 2)); WORKER=$PARLEY
sleep 1
probe "$PREFIX-probe" 30
taskset -c 1 python3 bench/cpuwin.py 5 20 ingress="$INGRESS" worker="$WORKER" rabbitmq="$BEAM" redis="$REDIS" load="$LOAD" >"$WORK/cpu.out"
finish_load "$WORK/s1.out"
wait "$PROBE" || { cat "$WORK/probe.out" >&2; exit 1; }
echo "   CPU in the window 5-25 s:"; cat "$WORK/cpu.out"
echo "   Parley's own ack histogram: $(acks $((PARLEY_PORT + 1)))"
echo "   broker probe in the same window: $(grep -o 'confirm latency.*' "$WORK/probe.out")"
echo "   peak RSS: ingress $(rss_mb "$INGRESS") MB, worker $(rss_mb "$WORKER") MB"
stop "$INGRESS"; stop "$WORKER"
python3 "$WORK/report.py" ack "$WORK/s1.out"
drop_run "$PREFIX"
fi

if want 2; then
echo "== 2. disconnect at 5, 10, 15, 20 and 25 s under 200 messages/s: 1 ingress + 1 worker"
PREFIX="$RUN_ID-d"
config "$WORK/s2.toml" "$PREFIX"
load "$WORK/s2.out" --rate 200 --duration-secs 30 --connections 1 \
  --disconnect-at 5 --disconnect-at 10 --disconnect-at 15 --disconnect-at 20 --disconnect-at 25
start_parley ingress "$WORK/s2.toml" "$PARLEY_PORT"; INGRESS=$PARLEY
start_parley worker "$WORK/s2.toml" $((PARLEY_PORT + 2)); WORKER=$PARLEY
finish_load "$WORK/s2.out"
stop "$INGRESS"; stop "$WORKER"
python3 "$WORK/report.py" reconnect "$WORK/s2.out"
drop_run "$PREFIX"
fi

if want 3; then
echo "== 3. Two ingresses, every message delivered to both connections, 200 messages/s for 20 s, a disconnect at 10 s"
PREFIX="$RUN_ID-e"
config "$WORK/s3.toml" "$PREFIX"
load "$WORK/s3.out" --rate 200 --duration-secs 20 --connections 2 --delivery every --disconnect-at 10
start_parley ingress "$WORK/s3.toml" "$PARLEY_PORT"; I1=$PARLEY
start_parley ingress "$WORK/s3.toml" $((PARLEY_PORT + 4)); I2=$PARLEY
start_parley worker "$WORK/s3.toml" $((PARLEY_PORT + 2)); WORKER=$PARLEY
finish_load "$WORK/s3.out"
stop "$I1"; stop "$I2"; stop "$WORKER"
python3 "$WORK/report.py" every "$WORK/s3.out"
drop_run "$PREFIX"
fi
