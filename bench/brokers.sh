#!/usr/bin/env bash
# Parley's distributed-mode figures (RabbitMQ + Redis), each beside its reference in the same run.
#   bench/brokers.sh        all figures (about 4 minutes)
#   SECTIONS="1" bench/brokers.sh   only the listed sections (1 ingress vs bare_publish,
#                                   2 ack latency, 3 end to end)
#   SHARDS=1 bench/brokers.sh       Parley's `[queue] shards` and the reference's queue count (default 8,
#                                   the config default)
# Pinning: Parley (ingress, workers) or the references on core 0; load generators, the CPU
# sampler and the fake model on core 1 — except in section 1, where wrk shares core 0 with
# the ingress (see there). RabbitMQ and Redis are the machine's shared servers
# and are NOT pinned: they run wherever the kernel puts them, and every figure says where
# that was (CPU per core of each process over the measured window) and how contended the
# machine was (pressure-stall shares, iowait, RabbitMQ WAL rollovers).
# Needs: RabbitMQ on 127.0.0.1:5672 (guest/guest) and Redis on 127.0.0.1:6379 (started here
# as .ci/run does if they are down, and left running), wrk, taskset, python3. Loopback only.
# Every queue (`{prefix}.jobs*`, `{prefix}.delay.*`, `{prefix}.dead`, the references' queues)
# and Redis key of the run carries the run id and is deleted after its section and again on
# exit, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
need_tools cargo wrk taskset python3 curl redis-cli rabbitmqctl
cargo build --release --quiet --bin parley --examples
BIN=$PWD/target/release/parley
BARE_PUBLISH=$PWD/target/release/examples/bare_publish
BARE_SERVER=$PWD/target/release/examples/bare_server
AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"
REDIS_URL="redis://127.0.0.1:6379/"
WORK=$(mktemp -d)
SECRET=bench-secret
RUN_ID="bench-$(date +%s)-$$"
PIDS=()

ensure_brokers
BEAM=$(pgrep -o -x beam.smp)
REDIS=$(pgrep -o -x redis-server)

BROKERS=1
trap cleanup_run EXIT

jobs_held() { # messages in the job queue(s) `$1.jobs*`, or "unknown". RabbitMQ refreshes a
  # quorum queue's counts every few seconds, so read until two readings 6 s apart agree.
  local last="" now
  for _ in 1 2 3 4 5; do
    if now=$(rmq list_queues -q --no-table-headers name messages 2>/dev/null |
      awk -v p="$1.jobs" 'index($1, p) == 1 {n += $2; seen = 1} END {if (seen) print n}') &&
      [ -n "$now" ]; then
      [ "$now" = "$last" ] && { echo "$now"; return; }
      last=$now
    fi
    sleep 6
  done
  echo "${last:-unknown}"
}

# CPU over a window, per process and per core: cpuwin.py DELAY SECS NAME=PID... > file.
# Every 100 ms it reads each thread's CPU ticks and the core it is on, so the unpinned
# RabbitMQ and Redis are attributed to the cores they actually ran on; "others" is what the
# cores spent beyond the listed processes (the machine's other tenants, the kernel, ...).
# Then the pressure-stall shares of the window (/proc/pressure: time some runnable task
# waited for a CPU, some task waited for I/O), the cores' iowait, and whether RabbitMQ
# rolled its quorum write-ahead log over (a burst of segment writing) during the window.

# Ack and reply rows of a `parley sim load --json` run: summary.py NAME FILE.
cat >"$WORK/summary.py" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
text = open(path).read()
lines = [l for l in text.splitlines() if l.startswith("{")]
if not lines:
    raise SystemExit(f"no JSON report in {path}:\n{text}")
