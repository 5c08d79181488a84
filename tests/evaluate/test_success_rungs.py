"""The cheap rungs of "does a trained policy work in closed loop" (README "Policies that work"), as slow tests:

(a) fit ONE training episode of reach-v3 and replay it in closed loop on its own seed -> success;
(b) the offline position error of a short reach-v3 run falls under 10 cm (the closed-loop >= 80 % of
    rung (b) on held-out seeds is `mdh sweep smoke_success`, measured in the README: minutes, not a test).

Run with ``pytest -m slow tests/evaluate/test_success_rungs.py``. Both train Mini-Diffuser ``small`` with
its defaults on CPU.
"""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from harness.train import run_training

pytestmark = pytest.mark.slow


def _train(data, run_dir, steps: int, B: int, **train):
    cfg = RunConfig(model=ModelConfig(name="minidiffuser", preset="small"),
                    data=DataConfig(name="metaworld", path=str(data), workers=0, eval_keysteps=8),
                    train=TrainConfig(B=B, M=64, steps=steps, eval_every=steps, ckpt_every=steps, device="cpu",
                                      progress=False, sampler="ddim", **train))
    record = run_training(cfg, run_dir)
    assert record["status"] == "done"
    return record


def test_rung_a_one_training_episode_is_replayed_in_closed_loop(tmp_path, metaworld, capsys):
    data = metaworld.generate_suite(tmp_path / "one", ["reach-v3"], episodes=1, image_size=128, val_episodes=1,
                                    test_episodes=1)
    _train(data, tmp_path / "run", steps=300, B=4)
    assert main(["eval", str(tmp_path / "run"), "--train-seeds", "--episodes", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["seeds"] == [0] and summary["oracle_success"] == 1.0
    assert summary["successes"] == 1, summary["failures"]


def test_rung_b_reach_position_error_falls_under_10_cm(tmp_path, metaworld):
    data = metaworld.generate_suite(tmp_path / "reach", ["reach-v3"], episodes=10, image_size=128)
    record = _train(data, tmp_path / "run", steps=300, B=8)
    assert record["final_metrics"]["overall"]["pos_err_cm"] < 10.0
