"""The device simulators speak the contract, are reproducible, and produce faults that clear."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from devices.elevator import Elevator
from devices.fleet import FleetConfig, FleetStats, SimDevice, build_models
from devices.misbehave import bad_messages
from devices.sensors import SENSOR_TYPES, Sensor
from gateway.core.protocol import parse
from gateway.errors import PayloadError


def drive(elevator: Elevator, steps: int) -> list[dict[str, object]]:
    return [s for _ in range(steps) if (s := elevator.step()) is not None]


def test_same_seed_same_behaviour_different_seed_different() -> None:
    a = drive(Elevator("e", "hq", random.Random("1:e"), fault_rate=0.01), 500)
    b = drive(Elevator("e", "hq", random.Random("1:e"), fault_rate=0.01), 500)
    c = drive(Elevator("e", "hq", random.Random("2:e"), fault_rate=0.01), 500)
    assert a == b
    assert a != c


def test_elevator_states_are_valid_and_physically_plausible() -> None:
    e = Elevator("e", "hq", random.Random(5), fault_rate=0.02, maintenance_rate=0.005)
    states = drive(e, 3000)
    assert len(states) > 1000
    prev = None
    for s in states:
        assert 0 <= s["floor"] <= 12  # type: ignore[operator]
        assert 0 <= s["load_kg"] <= 1000  # type: ignore[operator]
        if s["direction"] != "idle":
            assert s["door"] == "closed", "never moves with the door open"
        if prev is not None:
            assert abs(s["floor"] - prev["floor"]) <= 1  # type: ignore[operator]
        prev = s
    faults = Counter(s["fault"] for s in states)
    assert {"DOOR_JAM", "STUCK", "OVERSPEED", "LEVELLING", "POWER"} <= set(faults)
    modes = {s["mode"] for s in states}
    assert modes == {"normal", "maintenance", "fault", "out_of_service"}


def test_forced_fault_starts_now_and_clears() -> None:
    e = Elevator("e", "hq", random.Random(1))
    e.force_fault("POWER", steps=3)
    assert e.state()["mode"] == "out_of_service"
    drive(e, 3)
    assert e.state()["fault"] is None
    assert e.state()["mode"] == "normal"


def test_sensor_readings_have_the_right_unit_and_excursions() -> None:
    for stype in SENSOR_TYPES:
        s = Sensor("s", "hq", stype, random.Random(3), fault_rate=0.05)
        values = [s.step() for _ in range(500)]
        assert {v["unit"] for v in values} == {
            {"temperature": "C", "vibration": "mm/s", "humidity": "%RH", "power": "W"}[stype]
        }
        nums = [float(v["value"]) for v in values]  # type: ignore[arg-type]
        assert max(nums) - min(nums) > 5, "fault excursions stand out from the noise"


def test_every_simulated_message_passes_the_gateway_protocol() -> None:
    cfg = FleetConfig(elevators=3, sensors=8, fault_rate=0.02, seq_start=0)
    stats = FleetStats()
    for model in build_models(cfg):
        dev = SimDevice(model, cfg, stats, 0)
        for _ in range(200):
            dev.next_message()
        seqs = []
        for topic, payload, qos, _ in dev.outbox:
            m = parse(topic, payload)
            assert qos == 1
            seqs.append(m.seq)
        assert seqs == list(range(1, len(seqs) + 1))


def test_misbehaving_messages_are_each_rejected_for_the_stated_reason() -> None:
    for topic, payload, reason in bad_messages("rogue"):
        with pytest.raises(PayloadError) as info:
            parse(topic, payload)
        assert info.value.reason == reason, (topic, payload[:60])


def test_status_payloads_are_json_with_online_flag() -> None:
    cfg = FleetConfig(elevators=1, sensors=0)
    dev = SimDevice(build_models(cfg)[0], cfg, FleetStats(), 0)
    assert json.loads(dev._status(online=False))["online"] is False