r = json.loads(lines[-1])
a = r["ack_latency_ms"]
refused = f"  non-2xx {r['non_2xx']} errors {r['errors']} ({r['first_error']})" if r["non_2xx"] or r["errors"] else "  non-2xx 0"
print(f"   {name}: sent {r['sent']} ok {r['ok_2xx']} rate {r['achieved_rate']:.0f}/s  ack p50 {a['p50']:.2f} p90 {a['p90']:.2f} p99 {a['p99']:.2f} max {a['max']:.2f} ms{refused}")
rep = r.get("replies")
if rep:
    l = rep["latency_ms"]
    print(f"   {name}: replies {rep['replies']} missing {rep['missing']} duplicates {rep['duplicates']}  reply p50 {l['p50']:.0f} p90 {l['p90']:.0f} p99 {l['p99']:.0f} max {l['max']:.0f} ms")
PY
field() { # field FILE EXPR: a value of the last JSON report in FILE
  python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')][-1]; print($2)" "$1"
}

config() { # $1 file, $2 queue prefix and cache key prefix, $3 max_concurrency
  cat >"$1" <<TOML
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:18081"
[queue]
url = "$AMQP_URL"
prefix = "$2"
${SHARDS:+shards = $SHARDS}
[cache]
url = "$REDIS_URL"
key_prefix = "$2"
TOML
  bench_model_and_bot 1000000 "$3" >>"$1"
}
start_role() { # $1 role, $2 config, $3 listen port, $4 admin port; sets ROLE_PID
  RUST_LOG=warn taskset -c 0 "$BIN" --config "$2" "$1" --listen "127.0.0.1:$3" \
    --admin-listen "127.0.0.1:$4" >>"$WORK/parley.log" 2>&1 &
  ROLE_PID=$!
  PIDS+=("$ROLE_PID")
  wait_http "http://127.0.0.1:$4/readyz"
}
per_k() { python3 -c "print(f'{($2-$1)/$3:.3f}')"; } # cpu before, after, thousands of messages

TS=$(python3 -c 'import time; print(int(time.time()*1000))')
SIGN=$(python3 -c "import hmac,hashlib,base64; s=b'$SECRET'; print(base64.b64encode(hmac.new(s, b'$TS\n'+s, hashlib.sha256).digest()).decode())")
export TIMESTAMP=$TS SIGN

echo "== load before: $(uptime)"
echo "   RabbitMQ $(rmq version 2>/dev/null) (pid $BEAM) and Redis (pid $REDIS): unpinned, shared with the machine's other tenants"

SECTIONS=${SECTIONS:-1 2 3}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }

