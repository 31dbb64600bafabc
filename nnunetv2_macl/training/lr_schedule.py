"""The pretraining's learning-rate schedule: cosine decay per iteration (paper), and honest extension.

A run of E epochs decays the learning rate from ``lr`` to 0 over its E x iterations. Resuming with
another ``--epochs`` used to recompute the cosine for the new total while the step count was
restored, so the learning rate jumped back up. An extension is now one more cosine *segment*: from
the learning rate the run has reached down to 0 at the new end, so it never rises. The segments are
stored in the checkpoint (``macl.lr_schedule``): a run extended from 32 to 100 epochs is not a
100-epoch run, and its checkpoint says so. A run whose learning rate has already reached 0 (a
finished run) cannot be extended this way: that would train at lr 0; start a new run instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from nnunetv2_macl.errors import ConfigError

# below this fraction of the peak the run has effectively stopped learning: extending it is refused
MIN_EXTENSION_FACTOR = 1e-3


@dataclass(frozen=True)
class CosineSegment:
    """Factor ``start_factor * (1 + cos(pi * (it - start) / (end - start))) / 2`` from ``start``; 0 after ``end``."""

    start: int
    end: int
    start_factor: float

    def factor(self, it: int) -> float:
        span = max(1, self.end - self.start)
        t = min(max(it - self.start, 0), span) / span
        return self.start_factor * 0.5 * (1 + math.cos(math.pi * t))


class CosineSchedule:
    """The learning-rate factor per iteration (a ``LambdaLR`` lambda): cosine segments, each in force from
    its start until the next one starts (an extension takes over from where it begins)."""

    def __init__(self, segments: list[CosineSegment]) -> None:
        if not segments or any(b.start < a.start for a, b in zip(segments, segments[1:])):
            raise ValueError(f"a schedule needs segments in increasing order of start, got {segments}")
        self.segments = list(segments)

    @classmethod
    def single(cls, total_iterations: int) -> "CosineSchedule":
        return cls([CosineSegment(0, max(1, int(total_iterations)), 1.0)])

    @property
    def end(self) -> int:
        return self.segments[-1].end

    def __call__(self, it: int) -> float:
        seg = next(s for s in reversed(self.segments) if s.start <= it or s is self.segments[0])
        return seg.factor(it)

    def extended(self, at_iteration: int, new_end: int, run: str = "the run") -> "CosineSchedule":
        """This schedule up to ``at_iteration``, then a cosine from the factor reached there to 0 at ``new_end``."""
        if new_end == self.end:
            return self
        if new_end <= at_iteration:
            raise ConfigError(f"Cannot resume {run} with a schedule that ends at iteration {new_end}: it has "
                              f"already run {at_iteration} iterations; pass a larger --epochs")
        reached = self(at_iteration)
        if reached < MIN_EXTENSION_FACTOR:
            raise ConfigError(
                f"Cannot extend {run}: its learning rate has decayed to {reached:.1e} of the peak (it has finished "
                f"its cosine schedule), so continuing would not train. Start a new pretraining with the longer "
                f"--epochs in another output folder (-o); --keep-epochs keeps snapshots on the way")
        kept = [s for s in self.segments if s.start < at_iteration]
        return CosineSchedule(kept + [CosineSegment(at_iteration, new_end, reached)])

    def to_list(self) -> list[list[float]]:
        return [[s.start, s.end, s.start_factor] for s in self.segments]

    @classmethod
    def from_list(cls, rows: list) -> "CosineSchedule":
        return cls([CosineSegment(int(a), int(b), float(f)) for a, b, f in rows])

    def describe(self) -> str:
        return "; ".join(f"from iteration {s.start}: cosine from {s.start_factor:.4g} x lr to 0 at {s.end}"
                         for s in self.segments)
