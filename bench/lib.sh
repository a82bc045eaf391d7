# Helpers shared by the bench/ scripts; sourced, not run. Loopback only.

# A failing command stops a benchmark (set -e); say which one instead of exiting silently.
trap 'echo "bench: stopped: \"$BASH_COMMAND\" failed (exit $?) at ${BASH_SOURCE[0]}:$LINENO" >&2' ERR

# Stops with how to install them when any of the named tools is missing: need_tools wrk taskset.
need_tools() {
  local missing=() t
  for t in "$@"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
  [ ${#missing[@]} = 0 ] && return 0
  echo "bench: missing tool(s): ${missing[*]}" >&2
  for t in "${missing[@]}"; do
    case $t in
      wrk) echo "  wrk: apt-get install wrk" >&2 ;;
      taskset) echo "  taskset: apt-get install util-linux" >&2 ;;
      python3) echo "  python3: apt-get install python3" >&2 ;;
      curl) echo "  curl: apt-get install curl" >&2 ;;
      redis-cli | redis-server) echo "  $t: apt-get install redis-server" >&2 ;;
      rabbitmqctl | rabbitmq-server) echo "  $t: apt-get install rabbitmq-server" >&2 ;;
      *) echo "  $t: install it and put it on PATH" >&2 ;;
    esac
  done
  exit 1
}

# Waits until URL answers 2xx (10 s): wait_http [curl options] URL.
wait_http() {
  for _ in $(seq 1 100); do curl -sf "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timeout waiting for ${*: -1}" >&2; return 1
}
rss_mb() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
cpu_s() { awk '{printf "%.2f", ($14+$15)/100}' "/proc/$1/stat"; }

# rabbitmqctl, never hanging the benchmark (it waits forever on a wedged broker).
rmq() { timeout 60 rabbitmqctl "$@" </dev/null; }
# Whether the broker answers the AMQP protocol header with a frame (connection.start): a
# broker out of file handles accepts TCP connections but never answers.
amqp_answers() {
  timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672 && printf "AMQP\0\0\11\1" >&3 && head -c 1 <&3 | grep -q .' 2>/dev/null
}
# RabbitMQ on 127.0.0.1:5672 and Redis on 127.0.0.1:6379, started as .ci/run does if they
# are down (and left running: they are shared with the tests).
ensure_brokers() {
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "starting redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  if ! timeout 5 bash -c '</dev/tcp/127.0.0.1/5672' 2>/dev/null; then
    echo "starting rabbitmq"
    rabbitmq-server -detached || true
    rmq -q await_startup --timeout 60 >/dev/null
  fi
  if ! amqp_answers; then
    echo "RabbitMQ on 127.0.0.1:5672 does not answer the AMQP handshake. If" >&2
    echo "  rabbitmqctl eval 'file_handle_cache:info([total_limit,total_used]).'" >&2
    echo "shows total_used at or above total_limit, it is out of file handles (too many queues for its" >&2
    echo "ulimit -n): delete stale queues or raise the limit, then run this again." >&2
    return 1
  fi
}
drop_queues() { # every queue whose name contains $1
  rmq list_queues -q --no-table-headers name 2>/dev/null | { grep -F -- "$1" || true; } |
    while read -r q; do rmq -q delete_queue "$q" >/dev/null 2>&1 || true; done
}
drop_keys() { # every Redis key starting with $1
  redis-cli -h 127.0.0.1 -p 6379 --scan --pattern "$1*" | xargs -r -n 500 redis-cli -h 127.0.0.1 -p 6379 del >/dev/null
}
queues_left() { # how many queues whose name contains $1 are left
  rmq list_queues -q --no-table-headers name 2>/dev/null | grep -cF -- "$1" || true
}
drop_run() { # a run's queues and keys ($1 in their names), warning about any queue left
  drop_queues "$1"
  drop_keys "$1"
  local left
  left=$(queues_left "$1")
  [ "${left:-0}" = 0 ] || echo "warning: $left queue(s) named *$1* are left in RabbitMQ" >&2
}

# The [llm] table and the DingTalk bot every benchmark configures, as TOML on stdout:
# bench_model_and_bot REQUESTS_PER_MINUTE MAX_CONCURRENCY. The fake model listens on
# 127.0.0.1:19200 (key sk-bench), the fake DingTalk on 127.0.0.1:19100 (app bench-app,
# secret $SECRET).
bench_model_and_bot() {
  cat <<TOML
[llm]
base_url = "http://127.0.0.1:19200/v1"
api_key = "sk-bench"
model = "bench"
requests_per_minute = $1
max_concurrency = $2
[[bots]]
id = "bench"
platform = "dingtalk"
app_key = "bench-app"
app_secret = "$SECRET"
api_base = "http://127.0.0.1:19100"
TOML
}

# Process bookkeeping for the scripts that start Parley. They set BIN (the release binary),
# WORK (a scratch directory), PARLEY_PORT, PIDS=() and, when they use the brokers, RUN_ID and
# BROKERS=1; then `trap cleanup_run EXIT`.
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
cleanup_run() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${BROKERS:-0}" = 1 ]; then drop_run "$RUN_ID"; fi
}
# start_parley ROLE CONFIG PORT: `parley serve` (PORT ignored; admin on PARLEY_PORT+1) or a role on
# PORT (admin PORT+1), on core 0, logging to $WORK/parley.log; waits until ready; sets PARLEY.
# `parley serve` starts in a fresh working directory under $WORK, so its data directory (the
# default `[queue] path`, parley-data) holds nothing from an earlier section. CONFIG must be
# an absolute path.
start_parley() {
  if [ "$1" = serve ]; then
    local dir; dir=$(mktemp -d -p "$WORK" serve.XXXX)
    (cd "$dir" && RUST_LOG=warn exec taskset -c 0 "$BIN" --config "$2" serve >>"$WORK/parley.log" 2>&1) &
    PARLEY=$!; PIDS+=("$PARLEY")
    wait_http "http://127.0.0.1:$((PARLEY_PORT + 1))/readyz"
    parley_alive
  else
    RUST_LOG=warn taskset -c 0 "$BIN" --config "$2" "$1" --listen "127.0.0.1:$3" \
      --admin-listen "127.0.0.1:$(($3 + 1))" >>"$WORK/parley.log" 2>&1 &
    PARLEY=$!; PIDS+=("$PARLEY")
    wait_http "http://127.0.0.1:$(($3 + 1))/readyz"
    parley_alive
  fi
}
# Stops the benchmark when the Parley just started has exited (another process on its ports
# would otherwise answer its /readyz).
parley_alive() {
  sleep 0.2
  kill -0 "$PARLEY" 2>/dev/null && return 0
  echo "bench: parley exited at start:" >&2; tail -5 "$WORK/parley.log" >&2; exit 1
}
# finish_load OUT: waits for the background generator LOAD; on failure shows its output and stops.
finish_load() { wait "$LOAD" || { cat "$1" >&2; exit 1; }; }
