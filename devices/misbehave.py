"""Messages a broken or hostile device might send; the gateway must dead-letter each with its reason."""

from __future__ import annotations

import json

from devices.connect import mqtt_client
from devices.fleet import iso_now


def bad_messages(device_id: str, *, seq: int = 1) -> list[tuple[str, bytes, str]]:
    """(topic, payload, expected dead-letter reason) for each kind of bad input."""
    good = {"type": "temperature", "seq": seq, "ts": iso_now(), "site": "hq", "data": {"value": 20.5, "unit": "C"}}
    topic = f"devices/{device_id}/telemetry"

    def body(**changes: object) -> bytes:
        return json.dumps({**good, **changes}).encode()

    return [
        (topic, b'{"type": "temperature", "seq": ', "bad_json"),
        (topic, b"\xff\xfe not utf-8", "not_utf8"),
        (topic, body(data={"value": "hot", "unit": "C"}), "schema"),
        (topic, body(type="toaster"), "unknown_type"),
        (topic, body(device_id="someone-else"), "device_mismatch"),
        (topic, body(padding="x" * 20_000), "too_large"),
        (f"devices/{device_id}/state", body(), "channel_mismatch"),
        (f"devices/{device_id}/firmware", body(), "bad_topic"),
    ]


async def publish_bad(mqtt_url: str, device_id: str, *, seq: int = 1, password: str | None = None) -> list[str]:
    """Publish one of each bad message as `device_id` (logged in as it with `password`, else with the
    URL's credentials); returns the reasons expected, in order."""
    msgs = bad_messages(device_id, seq=seq)
    login = (device_id, password) if password is not None else None
    async with mqtt_client(mqtt_url, f"{device_id}-bad", login=login) as c:
        for topic, payload, _ in msgs:
            await c.publish(topic, payload, qos=1)
    return [reason for _, _, reason in msgs]
