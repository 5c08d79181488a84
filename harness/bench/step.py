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
  M in one process would report the running maximum. The steps run inside the ``MemoryMonitor`` that
  ``mdh train`` wraps its loop in (``harness.measure.memory``), so the figures and ``memory_source`` names
  are the run record's (CPU: ``process_rss``, plus the growth over the RSS before the first step; CUDA:
  NVML, else the allocator's reserved peak, with the allocator peaks beside it).
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

from harness.bench.synthetic import SYNTHETIC_CAMERAS, synthetic_batch
from harness.config import TrainConfig
from harness.data.errors import DataError
from harness.measure.memory import MemoryMonitor
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


def inputs_label(data: str | os.PathLike | None, split: str, n_batches: int, cameras=None) -> str:
    if data is None:
        return "synthetic" + (f" ({cameras[0]} cameras {cameras[1]}x{cameras[2]})" if cameras else "")
    return f"data:{data} ({split}, {n_batches} batches)"


class StepRunner:
    """A policy, its ``TrainStep`` (``self.trainer``) and fixed input batches; ``step(M)`` runs one training
    step at Level-2 batch M and returns its wall time.

    ``data``: a dataset path for real batches (``split``/``kind``, ``n_batches`` of them, pre-loaded here),
    else one synthetic batch. Each M cycles through the batches from the first, so every M sees the same
    inputs in the same order however the steps of different M are interleaved.
    """

    def __init__(self, model: str, preset: str, B: int, device: str = "cpu", seed: int = 0,
                 data: str | os.PathLike | None = None, split: str = "train", kind: str | None = None,
                 n_batches: int = DEFAULT_DATA_BATCHES, options: dict | None = None):
        self.device = torch.device(device)
        torch.manual_seed(seed)
        info = None
        if data is not None:  # the dataset's facts (workspace bounds, text width), as `mdh train` builds with
            from harness.config import ConfigError, DataConfig, RunConfig
            from harness.train import dataset_info

            try:
                info = dataset_info(RunConfig(data=DataConfig(path=str(data), split=split)))
            except ConfigError as e:
                raise BenchInputError(str(e)) from None
        self.policy = build_policy(model, preset=preset, data_info=info, **(options or {})).to(self.device).train()
        spec = self.policy.input_spec  # build_policy guarantees one
        kind = kind_for(spec.modality, kind)
        if data is None:
            cameras = None
            if spec.modality == "images":
                n_cam = len(spec.cameras) if spec.cameras else SYNTHETIC_CAMERAS[0]
                cameras = (n_cam, *(spec.image_size or SYNTHETIC_CAMERAS[1:]))
            batches = [synthetic_batch(B, spec.num_points or 1024, D=spec.text_dim or 512, seed=seed, full=True,
                                       n_hist=spec.n_hist, cameras=cameras)]
        else:
            batches = data_batches(data, B, spec, split=split, kind=kind, n_batches=n_batches)
        self.kind = kind if data is not None else None
        self.batches = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        self.inputs = inputs_label(data, split, len(self.batches), None if data is not None else cameras)
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
                "inputs": self.inputs, "input_batches": len(self.batches), "autocast": self.autocast,
                "data_kind": self.kind}


def kind_for(modality: str, kind: str | None) -> str:
    """The data kind a policy reads: camera images exist only in "keysteps" data; points default to
    "voxel1cm" unless ``kind`` says otherwise."""
    return "keysteps" if modality == "images" else (kind or "voxel1cm")


def parse_targets(text: str) -> list[dict]:
    """``--model`` -> what to time: comma-separated ``name`` or ``name[variant]`` (``PolicyEntry.variants``).
    A bare name stands for the policy as configured by its preset AND each of its variants (3D Diffuser
    Actor: its three Level-2 strategies). Returns [{"label", "model", "options"}]; bad names raise
    ``BenchInputError``."""
    targets = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, variant = item.partition("[")
        try:
            entry = get_policy(name)
        except KeyError as e:
            raise BenchInputError(e.args[0]) from None
        if variant:
            variant = variant.rstrip("]")
            if variant not in entry.variants:
                raise BenchInputError(f"policy {name!r} has no variant {variant!r}; choices: {sorted(entry.variants)}")
            targets.append({"label": item, "model": name, "options": dict(entry.variants[variant])})
        else:
            targets.append({"label": name, "model": name, "options": {}})
            targets += [{"label": f"{name}[{v}]", "model": name, "options": dict(o)} for v, o in entry.variants.items()]
    if not targets:
        raise BenchInputError(f"--model names no policy: {text!r}")
    labels = [t["label"] for t in targets]
    if len(set(labels)) != len(labels):
        raise BenchInputError(f"--model names a configuration twice: {labels}")
    return targets


