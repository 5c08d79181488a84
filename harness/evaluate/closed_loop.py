"""Closed-loop evaluation results, simulator-independent: episode outcomes, the summary with Wilson
intervals, episodes.jsonl, and the paired comparison of two evaluations on the same episode seeds.

Every episode ends with exactly one outcome:

- ``success``: the environment reported success;
- ``policy_failure``: the keypose budget (or the environment's step budget) was spent without success;
- ``unreachable``: the policy predicted a target the environment truly cannot execute (RLBench's motion
  planner found no path); the episode ends there. Meta-World never gives it: like the environment itself,
  its evaluation clips targets to the mocap box and records how many keyposes were clipped and by how much;
- ``sim_error``: the simulator raised or produced a non-finite state;
- ``infra_failure``: the worker running the episode crashed or hung past its timeout (retried, bounded).

Success rates are reported over policy-attributable episodes (success + policy_failure + unreachable):
simulator and infrastructure failures are listed, never counted as the policy's.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.record import write_text_atomic
from harness.report.stats import wilson_interval

OUTCOMES = ("success", "policy_failure", "unreachable", "sim_error", "infra_failure")
POLICY_ATTRIBUTABLE = ("success", "policy_failure", "unreachable")
EPISODES_FILE = "episodes.jsonl"


@dataclass
class EpisodeResult:
    """One episode: ``task``, ``seed``, ``outcome`` (one of OUTCOMES), ``keyposes`` predicted, ``env_steps``,
    ``time_s`` wall time, ``error`` text (sim/infra failures, unreachable targets), ``attempts`` (1 + retries
    after infrastructure failures), ``policy``: what was evaluated ("oracle" or the run);
    ``clipped_keyposes``: predicted targets moved into the environment's reachable box before execution,
    ``clip_max_m`` / ``clip_mean_m``: the largest / mean distance (m) they moved (0 when none)."""

    task: str
    seed: int
    outcome: str
    keyposes: int = 0
    env_steps: int = 0
    time_s: float = 0.0
    error: str | None = None
    attempts: int = 1
    policy: str = ""
    clipped_keyposes: int = 0
    clip_max_m: float = 0.0
    clip_mean_m: float = 0.0

    def __post_init__(self):
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} is not one of {OUTCOMES}")

    def to_dict(self) -> dict:
        return asdict(self)


def _rate(results: list[EpisodeResult]) -> dict:
    counted = [r for r in results if r.outcome in POLICY_ATTRIBUTABLE]
    wins = sum(r.outcome == "success" for r in counted)
    n = len(counted)
    lo, hi = wilson_interval(wins, n) if n else (None, None)
    return {"success": wins / n if n else None, "success_ci": [lo, hi], "successes": wins, "episodes": n,
            "excluded": len(results) - n}


def summarize(results: list[EpisodeResult], oracle: list[EpisodeResult] | None = None) -> dict:
    """{"success" (0-1 over policy-attributable episodes), "success_ci" (Wilson 95 %), "successes",
    "episodes" (counted), "excluded", "per_task": {task: same keys}, "failures": {outcome: count} (every
    outcome, success included), "clipping": {"keyposes" clipped into the reachable box, "episodes" with
    any, "max_m" the largest move}, "oracle_success" (and its per task) when ``oracle`` is given}."""
    out = _rate(results)
    out["per_task"] = {t: _rate([r for r in results if r.task == t]) for t in sorted({r.task for r in results})}
    counts = Counter(r.outcome for r in results)
    out["failures"] = {o: counts.get(o, 0) for o in OUTCOMES}
    clipped = [r for r in results if r.clipped_keyposes]
    out["clipping"] = {"keyposes": sum(r.clipped_keyposes for r in results), "episodes": len(clipped),
                       "max_m": max((r.clip_max_m for r in clipped), default=0.0)}
    if oracle is not None:
        rate = _rate(oracle)
        out["oracle_success"] = rate["success"]
        out["oracle_success_ci"] = rate["success_ci"]
        out["oracle_per_task"] = {t: _rate([r for r in oracle if r.task == t])["success"]
                                  for t in sorted({r.task for r in oracle})}
    return out


def write_episodes(path: Path, results: list[EpisodeResult]) -> None:
    """episodes.jsonl: one JSON object per episode (atomic: a reader never sees half a file)."""
    write_text_atomic(Path(path), "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in results))


def read_episodes(path: Path) -> list[EpisodeResult]:
    """Parse episodes.jsonl; a malformed line raises ValueError naming the file and line number."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(EpisodeResult(**json.loads(line)))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path} line {i}: not an episode record ({e})") from None
    return out


def paired_comparison(a: list[EpisodeResult], b: list[EpisodeResult]) -> dict:
    """Success of A minus success of B on the episodes both counted (same task and seed), overall and per
    task, with a paired 95 % interval (normal approximation on the per-episode differences; t quantile for
    small n). Episodes only one side has, or excluded on either side, are left out and counted."""
    key = {(r.task, r.seed): r for r in a if r.outcome in POLICY_ATTRIBUTABLE}
    pairs = [(key[(r.task, r.seed)], r) for r in b if r.outcome in POLICY_ATTRIBUTABLE and (r.task, r.seed) in key]

    def diff(ps) -> dict:
        d = [float(x.outcome == "success") - float(y.outcome == "success") for x, y in ps]
        n = len(d)
        if n == 0:
            return {"n": 0, "a": None, "b": None, "difference": None, "ci": [None, None]}
        mean = sum(d) / n
        if n > 1:
            from scipy.stats import t

            sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
            half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        else:
            half = float("nan")
        return {"n": n, "a": sum(x.outcome == "success" for x, _ in ps) / n,
                "b": sum(y.outcome == "success" for _, y in ps) / n, "difference": mean,
                "ci": [mean - half, mean + half]}

    out = diff(pairs)
    out["per_task"] = {t: diff([p for p in pairs if p[0].task == t]) for t in sorted({p[0].task for p in pairs})}
    out["unpaired"] = len(a) + len(b) - 2 * len(pairs)
    return out
