#!/usr/bin/env bash
# Parley under chaos (issue 14): steady load while processes die and dependencies fail; no
# acknowledged message may be lost, none answered twice.
#   bench/chaos.sh                    both phases, 5 minutes of load each (about 15 minutes
#                                     after the build)
#   DURATION=60 bench/chaos.sh        shorter phases; the fault schedule scales with DURATION
#   PHASES="A" bench/chaos.sh         one phase only (A distributed, B embedded)
#   RATE=200 bench/chaos.sh           another load (messages/s, default 100)
#   SKIP="connections" bench/chaos.sh  without some faults, to find which one causes a loss or
#                                     a duplicate: workers, ingress, connections, redis, serve
#                                     (the shell's); model-429, model-stall, platform-fail,
#                                     platform-throttle (the driver's)
# `parley sim chaos-load` hosts the fake DingTalk (the bot's api_base, 127.0.0.1:19140) and the
# fake model (127.0.0.1:19240, 100 ms an answer), POSTs signed callbacks at RATE for DURATION
# seconds (one-to-one chats over 500 conversations; every tenth message's sessionWebhook has
# expired, so its answer goes through the OpenAPI robot send), sends a refused callback again
# with the same msgId as a platform retrying an unacknowledged callback would (after 1, 2, 4,
# 8, 8, … s, for up to 2 minutes), and plays the model and platform faults itself (durations at
# the default DURATION): a 429 storm (15 s), a stall (15 s; calls hang 30 s, beyond the 10 s
# call timeout), a platform outage (10 s, every send 503) and throttling (20 s; the OpenAPI at
# 1 QPS, about half the sends refused as throttled). This script plays the process faults on
# the same clock (every kill a SIGKILL):
#   A. 1 `parley ingress` + 2 `parley worker` on RabbitMQ (the machine's broker, queues named
#      after the run) and a Redis of the run's own (127.0.0.1:16390, appendonly, fsync always,
#      in the scratch directory): workers killed one at a time and both at once, the ingress
#      killed, the run's RabbitMQ connections closed (rabbitmqctl close_connection, twice;
#      other users' connections are left alone), Redis killed and restarted from its AOF,
#      later shut down cleanly and restarted.
#   B. `parley serve` with the embedded queue and cache in a data directory ([queue] path):
#      killed and restarted seven times, during the model's storm and stall, the platform's
#      outage and throttling, and in between.
# Each phase ends when every acknowledged message is answered or dead-lettered (at most DRAIN
# seconds, default 300) plus 30 s for late duplicates, and prints the table: sent,
# acknowledged, answered, lost (must be 0), duplicated (must be 0), dead-lettered with their
# reasons (phase A: `parley dlq list`; B: the server's `job dead-lettered` log lines); then
# both phases side by side. Exit status 1 when a phase lost or duplicated a message.
# Queue settings for the run: max_attempts 10, retry_delays_secs [1, 2, 5, 10, 20] (so a fault
# of 20 s is ridden out and a hopeless job is dead-lettered within minutes, not hours).
# Pinning: Parley on core 0; the driver and its fakes on core 1; RabbitMQ and Redis unpinned.
# Bounded: once the release binary is built, the script runs under `timeout` (HARD_TIMEOUT
# seconds, default 2 × (DURATION + DRAIN + 180)); every process it started is stopped on exit,
# the run's queues deleted, the Redis data and the data directory removed. The logs stay in the
# printed scratch directory: Parley's JSON lines (PARLEY_LOG, default info: each job's lines
# carry its id), the driver's output, every reply the fake recorded (replies-A.jsonl), the
# schedule as played (events-A.log); a lost or duplicated message is listed with the events
# that happened while it was in flight.
# Needs RabbitMQ on 127.0.0.1:5672 (guest/guest; started as .ci/run does if down), redis-server,
# rabbitmqctl, taskset, python3, curl, timeout, ss. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
PHASES=${PHASES:-A B}
DURATION=${DURATION:-300}
RATE=${RATE:-100}
DRAIN=${DRAIN:-300}
HARD_TIMEOUT=${HARD_TIMEOUT:-$((2 * (DURATION + DRAIN + 180)))}
source bench/lib.sh
if [ -z "${CHAOS_BOUNDED:-}" ]; then
  need_tools cargo taskset python3 curl redis-server redis-cli rabbitmqctl timeout ss
  cargo build --release --quiet --bin parley
  CHAOS_BOUNDED=1 exec timeout --foreground --kill-after=30 "$HARD_TIMEOUT" "$0" "$@"