def time_interleaved(targets: list[dict], preset: str | None, B: int, Ms: list[int], steps: int = 10,
                     warmup: int = 3, device: str = "cpu", **inputs) -> dict:
    """Step times of every (target, M) from ONE process, steps interleaved round-robin over targets and M.
    ``targets``: ``parse_targets`` entries (``preset`` None: each policy's default). Returns
    {label: {"times": {M: [s, ...]}, **describe()}}. ``inputs``: ``data``, ``split``, ``kind``, ``n_batches``."""
    runners = {t["label"]: StepRunner(t["model"], preset, B, device, options=t["options"], **inputs)
               for t in targets}
    for _ in range(warmup):
        for runner in runners.values():
            for M in Ms:
                runner.step(M)
    times = {label: {M: [] for M in Ms} for label in runners}
    for _ in range(steps):
        for label, runner in runners.items():
            for M in Ms:
                times[label][M].append(runner.step(M))
    return {label: {"times": {str(M): t for M, t in times[label].items()}, **runner.describe()}
            for label, runner in runners.items()}


def peak_memory(model: str, preset: str | None, B: int, M: int, steps: int = 2, device: str = "cpu",
                options: dict | None = None, **inputs) -> dict:
    """Peak memory of ``steps`` training steps at one M, meant to run in a fresh process.

    Measured as ``mdh train`` measures its loop: a ``harness.measure.memory.MemoryMonitor`` started after
    the policy is built, so the result has its ``summary()`` keys and ``memory_source`` is one of
    ``MEMORY_SOURCES`` (``process_rss`` on CPU; on CUDA NVML's per-process figure, else the device-wide
    figure minus its baseline, else the allocator's reserved peak). ``rss_before_steps_bytes``: the RSS
    before the first step; ``step_memory_bytes`` (``process_rss`` only): the peak minus it."""
    runner = StepRunner(model, preset, B, device, options=options, **inputs)
    rss_before = psutil.Process().memory_info().rss
    with MemoryMonitor(runner.device) as monitor:
        for _ in range(steps):
            runner.step(M)
    out = {**monitor.summary(), "rss_before_steps_bytes": int(rss_before)}
    if out["memory_source"] == "process_rss" and out["peak_memory_bytes"] is not None:
        out["step_memory_bytes"] = int(out["peak_memory_bytes"] - rss_before)
    return out


