#!/usr/bin/env bash
# Checks the fake DingTalk Stream gateway (sim/src/dingtalk/stream.rs) against the official
# Python SDK: starts sim/examples/stream_gateway.rs, runs stream_sdk.py against it and
# prints both sides. The gateway pushes MESSAGES messages, pings, sends `disconnect`, waits
# for the SDK to reconnect with a new ticket and pushes one more; it exits non-zero if any
# of its checks failed, the SDK script if it did not get every message.
#
# Usage: tests/sdk/stream_sdk.sh   (SDK_PYTHON: a python with `dingtalk-stream` installed;
# by default a virtualenv under the system temp directory, made with
# `pip install dingtalk-stream==0.24.3` the first time; MESSAGES defaults to 3)
set -uo pipefail
cd "$(dirname "$0")/../.."

python=${SDK_PYTHON:-}
if [ -z "$python" ]; then
  venv=${TMPDIR:-/tmp}/parley-stream-sdk-venv
  if ! "$venv/bin/python" -c 'import dingtalk_stream' 2>/dev/null; then
    echo "installing the official DingTalk Stream SDK (dingtalk-stream 0.24.3) into $venv"
    python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check \
      dingtalk-stream==0.24.3 || { echo "could not install dingtalk-stream" >&2; exit 1; }
  fi
  python=$venv/bin/python
fi
messages=${MESSAGES:-3}
app_key=sdk-app
app_secret=sdk-secret
gateway_bin=${CARGO_TARGET_DIR:-target}/debug/examples/stream_gateway

cargo build -q -p parley-sim --example stream_gateway || exit 1
logs=$(mktemp -d)
"$gateway_bin" "$app_key" "$app_secret" "$messages" >"$logs/gateway.log" 2>&1 &
gateway=$!
trap 'kill "$gateway" 2>/dev/null; rm -rf "$logs"' EXIT

base_url=
for _ in $(seq 100); do
  base_url=$(sed -n 's/^BASE_URL //p' "$logs/gateway.log")
  [ -n "$base_url" ] && break
  sleep 0.1
done
if [ -z "$base_url" ]; then
  echo "gateway did not start:" >&2
  cat "$logs/gateway.log" >&2
  exit 1
fi
echo "fake gateway at $base_url"

"$python" tests/sdk/stream_sdk.py "$base_url" "$app_key" "$app_secret" $((messages + 1)) 90 \
  >"$logs/sdk.log" 2>&1
sdk_rc=$?
wait "$gateway"
gateway_rc=$?

echo "---- gateway (sim/examples/stream_gateway.rs) ----"
cat "$logs/gateway.log"
echo "---- SDK (tests/sdk/stream_sdk.py) ----"
cat "$logs/sdk.log"
echo "----"
echo "gateway exit $gateway_rc, SDK exit $sdk_rc"
[ "$gateway_rc" -eq 0 ] && [ "$sdk_rc" -eq 0 ]
