"""The time budget of one stage: a deadline on a clock.

``Budget(deadline, clock)``: ``deadline`` a ``clock()`` value (None: no limit), ``clock`` a
monotonic clock in seconds (``time.monotonic``; tests pass a fake one). A forward pass starts only
if, timed like the previous one, it ends before the deadline (``fits``); how long a pass takes is
the engine's to know (``infer.engine.Engine.cost``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class Budget:
    deadline: Optional[float] = None
    clock: Callable[[], float] = field(default=time.monotonic)

    def now(self) -> float:
        return self.clock()

    def fits(self, cost: Callable[[], float]) -> bool:
        """Whether work that takes ``cost()`` seconds, started now, ends by the deadline (``cost``
        is not called without a deadline: estimating it may itself take time)."""
        return self.deadline is None or self.clock() + cost() <= self.deadline


UNLIMITED = Budget()
