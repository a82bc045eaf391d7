#!/usr/bin/env bash
# The public listener under slow clients (issue 14): valid callbacks at 200/s for 20 s while
# 2,000 sockets misbehave on purpose — 700 connected and silent, 700 sending one header byte
# every 2 s and never finishing, 600 sending full, validly signed headers (Content-Length 2,000)
# and then one body byte every 2 s —
# beside the same load without them. Prints the callbacks' ack latency both ways, and how many
# of the 2,000 the server had closed 5, 15 and 25 s after they connected (header and body
# timeouts 10 s, the defaults).
#   bench/slowclients.sh      (about 2 minutes)
# Pinning: Parley (`parley serve`, embedded) on core 0; the load generator, the slow clients
# and the fake model on core 1. Needs taskset, python3, curl. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
need_tools cargo taskset python3 curl
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --quiet --bin parley
BIN=$PWD/target/release/parley
WORK=$(mktemp -d)
SECRET=bench-secret
PARLEY_PORT=18580
PIDS=()
trap cleanup_run EXIT

taskset -c 1 "$BIN" sim serve --dingtalk-listen 127.0.0.1:19101 --openai-listen 127.0.0.1:19200 \
  --robots-listen 127.0.0.1:19300 --app "bench-app:$SECRET" --api-key sk-bench >"$WORK/sim.log" 2>&1 &
PIDS+=($!)
wait_http -H "Authorization: Bearer sk-bench" http://127.0.0.1:19200/v1/models
{
  printf '[server]\nlisten = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\n' "$PARLEY_PORT" $((PARLEY_PORT + 1))
  bench_model_and_bot 1000000 256
} >"$WORK/p.toml"
start_parley serve "$WORK/p.toml"; P=$PARLEY

load() { # load OUT: 200 signed callbacks a second for 20 s, replies awaited
  taskset -c 1 "$BIN" sim load --target "http://127.0.0.1:$PARLEY_PORT/dingtalk/bench" --app-secret "$SECRET" --fake-listen 127.0.0.1:19100 \
    --robot-code bench-app --rate 200 --duration-secs 20 --conversations 1000 --wait-replies-secs 15 \
    --json >"$1" 2>&1
}
summary() { # summary LABEL OUT
  python3 - "$1" "$2" <<'PY'
import json, sys
label, path = sys.argv[1], sys.argv[2]
r = json.loads([l for l in open(path) if l.startswith("{")][-1])
a = r["ack_latency_ms"]
rep = r.get("replies") or {}
non2xx = sum(r["non_2xx"].values())
print(f"   {label}: sent {r['sent']} at {r['achieved_rate']:.0f}/s, 2xx {r['ok_2xx']}, non-2xx {non2xx}, errors {r['errors']}; ack p50 {a['p50']:.2f} p90 {a['p90']:.2f} p99 {a['p99']:.2f} max {a['max']:.2f} ms; replies {rep.get('replies', '?')} missing {rep.get('missing', '?')} duplicated {rep.get('duplicates', '?')}")
PY
}

echo "== load before: $(uptime)"
echo "== 1. reference: the same callbacks with no slow clients"
load "$WORK/ref.out"
summary "no slow clients" "$WORK/ref.out"

echo "== 2. the same callbacks with 2,000 slow or idle sockets"
cat >"$WORK/slow.py" <<'PY'
import base64, hashlib, hmac, socket, sys, time
port, n_idle, n_head, n_body, secs = map(int, sys.argv[1:6])
secret = sys.argv[6].encode()
# A valid signature: the body clients pass the signature check and are cut by the body timeout.
ts = str(int(time.time() * 1000)).encode()
sign = base64.b64encode(hmac.new(secret, ts + b"\n" + secret, hashlib.sha256).digest())
head = b"POST /dingtalk/bench HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntimestamp: " + ts + b"\r\nsign: " + sign + b"\r\ncontent-length: 2000\r\n\r\n"
socks = []
def dial():
    s = socket.create_connection(("127.0.0.1", port)); s.setblocking(False); return s
t0 = time.time()
for kind, n in (("idle", n_idle), ("head", n_head), ("body", n_body)):
    for _ in range(n):
        s = dial()
        if kind == "body":
            s.sendall(head)
        socks.append([kind, s, 0, True])
print(f"opened {len(socks)} sockets in {time.time()-t0:.1f} s", flush=True)
marks = {5, 15, 25}
start = time.time()
while time.time() - start < secs:
    el = int(time.time() - start)
    for e in socks:
        kind, s, sent, open_ = e
        if not open_:
            continue
        try:
            if s.recv(4096) == b"":
                e[3] = False; continue
        except BlockingIOError:
            pass
        except OSError:
            e[3] = False; continue
        try:
            if kind == "head" and sent < len(head) and el % 2 == 0:
                s.send(head[sent:sent+1]); e[2] += 1
            elif kind == "body" and el % 2 == 0:
                s.send(b" ")
        except OSError:
            e[3] = False
    if el in marks:
        marks.discard(el)
        by = {}
        for kind, _, _, o in socks:
            by.setdefault(kind, [0, 0])[0 if o else 1] += 1
        print(f"after {el:2d} s: " + ", ".join(f"{k} {v[1]} closed / {v[0]} open" for k, v in by.items()), flush=True)
    time.sleep(0.5)
PY
taskset -c 1 python3 "$WORK/slow.py" "$PARLEY_PORT" 700 700 600 30 "$SECRET" >"$WORK/slow.out" 2>&1 &
SLOW=$!; PIDS+=("$SLOW")
sleep 3
open_now=$(curl -sf "http://127.0.0.1:$((PARLEY_PORT + 1))/metrics" | awk '/^parley_connections_open / {print $2}')
echo "   Parley holds $open_now connections as the load starts"
load "$WORK/slow-load.out"
wait "$SLOW" || true
summary "with 2,000 slow clients" "$WORK/slow-load.out"
sed 's/^/   slow clients: /' "$WORK/slow.out"
shed=$(curl -sf "http://127.0.0.1:$((PARLEY_PORT + 1))/metrics" | awk '/^parley_connections_shed_total/ {print $2}')
echo "   shed at the cap: ${shed:-0} (cap 10,000: none expected)"
echo "   parley peak RSS $(rss_mb "$P") MB"
python3 - "$WORK/ref.out" "$WORK/slow-load.out" <<'PY'
import json, sys
p = [json.loads([l for l in open(f) if l.startswith("{")][-1])["ack_latency_ms"]["p99"] for f in sys.argv[1:]]
print(f"   ack p99 {p[1]:.2f} ms with the slow clients vs {p[0]:.2f} ms without (ratio {p[1]/max(p[0],0.001):.2f}); target < 50 ms: {'met' if p[1] < 50 else 'MISSED'}")
PY
