"""``mdh bench step``: median training-step time and peak memory per Level-2 batch M, side by side.

A step is what training does: encode the B observations once, draw the Level-2 batch, loss, backward,
AdamW step, on synthetic inputs of the preset's shape (no data loading). Each configuration runs in its
own fresh process, because a process's RSS peak only grows: measuring several M in one process would
report the running maximum. On CUDA the allocator peak (``max_memory_allocated``) is reported instead.
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
from harness.level2 import sample_level2
from harness.policy import build_policy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_config(model: str, preset: str, B: int, M: int, steps: int = 10, warmup: int = 3,
                   device: str = "cpu", seed: int = 0) -> dict:
    """Time ``steps`` training steps after ``warmup`` steps, in this process. Returns one result dict."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    policy = build_policy(model, preset=preset).to(dev).train()
    cfg = policy.cfg
    batch = {k: v.to(dev) for k, v in synthetic_batch(B, cfg.num_points, D=cfg.text_dim, seed=seed, full=True).items()}
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)

    def step() -> None:
        cond = policy.encode(batch)
        level2 = sample_level2(policy.diffusion_target(batch), M, policy.noise_scheduler)
        policy.loss(batch, level2, cond)["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rss_before = psutil.Process().memory_info().rss
    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(steps):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    result = {
        "model": model, "preset": preset, "B": B, "M": M, "steps": steps, "warmup": warmup,
        "step_time_median_s": float(np.median(times)), "step_time_p90_s": float(np.percentile(times, 90)),
        "samples_per_s": B * M / float(np.median(times)),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "params": sum(p.numel() for p in policy.parameters()),
    }
    if dev.type == "cuda":
        result.update(peak_memory_bytes=int(torch.cuda.max_memory_allocated(dev)),
                      reserved_peak_bytes=int(torch.cuda.max_memory_reserved(dev)),
                      memory_source="cuda_max_memory_allocated")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        result.update(peak_memory_bytes=int(peak), memory_source="process_rss_peak",
                      rss_before_steps_bytes=int(rss_before), step_memory_bytes=int(peak - rss_before))
    return result


def bench_step(model: str, preset: str, B: int, Ms: list[int], steps: int = 10, warmup: int = 3,
               device: str = "cpu", isolate: bool = True) -> list[dict]:
    """Measure every M (each in a fresh subprocess when ``isolate``) and add ratios to the first M."""
    results = []
    for M in Ms:
        if isolate:
            args = json.dumps(dict(model=model, preset=preset, B=B, M=M, steps=steps, warmup=warmup, device=device))
            proc = subprocess.run([sys.executable, "-m", "harness.bench.step", args], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark of M={M} failed:\n{proc.stderr[-2000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            results.append(measure_config(model, preset, B, M, steps, warmup, device))
    base = results[0]
    for r in results:
        r["time_ratio"] = r["step_time_median_s"] / base["step_time_median_s"]
        r["memory_ratio"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
        if "step_memory_bytes" in r and base.get("step_memory_bytes"):
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
             f"params={r0['params']:,} memory={r0['memory_source']} (step MiB = peak minus RSS before the "
             f"first step)")
    return title + "\n" + tabulate(rows, head, tablefmt="github")


if __name__ == "__main__":
    print(json.dumps(measure_config(**json.loads(sys.argv[1]))))
