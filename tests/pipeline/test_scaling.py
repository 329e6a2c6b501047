"""The scaling signals' decision (``pipeline.scaling``) on an injected clock: out above
80 % held for 30 s, in below 20 % held for 2 minutes, hysteresis, a cool-down."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from pipeline.scaling import Decision, Load, QueueScaler, ScalingPolicy, Signal

SLOTS = 10


def at(utilization: float, workers: int = 4) -> Load:
    return Load(work=round(utilization * workers * SLOTS), workers=workers, slots_per_worker=SLOTS)


def run(scaler: QueueScaler, readings: list[tuple[float, float]]) -> list[Signal]:
    """(time, utilization) readings, in order: the signal after each."""
    return [scaler.observe(at(u), t).signal for t, u in readings]


def test_out_comes_once_the_load_has_stayed_above_80_percent_for_30_s_and_not_before() -> None:
    scaler = QueueScaler()
    signals = run(scaler, [(t, 0.9) for t in range(0, 31, 5)])
    assert signals == [Signal.HOLD] * 6 + [Signal.OUT]  # t=0..25 hold; at t=30 out


def test_in_comes_after_two_minutes_below_20_percent() -> None:
    scaler = QueueScaler()
    signals = run(scaler, [(t, 0.1) for t in range(0, 125, 5)])
    assert signals[:24] == [Signal.HOLD] * 24 and signals[24] == Signal.IN  # t=120


def test_a_burst_shorter_than_the_window_changes_nothing() -> None:
    scaler = QueueScaler()
    readings = [(t, 0.5) for t in range(0, 60, 5)] + [(t, 1.5) for t in range(60, 85, 5)] + [(t, 0.5) for t in range(85, 200, 5)]
    assert set(run(scaler, readings)) == {Signal.HOLD}


def test_a_dip_restarts_the_window() -> None:
    scaler = QueueScaler()
    readings = [(0, 0.9), (20, 0.9), (25, 0.8), (30, 0.9), (55, 0.9), (60, 0.9)]
    assert run(scaler, readings) == [Signal.HOLD] * 5 + [Signal.OUT]  # 30 s from t=30, not from t=0


@pytest.mark.parametrize("centre", [0.8, 0.2])
def test_a_load_hovering_about_a_threshold_for_30_minutes_does_not_flap(centre: float) -> None:
    rng = random.Random(7)
    scaler = QueueScaler()
    signals = run(scaler, [(t, centre + rng.uniform(-0.06, 0.06)) for t in range(0, 1800, 5)])
    changes = sum(1 for a, b in itertools.pairwise(signals) if a != b)
    assert changes <= 1  # at most the one signal the hovering earns, then it holds


def test_out_ends_only_back_inside_the_band() -> None:
    scaler = QueueScaler()
    run(scaler, [(t, 0.95) for t in range(0, 31, 5)])
    assert run(scaler, [(35, 0.75), (40, 0.725)]) == [Signal.OUT, Signal.OUT]
    assert run(scaler, [(45, 0.7)]) == [Signal.HOLD]


def test_in_waits_for_the_cool_down_after_out() -> None:
    policy = ScalingPolicy(in_after_s=10, cooldown_s=60)
    scaler = QueueScaler(policy)
    run(scaler, [(t, 0.95) for t in range(0, 31, 5)])  # out at 30
    signals = run(scaler, [(t, 0.0) for t in range(35, 100, 5)])
    first_in = 35 + 5 * signals.index(Signal.IN)
    assert first_in == 90  # below since 35 (10 s would be 45), but out was at 30: 60 s of cool-down


def test_desired_workers_move_only_with_a_signal() -> None:
    scaler = QueueScaler()
    assert scaler.observe(Load(work=36, workers=4, slots_per_worker=SLOTS), 0) == Decision(Signal.HOLD, 0.9, 4)
    out = scaler.observe(Load(work=36, workers=4, slots_per_worker=SLOTS), 30)
    assert out == Decision(Signal.OUT, 0.9, 8)  # 36 at 50 % of 10 slots each: 8 workers
    scaler = QueueScaler(ScalingPolicy(cooldown_s=0))
    run(scaler, [(t, 0.05) for t in range(0, 125, 5)])
    assert scaler.observe(at(0.05, workers=4), 125).desired_workers == 3  # one fewer at a time
    assert scaler.observe(Load(work=0, workers=1, slots_per_worker=SLOTS), 130).desired_workers == 1  # never below one
    assert QueueScaler().observe(Load(work=0, workers=0, slots_per_worker=0), 0).desired_workers == 0  # an unused queue needs none


def test_work_with_no_worker_to_do_it_scales_out() -> None:
    scaler = QueueScaler()
    assert math.isinf(scaler.observe(Load(work=3, workers=0, slots_per_worker=0), 0).utilization)
    out = scaler.observe(Load(work=3, workers=0, slots_per_worker=0), 30)
    assert (out.signal, out.desired_workers) == (Signal.OUT, 1)


readings = st.lists(st.floats(min_value=0, max_value=1.5, allow_nan=False), min_size=1, max_size=120)


@hypothesis_settings(max_examples=150, deadline=None)
@given(utilizations=readings, step=st.sampled_from([1, 5, 10]))
def test_no_signal_comes_without_its_whole_window_behind_it(utilizations: list[float], step: int) -> None:
    """Whatever the load does: an out comes only after out_after_s of readings all above
    the threshold, an in only after in_after_s all below it, and the two are never
    closer than the cool-down."""
    policy = ScalingPolicy()
    scaler = QueueScaler(policy)
    history: list[tuple[int, float, Signal]] = []
    for n, u in enumerate(utilizations):
        now = n * step
        load = Load(work=round(u * 1000), workers=10, slots_per_worker=100)
        before = scaler.signal
        signal = scaler.observe(load, now).signal
        history.append((now, load.utilization, signal))
        if signal is not before and signal is not Signal.HOLD:
            window = policy.out_after_s if signal is Signal.OUT else policy.in_after_s
            behind = [v for t, v, _ in history if t >= now - window]
            assert now >= window and all(v > policy.out_above if signal is Signal.OUT else v < policy.in_below for v in behind)
            changes = [t for (t, _, s), (_, _, prev) in zip(history[1:], history[:-1], strict=True) if s is Signal(-signal) and prev is not s]
            assert not changes or now - max(changes) >= policy.cooldown_s


@given(work=st.integers(0, 10_000), workers=st.integers(0, 50), slots=st.integers(0, 64))
def test_desired_workers_under_hold_are_the_workers_there_are(work: int, workers: int, slots: int) -> None:
    decision = QueueScaler().observe(Load(work=work, workers=workers, slots_per_worker=slots), 0)
    assert decision.signal is Signal.HOLD  # one reading is never a window
    assert decision.desired_workers == (max(workers, 1) if work or workers else 0)


def test_an_idle_queue_with_no_workers_is_not_full() -> None:
    assert Load(work=0, workers=0, slots_per_worker=0).utilization == 0.0
    assert Load(work=5, workers=2, slots_per_worker=5).utilization == 0.5


def test_each_change_of_signal_is_logged_once() -> None:
    scaler = QueueScaler(ScalingPolicy(cooldown_s=0))
    with capture_logs() as logs:
        run(scaler, [(t, 0.95) for t in range(0, 40, 5)] + [(t, 0.5) for t in range(40, 60, 5)])
    changes = [(e["signal"], e["previous"], e["outcome"]) for e in logs if e["event"] == "scaling_signal"]
    assert changes == [("out", "hold", "changed"), ("hold", "out", "changed")]


def test_a_policy_of_its_own_sets_every_threshold() -> None:
    policy = ScalingPolicy(out_above=0.6, out_after_s=10, in_below=0.3, in_after_s=20, band=0.05, cooldown_s=0, target=0.4)
    scaler = QueueScaler(policy)
    assert run(scaler, [(0, 0.65), (5, 0.65), (10, 0.65)]) == [Signal.HOLD, Signal.HOLD, Signal.OUT]
    assert scaler.observe(Load(work=26, workers=4, slots_per_worker=SLOTS), 15).desired_workers == 7  # 26 / (10 * 0.4)
    assert run(scaler, [(20, 0.575), (25, 0.55)]) == [Signal.OUT, Signal.HOLD]  # the band: 0.6 - 0.05
    assert run(scaler, [(t, 0.25) for t in range(30, 55, 5)]) == [Signal.HOLD] * 4 + [Signal.IN]  # 20 s below 0.3
    assert run(scaler, [(55, 0.325), (60, 0.35)]) == [Signal.IN, Signal.HOLD]  # 0.3 + 0.05


def test_out_may_come_again_after_it_ended() -> None:
    scaler = QueueScaler()
    first = run(scaler, [(t, 0.9) for t in range(0, 31, 5)])
    dropped = run(scaler, [(35, 0.5)])
    again = run(scaler, [(t, 0.9) for t in range(40, 71, 5)])
    assert (first[-1], dropped, again[-1], again[:-1]) == (Signal.OUT, [Signal.HOLD], Signal.OUT, [Signal.HOLD] * 6)


def test_in_waits_for_the_cool_down_after_in_only_against_out() -> None:
    """The cool-down stands between opposite signals: in, hold, in again is not held back."""
    scaler = QueueScaler(ScalingPolicy(in_after_s=10, cooldown_s=600))
    assert run(scaler, [(0, 0.1), (10, 0.1)])[-1] is Signal.IN
    assert run(scaler, [(15, 0.5)]) == [Signal.HOLD]
    assert run(scaler, [(20, 0.1), (30, 0.1)])[-1] is Signal.IN  # 20 s after the first: no cool-down applies
    assert run(scaler, [(35, 0.95), (65, 0.95), (600, 0.95)])[1:] == [Signal.HOLD, Signal.HOLD]  # out waits 600 s from the in at 30
    assert scaler.observe(at(0.95), 630).signal is Signal.OUT


@given(work=st.integers(1, 10_000), workers=st.integers(0, 50), slots=st.integers(0, 64))
def test_out_always_asks_for_more_workers_and_in_for_fewer_but_one(work: int, workers: int, slots: int) -> None:
    load = Load(work=work, workers=workers, slots_per_worker=slots)
    out = QueueScaler(ScalingPolicy(out_above=-1, out_after_s=0))  # out on the first reading
    assert out.observe(load, 0).desired_workers >= workers + 1
    if load.capacity:  # (work with no capacity at all is full, never idle)
        idle = QueueScaler(ScalingPolicy(in_below=2e9, in_after_s=0, out_above=3e9))  # in on the first reading
        assert idle.observe(load, 0).desired_workers == max(workers - 1, 1)


def test_the_default_policy_is_the_one_operations_md_describes() -> None:
    from pathlib import Path

    policy = ScalingPolicy()
    assert (policy.out_above, policy.out_after_s, policy.in_below, policy.in_after_s) == (0.8, 30.0, 0.2, 120.0)
    assert (policy.band, policy.cooldown_s, policy.target) == (0.1, 60.0, 0.5)
    described = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text(encoding="utf-8")
    section = described[described.index("## Scaling") : described.index("## Dependency audit")]
    for words in ("above 80 % for 30 s", "below 20 % for 2 minutes", "10 points back", "a minute's cool-down", "at 50 % utilization"):
        assert words in section, words


def test_exactly_at_a_threshold_is_not_past_it() -> None:
    """Out needs more than 80 %, in less than 20 %: a load sitting on either holds."""
    assert set(run(QueueScaler(), [(t, 0.8) for t in range(0, 200, 5)])) == {Signal.HOLD}
    assert set(run(QueueScaler(), [(t, 0.2) for t in range(0, 300, 5)])) == {Signal.HOLD}
