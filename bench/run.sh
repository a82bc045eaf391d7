#!/usr/bin/env bash
# Parley's headline figures on this machine, each beside its reference in the same run.
#   bench/run.sh            all figures (about 4 minutes)
# Pinning: Parley or the reference server on core 0, load generators and fakes on core 1.
# Needs: wrk (apt-get install wrk), taskset, python3. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
need_tools cargo wrk taskset python3 curl
cargo build --release --quiet --bin parley --example bare_server
BIN=$PWD/target/release/parley
BARE=$PWD/target/release/examples/bare_server
WORK=$(mktemp -d)
SECRET=bench-secret
PIDS=()
trap cleanup_run EXIT

parley_usage() { # $1 pid, $2 its CPU seconds before the run, $3 thousands of messages in the run
  echo "   parley RSS peak $(rss_mb "$1") MB, CPU $(python3 -c "print(f'{($(cpu_s "$1")-$2)/$3:.3f}')") s per 1,000 messages (ingress + worker)"
}

# Ack rows of `parley sim load --json` runs: summary.py TARGET_LABEL NAME=FILE...; the last
# file's ack p99 is the one checked against the target.
cat >"$WORK/summary.py" <<'PY'
import json, sys
def last_json(path):
    for line in reversed(open(path).read().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no JSON report in {path}:\n" + open(path).read())
label, rows = sys.argv[1], [arg.split("=", 1) for arg in sys.argv[2:]]
width = max(len(name) for name, _ in rows)
reports = [(name, last_json(path)) for name, path in rows]
for name, r in reports:
    a = r["ack_latency_ms"]
    refused = f"  non-2xx {r['non_2xx']} errors {r['errors']}" if r["non_2xx"] or r["errors"] else ""
    print(f"   {name.ljust(width)} sent {r['sent']} ok {r['ok_2xx']} rate {r['achieved_rate']:.0f}/s  ack p50 {a['p50']:.2f} p90 {a['p90']:.2f} p99 {a['p99']:.2f} max {a['max']:.2f} ms{refused}")
for name, r in reports:
    rep = r.get("replies")
    if rep:
        l = rep["latency_ms"]
        dropped = f" dropped by the platform {rep['dropped_by_platform']}" if rep.get("dropped_by_platform") else ""
        print(f"   {name} replies {rep['replies']} missing {rep['missing']} duplicates {rep['duplicates']}{dropped}  reply p50 {l['p50']:.0f} p99 {l['p99']:.0f} max {l['max']:.0f} ms")
print(f"   {label} p99 {reports[-1][1]['ack_latency_ms']['p99']:.2f} ms (target < 10 ms)")
PY

# The fake model (1 s per answer), on core 1. The DingTalk the bot talks to (api_base 19100) is
# the load generator's own fake, so the sessionWebhooks it hands out share the bot's origin and
# every reply is counted; sim serve's DingTalk (19101) is unused.
taskset -c 1 "$BIN" sim serve --dingtalk-listen 127.0.0.1:19101 --openai-listen 127.0.0.1:19200 \
  --app "bench-app:$SECRET" --api-key sk-bench --llm-latency-ms 1000 >"$WORK/sim.log" 2>&1 &
PIDS+=($!)
wait_http -H "Authorization: Bearer sk-bench" http://127.0.0.1:19200/v1/models

config() { # $1 file, $2 requests_per_minute, $3 max_concurrency
  cat >"$1" <<TOML
[server]
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:18081"
[queue]
capacity = 2000000
TOML
  bench_model_and_bot "$2" "$3" >>"$1"
}
config "$WORK/full.toml" 1000000 2000
# Ingress-only: the worker is paced to one model call a minute, so jobs stay queued and
# the figure is the ingress path alone (verify, parse, enqueue, ack).
config "$WORK/ingress.toml" 1 1
# Section 4: the full pipeline plus a WeCom app (Tencent's sample keys) whose api_base is the
# load generator's in-process fake WeCom, so its replies are counted too.
CORP_ID=ww1436e0e65a779aee AGENT_ID=1000002 WECOM_FAKE=127.0.0.1:19300
WECOM_TOKEN=hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo WECOM_AES_KEY=6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt
config "$WORK/wecom.toml" 1000000 2000
cat >>"$WORK/wecom.toml" <<TOML
[[bots]]
id = "bench-wx"
platform = "wecom"
corp_id = "$CORP_ID"
corp_secret = "bench"
agent_id = $AGENT_ID
token = "$WECOM_TOKEN"
encoding_aes_key = "$WECOM_AES_KEY"
api_base = "http://$WECOM_FAKE"
# Above WeCom's default 2,000 calls a minute, so all 30,000 replies of the run go out.
api_per_minute = 1000000
TOML

PARLEY_PORT=18080 # parley serve; admin +1

TS=$(python3 -c 'import time; print(int(time.time()*1000))')
SIGN=$(python3 -c "import hmac,hashlib,base64,sys; s=b'$SECRET'; print(base64.b64encode(hmac.new(s, b'$TS\n'+s, hashlib.sha256).digest()).decode())")
export TIMESTAMP=$TS SIGN

wrk_rate() { # $1 url; prints requests/s
  taskset -c 1 wrk -t1 -c64 -d10s -s bench/wrk_dingtalk.lua "$1" >"$WORK/wrk.out" 2>&1
  grep -q "Non-2xx" "$WORK/wrk.out" && { echo "non-2xx answers:" >&2; cat "$WORK/wrk.out" >&2; }
  awk '/Requests\/sec/ {print $2}' "$WORK/wrk.out"
}

echo "== 1. Ingress throughput: Parley (embedded) vs a bare axum server, wrk -t1 -c64 -d10s, A B A B"
declare -a BARE_R PARLEY_R
for round in 1 2; do
  taskset -c 0 "$BARE" 127.0.0.1:18090 >/dev/null 2>&1 & B=$!; PIDS+=($B)
  sleep 0.3; taskset -c 1 wrk -t1 -c64 -d2s -s bench/wrk_dingtalk.lua http://127.0.0.1:18090/dingtalk/bench >/dev/null 2>&1
  BARE_R+=("$(wrk_rate http://127.0.0.1:18090/dingtalk/bench)"); stop $B
  start_parley serve "$WORK/ingress.toml"
  taskset -c 1 wrk -t1 -c64 -d2s -s bench/wrk_dingtalk.lua http://127.0.0.1:18080/dingtalk/bench >/dev/null 2>&1
  PARLEY_R+=("$(wrk_rate http://127.0.0.1:18080/dingtalk/bench)")
  echo "   round $round: bare ${BARE_R[-1]} req/s, parley ${PARLEY_R[-1]} req/s (parley peak RSS $(rss_mb $PARLEY) MB with ~$(python3 -c "print(int(${PARLEY_R[-1]}*12))") jobs queued)"
  stop $PARLEY
done
python3 - "${BARE_R[@]}" "${PARLEY_R[@]}" <<'PY'
import sys, statistics as st
v = list(map(float, sys.argv[1:])); n = len(v)//2
b, p = v[:n], v[n:]
print(f"   median: bare {st.median(b):.0f} req/s, parley {st.median(p):.0f} req/s, ratio {st.median(p)/st.median(b):.2f} (target >= 0.50)")
PY

echo "== 2. Ack latency at 1,000 req/s, open loop, 30 s, full pipeline (fake model at 1 s, replies awaited)"
taskset -c 0 "$BARE" 127.0.0.1:18090 >/dev/null 2>&1 & B=$!; PIDS+=($B); sleep 0.3
taskset -c 1 "$BIN" sim load --target http://127.0.0.1:18090/dingtalk/bench --app-secret "$SECRET" --fake-listen 127.0.0.1:19100 \
  --robot-code bench-app --rate 1000 --duration-secs 30 --conversations 1000 --json >"$WORK/bare-lat.out" 2>&1
stop $B
start_parley serve "$WORK/full.toml"
CPU0=$(cpu_s $PARLEY)
taskset -c 1 "$BIN" sim load --target http://127.0.0.1:18080/dingtalk/bench --app-secret "$SECRET" --fake-listen 127.0.0.1:19100 \
  --robot-code bench-app --rate 1000 --duration-secs 30 --conversations 1000 --wait-replies-secs 15 --json >"$WORK/parley-lat.out" 2>&1
parley_usage $PARLEY "$CPU0" 30
stop $PARLEY
python3 "$WORK/summary.py" "ack" "bare=$WORK/bare-lat.out" "parley=$WORK/parley-lat.out"

echo "== 3. Worker: 1,000 conversations at once (1,000 callbacks in 1 s), fake model at 1 s"
start_parley serve "$WORK/full.toml"
taskset -c 1 "$BIN" sim load --target http://127.0.0.1:18080/dingtalk/bench --app-secret "$SECRET" --fake-listen 127.0.0.1:19100 \
  --robot-code bench-app --rate 1000 --duration-secs 1 --conversations 1000 --wait-replies-secs 10 --json >"$WORK/burst.out" 2>&1
echo "   parley RSS peak $(rss_mb $PARLEY) MB (target < 150 MB)"
stop $PARLEY
python3 - "$WORK/burst.out" <<'PY'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]).read().splitlines() if l.startswith("{")][-1]
rep = r["replies"]; l = rep["latency_ms"]
print(f"   callbacks {r['sent']} acked {r['ok_2xx']}; replies {rep['replies']} missing {rep['missing']} duplicates {rep['duplicates']}")
print(f"   reply latency p50 {l['p50']:.0f} p99 {l['p99']:.0f} max {l['max']:.0f} ms (target: all within 3,000 ms)")
PY

