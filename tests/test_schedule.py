"""Cubic and one-shot pruning schedules."""

from __future__ import annotations

import numpy as np
import pytest

from loraprune_jax.core.masks import num_to_prune, update_masks
from loraprune_jax.core.schedule import OneShotSchedule, PruneSchedule, Schedule


def test_ramp_ends_and_known_values():
    sch = PruneSchedule(total_steps=1000, final_ratio=0.5)
    assert (sch.ramp_start, sch.ramp_end) == (100, 900)
    assert sch.ratio_at(100) == 0.0
    assert sch.ratio_at(900) == 0.5
    # halfway through the ramp: 0.5 * (1 - 0.5**3) = 0.4375
    assert sch.ratio_at(500) == pytest.approx(0.4375)
    assert sch.ratio_at(300) == pytest.approx(0.5 * (1 - 0.75**3))
    # by hand, r_t = 0.5 * (1 - (1 - (t - 100) / 800) ** 3) on the ramp
    known = {0: 0.0, 50: 0.0, 100: 0.0, 101: 0.5 * (1 - (799 / 800) ** 3), 237: 0.5 * (1 - (663 / 800) ** 3),
             700: 0.5 * (1 - 0.25**3), 899: 0.5 * (1 - (1 / 800) ** 3), 900: 0.5, 950: 0.5, 1000: 0.5}
    for t, want in known.items():
        assert sch.ratio_at(t) == pytest.approx(want), t


def test_formula_with_init_ratio_and_odd_fractions():
    sch = PruneSchedule(total_steps=333, final_ratio=0.6, init_ratio=0.2, warmup=0.15, cooldown=0.2)
    # by hand: s = floor(0.15 * 333 + 0.5) = 50, e = 333 - floor(0.2 * 333 + 0.5) = 266, and on the
    # ramp r_t = 0.6 - 0.4 * (1 - (t - 50) / 216) ** 3
    assert (sch.ramp_start, sch.ramp_end) == (50, 266)
    known = {0: 0.2, 50: 0.2, 104: 0.6 - 0.4 * 0.75**3, 158: 0.55, 212: 0.59375, 266: 0.6, 333: 0.6}
    for t, want in known.items():
        assert sch.ratio_at(t) == pytest.approx(want), t
    r = [sch.ratio_at(t) for t in range(0, 334)]
    assert all(x == 0.2 for x in r[:51]) and all(x == 0.6 for x in r[266:])
    assert all(0.2 < x < 0.6 for x in r[51:266]) and all(b > a for a, b in zip(r[50:266], r[51:267]))


def test_rounding_avoids_float_ceiling():
    # 0.1 * 30 = 3.0000000000000004: the ramp must start at 3, not 4.
    sch = PruneSchedule(total_steps=30, final_ratio=0.5)
    assert (sch.ramp_start, sch.ramp_end) == (3, 27)


def test_before_and_after_ramp():
    sch = PruneSchedule(total_steps=200, final_ratio=0.3, init_ratio=0.1)
    assert all(sch.ratio_at(t) == 0.1 for t in range(0, sch.ramp_start + 1))
    assert all(sch.ratio_at(t) == 0.3 for t in range(sch.ramp_end, 201))
    assert sch.ratio_at(10_000) == 0.3


def test_monotone_non_decreasing():
    sch = PruneSchedule(total_steps=517, final_ratio=0.7, init_ratio=0.05, prune_every=7)
    r = [sch.ratio_at(t) for t in range(0, 518)]
    assert all(b >= a for a, b in zip(r, r[1:]))
    assert min(r) == 0.05 and max(r) == 0.7


@pytest.mark.parametrize("total", [1000, 1003, 997, 64])
def test_update_steps_spacing_and_end(total):
    sch = PruneSchedule(total_steps=total, final_ratio=0.5, prune_every=10)
    steps = sch.update_steps()
    assert steps[-1] == sch.ramp_end
    assert steps[0] == sch.ramp_start + 10 or steps == [sch.ramp_end]
    gaps = np.diff(steps)
    assert np.all(gaps[:-1] == 10) and 1 <= (gaps[-1] if len(gaps) else 1) <= 10
    assert sch.ratio_at(steps[-1]) == 0.5
    assert [t for t in range(0, total + 5) if sch.is_update_step(t)] == steps
    assert all(not sch.is_update_step(t) for t in range(sch.ramp_end + 1, total + 1))


