"""Per-step wall time with warm-up exclusion, CUDA synchronisation and resumable state.

    timer = StepTimer(warmup_steps=5, device=device)
    for batch in loader:
        timer.start(); train_step(batch); timer.stop()
    timer.summary()  # {"step_time_median_s": ..., "step_time_p90_s": ..., "steps_timed": ..., ...}

Clock: ``time.perf_counter`` (seconds). On a CUDA device both ends call ``torch.cuda.synchronize`` so a
step's time includes the kernels it queued, not just their launch.

Resume: ``state_dict()`` keeps every measurement and where each session (segment) began;
``load_state_dict()`` restores them and opens a new segment. The first ``warmup_steps`` measurements of
EVERY segment are warm-up and excluded, because a resumed process pays the same one-off costs again
(CUDA context, cuDNN autotuning, allocator growth, ``torch.compile``) that the first session's warm-up
excluded; counting them would make a resumed run look slower than an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import itertools
import time

import numpy as np
import torch

_STATE_VERSION = 1


class StepTimer:
    """Wall time of training steps in seconds; the first ``warmup_steps`` of each segment are excluded.

    ``device``: synchronise CUDA around each measurement when it is a CUDA device.
    ``times``: every measurement so far (warm-up included), in seconds, in order.
    """

    def __init__(self, warmup_steps: int = 5, device: torch.device | str = "cpu"):
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.device = torch.device(device)
        self.times: list[float] = []
        self._segment_starts: list[int] = [0]
        self._t0: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        """Begin one measurement (synchronises CUDA first)."""
        if self._t0 is not None:
            raise RuntimeError("StepTimer.start() called twice without stop()")
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """End the measurement begun by ``start()`` (synchronises CUDA first); returns it in seconds."""
        if self._t0 is None:
            raise RuntimeError("StepTimer.stop() called without start()")
        self._sync()
        dt = time.perf_counter() - self._t0
        self._t0 = None
        self.times.append(dt)
        return dt

    def cancel(self) -> None:
        """Drop a measurement begun by ``start()`` without recording it (e.g. the step raised)."""
        self._t0 = None

    @contextlib.contextmanager
    def step(self):
        """``with timer.step(): ...`` times the block; a block that raises is not recorded."""
        self.start()
        try:
            yield self
        except BaseException:
            self.cancel()
            raise
        self.stop()

    @property
    def segments(self) -> list[int]:
        """Index into ``times`` where each session (the first run, then each resume) began."""
        return list(self._segment_starts)

    @property
    def timed(self) -> list[float]:
        """The measurements that count (seconds): ``times`` minus the first ``warmup_steps`` of each segment."""
        bounds = self._segment_starts + [len(self.times)]
        out: list[float] = []
        for begin, end in itertools.pairwise(bounds):
            out.extend(self.times[begin + self.warmup_steps:end])
        return out

    def summary(self) -> dict:
        """Median, 90th percentile (linear interpolation) and mean of the counted step times in seconds.

        Keys: ``step_time_median_s``, ``step_time_p90_s``, ``step_time_mean_s`` (None when no step counted,
        e.g. a run shorter than its warm-up), ``steps_timed`` (counted), ``warmup_steps`` (per segment),
        ``steps_measured`` (all, warm-up included), ``segments`` (1 + number of resumes).
        """
        timed = np.asarray(self.timed, dtype=np.float64)
        have = timed.size > 0
        return {
            "step_time_median_s": float(np.median(timed)) if have else None,
            "step_time_p90_s": float(np.percentile(timed, 90)) if have else None,
            "step_time_mean_s": float(timed.mean()) if have else None,
            "steps_timed": int(timed.size),
            "warmup_steps": self.warmup_steps,
            "steps_measured": len(self.times),
            "segments": len(self._segment_starts),
        }

    def state_dict(self) -> dict:
        """Plain-Python state (JSON/torch.save friendly): every measurement in seconds and segment starts."""
        return {"version": _STATE_VERSION, "times": [float(t) for t in self.times],
                "segment_starts": list(self._segment_starts), "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output and open a new segment: the next ``warmup_steps`` measurements
        are warm-up again. The warm-up length stays this timer's own ``warmup_steps``."""
        if not isinstance(state, dict) or "times" not in state or "segment_starts" not in state:
            raise ValueError(f"StepTimer state must be a dict with 'times' and 'segment_starts', got {state!r:.200}")
        if state.get("version", _STATE_VERSION) != _STATE_VERSION:
            raise ValueError(f"StepTimer state version {state.get('version')!r} is not {_STATE_VERSION}")
        times = [float(t) for t in state["times"]]
        starts = [int(s) for s in state["segment_starts"]]
        if not starts or starts[0] != 0 or starts != sorted(starts) or starts[-1] > len(times):
            raise ValueError(f"StepTimer state 'segment_starts' must rise from 0 to at most len(times)="
                             f"{len(times)}, got {starts}")
        self.times = times
        self._segment_starts = starts if starts[-1] == len(times) else starts + [len(times)]
        self._t0 = None
