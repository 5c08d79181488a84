"""Every shape of RLBench data trains: the real reach_target episodes (../shared/fixtures/rlbench) converted
to LMDBs, repackaged as 3DDA ``.dat`` and as a 3DFA zarr store, each read by ``mdh train``'s own path
(``run_training``: format detection, instruction embeddings, the held-out split) for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from harness.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from harness.data.convert_rlbench import convert_rlbench
from harness.data.dataset import KeystepDataset
from harness.data.formats.dda_dat import DdaDatSource, write_dda_episode, write_dda_instructions
from harness.data.formats.instructions import embed_instructions
from harness.data.formats.rlbench_raw import PERACT_CAMERAS, RLBenchRawSource
from harness.train import dataset_info, run_training

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "rlbench"
TV = "reach_target+0"


@pytest.fixture(scope="module")
def raw_episodes():
    if not (FIXTURE / "reach_target" / "variation0" / "episodes" / "episode0" / "low_dim_obs.pkl").is_file():
        pytest.skip(f"RLBench fixture not found at {FIXTURE} (../shared beside the checkout)")
    src = RLBenchRawSource(FIXTURE)
    return [src.read_episode(TV, k) for k in src.episode_keys(TV)]


def _parts(ep) -> dict:
    """The K = T - 1 states of a raw episode as the 3DDA / 3DFA writers take them."""
    return {"rgb": ep.rgb_images[:-1], "point_maps": ep.point_maps[:-1], "currents": ep.actions[:-1],
            "targets": ep.actions[1:]}


@pytest.fixture(scope="module")
def dda_root(raw_episodes, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dda") / "Peract_packaged"
    for split in ("train", "val"):
        for i, ep in enumerate(raw_episodes):
            write_dda_episode(root / split / TV / f"ep{i}.dat", cameras=PERACT_CAMERAS, **_parts(ep))
    tokens = np.random.default_rng(0).normal(size=(2, 53, 512)).astype(np.float32)
    write_dda_instructions(root / "instructions" / "peract" / "instructions.pkl", {"reach_target": {0: tokens}})
    return root


@pytest.fixture(scope="module")
def zarr_root(raw_episodes, tmp_path_factory) -> Path:
    pytest.importorskip("zarr", reason="3DFA stores need the optional extra mdh[zarr]")
    from harness.data.formats.flowmatch_zarr import write_flowmatch_zarr

    root = tmp_path_factory.mktemp("zarr") / "Peract_zarr"
    episodes = [{"task": "reach_target", "variation": 0, **_parts(ep)} for ep in raw_episodes]
    write_flowmatch_zarr(root / "train.zarr", episodes, tasks=["reach_target"])
    embed_instructions(root, encoder="hash")
    return root


def _train(data: Path, run_dir: Path, model: str = "minidiffuser", kind: str = "voxel1cm") -> dict:
    cfg = RunConfig(model=ModelConfig(name=model, preset="tiny"),
                    data=DataConfig(name="rlbench", path=str(data), kind=kind, workers=0, num_points=256,
                                    eval_keysteps=2),
                    train=TrainConfig(B=2, M=2, steps=2, eval_every=2, ckpt_every=2, warmup_steps=1, sampler_steps=2,
                                      progress=False))
    record = run_training(cfg, run_dir)
    assert record["status"] == "done" and record["steps_done"] == 2, record.get("error")
    assert record["data"]["train_keysteps"] == 2  # two episodes, one keystep each (frame 0 -> last frame)
    return record


def test_converted_raw_data_trains(raw_episodes, tmp_path):
    convert_rlbench(FIXTURE, tmp_path / "out", encoder="hash", progress=False)
    record = _train(tmp_path / "out", tmp_path / "run")
    assert record["data"]["meta"] == f"file:{tmp_path / 'out' / 'meta.json'}"


def test_3dda_packaged_episodes_train_both_models(dda_root, tmp_path):
    # the text width comes from instructions.pkl, the format's own embeddings (no instr_embeds file)
    cfg = RunConfig(data=DataConfig(name="rlbench", path=str(dda_root)))
    assert dataset_info(cfg).text_dim == 512 and dataset_info(cfg).has_images is False
    record = _train(dda_root, tmp_path / "md")
    assert record["data"]["eval_split"] == "val"  # Peract_packaged/val is the held-out split
    _train(dda_root, tmp_path / "dda", model="diffuser_actor", kind="keysteps")


def test_a_3dda_split_folder_is_not_mistaken_for_empty_lmdbs(dda_root):
    ds = KeystepDataset(dda_root / "train", require_text=False)
    assert isinstance(ds.source, DdaDatSource) and len(ds) == 2


def test_3dfa_zarr_store_trains_with_embedded_instructions(zarr_root, tmp_path):
    table = json.loads((zarr_root / "taskvars_instructions.json").read_text())
    assert table == {TV: ["reach target"]}  # no 3DFA instructions JSON: the task name
    assert (zarr_root / "instr_embeds_hash.npy").is_file()
    record = _train(zarr_root, tmp_path / "run")
    assert record["data"]["eval_split"] == "train"  # no val.zarr


def test_cli_inspect_and_embed_instructions_on_3dda_data(dda_root, capsys):
    from harness.cli import main

    assert main(["data", "inspect", str(dda_root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == 2 and summary["keysteps"] == 2 and summary["format"] == "dda_dat"
    # instructions.pkl already embeds every task-variation: nothing to write, and nothing is written
    assert main(["data", "embed-instructions", str(dda_root), "--encoder", "hash"]) != 0
    assert "carries its own instruction embeddings" in capsys.readouterr().err
    assert not (dda_root / "taskvars_instructions.json").exists()
