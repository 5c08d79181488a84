"""``mdh bench step``: median training-step time and peak memory per Level-2 batch M, side by side.

A step is what training does: encode the B observations once, draw the Level-2 batch, loss, backward,
AdamW step, on synthetic inputs of the preset's shape (no data loading).

- Time: all M are timed in ONE process, steps interleaved round-robin (M1, M2, ..., M1, M2, ...) after a
  warm-up, so drift in machine load and process-to-process variance (which reached 20 % here between two
  identical processes) hit every M alike. CUDA is synchronised around each step.
- Memory: each M runs in its own fresh process, because a process's RSS peak only grows: measuring several
  M in one process would report the running maximum. CPU reports the process RSS peak and the growth over
  the RSS before the first step; CUDA reports ``max_memory_allocated``/``max_memory_reserved``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import psutil
import torch

from harness.bench.synthetic import synthetic_batch
from harness.level2 import level2_losses
from harness.policy import build_policy


class StepRunner:
    """A policy, an optimizer and a synthetic batch; ``step(M)`` runs one training step."""

    def __init__(self, model: str, preset: str, B: int, device: str = "cpu", seed: int = 0):
        self.device = torch.device(device)
        torch.manual_seed(seed)
        self.policy = build_policy(model, preset=preset).to(self.device).train()
        cfg = self.policy.cfg
        batch = synthetic_batch(B, cfg.num_points, D=cfg.text_dim, seed=seed, full=True)
        self.batch = {k: v.to(self.device) for k, v in batch.items()}
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=1e-4)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, M: int) -> float:
        """One training step at Level-2 batch M; returns its wall time in seconds."""
        self.sync()
        t0 = time.perf_counter()
        level2_losses(self.policy, self.batch, M)["total"].backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sync()
        return time.perf_counter() - t0

    def describe(self) -> dict:
        dev = self.device
        return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "torch_threads": torch.get_num_threads(),
                "params": sum(p.numel() for p in self.policy.parameters())}


def time_interleaved(model: str, preset: str, B: int, Ms: list[int], steps: int = 10, warmup: int = 3,
                     device: str = "cpu") -> dict:
    """Step times per M from one process, steps interleaved round-robin. Returns {"times": {M: [s, ...]}, ...}."""
    runner = StepRunner(model, preset, B, device)
    for _ in range(warmup):
        for M in Ms:
            runner.step(M)
    times: dict[int, list[float]] = {M: [] for M in Ms}
    for _ in range(steps):
        for M in Ms:
            times[M].append(runner.step(M))
    return {"times": {str(M): t for M, t in times.items()}, **runner.describe()}


def peak_memory(model: str, preset: str, B: int, M: int, steps: int = 2, device: str = "cpu") -> dict:
    """Peak memory of ``steps`` training steps at one M, meant to run in a fresh process."""
    runner = StepRunner(model, preset, B, device)
    rss_before = psutil.Process().memory_info().rss
    if runner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runner.device)
    for _ in range(steps):
        runner.step(M)
    if runner.device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(runner.device)),
                "reserved_peak_bytes": int(torch.cuda.max_memory_reserved(runner.device)),
                "memory_source": "cuda_max_memory_allocated"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_memory_bytes": int(peak), "memory_source": "process_rss_peak",
            "rss_before_steps_bytes": int(rss_before), "step_memory_bytes": int(peak - rss_before)}


def _subprocess(func: str, kwargs: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "harness.bench.step", func, json.dumps(kwargs)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark {func}({kwargs}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_step(model: str, preset: str, B: int, Ms: list[int], steps: int = 10, warmup: int = 3,
               device: str = "cpu") -> list[dict]:
    """One result dict per M (keys: model, preset, B, M, step_time_median_s, step_time_p90_s, samples_per_s,
    peak_memory_bytes, memory_source, device, ...) with ratios to the first M."""
    timing = _subprocess("time_interleaved", dict(model=model, preset=preset, B=B, Ms=list(Ms), steps=steps,
                                                  warmup=warmup, device=device))
    results = []
    for M in Ms:
        t = timing["times"][str(M)]
        mem = _subprocess("peak_memory", dict(model=model, preset=preset, B=B, M=M, device=device))
        results.append({
            "model": model, "preset": preset, "B": B, "M": M, "steps": steps, "warmup": warmup,
            "step_time_median_s": float(np.median(t)), "step_time_p90_s": float(np.percentile(t, 90)),
            "samples_per_s": B * M / float(np.median(t)), "step_times_s": t,
            "device": timing["device"], "torch_threads": timing["torch_threads"], "params": timing["params"],
            **mem,
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
    title = (f"{r0['model']} preset={r0['preset']} B={r0['B']} device={r0['device']} threads={r0['torch_threads']} "
             f"params={r0['params']:,}; time: {r0['steps']} interleaved steps per M in one process; memory "
             f"({r0['memory_source']}): one process per M (step MiB = peak minus RSS before the first step)")
    return title + "\n" + tabulate(rows, head, tablefmt="github")


if __name__ == "__main__":
    funcs = {"time_interleaved": time_interleaved, "peak_memory": peak_memory}
    print(json.dumps(funcs[sys.argv[1]](**json.loads(sys.argv[2]))))
