#!/usr/bin/env bash
# The deployment-wide model limit (issue 12): N workers sharing one [llm] requests_per_minute in
# Redis, with more questions than the limit serves, and the fake model's own arrival times as
# the measure.
#   bench/limits.sh                          2 and 4 workers × 600 and 6,000 a minute (about 6 minutes)
#   CASES="2:600 4:6000" bench/limits.sh     only the listed WORKERS:RPM cases
# Each case: 1 ingress + WORKERS workers (`parley ingress` / `parley worker`, core 0) on RabbitMQ +
# Redis with a fresh queue and key prefix; the fake model (`parley sim serve`, answers after
# 200 ms; core 1) records when each request arrived (GET /_sim/arrivals); `parley sim load`
# (core 1) sends 1.5 × the limit in callbacks for 70 s, each its own conversation, so a backlog
# builds from the first seconds. Reported: calls the model saw in the 60 s from 5 s after its
# first call, and the fewest and most in any 60 s window wholly inside the run, against the limit
# ±5 %; Redis script calls (EVALSHA, from INFO commandstats) per model call; the workers' CPU per
# model call. The cost of the shared step alone is `cargo run --release --example reserve_cost`
# (printed at the end). Needs taskset, python3, curl, redis-cli, rabbitmqctl; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
CASES=${CASES:-2:600 4:600 2:6000 4:6000}
need_tools cargo taskset python3 curl redis-cli rabbitmqctl
cargo build --release --quiet --bin parley --example reserve_cost
BIN=$PWD/target/release/parley
WORK=$(mktemp -d)
SECRET=bench-secret
RUN_ID="bench-limits-$(date +%s)-$$"
BROKERS=1
PIDS=()
FAKE_DT=127.0.0.1:19130 # sim load's fake DingTalk (sessionWebhooks)
MODEL_PORT=19230
PARLEY_PORT=18380       # ingress; admin +1; workers 18382.. (admin +1)
trap cleanup_run EXIT
ensure_brokers

cat >"$WORK/window.py" <<'PY'
import json, sys, urllib.request
port, limit, start_ms = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
req = urllib.request.Request(f"http://127.0.0.1:{port}/_sim/arrivals", headers={"Authorization": "Bearer sk-bench"})
at = sorted(t for t in json.load(urllib.request.urlopen(req, timeout=10))["received_at_ms"] if t >= start_ms)
if not at:
    raise SystemExit("the model saw no calls")
t0 = at[0]
main = sum(1 for t in at if t0 + 5000 <= t < t0 + 65000)
# Sliding 60 s windows starting at each arrival, wholly inside the run.
lo, hi, j = None, 0, 0
for i, t in enumerate(at):
    while j < len(at) and at[j] < t + 60000:
        j += 1
    n = j - i
    hi = max(hi, n)
    if t + 60000 <= at[-1]:
        lo = n if lo is None else min(lo, n)
ok = all(abs(n - limit) <= 0.05 * limit for n in (main, lo or 0, hi))
print(f"   model calls: {len(at)} in {(at[-1] - t0) / 1000:.1f} s; in the 60 s from 5 s after the first: {main} "
      f"({100 * (main - limit) / limit:+.1f} %); any 60 s window: fewest {lo}, most {hi} "
      f"(limit {limit}, ±5 % = {limit * 0.95:.0f}..{limit * 1.05:.0f}): {'met' if ok else 'MISSED'}")
print(f"CALLS={len(at)}")
PY
evalsha() { redis-cli -h 127.0.0.1 -p 6379 info commandstats | awk -F'[=,:]' '/^cmdstat_evalsha:/ {print $3}'; }
jobs_by() { # jobs_by ADMIN_PORT: the worker's finished jobs by outcome
  curl -sf "http://127.0.0.1:$1/metrics" | python3 -c '
import re, sys
n = {}
for m in re.finditer(r"^parley_jobs_total\{([^}]*)\} (\S+)$", sys.stdin.read(), re.M):
    k = dict(re.findall(r"(\w+)=\"([^\"]*)\"", m.group(1))).get("outcome", "?")
    n[k] = n.get(k, 0) + int(float(m.group(2)))
print(", ".join(f"{k} {v}" for k, v in sorted(n.items())) or "none")'
}

