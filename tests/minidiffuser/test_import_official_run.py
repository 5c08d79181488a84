"""`mdh checkpoint import-official` writes a run folder from a state dict laid out like the released
checkpoint (../shared/reference/official_minidiffuser_state_dict.tsv), which `mdh eval` loads; and
`train.init_weights` starts a new run from a run folder's weights (fine-tuning)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.checkpoint import load_checkpoint
from harness.cli import main
from harness.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from harness.train import run_training
from minidiffuser.official_import import read_reference_list

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "official_minidiffuser_state_dict.tsv"


def _official_like_state_dict(seed: int = 0) -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} is not here (the shared reference folder sits beside the repository)")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype) in read_reference_list(REFERENCE).items():
        if dtype == "int64":
            out[name] = torch.randint(0, 100, shape, generator=g, dtype=torch.int64)
        else:
            out[name] = torch.randn(shape, generator=g) * 0.02
    return out


def test_import_writes_a_run_folder_that_eval_loads(tmp_path, dataset_root):
    sd = _official_like_state_dict()
    ckpt = tmp_path / "official.pt"
    torch.save({"epoch": 5, "model": sd}, ckpt)
    out = tmp_path / "imported"
    assert main(["checkpoint", "import-official", str(ckpt), str(out), "--data", str(dataset_root.root)]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["status"] == "done" and record["model"] == "minidiffuser" and record["preset"] == "paper"
    assert record["config"]["model"]["options"]["official_quirks"] is True
    assert record["weights_source"]["path"] == str(ckpt.resolve()) and len(record["weights_source"]["sha256"]) == 64
    assert sorted(record["weights_source"]["ignored"]) == sorted(
        ["anchor_embeding", *(k for k in sd if k.startswith("act_proj_head.heatmap_mlp."))])
    weights = load_checkpoint(out / "ckpt" / "last.pt")["model"]
    torch.testing.assert_close(weights["text.proj.weight"], sd["txt_fc.weight"])
    # mdh eval's loader builds the run's policy with these weights
    from harness.evaluate.run_eval import load_policy

    policy, cfg, _ = load_policy(out, out / "ckpt" / "last.pt")
    assert cfg.model.options["official_quirks"] is True
    torch.testing.assert_close(policy.state_dict()["query.denoise_mlp.0.weight"],
                               sd["act_proj_head.denoise_mlp.0.weight"])
    # a second import into the same folder is refused; so is a checkpoint with a missing tensor
    assert main(["checkpoint", "import-official", str(ckpt), str(out)]) == 2
    del sd["txt_fc.weight"]
    torch.save(sd, tmp_path / "broken.pt")
    assert main(["checkpoint", "import-official", str(tmp_path / "broken.pt"), str(tmp_path / "b")]) == 2
    assert not (tmp_path / "b" / "record.json").exists()


def _tiny(root, run_dir, **train) -> RunConfig:
    t = {"B": 2, "M": 2, "steps": 2, "eval_every": 2, "ckpt_every": 2, "warmup_steps": 1, "progress": False,
         "device": "cpu", **train}
    return RunConfig(model=ModelConfig(preset="tiny"),
                     data=DataConfig(name="synthetic", path=str(root), workers=0, num_points=64, eval_keysteps=2),
                     train=TrainConfig(**t))


def test_init_weights_starts_a_new_run_from_a_run_folders_weights(tmp_path, dataset_root):
    a = tmp_path / "a"
    run_training(_tiny(dataset_root.root, a), a)
    trained = load_checkpoint(a / "ckpt" / "last.pt")["model"]
    b = tmp_path / "b"
    out = run_training(_tiny(dataset_root.root, b, steps=1, lr=1e-12, lr_floor=1e-12, init_weights=str(a)), b)
    assert out["weights_source"]["path"] == str((a / "ckpt" / "last.pt").resolve())
    after = load_checkpoint(b / "ckpt" / "last.pt")["model"]
    for k, v in trained.items():  # one step at lr 1e-12: still the weights it started from
        if "running_" not in k and "num_batches" not in k:  # BatchNorm statistics move with any step
            torch.testing.assert_close(after[k], v, atol=1e-6, rtol=0)
    fresh = tmp_path / "c"
    run_training(_tiny(dataset_root.root, fresh, steps=1, lr=1e-12, lr_floor=1e-12), fresh)
    other = load_checkpoint(fresh / "ckpt" / "last.pt")["model"]
    assert any(not torch.allclose(other[k], v) for k, v in trained.items())  # the test can fail
    with pytest.raises(ConfigError, match="no checkpoint file"):
        run_training(_tiny(dataset_root.root, tmp_path / "d", init_weights=str(tmp_path / "nope")), tmp_path / "d")


def test_unset_init_weights_leaves_every_earlier_fingerprint_unchanged():
    from harness.fingerprint import semantic_config

    assert "train.init_weights" not in semantic_config(RunConfig())
    cfg = RunConfig(train=TrainConfig(init_weights="/runs/a"))
    assert semantic_config(cfg)["train.init_weights"] == "/runs/a"  # set, it is part of the run's identity