fi
BIN=$PWD/target/release/parley
WORK=$(mktemp -d)
RUN_ID="bench-chaos-$(date +%s)-$$"
AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"
REDIS_PORT=16390
FAKE=127.0.0.1:19140 # the driver's fake DingTalk: the bot's api_base
MODEL=127.0.0.1:19240
APP=chaos-app
SECRET=chaos-secret
INGRESS_PORT=18480 # admin +1; workers 18482 and 18484 (admin +1); serve 18490 (admin +1)
PIDS=()
BROKERS=1
declare -A PID=()
FAILED=0

chaos_cleanup() {
  cleanup_run
  rm -rf "$WORK/redis" "$WORK/data"
  echo "logs: $WORK"
}
trap chaos_cleanup EXIT
trap 'echo "bench: stopped by a signal (HARD_TIMEOUT=$HARD_TIMEOUT s?)" >&2; exit 143' TERM
trap 'exit 130' INT
ensure_brokers
for port in 19140 19240 "$REDIS_PORT" 18480 18481 18482 18483 18484 18485 18490 18491; do
  if timeout 1 bash -c "</dev/tcp/127.0.0.1/$port" 2>/dev/null; then
    echo "bench: 127.0.0.1:$port is in use; stop what listens there first" >&2
    exit 1
  fi
done

