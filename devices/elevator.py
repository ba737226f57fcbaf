"""An elevator car as a discrete state machine: hall calls, trips, door cycles, load, modes, faults.

Each `step()` advances the car by one phase and returns its new full state when something changed
(what the device publishes on `devices/{id}/state`), or None. Pure apart from its own seeded RNG.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from devices.faults import ANY_TIME_FAULTS, ARRIVAL_FAULTS, DOOR_FAULTS, MOVING_FAULTS, ActiveFault, maybe_start

CAPACITY_KG = 1000.0
PASSENGER_KG = 75.0
DOOR_OPEN_STEPS = 2


@dataclass(slots=True)
class Elevator:
    """One car serving floors `lowest..highest`."""

    device_id: str
    site: str
    rng: random.Random
    lowest: int = 0
    highest: int = 12
    fault_rate: float = 0.0
    call_rate: float = 0.5
    maintenance_rate: float = 0.0
    floor: int = 0
    direction: str = "idle"
    door: str = "closed"
    mode: str = "normal"
    load_kg: float = 0.0
    fault: ActiveFault | None = None
    calls: list[int] = field(default_factory=list)
    target: int | None = None
    hold: int = 0
    maintenance_left: int = 0
    published: dict[str, Any] | None = None  # the state last returned by step (what the broker has)

    def state(self) -> dict[str, Any]:
        """The `data` object of a state message."""
        return {
            "floor": self.floor,
            "direction": self.direction,
            "door": self.door,
            "mode": self.mode,
            "load_kg": round(self.load_kg, 1),
            "fault": self.fault.code if self.fault else None,
        }

    def step(self) -> dict[str, Any] | None:
        """Advance one phase; the new state if it changed."""
        before = self.state() if self.published is None else self.published
        self._step()
        after = self.state()
        self.published = after
        # Against what was published: a fault forced between steps is a change too.
        return after if after != before else None

    def force_fault(self, code: str, steps: int = 10) -> None:
        """Start a fault now (for demos and tests)."""
        self._raise(ActiveFault(code, steps))

    # -- the machine -------------------------------------------------------------------------

    def _step(self) -> None:
        if self.fault is not None:
            self._fault_step(self.fault)
            return
        if self.maintenance_left > 0:
            self.maintenance_left -= 1
            if self.maintenance_left == 0:
                self.mode = "normal"
            return
        if self.direction == "idle" and self.door == "closed" and self._start_maintenance():
            return
        if self._maybe_fault(ANY_TIME_FAULTS):
            return
        if self.rng.random() < self.call_rate:
            self.calls.append(self.rng.randint(self.lowest, self.highest))
        if self.direction != "idle":
            self._move()
        elif self.door != "closed":
            self._door_cycle()
        elif self.calls:
            self._depart()

    def _start_maintenance(self) -> bool:
        if self.maintenance_rate > 0 and self.rng.random() < self.maintenance_rate:
            self.mode = "maintenance"
            self.maintenance_left = self.rng.randint(10, 40)
            self.calls.clear()
            return True
        return False

    def _maybe_fault(self, candidates: tuple[str, ...]) -> bool:
        started = maybe_start(self.rng, self.fault_rate, candidates)
        if started is None:
            return False
        self._raise(started)
        return True

    def _raise(self, fault: ActiveFault) -> None:
        self.fault = fault
        if fault.code == "POWER":
            self.mode = "out_of_service"
            self.direction = "idle"
        elif fault.code == "OVERSPEED":
            self.mode = "fault"
            self.direction = "idle"  # the safety gear stops the car between floors
        elif fault.code == "DOOR_JAM":
            self.mode = "fault"
            self.door = "opening"
        else:
            self.mode = "fault"

    def _fault_step(self, fault: ActiveFault) -> None:
        fault.remaining -= 1
        if fault.code == "STUCK" and fault.remaining % 4 == 0 and self.load_kg > 0:
            # Passengers shift about while they wait: load readings wobble.
            self.load_kg = max(0.0, self.load_kg + self.rng.choice((-5.0, 5.0)))
        if fault.remaining > 0:
            return
        self.fault = None
        self.mode = "normal"
        if fault.code == "DOOR_JAM":
            self.door = "closing"

    def _depart(self) -> None:
        self.target = self.calls.pop(0)
        if self.target == self.floor:
            self.door = "opening"
            return
        self.direction = "up" if self.target > self.floor else "down"

    def _move(self) -> None:
        if self._maybe_fault(MOVING_FAULTS):
            return
        self.floor += 1 if self.direction == "up" else -1
        if self.floor == self.target:
            self.direction = "idle"
            self.target = None
            if not self._maybe_fault(ARRIVAL_FAULTS):
                self.door = "opening"

    def _door_cycle(self) -> None:
        if self.door == "opening":
            if self._maybe_fault(DOOR_FAULTS):
                return
            self.door = "open"
            self.hold = DOOR_OPEN_STEPS
            self._exchange_passengers()
        elif self.door == "open":
            self.hold -= 1
            if self.hold <= 0:
                self.door = "closing"
        elif self.door == "closing":
            self.door = "closed"

    def _exchange_passengers(self) -> None:
        leaving = self.rng.randint(0, int(self.load_kg // PASSENGER_KG))
        room = int((CAPACITY_KG - self.load_kg) // PASSENGER_KG) + leaving
        entering = self.rng.randint(0, min(room, 4))
        self.load_kg = max(0.0, self.load_kg + (entering - leaving) * PASSENGER_KG)
        if entering:
            self.calls.append(self.rng.randint(self.lowest, self.highest))
