"""``mdh bench step``: median training-step time and peak memory per Level-2 batch M, side by side.

A step is THE training step, ``harness.train_step.TrainStep`` (the object ``mdh train`` steps with, built
from a default ``TrainConfig``): bf16 autocast on CUDA, encode the B observations once, draw the Level-2
batch, loss, backward, gradient clipping, AdamW with the paper's parameter groups, the LR schedule.

Inputs: with ``data`` (``--data PATH``) a fixed list of real batches, read from the dataset with the
training transforms at the policy's ``num_points`` and collated before any step runs (data loading is not
timed); every M steps through the same list in the same order. Without it, a synthetic batch of the
preset's shape (``harness.bench.synthetic``). Results say which (``inputs``).

- Time: all M are timed in ONE process, steps interleaved round-robin (M1, M2, ..., M1, M2, ...) after a
  warm-up, so drift in machine load and process-to-process variance (which reached 20 % here between two
  identical processes) hit every M alike. CUDA is synchronised around each step.
- Memory: each M runs in its own fresh process, because a process's RSS peak only grows: measuring several
  M in one process would report the running maximum. CPU reports the process RSS peak
  (``harness.measure.memory.maxrss_bytes``) and the growth over the RSS before the first step; CUDA reports
  ``max_memory_allocated``/``max_memory_reserved``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from harness.bench.synthetic import synthetic_batch
from harness.config import TrainConfig
from harness.data.errors import DataError
from harness.measure.memory import maxrss_bytes
from harness.policy import build_policy, get_policy
from harness.train_step import TrainStep

DEFAULT_DATA_BATCHES = 8


class BenchInputError(ValueError):
    """Inputs ``mdh bench step`` cannot use (a missing or empty dataset, too few keysteps); one line."""


def _data_path(data: str | os.PathLike) -> Path:
    if not str(data).strip():
        raise BenchInputError("--data is an empty path")
    path = Path(data).expanduser()
    if not path.exists():
        raise BenchInputError(f"--data {data}: no such file or folder")
    return path


def open_dataset(data: str | os.PathLike, split: str = "train", kind: str = "voxel1cm", spec=None, B: int = 1):
    """The ``KeystepDataset`` at ``data`` (with the training transform the ``InputSpec`` ``spec`` asks for, or
    raw when None).
    Raises ``BenchInputError`` (one line) when it is missing, unreadable or holds fewer than ``B`` keysteps."""
    from harness.data.dataset import KeystepDataset
    path = _data_path(data)
    transform = spec.transform(True) if spec is not None else None
    try:
        ds = KeystepDataset(path, split=split, kind=kind, transform=transform, seed=0,
                            n_hist=spec.n_hist if spec is not None else 1,
                            require_text=spec is None or spec.text_dim is not None)
    except DataError as e:
        raise BenchInputError(f"--data {data} (split {split!r}, kind {kind!r}): {e}") from None
    if len(ds) == 0:
        raise BenchInputError(f"--data {data} (split {split!r}, kind {kind!r}) holds no keysteps")
    if len(ds) < B:
        raise BenchInputError(f"--data {data} (split {split!r}, kind {kind!r}) holds {len(ds)} keysteps, "
                              f"fewer than one batch of --B {B}")
    return ds


def check_data(data: str | os.PathLike, split: str = "train", kind: str = "voxel1cm", B: int = 1) -> int:
    """Fail fast, before any subprocess starts: the number of keysteps, or ``BenchInputError``."""
    return len(open_dataset(data, split, kind, None, B))


def data_batches(data: str | os.PathLike, B: int, spec, split: str = "train", kind: str = "voxel1cm",
                 n_batches: int = DEFAULT_DATA_BATCHES) -> list[dict]:
    """Up to ``n_batches`` collated batches of ``B`` real keysteps (a seed-0 permutation of the dataset, no
    keystep twice), read with the training transform the policy's ``InputSpec`` asks for and checked against
    it. Deterministic."""
    from harness.data.collate import collate_keysteps

    ds = open_dataset(data, split, kind, spec, B)
    n = max(1, min(n_batches, len(ds) // B))
    order = np.random.default_rng(0).permutation(len(ds))[:n * B]
    try:
        items = [ds[int(i)] for i in order]
    except DataError as e:
        raise BenchInputError(f"--data {data}: {e}") from None
    batches = [collate_keysteps(items[k * B:(k + 1) * B]) for k in range(n)]
    try:
        spec.check_batch(batches[0], where=f"a batch of --data {data}")
    except ValueError as e:
        raise BenchInputError(str(e)) from None
    return batches


def inputs_label(data: str | os.PathLike | None, split: str, n_batches: int) -> str:
    return "synthetic" if data is None else f"data:{data} ({split}, {n_batches} batches)"


class StepRunner:
    """A policy, its ``TrainStep`` (``self.trainer``) and fixed input batches; ``step(M)`` runs one training
    step at Level-2 batch M and returns its wall time.

    ``data``: a dataset path for real batches (``split``/``kind``, ``n_batches`` of them, pre-loaded here),
    else one synthetic batch. Each M cycles through the batches from the first, so every M sees the same
    inputs in the same order however the steps of different M are interleaved.
    """

    def __init__(self, model: str, preset: str, B: int, device: str = "cpu", seed: int = 0,
                 data: str | os.PathLike | None = None, split: str = "train", kind: str = "voxel1cm",
                 n_batches: int = DEFAULT_DATA_BATCHES):
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.policy = build_policy(model, preset=preset).to(self.device).train()
        spec = self.policy.input_spec  # build_policy guarantees one
        if data is None:
            if spec.modality == "images":
                raise BenchInputError(f"model {model!r} reads camera images; synthetic batches are point clouds "
                                      "only: pass --data with a keysteps dataset")
            batches = [synthetic_batch(B, spec.num_points, D=spec.text_dim or 512, seed=seed, full=True,
                                       n_hist=spec.n_hist)]
        else:
            batches = data_batches(data, B, spec, split=split, kind=kind, n_batches=n_batches)
        self.batches = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        self.inputs = inputs_label(data, split, len(self.batches))
        self.train_cfg = TrainConfig(B=B, seed=seed, device=str(self.device))
        self.trainer = TrainStep(self.policy, self.train_cfg, self.device)
        self._next: dict[int, int] = {}

    @property
    def autocast(self) -> str:
        return "bf16" if self.device.type == "cuda" and self.train_cfg.bf16 else "none"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def next_batch(self, M: int) -> dict:
        i = self._next.get(M, 0)
        self._next[M] = i + 1
        return self.batches[i % len(self.batches)]

    def step(self, M: int) -> float:
        """One training step at Level-2 batch M; returns its wall time in seconds."""
        batch = self.next_batch(M)
        self.sync()
        t0 = time.perf_counter()
        self.trainer.step(batch, M)
        self.sync()
        return time.perf_counter() - t0

    def describe(self) -> dict:
        dev = self.device
        return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "torch_threads": torch.get_num_threads(),
                "params": sum(p.numel() for p in self.policy.parameters()),
                "inputs": self.inputs, "input_batches": len(self.batches), "autocast": self.autocast}


def time_interleaved(model: str, preset: str, B: int, Ms: list[int], steps: int = 10, warmup: int = 3,
                     device: str = "cpu", **inputs) -> dict:
    """Step times per M from one process, steps interleaved round-robin. Returns {"times": {M: [s, ...]}, ...}.
    ``inputs``: ``data``, ``split``, ``kind``, ``n_batches`` of ``StepRunner``."""
    runner = StepRunner(model, preset, B, device, **inputs)
    for _ in range(warmup):
        for M in Ms:
            runner.step(M)
    times: dict[int, list[float]] = {M: [] for M in Ms}
    for _ in range(steps):
        for M in Ms:
            times[M].append(runner.step(M))
    return {"times": {str(M): t for M, t in times.items()}, **runner.describe()}


def peak_memory(model: str, preset: str, B: int, M: int, steps: int = 2, device: str = "cpu", **inputs) -> dict:
    """Peak memory of ``steps`` training steps at one M, meant to run in a fresh process."""
    runner = StepRunner(model, preset, B, device, **inputs)
    rss_before = psutil.Process().memory_info().rss
    if runner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runner.device)
    for _ in range(steps):
        runner.step(M)
    if runner.device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(runner.device)),
                "reserved_peak_bytes": int(torch.cuda.max_memory_reserved(runner.device)),
                "memory_source": "cuda_max_memory_allocated"}
    peak = maxrss_bytes()
    if peak is None:  # no ``resource`` module (Windows): the RSS now, a lower bound of the peak
        peak = psutil.Process().memory_info().rss
    return {"peak_memory_bytes": int(peak), "memory_source": "process_rss_peak",
            "rss_before_steps_bytes": int(rss_before), "step_memory_bytes": int(peak - rss_before)}


def _subprocess(func: str, kwargs: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "harness.bench.step", func, json.dumps(kwargs)],
                          check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark {func}({kwargs}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_step(model: str, preset: str | None, B: int, Ms: list[int], steps: int = 10, warmup: int = 3,
               device: str = "cpu", data: str | os.PathLike | None = None, split: str = "train",
               kind: str = "voxel1cm", n_batches: int = DEFAULT_DATA_BATCHES) -> list[dict]:
    """One result dict per M (keys: model, preset, B, M, inputs, step_time_median_s, step_time_p90_s,
    samples_per_s, peak_memory_bytes, memory_source, device, autocast, ...) with ratios to the first M.

    ``data``: time real batches from this dataset (``split``, ``kind``, ``n_batches`` batches) instead of a
    synthetic one; checked here first, so a bad path raises ``BenchInputError`` before any subprocess starts.
    """
    try:  # a bad model or preset is one line here, not a traceback from a subprocess
        entry = get_policy(model)
        entry.make_config(preset)
        preset = preset or entry.default_preset
    except (KeyError, ValueError) as e:
        raise BenchInputError(e.args[0] if isinstance(e, KeyError) else str(e)) from None
    inputs: dict = {}
    if data is not None:
        check_data(data, split, kind, B)
        inputs = {"data": str(Path(data).expanduser().resolve()), "split": split, "kind": kind,
                  "n_batches": n_batches}
    timing = _subprocess("time_interleaved", dict(model=model, preset=preset, B=B, Ms=list(Ms), steps=steps,
                                                  warmup=warmup, device=device, **inputs))
    label = inputs_label(None if data is None else data, split, timing["input_batches"])
    results = []
    for M in Ms:
        t = timing["times"][str(M)]
        mem = _subprocess("peak_memory", dict(model=model, preset=preset, B=B, M=M, device=device, **inputs))
        results.append({
            "model": model, "preset": preset, "B": B, "M": M, "steps": steps, "warmup": warmup,
            "inputs": label, "data_path": inputs.get("data"), "data_split": inputs.get("split"),
            "data_kind": inputs.get("kind"), "input_batches": timing["input_batches"],
            "step_time_median_s": float(np.median(t)), "step_time_p90_s": float(np.percentile(t, 90)),
            "samples_per_s": B * M / float(np.median(t)), "step_times_s": t,
            "device": timing["device"], "torch_threads": timing["torch_threads"], "params": timing["params"],
            "autocast": timing["autocast"], **mem,
        })
    base = results[0]
    for r in results:
        r["time_ratio"] = r["step_time_median_s"] / base["step_time_median_s"]
        r["memory_ratio"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
        if base.get("step_memory_bytes"):
            r["step_memory_ratio"] = r["step_memory_bytes"] / base["step_memory_bytes"]
    return results


def format_table(results: list[dict]) -> str:
    from tabulate import tabulate

    base_M = results[0]["M"]
    rows = [[r["M"], f"{r['step_time_median_s']:.3f}", f"{r['step_time_p90_s']:.3f}", f"{r['time_ratio']:.3f}",
             f"{r['peak_memory_bytes'] / 2**20:.0f}", f"{r['memory_ratio']:.3f}",
             f"{r['step_memory_bytes'] / 2**20:.0f}" if "step_memory_bytes" in r else "-",
             f"{r['step_memory_ratio']:.3f}" if "step_memory_ratio" in r else "-"] for r in results]
    head = ["M", "median s", "p90 s", f"time / M={base_M}", "peak MiB", f"peak / M={base_M}",
            "step MiB", f"step / M={base_M}"]
    r0 = results[0]
    title = (f"{r0['model']} preset={r0['preset']} B={r0['B']} inputs={r0.get('inputs', 'synthetic')} "
             f"device={r0['device']} autocast={r0.get('autocast', 'none')} threads={r0['torch_threads']} "
             f"params={r0['params']:,}; step: harness.train_step.TrainStep; time: {r0['steps']} interleaved "
             f"steps per M in one process; memory ({r0['memory_source']}): one process per M (step MiB = peak "
             f"minus RSS before the first step)")
    return title + "\n" + tabulate(rows, head, tablefmt="github")


if __name__ == "__main__":
    funcs = {"time_interleaved": time_interleaved, "peak_memory": peak_memory}
    print(json.dumps(funcs[sys.argv[1]](**json.loads(sys.argv[2]))))
