"""Scaling signals per queue (roadmap 6.1): whether each queue needs more workers, fewer,
or as many as it has, for an autoscaler (KEDA, an HPA) to act on.

A queue's utilization is its work (in flight plus queued) over its capacity (the
slots of the live workers that consume it). The signal is:

- **out** (+1) once the utilization has stayed above ``out_above`` (80 %) for
  ``out_after_s`` (30 s), and until it falls back to ``out_above - band``;
- **in** (-1) once it has stayed below ``in_below`` (20 %) for ``in_after_s``
  (2 min), and until it rises back to ``in_below + band``;
- **hold** (0) otherwise.

The band is the hysteresis: a load hovering about a threshold does not flip the
signal on every reading. After a signal changes to out or in, the opposite one
waits ``cooldown_s``, so that workers just added are not taken away while the
load settles on them. ``desired_workers`` moves only with a signal: the workers
the load needs at ``target`` utilization (out), or one fewer than now until
there (in); under hold it is the workers there are.

``QueueScaler`` is the decision alone, on an injected clock;
``orchestrator_site.scaling`` reads the platform and exports the gauges, in one
process, the scheduler (beat), so that replicas never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import structlog

log = structlog.get_logger("pipeline.scaling")


class Signal(IntEnum):
    IN = -1
    HOLD = 0
    OUT = 1


@dataclass(frozen=True)
class ScalingPolicy:
    out_above: float = 0.8
    out_after_s: float = 30.0
    in_below: float = 0.2
    in_after_s: float = 120.0
    band: float = 0.1  # hysteresis: a signal ends only this far back past its threshold
    cooldown_s: float = 60.0  # after out (in), in (out) waits this long
    target: float = 0.5  # the utilization desired_workers aims at


@dataclass(frozen=True)
class Load:
    """A queue as one reading saw it."""

    work: int  # in flight plus queued
    workers: int  # live workers consuming it
    slots_per_worker: int  # each worker's concurrency

    @property
    def capacity(self) -> int:
        return self.workers * self.slots_per_worker

    @property
    def utilization(self) -> float:
        if self.capacity == 0:
            return math.inf if self.work else 0.0  # work and nobody to do it: out at once
        return self.work / self.capacity


@dataclass(frozen=True)
class Decision:
    signal: Signal
    utilization: float
    desired_workers: int


class QueueScaler:
    """One queue's signal over time (see the module's docstring)."""

    def __init__(self, policy: ScalingPolicy | None = None) -> None:
        self.policy = policy or ScalingPolicy()
        self.signal = Signal.HOLD
        self._last = Signal.HOLD  # the last signal changed to, other than hold  # pragma: no mutate (None: as HOLD, neither IN nor OUT)
        self._above_since: float | None = None
        self._below_since: float | None = None
        self._changed_at: float | None = None  # pragma: no mutate (read only once _last is IN or OUT, which sets it)

    def observe(self, load: Load, now: float) -> Decision:
        p, u = self.policy, load.utilization
        self._above_since = (self._above_since if self._above_since is not None else now) if u > p.out_above else None
        self._below_since = (self._below_since if self._below_since is not None else now) if u < p.in_below else None
        # Rounded: 0.6 - 0.05 is 0.5499999999999999 in floats, and 0.55 would not end it.
        if (self.signal is Signal.OUT and u <= round(p.out_above - p.band, 9)) or (self.signal is Signal.IN and u >= round(p.in_below + p.band, 9)):
            self._set(Signal.HOLD, now)
        if self.signal is not Signal.OUT and self._held(self._above_since, p.out_after_s, now) and self._cooled(Signal.IN, now):
            self._set(Signal.OUT, now)
        elif self.signal is not Signal.IN and self._held(self._below_since, p.in_after_s, now) and self._cooled(Signal.OUT, now):
            self._set(Signal.IN, now)
        return Decision(self.signal, u, self._desired(load))

    def _held(self, since: float | None, for_s: float, now: float) -> bool:
        return since is not None and now - since >= for_s

    def _cooled(self, opposite: Signal, now: float) -> bool:
        """Whether a signal against ``opposite``'s direction may start: ``opposite`` was
        not the last change, or it was long enough ago."""
        return self._last is not opposite or self._changed_at is None or now - self._changed_at >= self.policy.cooldown_s

    def _set(self, signal: Signal, now: float) -> None:
        if signal is not self.signal:
            log.info("scaling_signal", signal=signal.name.lower(), previous=self.signal.name.lower(), outcome="changed")
        self.signal = signal
        if signal is not Signal.HOLD:
            self._last, self._changed_at = signal, now

    def _desired(self, load: Load) -> int:
        if self.signal is Signal.OUT:
            needed = math.ceil(load.work / (load.slots_per_worker * self.policy.target)) if load.slots_per_worker else load.workers + 1
            return max(needed, load.workers + 1)
        if self.signal is Signal.IN:
            return max(load.workers - 1, 1)
        return max(load.workers, 1) if load.work or load.workers else 0
