"""Building sensors (temperature, vibration, humidity, power): drift, noise and fault excursions."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from devices.faults import ActiveFault, maybe_start

# type: (unit, baseline, noise sd, drift per step, excursion offset, lower bound)
PROFILES: dict[str, tuple[str, float, float, float, float, float]] = {
    "temperature": ("C", 21.0, 0.15, 0.01, 18.0, -40.0),
    "vibration": ("mm/s", 2.0, 0.3, 0.002, 12.0, 0.0),
    "humidity": ("%RH", 45.0, 0.8, 0.02, 35.0, 0.0),
    "power": ("W", 1500.0, 40.0, 0.5, 4500.0, 0.0),
}
SENSOR_TYPES = tuple(PROFILES)


@dataclass(slots=True)
class Sensor:
    """One sensor; `step()` returns the next reading's `data` object."""

    device_id: str
    site: str
    type: str
    rng: random.Random
    fault_rate: float = 0.0
    drift: float = 0.0
    t: int = 0
    fault: ActiveFault | None = None

    def step(self) -> dict[str, Any]:
        """The next reading: baseline + daily cycle + drift + noise (+ an excursion during a fault)."""
        unit, base, noise, drift_step, excursion, floor = PROFILES[self.type]
        self.t += 1
        self.drift += self.rng.uniform(-drift_step, drift_step)
        value = base * (1 + 0.05 * math.sin(self.t / 300)) + self.drift + self.rng.gauss(0, noise)
        if self.fault is None:
            self.fault = maybe_start(self.rng, self.fault_rate, ("EXCURSION",))
        if self.fault is not None:
            value += excursion
            self.fault.remaining -= 1
            if self.fault.remaining <= 0:
                self.fault = None
        if self.type == "humidity":
            value = min(value, 100.0)
        return {"value": round(max(value, floor), 3), "unit": unit}
