"""Conformance of EVERY registered policy to the contract of harness/policy.py, built-ins and plugins alike.

The suite is parametrised over ``policy_names()`` with the toy plugin (tests/plugins/mdh_toy_policy, a
separate package found through its entry point) on the path, so a new architecture is checked the moment it
registers: its input spec against what the data pipeline really delivers, the shapes of target, denoiser and
loss, Level-2 isolation in eval AND train mode (policies that share the condition), seeded sampling, the
state-dict round trip through a checkpoint, ``world_actions``, offline evaluation. Each policy runs at its
"tiny" preset (else its default) on a synthetic dataset, B=2, M=4.

The end-to-end tests drive the toy plugin through the very commands a built-in goes through: ``mdh train
model=toy ...`` (its own loss names in steps.csv and metrics.csv, typed ``model.options``), ``bench_step``
and ``evaluate_policy``.

Conventions a policy's config follows for the train-mode test that compares M samples with one sample (no
seed aligns dropout masks of different shapes): dropout rates are float config fields whose name contains
"drop"; the test zeroes them, then checks train mode really is deterministic before comparing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from harness.checkpoint import load_checkpoint, save_checkpoint
from harness.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from harness.data.collate import collate_keysteps
from harness.diffusion import SamplerConfig, make_sampler
from harness.evaluate.offline import evaluate_policy
from harness.level2 import level2_losses, sample_level2
from harness.policy import Policy, get_policy, options_schema, policy_names, world_actions
from harness.train import build_datasets, build_run_policy, dataset_info, eval_batches
from harness.train_step import TrainStep
from tests.plugins.toy_env import REPO, TOY_DIR, isolated_registry, subprocess_env

B, M, NUM_POINTS = 2, 4, 64
MODES = ["eval", "train"]


def _registered() -> list[str]:
    """Every policy name, and ``name[variant]`` for each of its ``PolicyEntry.variants``."""
    with isolated_registry(TOY_DIR):
        return [p for n in policy_names() for p in [n, *(f"{n}[{v}]" for v in get_policy(n).variants)]]


def _split(param: str) -> tuple[str, dict]:
    """"name" or "name[variant]" -> (policy name, the variant's options)."""
    name, _, variant = param.partition("[")
    return name, dict(get_policy(name).variants[variant.rstrip("]")]) if variant else {}


POLICIES = _registered()


@pytest.fixture(scope="module", autouse=True)
def toy_plugin():
    """The toy plugin on sys.path for this module; the registry is restored afterwards."""
    with isolated_registry(TOY_DIR):
        yield


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, synth):
    root = tmp_path_factory.mktemp("conformance_data")
    synth.make_dataset(root, episodes=2, kinds=("keysteps", "voxel1cm"))
    return root


def _preset(name: str) -> str | None:
    entry = get_policy(_split(name)[0])
    return "tiny" if "tiny" in entry.presets else entry.default_preset


_KIND: dict[str, str] = {}


def _kind(name: str) -> str:
    """The data kind the policy reads: camera images are only in "keysteps" data."""
    if name not in _KIND:
        entry = get_policy(_split(name)[0])
        modality = entry.build(entry.make_config(_preset(name)), None).input_spec.modality
        _KIND[name] = "keysteps" if modality == "images" else "voxel1cm"
    return _KIND[name]


def _cfg(name: str, root, num_points: int | None = NUM_POINTS, **options) -> RunConfig:
    kind = _kind(name)
    base, variant = _split(name)
    return RunConfig(model=ModelConfig(name=base, preset=_preset(name), options={**variant, **options}),
                     data=DataConfig(name="synthetic", path=str(root), kind=kind, workers=0, num_points=num_points,
                                     eval_keysteps=4),
                     train=TrainConfig(B=B, M=M, device="cpu", progress=False))


def _build(name: str, root, mode: str = "eval", seed: int = 0, **options):
    """The policy as ``mdh train`` builds it (typed config, dataset facts), in ``mode``."""
    cfg = _cfg(name, root, **options)
    torch.manual_seed(seed)
    return build_run_policy(cfg, dataset_info(cfg)).train(mode == "train")


_DATA: dict = {}