def test_init_ratio_adds_ramp_start_update():
    sch = PruneSchedule(total_steps=100, final_ratio=0.5, init_ratio=0.2, prune_every=20)
    assert sch.update_steps() == [10, 30, 50, 70, 90]
    sch0 = PruneSchedule(total_steps=100, final_ratio=0.5, prune_every=20)
    assert sch0.update_steps() == [30, 50, 70, 90]


def test_tiny_runs_still_prune():
    sch = PruneSchedule(total_steps=1, final_ratio=0.5)
    assert sch.update_steps() == [1] and sch.ratio_at(1) == 0.5
    sch = PruneSchedule(total_steps=2, final_ratio=0.5, warmup=0.3, cooldown=0.69)
    assert sch.ramp_start <= sch.ramp_end and sch.update_steps()[-1] == sch.ramp_end
    assert sch.ratio_at(sch.ramp_end) == 0.5


@pytest.mark.parametrize("total", [1000, 1003])
def test_32_heads_at_half_reach_16(total):
    """The authors' loop stops one update short (15 of 32); ours reaches 16."""
    sch = PruneSchedule(total_steps=total, final_ratio=0.5)
    rng = np.random.default_rng(0)
    masks = {"layers": [{"attn": np.ones(32, np.float32), "mlp": np.ones(64, np.float32)}]}
    pruned = []
    for t in range(total + 1):
        if sch.is_update_step(t):
            scores = {
                "layers": [
                    {
                        "attn": rng.random(32).astype(np.float32),
                        "mlp": rng.random(64).astype(np.float32),
                    }
                ]
            }
            masks = update_masks(masks, scores, sch.ratio_at(t))
            pruned.append(int(32 - masks["layers"][0]["attn"].sum()))
    assert pruned[-1] == 16 == num_to_prune(32, 0.5)
    assert int(64 - masks["layers"][0]["mlp"].sum()) == 32
    assert all(b >= a for a, b in zip(pruned, pruned[1:]))
    # The authors' rule (steps strictly inside the ramp, multiples of prune_every) falls short.
    last_authors = max(t for t in range(total) if t % 10 == 0 and sch.ramp_start < t < sch.ramp_end)
    assert num_to_prune(32, sch.ratio_at(last_authors)) == 15


def test_one_shot():
    sch = PruneSchedule.one_shot(0.4, calibration_steps=8, total_steps=100)
    assert isinstance(sch, OneShotSchedule)
    assert isinstance(sch, Schedule) and isinstance(PruneSchedule(10, 0.1), Schedule)
    assert sch.update_steps() == [8]
    assert [t for t in range(0, 101) if sch.is_update_step(t)] == [8]
    assert sch.ratio_at(0) == sch.ratio_at(8) == sch.ratio_at(100) == 0.4
    assert sch.init_ratio == 0.4 and sch.ramp_end == 8


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(total_steps=0, final_ratio=0.5),
        dict(total_steps=10.5, final_ratio=0.5),
        dict(total_steps=10, final_ratio=1.0),
        dict(total_steps=10, final_ratio=-0.1),
        dict(total_steps=10, final_ratio=0.5, init_ratio=1.0),
        dict(total_steps=10, final_ratio=0.3, init_ratio=0.5),
        dict(total_steps=10, final_ratio=0.5, warmup=-0.1),
        dict(total_steps=10, final_ratio=0.5, cooldown=1.0),
        dict(total_steps=10, final_ratio=0.5, warmup=0.5, cooldown=0.5),
        dict(total_steps=10, final_ratio=0.5, prune_every=0),
    ],
)
def test_validation(kwargs):
    with pytest.raises(ValueError):
        PruneSchedule(**kwargs)


@pytest.mark.parametrize(
    "args", [(1.0, 5, 10), (0.5, 0, 10), (0.5, 11, 10), (0.5, 5, 0), (-0.2, 5, 10)]
)
def test_one_shot_validation(args):
    with pytest.raises(ValueError):
        PruneSchedule.one_shot(*args)
