"""Every numeric setting is range-checked; the run record is a versioned schema; the loader plan."""

from __future__ import annotations

import json

import pytest

from harness.config import ConfigError, RunConfig, validate_config
from harness.record import SCHEMA_VERSION, RecordError, RunRecord, upgrade_record
from harness.train import loader_plan


def _cfg(**changes) -> RunConfig:
    cfg = RunConfig()
    cfg.data.path = "."
    for key, value in changes.items():
        group, name = key.split("__")
        setattr(getattr(cfg, group), name, value)
    return cfg


@pytest.mark.parametrize("change, message", [
    ({"train__grad_clip": 0.0}, "train.grad_clip must be > 0"),
    ({"train__grad_clip": float("nan")}, "train.grad_clip must be a finite number"),
    ({"train__lr_floor": -1e-6}, "train.lr_floor must be >= 0"),
    ({"train__lr_floor": 1.0}, "train.lr_floor must be <= 0.0003"),
    ({"train__cosine_cycles": 0.0}, "train.cosine_cycles must be > 0"),
    ({"train__sampler_steps": 0}, "train.sampler_steps must be an integer >= 1, got 0"),
    ({"train__recipe_steps": 0}, "train.recipe_steps must be an integer >= 1"),
    ({"train__eps": 0.0}, "train.eps must be > 0"),
    ({"train__weight_decay": -0.1}, "train.weight_decay must be >= 0"),
    ({"train__betas": (0.9, 1.0)}, r"train.betas\[1\] must be < 1"),
    ({"train__ema_decay": 1.0}, "train.ema_decay must be < 1"),
    ({"train__lr": True}, "train.lr must be a finite number"),
    ({"train__seed": -1}, "train.seed must be an integer >= 0"),
    ({"data__kind": "voxels"}, "data.kind must be one of"),
    ({"data__num_points": 0}, "data.num_points must be an integer >= 1"),
    ({"data__workers": -1}, "data.workers must be an integer >= 0"),
    ({"data__split": ""}, "data.split must be a non-empty folder name"),
    ({"train__sampler": "euler"}, "train.sampler must be one of"),
])
def test_every_numeric_setting_is_range_checked(change, message):
    validate_config(_cfg())  # the defaults are valid
    with pytest.raises(ConfigError, match=message):
        validate_config(_cfg(**change))


def test_record_is_a_versioned_schema(tmp_path):
    record = RunRecord(tmp_path)
    record.update(status="running", steps_done=3)
    data = json.loads((tmp_path / "record.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["steps_done"] == 3 and "final_metrics" in data
    with pytest.raises(RecordError, match="not RecordSchema fields"):
        record.update(stepsdone=4)  # a typo is refused, not written
    with pytest.raises(RecordError, match="status 'finished'"):
        record.update(status="finished")
    # a record written before the schema had a version still loads, with the new fields empty
    legacy = {"run_id": "old", "status": "done", "B": 8, "M": 64, "steps_done": 10}
    (tmp_path / "record.json").write_text(json.dumps(legacy))
    loaded = RunRecord(tmp_path).load()
    assert loaded["schema_version"] == SCHEMA_VERSION and loaded["B"] == 8 and loaded["fingerprint"] is None
    with pytest.raises(RecordError, match="schema_version 99"):
        upgrade_record({"schema_version": 99})
    (tmp_path / "record.json").write_text("{half")
    with pytest.raises(RecordError, match="not valid JSON"):
        RunRecord(tmp_path).load()


def test_loader_plan_leaves_the_step_its_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert loader_plan(None, cpus=2) == {"workers": 0, "workers_auto": True, "torch_threads": 2, "cpus_available": 2}
    assert loader_plan(None, cpus=8)["workers"] == 4 and loader_plan(None, cpus=8)["torch_threads"] == 4
    assert loader_plan(None, cpus=64)["workers"] == 4
    assert loader_plan(3, cpus=2)["workers"] == 3 and loader_plan(3, cpus=2)["torch_threads"] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert loader_plan(None, cpus=16)["torch_threads"] == 1
