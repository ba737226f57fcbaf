"""Fault injection: which fault a device starts, and for how long it lasts (in steps)."""

from __future__ import annotations

import random
from dataclasses import dataclass

# Elevator faults and the phase in which each can start.
MOVING_FAULTS = ("STUCK", "OVERSPEED")
DOOR_FAULTS = ("DOOR_JAM",)
ARRIVAL_FAULTS = ("LEVELLING",)
ANY_TIME_FAULTS = ("POWER",)


@dataclass(slots=True)
class ActiveFault:
    """A fault in progress: its code and how many more steps it lasts."""

    code: str
    remaining: int


def maybe_start(rng: random.Random, fault_rate: float, candidates: tuple[str, ...]) -> ActiveFault | None:
    """With probability `fault_rate`, a fault chosen from `candidates`, lasting 5-30 steps."""
    if not candidates or fault_rate <= 0 or rng.random() >= fault_rate:
        return None
    return ActiveFault(code=rng.choice(candidates), remaining=rng.randint(5, 30))
