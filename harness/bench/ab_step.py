"""Old vs new Mini-Diffuser training step, side by side in ONE process (``python -m harness.bench.ab_step``).

The baseline is the ``minidiffuser`` package as committed at a git revision (default HEAD), extracted into a
temporary folder and imported under another name (``mdh_ab_baseline``), so the model code in the working
tree and the model code of that revision run in the same process, on the same machine, in the same minutes,
with the same weights (the baseline loads the working tree's state dict) and the same synthetic batch.
Each is stepped by its own ``harness.train_step.TrainStep`` (the step ``mdh train`` and ``mdh bench step``
run); steps are interleaved round-robin, old and new alternating first, over every M, so drift in machine
load hits both alike. Medians, not means: other processes share the CPU.

Before timing, both models predict the noise and the losses of the same eval-mode Level-2 draw; the largest
differences are printed (a faster step that changed the outputs is not a faster step).

    .venv/bin/python -m harness.bench.ab_step --rev HEAD --preset small --B 8 --M 1,64,256 --steps 15
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
BASELINE = "mdh_ab_baseline"


def extract_baseline(rev: str, into: Path, package: str = "minidiffuser", name: str = BASELINE) -> Path:
    """``package`` at git ``rev`` -> ``into/name`` with its absolute self-imports renamed; returns the folder."""
    out = into / name
    files = subprocess.run(["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", rev, package],
                           check=True, capture_output=True, text=True).stdout.split()
    pattern = re.compile(rf"\b{package}(?=[.\s])")
    for f in files:
        if not f.endswith(".py"):
            continue
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{f}"], check=True, capture_output=True,
                              text=True).stdout
        text = pattern.sub(name, text)
        target = out / Path(f).relative_to(package)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return out


def build_pair(rev: str, preset: str, tmp: Path):
    """(baseline policy at ``rev``, working-tree policy), the same model with the same weights, in train mode.

    Both are built from the BASELINE's preset: the working-tree config takes the baseline config's value of
    every field they share and its own default for fields the baseline lacks (new switches default to the
    old behaviour), so a preset edited since ``rev`` does not make the two arms different models."""
    import dataclasses

    from harness.policy import build_policy, get_policy

    extract_baseline(rev, tmp)
    for name in [m for m in sys.modules if m == BASELINE or m.startswith(BASELINE + ".")]:
        del sys.modules[name]  # another revision's copy from an earlier call
    sys.path.insert(0, str(tmp))
    try:
        base_mod = importlib.import_module(f"{BASELINE}.policy")
    finally:
        sys.path.remove(str(tmp))
    old_cfg = base_mod.ENTRY.make_config(preset)
    cls = get_policy("minidiffuser").config_class
    shared = {f.name: getattr(old_cfg, f.name) for f in dataclasses.fields(cls) if hasattr(old_cfg, f.name)}
    torch.manual_seed(0)
    new = build_policy("minidiffuser", config=cls(**shared).validate())
    old = base_mod.build(old_cfg)
    old.load_state_dict(new.state_dict())
    return old.train(), new.train()


def compare_outputs(policies: dict, batch: dict, M: int) -> dict:
    """Max |difference| between the two policies, in eval mode on one seeded Level-2 draw, of the predicted
    noise (``eps_hat``) and of the loss terms."""
    from harness.level2 import sample_level2

    outs = []
    for p in policies.values():
        p.eval()
        with torch.no_grad():
            torch.manual_seed(7)
            cond = p.encode(batch)
            level2 = sample_level2(p.diffusion_target(batch), M, p.noise_scheduler, torch.Generator().manual_seed(3))
            eps = p.denoise(level2.x_t, level2.t, cond)
            torch.manual_seed(8)
            losses = {k: float(v) for k, v in p.loss(batch, level2, cond).items()}
        outs.append((eps, losses))
        p.train()
    (e0, l0), (e1, l1) = outs
    return {"eps_hat": float((e0 - e1).abs().max()), "losses": max(abs(l0[k] - l1[k]) for k in l0)}


def run(rev: str = "HEAD", preset: str = "small", B: int = 8, Ms: tuple[int, ...] = (1, 64, 256),
        steps: int = 15, warmup: int = 3, threads: int | None = 2, progress=None) -> dict:
    """``progress``: called with the result so far after every timed round (``main`` prints a line and
    rewrites ``--json``, so a run stopped early keeps its rounds)."""
    from harness.bench.synthetic import synthetic_batch
    from harness.config import TrainConfig
    from harness.train_step import TrainStep

    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        old, new = build_pair(rev, preset, Path(tmp))
        policies = {"old": old, "new": new}
        batch = synthetic_batch(B, new.cfg.num_points, full=True, seed=0)
        diff = compare_outputs(policies, batch, max(Ms))
        trainers = {k: TrainStep(p, TrainConfig(B=B, seed=0), torch.device("cpu")) for k, p in policies.items()}
        times = {k: {M: [] for M in Ms} for k in trainers}
        order = list(trainers)
        for i in range(warmup + steps):
            for M in Ms:
                for k in (order if i % 2 == 0 else order[::-1]):
                    t0 = time.perf_counter()
                    trainers[k].step(batch, M)
                    if i >= warmup:
                        times[k][M].append(time.perf_counter() - t0)
            if i >= warmup and progress is not None:
                progress(_summary(rev, preset, B, Ms, i + 1 - warmup, warmup, diff, times))
    return _summary(rev, preset, B, Ms, steps, warmup, diff, times)


def _summary(rev, preset, B, Ms, steps, warmup, diff, times) -> dict:
    med = {k: {M: float(np.median(v)) for M, v in t.items()} for k, t in times.items()}
    return {
        "rev": rev, "preset": preset, "B": B, "steps": steps, "warmup": warmup,
        "threads": torch.get_num_threads(), "max_difference": diff,
        "median_s": {k: {str(M): v for M, v in m.items()} for k, m in med.items()},
        "new_over_old": {str(M): med["new"][M] / med["old"][M] for M in Ms},
        "M_ratio": {k: {f"{M}/{Ms[0]}": m[M] / m[Ms[0]] for M in Ms} for k, m in med.items()},
        "times_s": {k: {str(M): v for M, v in t.items()} for k, t in times.items()},
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD", help="git revision of the baseline minidiffuser package")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--M", default="1,64,256", help="comma-separated Level-2 batch sizes")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    def progress(res: dict) -> None:
        print(f"round {res['steps']}: new/old " + ", ".join(f"M={m} {v:.3f}" for m, v in res["new_over_old"].items()),
              file=sys.stderr, flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1) + "\n")

    res = run(a.rev, a.preset, a.B, tuple(int(m) for m in a.M.split(",")), a.steps, a.warmup, a.threads,
              progress)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print(f"preset={res['preset']} B={res['B']} threads={res['threads']} steps={res['steps']} (interleaved) "
          f"baseline={res['rev']}; max |old - new| eval-mode eps_hat {res['max_difference']['eps_hat']:.3g}, "
          f"losses {res['max_difference']['losses']:.3g}")
    print("M      old median s   new median s   new/old")
    for M in res["new_over_old"]:
        print(f"{M:<6} {res['median_s']['old'][M]:>13.3f}  {res['median_s']['new'][M]:>13.3f}  "
              f"{res['new_over_old'][M]:>8.3f}")
    for k, r in res["M_ratio"].items():
        print(f"{k}: " + ", ".join(f"M={m} {v:.3f}" for m, v in r.items()))


if __name__ == "__main__":
    main()
