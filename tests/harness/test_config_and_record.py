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
    ({"cluster__mem_gb": 0}, "cluster.mem_gb must be > 0, got 0"),
    ({"cluster__mem_gb": -4}, "cluster.mem_gb must be > 0, got -4"),
    ({"cluster__mem_gb": float("nan")}, "cluster.mem_gb must be a finite number"),
    ({"cluster__tasks_per_node": 0}, "cluster.tasks_per_node must be an integer >= 1"),
    ({"cluster__tasks_per_node": 2, "cluster__gpus_per_task": 4}, "one process per GPU"),
])
def test_every_numeric_setting_is_range_checked(change, message):
    validate_config(_cfg())  # the defaults are valid
    with pytest.raises(ConfigError, match=message):
        validate_config(_cfg(**change))


def test_ddim_without_steps_uses_the_documented_default():
    """train.sampler=ddim with train.sampler_steps=null is valid (no sweep or config sets the steps) and means
    DEFAULT_DDIM_STEPS, a named constant documented beside the field and in the README."""
    import inspect
    from pathlib import Path

    from harness.config import TrainConfig
    from harness.diffusion import (
        DEFAULT_DDIM_STEPS,
        SamplerConfig,
        ScheduleConfig,
        make_sampler,
        make_train_scheduler,
    )

    validate_config(_cfg(train__sampler="ddim"))  # null steps stay valid
    scheduler = make_train_scheduler(ScheduleConfig(num_train_timesteps=100))
    assert len(make_sampler(scheduler, SamplerConfig("ddim")).timesteps) == DEFAULT_DDIM_STEPS == 10
    assert len(make_sampler(scheduler, SamplerConfig("ddim", 3)).timesteps) == 3
    assert len(make_sampler(scheduler, SamplerConfig("ddpm")).timesteps) == 100
    with pytest.raises(ValueError, match="sampler steps must be an integer >= 1.*got 0"):
        make_sampler(scheduler, SamplerConfig("ddim", 0))  # 0 is not silently the default
    documented = f"DEFAULT_DDIM_STEPS = {DEFAULT_DDIM_STEPS}"
    assert documented in inspect.getsource(TrainConfig)
    assert documented in (Path(__file__).resolve().parents[2] / "README.md").read_text()


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


def test_record_md_documents_exactly_the_record_schema():
    """docs/record.md's record.json table has one entry per RecordSchema field: none missing, none extra."""
    import re
    from pathlib import Path

    from harness.measure.memory import MEMORY_SOURCES
    from harness.record import RECORD_FIELDS

    text = (Path(__file__).resolve().parents[2] / "docs" / "record.md").read_text()
    section = text.split("## record.json fields", 1)[1].split("\n## ", 1)[0]
    documented = []
    for line in section.splitlines():
        if line.startswith("| `"):
            documented += re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", line.split("|")[1])
    assert len(documented) == len(set(documented)), sorted(documented)
    assert set(documented) == set(RECORD_FIELDS), (
        f"missing from docs/record.md: {sorted(set(RECORD_FIELDS) - set(documented))}; "
        f"documented but not in RecordSchema: {sorted(set(documented) - set(RECORD_FIELDS))}")
    memory_row = next(line for line in section.splitlines() if line.startswith("| `memory` |"))
    assert all(f"`{source}`" in memory_row for source in MEMORY_SOURCES)


def test_loader_plan_leaves_the_step_its_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert loader_plan(None, cpus=2) == {"workers": 0, "workers_auto": True, "torch_threads": 2, "cpus_available": 2}
    assert loader_plan(None, cpus=8)["workers"] == 4 and loader_plan(None, cpus=8)["torch_threads"] == 4
    assert loader_plan(None, cpus=64)["workers"] == 4
    assert loader_plan(3, cpus=2)["workers"] == 3 and loader_plan(3, cpus=2)["torch_threads"] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert loader_plan(None, cpus=16)["torch_threads"] == 1