if want 1; then
# The reference publishes to as many quorum queues as Parley has shards (the same topology:
# RabbitMQ's cost per message grows with the number of queues a stream is spread over).
NQ=${SHARDS:-8}
echo "== 1. Ingress with RabbitMQ confirms vs bare_publish (1 process, confirmed persistent 600-byte publishes to $NQ quorum queue(s), Parley's shards), A B A B A B"
# Both sides of the comparison get the same core for everything that makes and publishes
# messages — bare_publish alone, or wrk and the ingress together — and leave the broker the
# same rest of the box. With wrk on core 1 instead, the broker (the bottleneck here) would
# lose the ~0.2 core wrk burns in the ingress rounds only, and spend ~30 % more CPU per
# message from the contention: that measured the load generator, not the ingress.
echo "   bare_publish: 64 in flight, 2 s warm-up + 10 s, core 0; parley ingress and wrk -t1 -c64 -d10s (2 s warm-up) together on core 0"
declare -a BARE_R PARLEY_R
for round in 1 2 3; do
  taskset -c 0 "$BARE_PUBLISH" --url "$AMQP_URL" --queue "$RUN_ID-bare-$round" --queues "$NQ" --in-flight 64 \
    --warmup-secs 2 --secs 10 >"$WORK/bare.out" 2>&1 &
  B=$!; PIDS+=("$B")
  taskset -c 1 python3 bench/cpuwin.py 2 10 bare_publish="$B" rabbitmq="$BEAM" redis="$REDIS" >"$WORK/cpu.out"
  wait "$B" || { cat "$WORK/bare.out" >&2; exit 1; }
  BARE_R+=("$(grep -o '[0-9]* msgs/s' "$WORK/bare.out" | awk '{print $1}')")
  echo "   round $round A: $(cat "$WORK/bare.out")"
  cat "$WORK/cpu.out"

  PREFIX="$RUN_ID-a$round"
  config "$WORK/a.toml" "$PREFIX" 64
  start_role ingress "$WORK/a.toml" 18080 18081; INGRESS=$ROLE_PID
  taskset -c 0 wrk -t1 -c64 -d2s -s bench/wrk_dingtalk.lua http://127.0.0.1:18080/dingtalk/bench >"$WORK/warm.out" 2>&1
  C0=$(cpu_s "$INGRESS"); Q0=$(cpu_s "$BEAM")
  taskset -c 0 wrk -t1 -c64 -d10s --latency -s bench/wrk_dingtalk.lua http://127.0.0.1:18080/dingtalk/bench >"$WORK/wrk.out" 2>&1 &
  W=$!
  taskset -c 1 python3 bench/cpuwin.py 0 10 ingress="$INGRESS" rabbitmq="$BEAM" redis="$REDIS" wrk="$W" >"$WORK/cpu.out"
  wait "$W"
  C1=$(cpu_s "$INGRESS"); Q1=$(cpu_s "$BEAM")
  RATE=$(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out")
  REQS=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
  NON2XX=$(awk '/Non-2xx/ {n += $NF} END {print n + 0}' "$WORK/warm.out" "$WORK/wrk.out")
  SOCKERR=$(grep -h "Socket errors" "$WORK/warm.out" "$WORK/wrk.out" || true)
  PARLEY_R+=("$RATE")
  echo "   round $round B: parley ingress $RATE req/s ($REQS requests, non-2xx $NON2XX${SOCKERR:+, $SOCKERR}), p50/p99 latency $(awk '/^ +50%/ {a=$2} /^ +99%/ {b=$2} END {print a"/"b}' "$WORK/wrk.out" 2>/dev/null)"
  echo "   ingress CPU $(per_k "$C0" "$C1" "$(python3 -c "print($REQS/1000)")") s, RabbitMQ CPU $(per_k "$Q0" "$Q1" "$(python3 -c "print($REQS/1000)")") s per 1,000 messages; ingress peak RSS $(rss_mb "$INGRESS") MB"
  cat "$WORK/cpu.out"
  stop "$INGRESS"
  # Every 2xx promised a queued job (the ingress queues a platform retry too; the worker drops it).
  ANSWERED=$(( $(awk '/requests in/ {n += $1} END {print n}' "$WORK/warm.out" "$WORK/wrk.out") - NON2XX ))
  HELD=$(jobs_held "$PREFIX")
  # wrk does not count answers still on their way when it stops: up to 64 more may be held.
  if [ "$HELD" = unknown ]; then VERDICT="could not count (rabbitmqctl failed)"
  elif [ "$HELD" -ge "$ANSWERED" ]; then VERDICT="none lost"
  else VERDICT="LOST $((ANSWERED - HELD))"; fi
  echo "   $PREFIX.jobs* hold $HELD messages for $ANSWERED 2xx answers to wrk's new messages (warm-up + run): $VERDICT"
  drop_queues "$PREFIX"
  drop_keys "$PREFIX"
done
# Beside it, the reference at 256 in flight (the box's ceiling for one publisher), once.
taskset -c 0 "$BARE_PUBLISH" --url "$AMQP_URL" --queue "$RUN_ID-bare-256" --queues "$NQ" --in-flight 256 \
  --warmup-secs 2 --secs 10 >"$WORK/bare256.out" 2>&1
echo "   reference: $(cat "$WORK/bare256.out")"
python3 - "${BARE_R[@]}" "${PARLEY_R[@]}" <<'PY'
import sys, statistics as st
v = list(map(float, sys.argv[1:])); n = len(v)//2
b, p = v[:n], v[n:]
print("   ratio per round (B / the A before it): " + ", ".join(f"{y / x:.2f}" for x, y in zip(b, p)))
print(f"   median: bare_publish (64 in flight) {st.median(b):.0f} msgs/s, parley ingress (c=64) {st.median(p):.0f} req/s, ratio {st.median(p)/st.median(b):.2f} (target >= 0.70)")
PY

fi

# The fake model (1 s per answer) and fake DingTalk OpenAPI, on core 1.
taskset -c 1 "$BIN" sim serve --dingtalk-listen 127.0.0.1:19101 --openai-listen 127.0.0.1:19200 \
  --app "bench-app:$SECRET" --api-key sk-bench --llm-latency-ms 1000 >"$WORK/sim.log" 2>&1 &
PIDS+=($!)
wait_http -H "Authorization: Bearer sk-bench" http://127.0.0.1:19200/v1/models

if want 2; then
echo "== 2. Ack latency at 1,000 req/s, open loop, 30 s: 1 ingress + 1 worker (both core 0), fake model at 1 s, replies awaited"
# References on core 0 first: the bare axum server under the same generator (the floor of
# generator + scheduling on this box) and bare_publish open loop at the same rate (the
# broker's own confirm latency, with no consumer on its queue).
taskset -c 0 "$BARE_SERVER" 127.0.0.1:18090 >/dev/null 2>&1 & B=$!; PIDS+=("$B"); sleep 0.3
taskset -c 1 "$BIN" sim load --target http://127.0.0.1:18090/dingtalk/bench --app-secret "$SECRET" --fake-listen 127.0.0.1:19100 \
  --robot-code bench-app --rate 1000 --duration-secs 30 --conversations 1000 --json >"$WORK/bare-lat.out" 2>&1 &
L=$!
taskset -c 1 python3 bench/cpuwin.py 0 30 bare_server="$B" rabbitmq="$BEAM" redis="$REDIS" load="$L" >"$WORK/cpu.out"
wait "$L" || { cat "$WORK/bare-lat.out" >&2; exit 1; }
stop "$B"
python3 "$WORK/summary.py" "bare server" "$WORK/bare-lat.out"
cat "$WORK/cpu.out"
taskset -c 0 "$BARE_PUBLISH" --url "$AMQP_URL" --queue "$RUN_ID-bare-open" --rate 1000 --secs 30 \
  >"$WORK/bare-open.out" 2>&1 &
B=$!; PIDS+=("$B")
taskset -c 1 python3 bench/cpuwin.py 0.3 30 bare_publish="$B" rabbitmq="$BEAM" redis="$REDIS" >"$WORK/cpu.out"
wait "$B" || { cat "$WORK/bare-open.out" >&2; exit 1; }
echo "   $(cat "$WORK/bare-open.out")"
cat "$WORK/cpu.out"
PREFIX="$RUN_ID-b"
config "$WORK/b.toml" "$PREFIX" 1500
start_role ingress "$WORK/b.toml" 18080 18081; INGRESS=$ROLE_PID
start_role worker "$WORK/b.toml" 18082 18083; WORKER=$ROLE_PID
CI0=$(cpu_s "$INGRESS"); CW0=$(cpu_s "$WORKER"); Q0=$(cpu_s "$BEAM")
taskset -c 1 "$BIN" sim load --target http://127.0.0.1:18080/dingtalk/bench --app-secret "$SECRET" --fake-listen 127.0.0.1:19100 \
  --robot-code bench-app --rate 1000 --duration-secs 30 --conversations 1000 --wait-replies-secs 15 \
  --json >"$WORK/lat.out" 2>&1 &
L=$!
# A probe in the same window: the broker's own confirm latency at 50 msgs/s on a queue of
# its own, so a broker stall (a quorum WAL rollover) shows as the broker's, beside Parley's.
taskset -c 1 "$BARE_PUBLISH" --url "$AMQP_URL" --queue "$RUN_ID-probe" --rate 50 --secs 30 \
  >"$WORK/probe.out" 2>&1 &
PROBE=$!; PIDS+=("$PROBE")
taskset -c 1 python3 bench/cpuwin.py 0 30 ingress="$INGRESS" worker="$WORKER" rabbitmq="$BEAM" redis="$REDIS" load="$L" >"$WORK/cpu.out"
wait "$L" || { cat "$WORK/lat.out" >&2; exit 1; }
wait "$PROBE" || { cat "$WORK/probe.out" >&2; exit 1; }
K=$(field "$WORK/lat.out" "r['sent']/1000")
echo "   CPU per 1,000 messages: ingress $(per_k "$CI0" "$(cpu_s "$INGRESS")" "$K") s, worker $(per_k "$CW0" "$(cpu_s "$WORKER")" "$K") s, RabbitMQ $(per_k "$Q0" "$(cpu_s "$BEAM")" "$K") s; peak RSS ingress $(rss_mb "$INGRESS") MB, worker $(rss_mb "$WORKER") MB"
cat "$WORK/cpu.out"
stop "$INGRESS"; stop "$WORKER"
python3 "$WORK/summary.py" "parley 1 ingress + 1 worker" "$WORK/lat.out"
echo "   broker probe in the same window: $(grep -o 'confirm latency.*' "$WORK/probe.out")"
echo "   ack p99 $(field "$WORK/lat.out" "f\"{r['ack_latency_ms']['p99']:.2f}\"") ms (target < 25 ms)"
drop_queues "$PREFIX"
drop_keys "$PREFIX"