def _batches(name: str, root) -> dict:
    """{"train": a batch with the training transforms, "eval": without, "eval_ds": the evaluated dataset},
    read through ``build_datasets`` (the policy's input spec picks the transform) and collated."""
    if name not in _DATA:
        cfg = _cfg(name, root)
        train_ds, eval_ds, _ = build_datasets(cfg, _build(name, root))
        _DATA[name] = {"train": collate_keysteps([train_ds[i] for i in range(B)]),
                       "eval": collate_keysteps([eval_ds[i] for i in range(B)]), "eval_ds": eval_ds}
    return _DATA[name]


def _no_dropout(name: str) -> dict:
    config = get_policy(_split(name)[0]).make_config(_preset(name), **_split(name)[1])
    return {f.name: 0.0 for f in dataclasses.fields(config)
            if "drop" in f.name and isinstance(getattr(config, f.name), float)}


def _samples(policy, M: int = M, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    T = policy.noise_scheduler.config.num_train_timesteps
    return torch.randn(B, M, policy.action_dim, generator=g) * 0.2, torch.randint(0, T, (B, M), generator=g)


def _encode(policy, batch, seed: int = 5):
    torch.manual_seed(seed)  # encoders may draw (dropout, random serialisation orders)
    return policy.encode(batch)


def _denoise(policy, x, t, cond, seed: int = 11):
    """Global RNG reset first: in train mode two calls on inputs of the same shapes draw the same dropout
    masks, so a difference between them comes from the inputs alone."""
    torch.manual_seed(seed)
    return policy.denoise(x, t, cond)


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor in a condition (tensors, dataclasses, lists, tuples, dicts, nested)."""
    if torch.is_tensor(obj):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


def _needs_shared_condition(policy) -> None:
    if not policy.shares_condition:
        pytest.skip("isolation of samples sharing one condition: the policy re-encodes per sample")


# --------------------------------------------------------------------------------------------- registry


def test_suite_covers_the_builtin_and_the_plugin():
    assert {"minidiffuser", "diffuser_actor", "diffuser_actor[shared]", "toy"} <= set(POLICIES), POLICIES
    assert _preset("minidiffuser") == "tiny" and _preset("toy") == "tiny"


@pytest.mark.parametrize("name", POLICIES)
def test_entry_config_and_protocol(name, data_root):
    base, variant = _split(name)
    entry = get_policy(base)
    assert entry.name == base
    for preset in entry.presets:  # every preset makes a valid config (building "paper" would be slow)
        assert isinstance(entry.make_config(preset), entry.config_class)
    schema = {f.name: f for f in dataclasses.fields(options_schema(entry))}
    assert set(schema) == {f.name for f in dataclasses.fields(entry.config_class)} - {"preset"}
    policy = _build(name, data_root)
    assert isinstance(policy, Policy) and isinstance(policy, nn.Module)
    assert isinstance(policy.config, entry.config_class)
    assert policy.config == entry.make_config(_preset(name), **variant)
    assert isinstance(policy.action_dim, int) and policy.action_dim >= 1
    assert isinstance(policy.shares_condition, bool)
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) > 0


BUILTINS = ("minidiffuser", "diffuser_actor")
# fields of the built-in configs where 0 is a valid value (probabilities, loss weights, noise, margins) and
# where any finite number is (coordinates); every other numeric field must be >= 1 or > 0
ZERO_OK = {"minidiffuser": {"attn_drop", "proj_drop", "head_dropout", "rot_cond_noise", "pos_weight", "rot_weight",
                            "open_weight"},
           "diffuser_actor": {"lang_dropout", "pos_weight", "rot_weight", "open_weight", "bounds_buffer"}}
ANY_FINITE = {"diffuser_actor": {"workspace_min", "workspace_max"}}


def _numeric_fields(cls, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], bool]]:
    """(path, is_tuple) of every int / float / tuple-of-numbers field of a config dataclass, nested included."""
    import typing

    from harness.policy import _strip_optional

    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(hint):
            out += _numeric_fields(hint, (*prefix, f.name))
        elif hint in (int, float):
            out.append(((*prefix, f.name), False))
        elif typing.get_origin(hint) is tuple and set(typing.get_args(hint)) - {Ellipsis} <= {int, float}:
            out.append(((*prefix, f.name), True))
    return out


def _bad_value_cases() -> list[tuple[str, tuple[str, ...], bool, float]]:
    cases = []
    for name in BUILTINS:
        entry = get_policy(name)
        for path, is_tuple in _numeric_fields(entry.config_class):
            for value in (0, -1, float("nan")):
                if path[-1] in ANY_FINITE.get(name, ()) and math.isfinite(value):
                    continue
                if path[-1] in ZERO_OK.get(name, ()) and value == 0:
                    continue
                cases.append((name, path, is_tuple, value))
    return cases


def _with_value(entry, preset, path, is_tuple, value) -> dict:
    """Overrides setting ``path`` (nested) to ``value`` (a tuple field: its first element)."""
    config = entry.make_config(preset)
    current = config
    for p in path:
        current = getattr(current, p)
    if is_tuple:
        value = (value, *(current or (0.5, 0.5, 0.5))[1:])
    overrides: dict = {}
    if path[-1] in ("workspace_min", "workspace_max"):  # both or neither; the other one valid
        overrides = {"workspace_min": (-1.0, -1.0, -1.0), "workspace_max": (1.0, 1.0, 1.0)}
    node = overrides
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value
    return overrides


def test_the_range_check_cases_cover_every_field():
    fields = {(n, p) for n, p, _, _ in _bad_value_cases()}
    assert ("minidiffuser", ("schedule", "clip_range")) in fields and ("minidiffuser", ("query_heads",)) in fields
    assert ("diffuser_actor", ("workspace_min",)) in fields and ("diffuser_actor", ("num_heads",)) in fields
    for name in BUILTINS:  # a value declared valid is accepted
        entry = get_policy(name)
        for field_name in ZERO_OK[name]:
            assert entry.make_config(_preset(name), **{field_name: 0.0}) is not None, field_name


@pytest.mark.parametrize("name, path, is_tuple, value", _bad_value_cases(),
                         ids=lambda v: ".".join(v) if isinstance(v, tuple) else str(v))
def test_builtin_policy_configs_range_check_every_numeric_field(name, path, is_tuple, value):
    """0, -1 and nan where invalid: a ValueError naming the field and the value from make_config (what
    `mdh train` reports as a configuration error), never a ZeroDivisionError or a silently odd model."""
    entry = get_policy(name)
    overrides = _with_value(entry, _preset(name), path, is_tuple, value)
    with pytest.raises(ValueError) as info:
        entry.make_config(_preset(name), **overrides)
    message = str(info.value)
    assert ".".join(path) in message and f"got {value!r}" in message, message


# --------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", POLICIES)
def test_input_spec_matches_what_the_dataset_delivers(name, data_root):
    policy = _build(name, data_root)
    spec = policy.input_spec
    # the policy's own cloud size (data.num_points unset) ...
    cfg = _cfg(name, data_root, num_points=None)
    train_ds, eval_ds, _ = build_datasets(cfg, policy)
    for ds in (train_ds, eval_ds):
        spec.check_batch(collate_keysteps([ds[0], ds[1]]), where=f"{name} batch")
    # ... and the one data.num_points asks for
    adapted = dataclasses.replace(spec, num_points=NUM_POINTS) if spec.modality == "points" else spec
    for split, batch in _batches(name, data_root).items():
        if split != "eval_ds":
            adapted.check_batch(batch, where=f"{name} {split} batch")


@pytest.mark.parametrize("name", POLICIES)
def test_shapes_of_target_denoiser_and_loss(name, data_root):
    policy = _build(name, data_root, mode="train")
    batch = _batches(name, data_root)["train"]
    cond = policy.encode(batch)
    x0 = policy.diffusion_target(batch)
    assert x0.shape == (B, policy.action_dim) and x0.dtype == torch.float32
    level2 = sample_level2(x0, M, policy.noise_scheduler)
    eps = policy.denoise(level2.x_t, level2.t, cond)
    assert eps.shape == (B, M, policy.action_dim)
    losses = policy.loss(batch, level2, cond)
    assert "total" in losses
    for key, value in losses.items():
        assert torch.is_tensor(value) and value.ndim == 0 and torch.isfinite(value), (key, value)
    losses["total"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert set(level2_losses(policy, batch, M)) == set(losses)  # the loss names are the policy's, stable


# --------------------------------------------------------------------------------------------- isolation


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", POLICIES)
def test_changing_one_sample_changes_no_other_exactly(name, mode, data_root):
    policy = _build(name, data_root, mode)  # dropout stays on in train mode: _denoise reseeds
    _needs_shared_condition(policy)
    with torch.no_grad():
        cond = _encode(policy, _batches(name, data_root)["train"])
        snapshot = [t.clone() for t in _tensors(cond)]
        x, t = _samples(policy)
        base = _denoise(policy, x, t, cond)
        x2, t2 = x.clone(), t.clone()
        x2[1, 2] += 0.37
        t2[1, 2] = (t2[1, 2] + 41) % policy.noise_scheduler.config.num_train_timesteps
        changed = _denoise(policy, x2, t2, cond)
        if mode == "train":  # the comparison is only sound if the masks really are reproducible
            assert torch.equal(base, _denoise(policy, x, t, cond))
    others = torch.ones(B, M, dtype=torch.bool)
    others[1, 2] = False
    assert torch.equal(base[others], changed[others]), (base[others] - changed[others]).abs().max()
    assert not torch.allclose(base[1, 2], changed[1, 2])
    assert all(torch.equal(a, b) for a, b in zip(snapshot, _tensors(cond)))  # denoise never writes the condition


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", POLICIES)
def test_m_samples_together_equal_each_alone(name, mode, data_root):
    policy = _build(name, data_root, mode, **(_no_dropout(name) if mode == "train" else {}))
    _needs_shared_condition(policy)
    with torch.no_grad():
        cond = _encode(policy, _batches(name, data_root)["train"])
        x, t = _samples(policy)
        together = policy.denoise(x, t, cond)
        assert torch.equal(together, policy.denoise(x, t, cond)), (
            f"{name} denoises at random in train mode with every '*drop*' config field at 0 "
            f"({sorted(_no_dropout(name))}); name its dropout rates so, or make them configurable")
        for m in range(M):
            alone = policy.denoise(x[:, m:m + 1], t[:, m:m + 1], cond)
            torch.testing.assert_close(alone[:, 0], together[:, m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", POLICIES)
def test_gradient_of_one_sample_wrt_any_other_is_zero(name, mode, data_root):
    # dropout stays on in train mode: an elementwise mask cannot create a cross-sample gradient
    policy = _build(name, data_root, mode)
    _needs_shared_condition(policy)
    cond = _encode(policy, _batches(name, data_root)["train"])
    x, t = _samples(policy)
    x.requires_grad_(True)
    out = _denoise(policy, x, t, cond)
    for b, m in [(0, 0), (1, 3)]:
        (grad,) = torch.autograd.grad(out[b, m].pow(2).sum(), x, retain_graph=True)
        own = torch.zeros(B, M, dtype=torch.bool)
        own[b, m] = True
        assert torch.count_nonzero(grad[~own]) == 0, grad[~own].abs().max()
        assert torch.count_nonzero(grad[own]) > 0


# --------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", POLICIES)
def test_seeded_sampling_is_deterministic(name, data_root):
    policy = _build(name, data_root)
    batch = _batches(name, data_root)["eval"]
    sampler = make_sampler(policy.noise_scheduler, SamplerConfig("ddim", 4))

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(0)  # as evaluate_policy under train.py's fork_rng: the global RNG in one state
        return policy.sample(batch, sampler, generator=torch.Generator().manual_seed(seed))

    a = sample(7)
    assert a.shape == (B, 8) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a[:, 3:7].norm(dim=-1), torch.ones(B), atol=1e-4, rtol=0)  # unit quaternions
    assert torch.equal(a, sample(7))
    assert not torch.equal(a[:, :3], sample(8)[:, :3])  # the generator does drive the sampler


@pytest.mark.parametrize("name", POLICIES)
def test_state_dict_round_trip_through_a_checkpoint(name, data_root, tmp_path):
    trained = _build(name, data_root, seed=0)
    fresh = _build(name, data_root, seed=1)
    save_checkpoint(tmp_path / "last.pt", {"model": trained.state_dict()})
    batch = _batches(name, data_root)["eval"]
    x, t = _samples(trained)

    sampler = make_sampler(trained.noise_scheduler, SamplerConfig("ddim", 3))

    def outputs(policy):
        with torch.no_grad():
            return _denoise(policy, x, t, _encode(policy, batch))

    def sample(policy):  # the whole sampling path, heads included, under one seed
        torch.manual_seed(0)
        with torch.no_grad():
            return policy.sample(batch, sampler, generator=torch.Generator().manual_seed(7))

    before, sampled_before = outputs(fresh), sample(fresh)
    fresh.load_state_dict(load_checkpoint(tmp_path / "last.pt")["model"])
    assert not torch.equal(before, outputs(trained))  # two seeds, two models: the test can fail
    assert not torch.equal(sampled_before, sample(trained))
    assert torch.equal(outputs(fresh), outputs(trained))
    assert torch.equal(sample(fresh), sample(trained))


@pytest.mark.parametrize("name", POLICIES)
def test_world_actions_adds_the_offset_back(name, data_root):
    policy = _build(name, data_root)
    batch = _batches(name, data_root)["eval"]
    assert not batch["rotation"].any()  # evaluation batches are not rotated
    actions = policy.sample(batch, make_sampler(policy.noise_scheduler, SamplerConfig("ddim", 2)),
                            generator=torch.Generator().manual_seed(0))
    world = world_actions(actions, batch)
    assert torch.equal(world[:, :3], actions[:, :3] + batch["offset"])
    assert torch.equal(world[:, 3:], actions[:, 3:])


def test_world_actions_undoes_the_training_augmentation(data_root):
    """The same keysteps through the training transform (rotated, jittered, centred) and the evaluation one
    (centred) land on the same world-frame targets."""
    data = _batches("toy", data_root)
    assert data["train"]["rotation"].abs().min() > 0
    a, b = (world_actions(data[s]["target"], data[s]) for s in ("train", "eval"))
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=1e-5, rtol=0)
    sign = torch.sign((a[:, 3:7] * b[:, 3:7]).sum(-1, keepdim=True))  # q and -q are one rotation
    torch.testing.assert_close(a[:, 3:7] * sign, b[:, 3:7], atol=1e-5, rtol=0)
    assert torch.equal(a[:, 7], b[:, 7])


@pytest.mark.parametrize("name", POLICIES)
def test_offline_evaluation_runs(name, data_root):
    policy = _build(name, data_root)
    batches = eval_batches(_batches(name, data_root)["eval_ds"], 4, B)
    metrics = evaluate_policy(policy, batches, make_sampler(policy.noise_scheduler, SamplerConfig("ddim", 2)),
                              "cpu", generator=torch.Generator().manual_seed(0))
    overall = metrics["overall"]
    assert overall["n"] == 4 and math.isfinite(overall["pos_err_cm"]) and 0 <= overall["gripper_acc"] <= 100
    assert not policy.training  # evaluate_policy restores the mode it found (eval here)


# --------------------------------------------------------------------------------------------- the toy plugin


def test_toy_policy_learns(data_root):
    """Honest plugin: its own loss terms fall when trained with THE training step."""
    policy = _build("toy", data_root, mode="train")
    ds = _batches("toy", data_root)["eval_ds"]
    batches = [collate_keysteps([ds[i] for i in range(k, k + 4)]) for k in range(0, len(ds) - 3, 4)]
    trainer = TrainStep(policy, TrainConfig(lr=3e-3, warmup_steps=5, steps=150, weight_decay=0.0), "cpu")
    torch.manual_seed(0)
    rows = [{k: float(v) for k, v in trainer.step(batches[i % len(batches)], 16)[0].items()} for i in range(150)]
    assert set(rows[0]) == {"noise_mse", "gripper_bce", "total"}

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)

    for key in ("noise_mse", "gripper_bce", "total"):
        assert mean(key, rows[-20:]) < 0.8 * mean(key, rows[:20]), key


def _train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main(sys.argv[1:]))",
            "train", *overrides]


def _toy_overrides(data_root, run_dir, *extra: str) -> list[str]:
    train = {"B": 2, "M": 4, "steps": 6, "seed": 3, "eval_every": 3, "ckpt_every": 3, "warmup_steps": 1,
             "progress": False}
    return ["model=toy", "model.preset=tiny", f"data.path={data_root}", "data.workers=0", "data.num_points=64",
            "data.eval_keysteps=4", "data.name=synthetic", f"hydra.run.dir={run_dir}",
            *[f"train.{k}={v}" for k, v in train.items()], *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=subprocess_env(TOY_DIR))


@pytest.fixture(scope="module")
def toy_run(data_root, tmp_path_factory):
    """``mdh train model=toy ...`` in a subprocess, as a user types it; ``model.options.hidden`` is set
    without ``+`` (24, not the tiny preset's 16, so the record shows it took effect)."""
    run_dir = tmp_path_factory.mktemp("toy_run") / "run"
    out = _run(_train_cmd(*_toy_overrides(data_root, run_dir, "model.options.hidden=24")))
    return run_dir, out


def _csv_rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_mdh_train_runs_the_plugin_with_its_loss_names(toy_run):
    run_dir, out = toy_run
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "done" and record["model"] == "toy" and record["preset"] == "tiny"
    assert record["model_config"]["hidden"] == 24 and record["ablation"] == {"hidden": 24}
    rows = _csv_rows(run_dir / "steps.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    for r in rows:
        for key in ("loss", "noise_mse", "gripper_bce"):
            assert math.isfinite(float(r[key])), (key, r)


def test_mdh_train_logs_the_plugin_loss_names_in_metrics_csv(toy_run):
    run_dir, out = toy_run
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _csv_rows(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [3, 6]
    for r in rows:
        for key in ("loss", "noise_mse", "gripper_bce", "pos_err_cm"):
            assert math.isfinite(float(r[key])), (key, r)


def test_metrics_csv_averages_steps_csv_since_the_previous_evaluation(toy_run):
    """Each metrics.csv row's loss terms (the total and the plugin's own) are the means of the steps.csv rows
    after the previous evaluation up to its step."""
    run_dir, out = toy_run
    assert out.returncode == 0, out.stderr[-3000:]
    steps = _csv_rows(run_dir / "steps.csv")
    metrics = _csv_rows(run_dir / "metrics.csv")
    assert len(metrics) == 2
    previous = 0
    for row in metrics:
        step = int(row["step"])
        window = [r for r in steps if previous < int(r["step"]) <= step]
        assert len(window) == step - previous
        for key in ("loss", "noise_mse", "gripper_bce"):
            mean = sum(float(r[key]) for r in window) / len(window)
            assert float(row[key]) == pytest.approx(mean, rel=1e-6, abs=0), (key, step)
        previous = step
    assert len({round(float(r["loss"]), 9) for r in steps}) > 1  # the steps differ: a mean is not any one row


def test_mistyped_plugin_option_fails_at_compose_time(data_root, tmp_path):
    run_dir = tmp_path / "run"
    out = _run(_train_cmd(*_toy_overrides(data_root, run_dir, "model.options.hidden=abc")))
    assert out.returncode != 0
    assert "hidden" in out.stderr + out.stdout
    assert not (run_dir / "record.json").exists()  # refused before the run started


def _config_tree(cls) -> dict:
    """{field: None or nested {...}} of a config dataclass, ``preset`` left out (it is ``model.preset``)."""
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: _config_tree(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else None
            for f in dataclasses.fields(cls) if f.name != "preset"}


def test_mdh_train_help_lists_every_plugin_option():
    """`mdh train model=toy --help` shows the plugin's typed model.options: every field of its options
    schema (nested schedule included), null = the preset's value."""
    import yaml

    out = _run(_train_cmd("model=toy", "--help"))
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout.split("== Config ==", 1)[1].split("\n", 2)[2].split("Powered by Hydra", 1)[0]
    model = yaml.safe_load(text)["model"]
    assert model["name"] == "toy" and model["preset"] == get_policy("toy").default_preset

    def tree(options):
        return {k: tree(v) if isinstance(v, dict) else None for k, v in options.items()}

    want = _config_tree(get_policy("toy").config_class)  # the plugin's own config, not the derived schema
    assert {"hidden", "noise_weight", "schedule"} <= set(want) and "clip_range" in want["schedule"]
    assert tree(model["options"]) == want
    assert all(v is None for k, v in model["options"].items() if k != "schedule")


def test_cli_bench_step_times_the_plugin(monkeypatch, capsys):
    """`mdh bench step --model toy ...` through the command line's main()."""
    from harness.cli import main

    env = subprocess_env(TOY_DIR)
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])  # bench_step's subprocesses inherit os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = main(["bench", "step", "--model", "toy", "--preset", "tiny", "--B", "2", "--M", "1,2", "--steps", "1",
               "--warmup", "0", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["M"], r["preset"]) for r in rows] == [("toy", 1, "tiny"), ("toy", 2, "tiny")]
    for r in rows:
        assert r["step_time_median_s"] > 0 and r["peak_memory_bytes"] > 0 and len(r["step_times_s"]) == 1
