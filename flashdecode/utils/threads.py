"""How many threads a native step runs on, chosen by timing the steps themselves.

On a machine whose cores other processes share, a team of threads that meets at a barrier a few
hundred times a step waits at each for whichever member the scheduler took off its core: with one
core busy elsewhere, a step on two threads can take longer than on one. ``AdaptiveTeam`` runs every
step on the team size that has been fastest lately for steps of that shape, and now and then times
the others again, so it follows the load as it comes and goes. The result of a step does not depend
on its team size (the native kernels split work in fixed pieces), only its time does.

Probes are rare while the incumbent holds (the interval doubles after each probe it wins, up to
``MAX_INTERVAL`` steps) and come at once when the incumbent's steps turn slower than its recent
median: the cost on a quiet machine is one slower step in a few hundred.
``FLASHDECODE_ADAPTIVE_THREADS=0`` pins every step to the whole team.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

HISTORY = 8  # recent step times kept per team size
PROBE_STEPS = 2  # a probe runs this many steps on the other size (the first may pay a wake-up)
MIN_INTERVAL, MAX_INTERVAL = 8, 256  # steps between probes
MARGIN = 0.9  # a probed size must be this much faster to take over
SLOWDOWN = 1.5  # an incumbent's step this much above its median is a sign that the load changed
SLOW_STEPS = 3  # consecutive such steps before probing at once
LOST = 2.0  # a probe's step this much above the incumbent's median ends the probe at once


@dataclass
class _Shape:
    """The record of one step shape: recent times per size, the incumbent and the probe schedule."""

    incumbent: int
    times: dict[int, deque] = field(default_factory=dict)
    interval: int = MIN_INTERVAL
    until_probe: int = MIN_INTERVAL
    probing: int | None = None  # the size under probe
    probe_times: list[float] = field(default_factory=list)
    slow: int = 0  # consecutive slow incumbent steps
    turn: int = 0  # which other size the next probe tries

    def history(self, size: int) -> deque:
        return self.times.setdefault(size, deque(maxlen=HISTORY))


class AdaptiveTeam:
    """Team sizes for steps of each shape (a hashable key), from ``most`` threads down to one."""

    def __init__(
        self, most: int, clock: Callable[[], float] = time.perf_counter, adaptive: bool | None = None
    ):
        self.most = max(1, most)
        if adaptive is None:
            adaptive = os.environ.get("FLASHDECODE_ADAPTIVE_THREADS", "1") != "0"
        self.sizes = sorted({self.most, max(1, self.most // 2), 1} if adaptive else {self.most}, reverse=True)
        self.clock = clock
        self._shapes: dict[Hashable, _Shape] = {}

    def run(self, key: Hashable, step: Callable[[int], T]) -> T:
        """``step(threads)`` on the size chosen for ``key``, timed to inform later choices."""
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = _Shape(self.most)
        size = self._choose(shape)
        start = self.clock()
        out = step(size)
        self._observe(shape, size, self.clock() - start)
        return out

    def size(self, key: Hashable) -> int:
        """The incumbent size for ``key`` (``most`` before any step of it ran)."""
        shape = self._shapes.get(key)
        return self.most if shape is None else shape.incumbent

    def _choose(self, shape: _Shape) -> int:
        if shape.probing is not None or len(self.sizes) == 1:
            return shape.probing or shape.incumbent
        shape.until_probe -= 1
        if shape.until_probe > 0:
            return shape.incumbent
        others = [s for s in self.sizes if s != shape.incumbent]
        shape.probing = others[shape.turn % len(others)]
        shape.turn += 1
        shape.probe_times = []
        return shape.probing

    def _observe(self, shape: _Shape, size: int, seconds: float) -> None:
        if shape.probing is None:
            self._incumbent_step(shape, seconds)
            return
        shape.probe_times.append(seconds)
        recent = shape.history(shape.incumbent)
        hopeless = recent and seconds > LOST * statistics.median(recent)  # a wake-up does not explain it
        if len(shape.probe_times) < PROBE_STEPS and not hopeless:
            return
        probed, shape.probing = size, None
        if recent and min(shape.probe_times) < MARGIN * statistics.median(recent):
            shape.incumbent, shape.interval = probed, MIN_INTERVAL
            shape.times = {probed: deque(shape.probe_times, maxlen=HISTORY)}
        else:
            shape.interval = min(2 * shape.interval, MAX_INTERVAL)
        shape.until_probe, shape.slow = shape.interval, 0

    def _incumbent_step(self, shape: _Shape, seconds: float) -> None:
        recent = shape.history(shape.incumbent)
        full = len(recent) == HISTORY
        shape.slow = shape.slow + 1 if full and seconds > SLOWDOWN * statistics.median(recent) else 0
        recent.append(seconds)
        if shape.slow >= SLOW_STEPS:  # the load changed: measure the others now
            shape.interval, shape.until_probe, shape.slow = MIN_INTERVAL, 1, 0
