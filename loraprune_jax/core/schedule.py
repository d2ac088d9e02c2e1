"""Pruning-ratio schedules: when masks are rewritten and to which target ratio.

The protocol follows jaxpruner's spirit (``is_update_step`` / ``sparsity_at``), here as
``ratio_at`` / ``is_update_step`` / ``update_steps``. Schedules are plain host-side Python: the
training loop asks them between compiled phases, so nothing here is traced.

Step convention: ``step`` counts *completed* optimizer steps (0 before training, ``total_steps``
after the last one). At a step ``t`` with ``is_update_step(t)``, the loop calls
``update_masks(masks, scores, schedule.ratio_at(t))`` after optimizer step ``t`` has updated the
scores; the new masks gate step ``t + 1`` onward.

Integer ramp (method.md section 4 writes it with real ``wT`` and ``T - cT``): we round both ends
to whole steps, half up (``floor(x + 0.5)``, not Python's banker's ``round`` and not ``ceil``,
which turns ``0.1 * 30 = 3.0000000000000004`` into 4)::

    ramp_start = min(floor(w * T + 0.5), ramp_end)
    ramp_end   = max(1, T - floor(c * T + 0.5))

so for ``T = 1000, w = c = 0.1`` the ramp is ``[100, 900]``. ``ramp_end >= 1`` guarantees at least
one update after a step has produced scores. The cubic then runs over the integer ramp and is
exactly ``r_init`` at ``ramp_start`` and exactly ``r_final`` at ``ramp_end``.

Update steps: ``ramp_start + k * prune_every`` for ``k >= 1`` strictly inside the ramp, plus
``ramp_end`` itself (always; it is where the final ratio is reached, unlike the authors' code which
stops one update short), plus ``ramp_start`` when ``init_ratio > 0`` (masks jump to ``r_init`` once
the warmup has accumulated scores). Step 0 is never an update step (there are no scores yet).
After ``ramp_end`` masks are frozen and only LoRA is fine-tuned.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, runtime_checkable


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@runtime_checkable
class Schedule(Protocol):
    """What the training loop needs from a pruning schedule."""

    total_steps: int

    @property
    def ramp_end(self) -> int: ...

    def ratio_at(self, step: float) -> float: ...

    def is_update_step(self, step: int) -> bool: ...

    def update_steps(self) -> list[int]: ...


def _check_ratio(name: str, value: float) -> None:
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _check_total(total_steps: int) -> None:
    if isinstance(total_steps, bool) or int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")


@dataclasses.dataclass(frozen=True)
class PruneSchedule:
    """Cubic progressive schedule (method.md section 4).

    ``r_t = r_final + (r_init - r_final) * (1 - (t - s) / (e - s)) ** 3`` for ``s <= t <= e``,
    ``r_init`` before ``s``, ``r_final`` from ``e`` on, with the integer ramp ``[s, e]`` described
    in the module docstring. Masks are rewritten every ``prune_every`` steps within the ramp and
    always at ``e``.
    """

    total_steps: int
    final_ratio: float
    init_ratio: float = 0.0
    warmup: float = 0.1
    cooldown: float = 0.1
    prune_every: int = 10

    def __post_init__(self) -> None:
        _check_total(self.total_steps)
        object.__setattr__(self, "total_steps", int(self.total_steps))
        _check_ratio("final_ratio", self.final_ratio)
        _check_ratio("init_ratio", self.init_ratio)
        if self.init_ratio > self.final_ratio:
            raise ValueError(
                f"init_ratio {self.init_ratio} exceeds final_ratio {self.final_ratio}: "
                "masks only shrink, the ratio cannot decrease"
            )
        for name in ("warmup", "cooldown"):
            value = getattr(self, name)
            if not (0.0 <= value < 1.0) or math.isnan(value):
                raise ValueError(f"{name} must be a fraction in [0, 1), got {value}")
        if self.warmup + self.cooldown >= 1.0:
            raise ValueError(
                f"warmup + cooldown must be < 1, got {self.warmup} + {self.cooldown}"
            )
        if isinstance(self.prune_every, bool) or int(self.prune_every) != self.prune_every or (
            self.prune_every < 1
        ):
            raise ValueError(f"prune_every must be an integer >= 1, got {self.prune_every!r}")
        object.__setattr__(self, "prune_every", int(self.prune_every))

    @staticmethod
    def one_shot(final_ratio: float, calibration_steps: int, total_steps: int) -> OneShotSchedule:
        """A one-shot schedule: one mask update at ``calibration_steps``, then fine-tuning."""
        return OneShotSchedule(total_steps, final_ratio, calibration_steps)

    @property
    def ramp_end(self) -> int:
        """Step at which the final ratio is reached; masks are frozen after it."""
        return max(1, self.total_steps - _round_half_up(self.cooldown * self.total_steps))

    @property
    def ramp_start(self) -> int:
        """Last step of the warmup (ratio ``init_ratio``); the cubic ramp starts here."""
        return min(_round_half_up(self.warmup * self.total_steps), self.ramp_end)

    def ratio_at(self, step: float) -> float:
        """Target pruning ratio at ``step`` (completed optimizer steps)."""
        s, e = self.ramp_start, self.ramp_end
        if step >= e:
            return float(self.final_ratio)
        if step <= s:
            return float(self.init_ratio)
        frac = 1.0 - (step - s) / (e - s)
        return float(self.final_ratio + (self.init_ratio - self.final_ratio) * frac**3)

    def update_steps(self) -> list[int]:
        """All steps at which masks are rewritten, ascending."""
        s, e = self.ramp_start, self.ramp_end
        steps = set(range(s + self.prune_every, e, self.prune_every))
        steps.add(e)
        if self.init_ratio > 0:
            steps.add(s)
        return sorted(t for t in steps if t >= 1)

    def is_update_step(self, step: int) -> bool:
        """Whether masks are rewritten after optimizer step ``step``."""
        s, e = self.ramp_start, self.ramp_end
        if step < 1 or step < s or step > e:
            return False
        if step == e or (step == s and self.init_ratio > 0):
            return True
        return step > s and (step - s) % self.prune_every == 0


@dataclasses.dataclass(frozen=True)
class OneShotSchedule:
    """One-shot pruning: ``r_init = r_final``, a single mask update at ``calibration_steps``.

    The first ``calibration_steps`` steps only accumulate importance scores; the masks are then
    set to ``final_ratio`` once and stay frozen while LoRA fine-tunes to ``total_steps``.
    ``ratio_at`` is ``final_ratio`` everywhere (the formula with ``r_init = r_final``).
    """

    total_steps: int
    final_ratio: float
    calibration_steps: int

    def __post_init__(self) -> None:
        _check_total(self.total_steps)
        object.__setattr__(self, "total_steps", int(self.total_steps))
        _check_ratio("final_ratio", self.final_ratio)
        c = self.calibration_steps
        if isinstance(c, bool) or int(c) != c or not (1 <= c <= self.total_steps):
            raise ValueError(
                f"calibration_steps must be an integer in [1, total_steps={self.total_steps}], "
                f"got {c!r}"
            )
        object.__setattr__(self, "calibration_steps", int(c))

    @property
    def init_ratio(self) -> float:
        return float(self.final_ratio)

    @property
    def ramp_start(self) -> int:
        return self.calibration_steps

    @property
    def ramp_end(self) -> int:
        return self.calibration_steps

    def ratio_at(self, step: float) -> float:
        """Target pruning ratio: ``final_ratio`` at every step."""
        return float(self.final_ratio)

    def update_steps(self) -> list[int]:
        return [self.calibration_steps]

    def is_update_step(self, step: int) -> bool:
        return step == self.calibration_steps
