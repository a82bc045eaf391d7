#!/usr/bin/env bash
# Issue #5's figure: with 3 group robots and 300 notifications queued at once, delivery runs
# at the robots' allowed rate (20 messages in any 60 s each), none lost.
#   bench/notify.sh            (about 5 minutes: 100 messages per robot take 4 windows)
#   ROBOTS=3 MESSAGES=300 WORKERS=2 bench/notify.sh
# Parley runs distributed — one `parley ingress` and WORKERS `parley worker`s on RabbitMQ and
# Redis — so the limit is the cluster-wide one every worker shares. `parley sim notify-load`
# runs the fake robots in-process (alternately signed DingTalk and WeCom), posts every
# message to `POST /notify/{channel}` at the start, and reports what each robot accepted:
# lost, duplicated, refused, order, the most in any 60 s, and the rate it saw. The rate
# compares with the fastest legal schedule: n messages go as a burst of 20 per window, the
# last burst ceil(n/20) - 1 windows after the first, so the rate is 20 * (ceil(n/20) - 1)
# messages per minute from the first to the last delivery. The work is rate-bound, not
# CPU-bound: nothing is pinned.
# Needs: RabbitMQ on 127.0.0.1:5672 and Redis on 127.0.0.1:6379 (started here as .ci/run
# does if they are down, and left running), python3. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
need_tools cargo python3 curl redis-cli rabbitmqctl
cargo build --release --quiet --bin parley
BIN=$PWD/target/release/parley
ROBOTS=${ROBOTS:-3}
MESSAGES=${MESSAGES:-300}
WORKERS=${WORKERS:-2}
WORK=$(mktemp -d)
RUN_ID="bench-notify-$(date +%s)-$$"
ROBOTS_LISTEN=127.0.0.1:19300
PIDS=()
ensure_brokers
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  drop_queues "$RUN_ID"
  drop_keys "$RUN_ID"
}
trap cleanup EXIT

cat >"$WORK/parley.toml" <<TOML
[queue]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
prefix = "$RUN_ID"
[cache]
url = "redis://127.0.0.1:6379/"
key_prefix = "$RUN_ID"
[llm]
base_url = "http://127.0.0.1:19200/v1"
api_key = "sk-unused"
model = "unused"
TOML
"$BIN" sim notify-load --robots-listen "$ROBOTS_LISTEN" --robots "$ROBOTS" --print-config >>"$WORK/parley.toml"

start_role() { # $1 role, $2 listen port, $3 admin port
  RUST_LOG=warn "$BIN" --config "$WORK/parley.toml" "$1" --listen "127.0.0.1:$2" \
    --admin-listen "127.0.0.1:$3" >>"$WORK/parley.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$3/readyz"
}
start_role ingress 18080 18081
for i in $(seq 1 "$WORKERS"); do start_role worker $((18080 + 2 * i)) $((18081 + 2 * i)); done

echo "== load before: $(uptime)"
echo "== $MESSAGES notifications to $ROBOTS robots at once; 1 ingress + $WORKERS workers on RabbitMQ + Redis"
"$BIN" sim notify-load --target http://127.0.0.1:18080 --robots-listen "$ROBOTS_LISTEN" \
  --robots "$ROBOTS" --messages "$MESSAGES" --json | tee "$WORK/report.out"
python3 - "$WORK/report.out" <<'PY'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")][-1]
allowed = r["allowed_per_minute"]
ok = True
for b in r["robots"]:
    rate = b["rate_per_minute"]
    good = (b["lost"] == 0 and b["duplicates"] == 0 and b["in_order"] and b["max_in_any_60s"] <= 20
            and rate is not None and abs(rate / 20 - 1) <= 0.05)
    ok &= good
    print(f"   {b['channel']}: {rate:.2f}/min = {100 * (rate / 20 - 1):+.1f}% of 20/min, "
          f"lost {b['lost']}, refused {b['refused']}: {'ok' if good else 'MISSED'}")
print(f"   every robot within 5% of 20/min, none lost or duplicated: {'yes' if ok else 'NO'}")
PY
echo "   Parley log lines at WARN or above: $(grep -ciE "error|warn" "$WORK/parley.log" || true)"
echo "== load after: $(uptime)"