echo "== 4. WeCom callback ack (verify + decrypt + parse + enqueue) at 1,000 req/s, open loop, 30 s, full pipeline (fake model at 1 s, replies awaited)"
# The generator encrypts and signs every body before its clock starts. 2,000 members keep each
# at 15 messages: WeCom (and its fake) silently drop beyond 30 a minute to one member.
WECOM_LOAD=(--platform wecom --corp-id "$CORP_ID" --agent-id "$AGENT_ID" --corp-secret bench
  --wecom-token "$WECOM_TOKEN" --encoding-aes-key "$WECOM_AES_KEY" --fake-listen "$WECOM_FAKE"
  --rate 1000 --duration-secs 30 --conversations 2000 --json)
# The bare server answers any POST to /dingtalk/{bot}: sent the same WeCom requests, it gives
# the generator's own floor for them.
taskset -c 0 "$BARE" 127.0.0.1:18090 >/dev/null 2>&1 & B=$!; PIDS+=($B); sleep 0.3
taskset -c 1 "$BIN" sim load --target http://127.0.0.1:18090/dingtalk/bench "${WECOM_LOAD[@]}" \
  >"$WORK/bare-wecom.out" 2>&1
stop $B
start_parley serve "$WORK/wecom.toml"
CPU0=$(cpu_s $PARLEY)
taskset -c 1 "$BIN" sim load --target http://127.0.0.1:18080/wecom/bench-wx "${WECOM_LOAD[@]}" \
  --wait-replies-secs 15 >"$WORK/parley-wecom.out" 2>&1
parley_usage $PARLEY "$CPU0" 30
stop $PARLEY
# Beside it, the DingTalk row of section 2 (same rate, same pipeline, measured minutes earlier).
python3 "$WORK/summary.py" "WeCom callback ack" "bare, WeCom requests=$WORK/bare-wecom.out" \
  "parley dingtalk (section 2)=$WORK/parley-lat.out" "parley wecom=$WORK/parley-wecom.out"