def _subprocess(func: str, kwargs: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "harness.bench.step", func, json.dumps(kwargs)],
                          check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark {func}({kwargs}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_step(model: str, preset: str | None, B: int, Ms: list[int], steps: int = 10, warmup: int = 3,
               device: str = "cpu", data: str | os.PathLike | None = None, split: str = "train",
               kind: str | None = None, n_batches: int = DEFAULT_DATA_BATCHES) -> list[dict]:
    """One result dict per (configuration, M) (keys: label, model, options, preset, B, M, inputs,
    step_time_median_s, step_time_p90_s, time_per_sample_s, samples_per_s, peak_memory_bytes, memory_source,
    device, autocast, ...) with ratios to the configuration's first M and, at equal M (so equal B x M),
    to the first configuration (``sample_time_ratio_to_first``, ``memory_ratio_to_first``).

    ``model``: ``parse_targets`` syntax (``"diffuser_actor,minidiffuser"``, ``"diffuser_actor[shared]"``).
    ``data``: time real batches from this dataset (``split``; ``kind``: the points policies' data kind,
    image policies read "keysteps"; ``n_batches`` batches) instead of a synthetic one; checked here first,
    so a bad path raises ``BenchInputError`` before any subprocess starts.
    """
    if steps < 1 or warmup < 0:
        raise BenchInputError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    targets = parse_targets(model)
    try:  # a bad preset is one line here, not a traceback from a subprocess
        for t in targets:
            get_policy(t["model"]).make_config(preset, **t["options"])
    except ValueError as e:
        raise BenchInputError(str(e)) from None
    inputs: dict = {}
    if data is not None:
        for k in sorted({kind_for(_modality(t), kind) for t in targets}):
            check_data(data, split, k, B)
        inputs = {"data": str(Path(data).expanduser().resolve()), "split": split, "kind": kind,
                  "n_batches": n_batches}
    timing = _subprocess("time_interleaved", dict(targets=targets, preset=preset, B=B, Ms=list(Ms), steps=steps,
                                                  warmup=warmup, device=device, **inputs))
    results = []
    for target in targets:
        tm = timing[target["label"]]
        label = tm["inputs"]
        rows = []
        for M in Ms:
            t = tm["times"][str(M)]
            mem = _subprocess("peak_memory", dict(model=target["model"], preset=preset, B=B, M=M, device=device,
                                                  options=target["options"], **inputs))
            median = float(np.median(t))
            rows.append({
                "label": target["label"], "model": target["model"], "options": target["options"],
                "preset": preset or get_policy(target["model"]).default_preset, "B": B, "M": M, "steps": steps,
                "warmup": warmup, "inputs": label, "data_path": inputs.get("data"), "data_split": inputs.get("split"),
                "data_kind": tm.get("data_kind"), "input_batches": tm["input_batches"],
                "step_time_median_s": median, "step_time_p90_s": float(np.percentile(t, 90)),
                "time_per_sample_s": median / (B * M), "samples_per_s": B * M / median, "step_times_s": t,
                "device": tm["device"], "torch_threads": tm["torch_threads"], "params": tm["params"],
                "autocast": tm["autocast"], **mem,
            })
        base = rows[0]
        for r in rows:
            r["time_ratio"] = r["step_time_median_s"] / base["step_time_median_s"]
            r["memory_ratio"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
            if base.get("step_memory_bytes"):
                r["step_memory_ratio"] = r["step_memory_bytes"] / base["step_memory_bytes"]
        results += rows
    first = {r["M"]: r for r in results if r["label"] == targets[0]["label"]}
    for r in results:
        ref = first[r["M"]]
        r["first_label"] = ref["label"]
        r["sample_time_ratio_to_first"] = r["time_per_sample_s"] / ref["time_per_sample_s"]
        r["memory_ratio_to_first"] = r["peak_memory_bytes"] / ref["peak_memory_bytes"]
    return results


def _modality(target: dict) -> str:
    entry = get_policy(target["model"])
    return entry.build(entry.make_config(None, **target["options"]), None).input_spec.modality


def format_table(results: list[dict]) -> str:
    from tabulate import tabulate

    base_M = results[0]["M"]
    labels = list(dict.fromkeys(r.get("label", r["model"]) for r in results))
    many = len(labels) > 1
    rows = [[*([r.get("label", r["model"])] if many else []), r["M"], f"{r['step_time_median_s']:.3f}",
             f"{r['step_time_p90_s']:.3f}", f"{r['time_ratio']:.3f}",
             f"{1e3 * r['step_time_median_s'] / (r['B'] * r['M']):.3f}",
             *([f"{r['sample_time_ratio_to_first']:.3f}"] if many else []),
             f"{r['peak_memory_bytes'] / 2**20:.0f}", f"{r['memory_ratio']:.3f}",
             *([f"{r['memory_ratio_to_first']:.3f}"] if many else []),
             f"{r['step_memory_bytes'] / 2**20:.0f}" if "step_memory_bytes" in r else "-",
             f"{r['step_memory_ratio']:.3f}" if "step_memory_ratio" in r else "-"] for r in results]
    head = [*(["configuration"] if many else []), "M", "median s", "p90 s", f"time / M={base_M}",
            "ms / sample (B x M)", *([f"sample time / {labels[0]}"] if many else []), "peak MiB",
            f"peak / M={base_M}", *([f"peak / {labels[0]}"] if many else []), "step MiB", f"step / M={base_M}"]
    r0 = results[0]
    params = ", ".join(f"{r.get('label', r['model'])} {r['params']:,}" for r in results if r["M"] == base_M)
    title = (f"{', '.join(labels)} preset={r0['preset']} B={r0['B']} inputs={r0.get('inputs', 'synthetic')} "
             f"device={r0['device']} autocast={r0.get('autocast', 'none')} threads={r0['torch_threads']} "
             f"params: {params}; step: harness.train_step.TrainStep; time: {r0['steps']} steps per configuration "
             f"and M, interleaved in one process; memory ({r0['memory_source']}): one process per configuration "
             f"and M (step MiB = peak minus RSS before the first step)"
             + (f"; ratios '/ {labels[0]}' at equal M (equal B x M)" if many else ""))
    return title + "\n" + tabulate(rows, head, tablefmt="github")


if __name__ == "__main__":
    funcs = {"time_interleaved": time_interleaved, "peak_memory": peak_memory}
    print(json.dumps(funcs[sys.argv[1]](**json.loads(sys.argv[2]))))