fi

if want 3; then
echo "== 3. End to end: 2,000 conversations at once (2,000 callbacks in 1 s), 1 ingress + 2 workers (all core 0, max_concurrency 1500 each), fake model at 1 s"
PREFIX="$RUN_ID-c"
config "$WORK/c.toml" "$PREFIX" 1500
start_role ingress "$WORK/c.toml" 18080 18081; INGRESS=$ROLE_PID
start_role worker "$WORK/c.toml" 18082 18083; WORKER1=$ROLE_PID
start_role worker "$WORK/c.toml" 18084 18085; WORKER2=$ROLE_PID
taskset -c 1 "$BIN" sim load --target http://127.0.0.1:18080/dingtalk/bench --app-secret "$SECRET" --fake-listen 127.0.0.1:19100 \
  --robot-code bench-app --rate 2000 --duration-secs 1 --conversations 2000 --wait-replies-secs 15 \
  --json >"$WORK/burst.out" 2>&1 &
L=$!
taskset -c 1 python3 bench/cpuwin.py 0 5 ingress="$INGRESS" worker1="$WORKER1" worker2="$WORKER2" rabbitmq="$BEAM" redis="$REDIS" load="$L" >"$WORK/cpu.out"
wait "$L" || { cat "$WORK/burst.out" >&2; exit 1; }
echo "   peak RSS: ingress $(rss_mb "$INGRESS") MB, worker1 $(rss_mb "$WORKER1") MB, worker2 $(rss_mb "$WORKER2") MB"
cat "$WORK/cpu.out"
stop "$INGRESS"; stop "$WORKER1"; stop "$WORKER2"
python3 "$WORK/summary.py" "parley 1 ingress + 2 workers" "$WORK/burst.out"
python3 - "$WORK/burst.out" <<'PY'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]).read().splitlines() if l.startswith("{")][-1]
rep = r["replies"]; l = rep["latency_ms"]
ok = rep["missing"] == 0 and rep["duplicates"] == 0 and r["ok_2xx"] == r["sent"] and l["max"] <= 4000
print(f"   all {r['sent']} answered once within 4,000 ms: {'yes' if ok else 'NO'} (max {l['max']:.0f} ms, missing {rep['missing']}, duplicates {rep['duplicates']})")
PY
drop_queues "$PREFIX"
drop_keys "$PREFIX"
fi
echo "== load after: $(uptime)"