echo "== load before: $(uptime)"
for CASE in $CASES; do
  WORKERS=${CASE%%:*}; RPM=${CASE##*:}
  RATE=$((RPM * 3 / 2 / 60))
  PREFIX="$RUN_ID-$WORKERS-$RPM"
  echo "== $WORKERS workers sharing requests_per_minute = $RPM; $RATE callbacks/s for 70 s ($((RATE * 70)) questions)"
  taskset -c 1 "$BIN" sim serve --dingtalk-listen 127.0.0.1:19131 --openai-listen "127.0.0.1:$MODEL_PORT" \
    --robots-listen 127.0.0.1:19331 --api-key sk-bench --llm-latency-ms 200 >"$WORK/sim.log" 2>&1 &
  MODEL=$!; PIDS+=("$MODEL")
  wait_http -H "Authorization: Bearer sk-bench" "http://127.0.0.1:$MODEL_PORT/v1/models"
  cat >"$WORK/c.toml" <<TOML
[server]
listen = "127.0.0.1:$PARLEY_PORT"
admin_listen = "127.0.0.1:$((PARLEY_PORT + 1))"
[queue]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
prefix = "$PREFIX"
[cache]
url = "redis://127.0.0.1:6379/"
key_prefix = "$PREFIX"
[llm]
base_url = "http://127.0.0.1:$MODEL_PORT/v1"
api_key = "sk-bench"
model = "bench"
requests_per_minute = $RPM
[[bots]]
id = "bench"
platform = "dingtalk"
app_key = "bench-app"
app_secret = "$SECRET"
api_base = "http://$FAKE_DT"
TOML
  start_parley ingress "$WORK/c.toml" "$PARLEY_PORT"; INGRESS=$PARLEY
  WPIDS=(); WPORTS=()
  for i in $(seq 1 "$WORKERS"); do
    start_parley worker "$WORK/c.toml" $((PARLEY_PORT + 2 * i))
    WPIDS+=("$PARLEY"); WPORTS+=($((PARLEY_PORT + 2 * i + 1)))
  done
  START_MS=$(date +%s%3N)
  E0=$(evalsha); CPU0=0; for p in "${WPIDS[@]}"; do CPU0=$(python3 -c "print($CPU0 + $(cpu_s "$p"))"); done
  taskset -c 1 "$BIN" sim load --target "http://127.0.0.1:$PARLEY_PORT/dingtalk/bench" --app-secret "$SECRET" \
    --robot-code bench-app --fake-listen "$FAKE_DT" --rate "$RATE" --duration-secs 70 \
    --conversations $((RATE * 70)) --json >"$WORK/load.out" 2>&1 || { cat "$WORK/load.out" >&2; exit 1; }
  sleep 2
  E1=$(evalsha); CPU1=0; for p in "${WPIDS[@]}"; do CPU1=$(python3 -c "print($CPU1 + $(cpu_s "$p"))"); done
  python3 "$WORK/window.py" "$MODEL_PORT" "$RPM" "$START_MS" | tee "$WORK/win.out" | grep -v '^CALLS='
  CALLS=$(awk -F= '/^CALLS=/ {print $2}' "$WORK/win.out")
  python3 - "$WORK/load.out" <<PY
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")][-1]
a = r["ack_latency_ms"]
print(f"   callbacks: {r['sent']} sent, {r['ok_2xx']} acked (ack p99 {a['p99']:.2f} ms)")
print(f"   Redis scripts (EVALSHA) per model call: {($E1 - $E0) / $CALLS:.2f}; workers' CPU per model call: {($CPU1 - $CPU0) * 1e6 / $CALLS:.0f} µs (all of a job's work)")
PY
  for i in "${!WPIDS[@]}"; do echo "   worker $((i + 1)) jobs: $(jobs_by "${WPORTS[$i]}")"; done
  stop "$INGRESS"; for p in "${WPIDS[@]}"; do stop "$p"; done; stop "$MODEL"
  drop_run "$PREFIX"
done
echo "== the shared step alone (examples/reserve_cost.rs, on core 0):"
taskset -c 0 target/release/examples/reserve_cost 20000 | sed 's/^/   /'
echo "== load after: $(uptime)"