# Whether the process fault NAME is switched off (SKIP="connections redis").
skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }
# Which of the driver's faults are played (all but those named in SKIP).
driver_faults() { # driver_faults KIND@FRACTION+FRACTION...
  local f kind
  for f in "$@"; do
    kind=${f%@*}
    skip "$kind" && continue
    echo "--fault"
    echo "$kind@$(secs "$(echo "${f#*@}" | cut -d+ -f1)")+$(secs "${f#*+}")"
  done
}
# Seconds since the driver's first message, and the events of the shell's schedule.
T0=0
now_s() { python3 -c "import time; print(f'{time.time() - $T0:.1f}')"; }
event() { echo "   t=$(now_s)s $*" | tee -a "$WORK/events-$PHASE.log"; }
# A sleep the TERM of the hard timeout interrupts (bash runs traps only between commands).
nap() {
  sleep "$1" &
  PIDS+=("$!")
  wait "$!"
}
# Sleeps until FRACTION of DURATION has passed since the driver's first message.
at() {
  nap "$(python3 -c "print(max(0.0, $T0 + $1 * $DURATION - __import__('time').time()))")"
}
# secs FRACTION: that share of DURATION in whole seconds (at least 1).
secs() { python3 -c "print(max(1, round($1 * $DURATION)))"; }

# start_role NAME ROLE CONFIG PORT: a Parley role on core 0, JSON logs appended to
# $WORK/NAME.log; waits up to 60 s for /readyz on PORT+1.
start_role() {
  local name=$1 role=$2 config=$3 port=$4
  RUST_LOG=${PARLEY_LOG:-info} taskset -c 0 "$BIN" --log-json --config "$config" "$role" \
    --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$((port + 1))" >>"$WORK/$name.log" 2>&1 &
  PID[$name]=$!
  PIDS+=("$!")
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$((port + 1))/readyz" >/dev/null 2>&1 && return 0
    kill -0 "${PID[$name]}" 2>/dev/null || { echo "   $name exited; its log:" >&2; tail -20 "$WORK/$name.log" >&2; return 1; }
    sleep 0.1
  done
  echo "   warning: $name not ready after 60 s" >&2
}
kill9() { # kill9 NAME: SIGKILL, reaped
  kill -KILL "${PID[$1]}" 2>/dev/null || true
  wait "${PID[$1]}" 2>/dev/null || true
}
# restart NAME ROLE CONFIG PORT AFTER: SIGKILL, AFTER seconds down, started again.
restart() {
  event "SIGKILL $1"
  kill9 "$1"
  nap "$5"
  start_role "$1" "$2" "$3" "$4"
  event "$1 up again (ready)"
}

start_redis() {
  mkdir -p "$WORK/redis"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$WORK/redis" --save "" \
    --appendonly yes --appendfsync always --daemonize no >>"$WORK/redis.log" 2>&1 &
  PID[redis]=$!
  PIDS+=("$!")
  for _ in $(seq 1 100); do
    [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && return 0
    sleep 0.1
  done
  echo "   warning: Redis not answering after 10 s" >&2
}
# The run's RabbitMQ connections (named "parley PREFIX" by Parley), closed by the broker one
# after another (rabbitmqctl takes about half a second each), each an event of its own.
close_connections() {
  local conns conn pid port owner
  mapfile -t conns < <(rmq list_connections -q --no-table-headers pid peer_port client_properties |
    grep -F "{\"connection_name\",\"parley $1\"}" | cut -f1,2)
  for conn in "${conns[@]}"; do
    pid=${conn%%$'\t'*}
    port=${conn##*$'\t'}
    owner=$(owner_of_port "$port")
    rmq close_connection "$pid" "bench/chaos.sh" >/dev/null || continue
    event "RabbitMQ connection of $owner closed"
  done
}
owner_of_port() { # the role (ingress, worker-1, …) whose connection to RabbitMQ has local port $1
  local pid name
  pid=$(ss -Htnp "sport = :$1 and dport = :5672" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
  for name in "${!PID[@]}"; do
    [ "${PID[$name]}" = "${pid:-none}" ] && { echo "$name"; return 0; }
  done
  echo "pid ${pid:-?}"
}

config() { # config FILE PHASE
  {
    echo "[server]"
    echo "shutdown_grace_secs = 5"
    echo "[queue]"
    echo "max_attempts = 10"
    echo "retry_delays_secs = [1, 2, 5, 10, 20]"
    if [ "$2" = A ]; then
      echo "url = \"$AMQP_URL\""
      echo "prefix = \"$RUN_ID-a\""
      echo "[cache]"
      echo "url = \"redis://127.0.0.1:$REDIS_PORT/\""
      echo "key_prefix = \"$RUN_ID-a\""
    else
      echo "path = \"$WORK/data\""
    fi
    cat <<TOML
[llm]
base_url = "http://$MODEL/v1"
api_key = "sk-chaos"
model = "chaos"
requests_per_minute = 60000
max_concurrency = 64
timeout_secs = 10
max_retries = 2
[history]
max_turns = 4
[[bots]]
id = "chaos"
platform = "dingtalk"
app_key = "$APP"
app_secret = "$SECRET"
api_base = "http://$FAKE"
TOML
  } >"$1"
}

# Phase B's dead letters, from the server's JSON log lines, as `parley dlq list` prints them.
cat >"$WORK/dead_from_log.py" <<'PY'
import json, sys
seen = {}
for line in open(sys.argv[1], errors="replace"):
    if '"job dead-lettered"' not in line:
        continue
    try:
        r = json.loads(line)
    except ValueError:
        continue
    f, span = r.get("fields", {}), r.get("span", {})
    if span.get("job"):
        seen[span["job"]] = f"{span['job']}\t{f.get('attempt', '?')} attempt(s)\t{r.get('timestamp', '')}\t{f.get('reason', '')}"
print("\n".join(seen.values()))
print(f"{len(seen)} dead letter(s)")
PY

# load PHASE [chaos-load options]: the driver on core 1, in the background (sets LOAD); returns
# once it is listening, before its first message (it waits for the ingress's /readyz).
load() {
  local phase=$1; shift
  taskset -c 1 "$BIN" sim chaos-load --app "$APP:$SECRET" --dingtalk-listen "$FAKE" \
    --openai-listen "$MODEL" --api-key sk-chaos --rate "$RATE" --duration-secs "$DURATION" \
    --drain-secs "$DRAIN" --settle-secs 30 --label "$phase" \
    --replies-out "$WORK/replies-$phase.jsonl" --json "$@" >"$WORK/load-$phase.out" 2>&1 &
  LOAD=$!
  PIDS+=("$LOAD")
  for _ in $(seq 1 100); do curl -s -o /dev/null "http://$FAKE/" && return 0; sleep 0.1; done
  echo "chaos-load did not start" >&2; cat "$WORK/load-$phase.out" >&2; return 1
}
# Waits for the driver's first message and sets T0 to it.
wait_started() {
  for _ in $(seq 1 1800); do
    local ms
    ms=$(sed -n 's/^chaos-load: started at \([0-9]*\) .*/\1/p' "$WORK/load-$PHASE.out")
    if [ -n "$ms" ]; then
      T0=$(python3 -c "print($ms / 1000)")
      return 0
    fi
    kill -0 "$LOAD" 2>/dev/null || break
    sleep 0.1
  done
  echo "chaos-load did not start sending" >&2; cat "$WORK/load-$PHASE.out" >&2; return 1
}
# Waits for the driver to finish (drain and settle included) and shows its table.
finish() {
  local phase=$1
  wait "$LOAD" || { cat "$WORK/load-$phase.out" >&2; exit 1; }
  echo "   driver's fault log:"
  { grep "chaos-load: t=.*fault" "$WORK/load-$phase.out" || echo "chaos-load: none"; } | sed 's/^chaos-load: /   /'
  sed -n '/^chaos run /,/^  model calls/p' "$WORK/load-$phase.out"
  python3 - "$WORK/load-$phase.out" "$WORK/events-$phase.log" <<'PY' || FAILED=1
import collections, json, re, sys
out, events_log = sys.argv[1], sys.argv[2]
r = [json.loads(l) for l in open(out) if l.startswith("{")][-1]
# The schedule as played: the shell's events and the driver's faults, seconds from the first message.
events = []
for l in open(events_log):
    m = re.match(r"\s*t=([\d.]+)s (.*)", l)
    if m:
        events.append((float(m.group(1)), m.group(2).strip()))
for l in open(out):
    m = re.match(r"chaos-load: t=\s*([\d.]+)s fault (\S+) on for (\d+) s", l)
    if m:
        events.append((float(m.group(1)), f"{m.group(2)} ({m.group(3)} s)"))
events.sort()
for what in ("lost", "duplicated"):
    traces = r[f"{what}_messages"]
    if not traces:
        continue
    # Each message with what happened while it was in flight: from 1 s before it was sent to 2 s
    # after its last answer (an event is logged once its command returned, and closing a
    # connection with rabbitmqctl takes about a second).
    by = collections.Counter()
    for t in traces:
        end = max(t["answered_at_s"], default=float("inf")) + 2
        seen = [e for at, e in events if t["sent_at_s"] - 1 <= at <= end and not any(
            w in e for w in ("up again", "first message", "last message"))]
        by["; ".join(seen) or "no event"] += 1
    print(f"   {what} (of the first {len(traces)} listed), by the events while they were in flight (from 1 s before the send to 2 s after the last answer):")
    for k, n in by.most_common():
        print(f"      {n:>4} × {k}")
ok = r["lost"] == 0 and r["duplicated"] == 0 and r["drained_after_ms"] is not None
print(f"   lost {r['lost']}, duplicated {r['duplicated']}, drained: {'yes' if r['drained_after_ms'] is not None else 'NO'}: {'met' if ok else 'MISSED'}")
sys.exit(0 if ok else 1)
PY
}

echo "== load before: $(uptime)"
echo "   $(nproc) cores; Parley on core 0, the driver (fakes included) on core 1; RabbitMQ $(rmq version 2>/dev/null) and Redis unpinned"
echo "   $RATE messages/s for $DURATION s per phase; scratch directory $WORK"

if [[ " $PHASES " == *" A "* ]]; then
  PHASE=A
  echo "== A. 1 ingress + 2 workers, RabbitMQ + Redis (appendonly, fsync always): SIGKILLs, closed connections, Redis restarts"
  config "$WORK/a.toml" A
  mapfile -t FAULTS < <(driver_faults model-429@0.13+0.05 model-stall@0.37+0.05 platform-fail@0.55+0.033 platform-throttle@0.70+0.067)
  start_redis
  load A --target "http://127.0.0.1:$INGRESS_PORT/dingtalk/chaos" --ready-url "http://127.0.0.1:$((INGRESS_PORT + 1))/readyz" \
    --dead-letters-cmd "'$BIN' --config '$WORK/a.toml' dlq list 2>/dev/null" \
    "${FAULTS[@]}"
  start_role ingress ingress "$WORK/a.toml" "$INGRESS_PORT"
  start_role worker-1 worker "$WORK/a.toml" $((INGRESS_PORT + 2))
  start_role worker-2 worker "$WORK/a.toml" $((INGRESS_PORT + 4))
  wait_started
  event "first message"
  at 0.07; skip workers || restart worker-1 worker "$WORK/a.toml" $((INGRESS_PORT + 2)) 2
  at 0.23; skip workers || restart worker-2 worker "$WORK/a.toml" $((INGRESS_PORT + 4)) 2
  at 0.30; skip connections || close_connections "$RUN_ID-a"
  at 0.47
  if ! skip redis; then
    event "SIGKILL redis"; kill9 redis; nap 2; start_redis; event "redis up again (AOF loaded)"
  fi
  at 0.63
  if ! skip workers; then
    event "SIGKILL worker-1 and worker-2"; kill9 worker-1; kill9 worker-2; nap 5
    start_role worker-1 worker "$WORK/a.toml" $((INGRESS_PORT + 2))
    start_role worker-2 worker "$WORK/a.toml" $((INGRESS_PORT + 4)); event "workers up again"
  fi
  at 0.80; skip ingress || restart ingress ingress "$WORK/a.toml" "$INGRESS_PORT" 1
  at 0.85; skip connections || close_connections "$RUN_ID-a"
  at 0.90
  if ! skip redis; then
    event "redis SHUTDOWN (clean), restarted"
    redis-cli -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || true
    wait "${PID[redis]}" 2>/dev/null || true
    start_redis; event "redis up again"
  fi
  at 1.0; event "last message; draining"
  finish A
  for name in ingress worker-1 worker-2; do stop "${PID[$name]}"; done
  stop "${PID[redis]}"
  rm -rf "$WORK/redis"
  drop_run "$RUN_ID-a"
fi

if [[ " $PHASES " == *" B "* ]]; then
  PHASE=B
  SERVE_PORT=18490
  echo "== B. parley serve, embedded queue and cache in a data directory: SIGKILLed and restarted seven times"
  config "$WORK/b.toml" B
  mapfile -t FAULTS < <(driver_faults model-429@0.13+0.05 model-stall@0.27+0.05 platform-fail@0.43+0.033 platform-throttle@0.57+0.067)
  load B --target "http://127.0.0.1:$SERVE_PORT/dingtalk/chaos" --ready-url "http://127.0.0.1:$((SERVE_PORT + 1))/readyz" \
    --dead-letters-cmd "python3 '$WORK/dead_from_log.py' '$WORK/serve.log'" \
    "${FAULTS[@]}"
  start_role serve serve "$WORK/b.toml" "$SERVE_PORT"
  wait_started
  event "first message"
  for f in 0.07 0.15 0.30 0.45 0.60 0.73 0.87; do
    at "$f"; skip serve || restart serve serve "$WORK/b.toml" "$SERVE_PORT" 1
  done
  at 1.0; event "last message; draining"
  finish B
  stop "${PID[serve]}"
  echo "   the data directory's dead letters, listed once the server is stopped (parley dlq list):"
  RUST_LOG=warn "$BIN" --config "$WORK/b.toml" dlq list 2>&1 | sed 's/^/      /' | tail -20
fi

echo "== summary"
python3 - "$WORK" $PHASES <<'PY'
import json, os, sys
work, phases = sys.argv[1], sys.argv[2:]
names = {"A": "A: ingress + 2 workers, RabbitMQ + Redis", "B": "B: parley serve, data directory"}
reps = {}
for p in phases:
    path = os.path.join(work, f"load-{p}.out")
    lines = [l for l in open(path) if l.startswith("{")]
    if lines:
        reps[p] = json.loads(lines[-1])
rows = [
    ("sent", lambda r: r["sent"]),
    ("acknowledged (2xx)", lambda r: r["acknowledged"]),
    ("refused at first, sent again", lambda r: r["refused_then_retried"]),
    ("never acknowledged", lambda r: r["never_acknowledged"]),
    ("answered", lambda r: r["answered"]),
    ("  by the model", lambda r: r["answered_by_model"]),
    ("  with an apology", lambda r: sum(r["answered_with_apology"].values())),
    ("lost (must be 0)", lambda r: r["lost"]),
    ("duplicated (must be 0)", lambda r: r["duplicated"]),
    ("dead-lettered", lambda r: r["dead_lettered"]),
]
w = max(len(n) for n, _ in rows)
print("   " + " " * w + "".join(f"  {p:>9}" for p in reps))
for name, get in rows:
    print("   " + name.ljust(w) + "".join(f"  {get(r):>9}" for r in reps.values()))
for p, r in reps.items():
    ap = ", ".join(f"{k} {v}" for k, v in r["answered_with_apology"].items()) or "none"
    refusals = ", ".join(f"{k} {v}" for k, v in r["refusals"].items()) or "none"
    print(f"   {names.get(p, p)}: apologies: {ap}; refused requests: {refusals}")
    for reason, n in r["dead_letter_reasons"].items():
        print(f"      dead-lettered {n} × {reason}")
PY
[ "$FAILED" = 0 ] || { echo "bench: a phase lost or duplicated messages, or did not drain" >&2; exit 1; }
