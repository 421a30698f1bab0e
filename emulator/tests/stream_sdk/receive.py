"""Receives events from the emulator's Stream gateway with the official dingtalk-stream SDK,
unchanged: pointed at the emulator by the SDK's own endpoint setting (the environment variable
DINGTALK_OPENAPI_ENDPOINT, read when the SDK is imported). Prints one JSON line per event and
acknowledges it as the SDK does (code 200, the event's data)."""

import json
import os
import sys

import dingtalk_stream
from dingtalk_stream import AckMessage


class Printer(dingtalk_stream.EventHandler):
    async def process(self, event):
        line = {
            "eventId": event.headers.event_id,
            "eventType": event.headers.event_type,
            "eventCorpId": event.headers.event_corp_id,
            "data": event.data,
        }
        print(json.dumps(line), flush=True)
        return AckMessage.STATUS_OK, "OK"


def main():
    credential = dingtalk_stream.Credential(os.environ["APP_KEY"], os.environ["APP_SECRET"])
    client = dingtalk_stream.DingTalkStreamClient(credential)
    client.register_all_event_handler(Printer())
    print("started", file=sys.stderr, flush=True)
    client.start_forever()


if __name__ == "__main__":
    main()
