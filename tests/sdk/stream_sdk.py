#!/usr/bin/env python3
"""Runs the official DingTalk Stream SDK (PyPI `dingtalk-stream`) against a Stream gateway,
normally the fake of sim/src/dingtalk/stream.rs (see stream_sdk.sh next to this file).

Usage: stream_sdk.py BASE_URL APP_KEY APP_SECRET [MESSAGES [TIMEOUT_SECS]]

Points the SDK's `connections/open` at BASE_URL, registers a ChatbotHandler for bot messages
that prints each message's text and acks it with AckMessage.STATUS_OK, 'OK', runs the
(blocking) client in a thread, and exits 0 once MESSAGES messages (default 4) arrived, or
1 after TIMEOUT_SECS (default 90). Everything else (pings, `disconnect`, reconnecting with a
new ticket) is the SDK's own behaviour.
"""

import os
import sys
import threading
import time

import dingtalk_stream
from dingtalk_stream import AckMessage


def main() -> int:
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    base_url, app_key, app_secret = sys.argv[1:4]
    want = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 90.0

    dingtalk_stream.DingTalkStreamClient.OPEN_CONNECTION_API = (
        base_url.rstrip('/') + '/v1.0/gateway/connections/open')

    received = []
    done = threading.Event()

    class Handler(dingtalk_stream.ChatbotHandler):
        async def process(self, callback: dingtalk_stream.CallbackMessage):
            incoming = dingtalk_stream.ChatbotMessage.from_dict(callback.data)
            text = incoming.text.content.strip() if incoming.text else ''
            received.append(incoming.message_id)
            print(f'sdk: message {len(received)}: {text!r} msgId={incoming.message_id} '
                  f'messageId={callback.headers.message_id} '
                  f'connectionId={callback.headers.connection_id}', flush=True)
            if len(received) >= want:
                done.set()
            return AckMessage.STATUS_OK, 'OK'

    client = dingtalk_stream.DingTalkStreamClient(
        dingtalk_stream.Credential(app_key, app_secret))
    client.register_callback_handler(dingtalk_stream.ChatbotMessage.TOPIC, Handler())
    threading.Thread(target=client.start_forever, daemon=True).start()

    if not done.wait(timeout):
        print(f'sdk: timed out after {timeout}s with {len(received)} of {want} messages',
              flush=True)
        return 1
    # The ack of the last message is sent after process() returns: let it go out.
    time.sleep(1)
    print(f'sdk: received {len(received)} messages ({len(set(received))} distinct msgIds)',
          flush=True)
    return 0


if __name__ == '__main__':
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The SDK's client thread never returns; leave without waiting for it.
    os._exit(code)
