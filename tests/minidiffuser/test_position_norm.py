"""``position_norm="keypose_bounds"``: the diffused position is the world position scaled to [-1, 1] by the
training keyposes' bounds + 0.04 m (as 3DDA / 3DFA); the network still reads metres in the centred frame."""

from __future__ import annotations

import numpy as np
import torch

from harness.bench.synthetic import synthetic_batch
from harness.data.bounds import keypose_bounds
from harness.data.formats.lotus_lmdb import LotusLmdbSource
from harness.policy import DataInfo, build_policy

LOW, HIGH = [-0.5, 0.4, 0.0], [0.5, 1.0, 0.4]


def _policy(bounds=(LOW, HIGH), **kw):
    torch.manual_seed(0)
    info = DataInfo(text_dim=512, bounds_fn=(lambda: bounds) if bounds is not None else None)
    return build_policy("minidiffuser", preset="tiny", data_info=info, position_norm="keypose_bounds", **kw).eval()


def test_the_bounds_map_to_minus_one_and_one_in_the_world_frame():
    policy = _policy()
    batch = synthetic_batch(B=2, N=policy.cfg.num_points, seed=1)
    batch["offset"] = torch.tensor([[0.1, 0.7, 0.2], [-0.2, 0.6, 0.1]])
    # targets at the low and high corners of the box, written in each observation's centred frame
    batch["target"][0, :3] = torch.tensor(LOW) - batch["offset"][0]
    batch["target"][1, :3] = torch.tensor(HIGH) - batch["offset"][1]
    x0 = policy.diffusion_target(batch)
    torch.testing.assert_close(x0, torch.tensor([[-1.0] * 3, [1.0] * 3]))
    # and back: what the network reads is the centred position again
    torch.testing.assert_close(policy._to_centred(x0, batch["offset"]), batch["target"][:, :3], atol=1e-6, rtol=0)


def test_samples_come_back_in_the_centred_frame_and_the_box_is_saved_with_the_weights():
    policy = _policy()
    assert torch.equal(policy.state_dict()["pos_low"], torch.tensor(LOW))
    batch = synthetic_batch(B=2, N=policy.cfg.num_points, seed=2)
    batch["offset"] = torch.tensor([[0.0, 0.7, 0.2], [0.0, 0.7, 0.2]])
    from harness.diffusion import SamplerConfig, make_sampler

    actions = policy.sample(batch, make_sampler(policy.noise_scheduler, SamplerConfig("ddim", 3)),
                            generator=torch.Generator().manual_seed(0))
    world = actions[:, :3] + batch["offset"]
    # the sampler clips its x0 estimate to [-1, 1] of the box: the world position stays inside it
    assert bool(((world >= torch.tensor(LOW) - 1e-5) & (world <= torch.tensor(HIGH) + 1e-5)).all())
    # a policy built without data (evaluation before the checkpoint loads) gets the box from the weights
    blank = _policy(bounds=None)
    assert torch.equal(blank.pos_low, torch.tensor([-1.0] * 3))
    blank.load_state_dict(policy.state_dict())
    assert torch.equal(blank.pos_low, torch.tensor(LOW)) and torch.equal(blank.pos_high, torch.tensor(HIGH))


def test_centred_keeps_the_official_metres():
    torch.manual_seed(0)
    policy = build_policy("minidiffuser", preset="tiny", position_norm="centred")
    batch = synthetic_batch(B=2, N=policy.cfg.num_points, seed=1)
    batch["offset"] = torch.ones(2, 3)
    assert torch.equal(policy.diffusion_target(batch), batch["target"][:, :3])
    assert "pos_low" not in policy.state_dict()


def test_small_preset_defaults_and_the_old_behaviour_stays_reachable():
    from harness.policy import get_policy

    entry = get_policy("minidiffuser")
    small = entry.make_config("small")
    assert (small.position_norm, small.schedule.schedule) == ("keypose_bounds", "squaredcos_cap_v2")
    old = entry.make_config("small", position_norm="centred", schedule={"schedule": "scaled_linear"})
    assert (old.position_norm, old.schedule.schedule) == ("centred", "scaled_linear")
    # a nested override keeps the preset's other nested values
    assert entry.make_config("small", schedule={"clip_range": 2.0}).schedule.schedule == "squaredcos_cap_v2"
    paper = entry.make_config("paper")
    assert (paper.position_norm, paper.schedule.schedule) == ("centred", "scaled_linear")


def test_keypose_bounds_are_the_training_targets_plus_the_margin(tmp_path, metaworld):
    data = metaworld.generate_suite(tmp_path / "suite", ["reach-v3", "push-v3"], episodes=2)
    low, high = keypose_bounds(data)
    src = LotusLmdbSource(data, split="train", kind="voxel1cm")
    targets = np.concatenate([src.read_episode(tv, k).actions[1:, :3] for tv in src.taskvars()
                              for k in src.episode_keys(tv)])
    np.testing.assert_allclose(low, targets.min(0) - 0.04, atol=1e-6)
    np.testing.assert_allclose(high, targets.max(0) + 0.04, atol=1e-6)
    only_reach = keypose_bounds(data, taskvars=["reach-v3+0"])
    assert only_reach != (low, high)


def test_bounds_reach_the_model_through_mdh_train(tmp_path, metaworld):
    from harness.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from harness.train import run_training

    data = metaworld.generate_suite(tmp_path / "suite", ["reach-v3"], episodes=2)
    cfg = RunConfig(model=ModelConfig(name="minidiffuser", preset="tiny", options={"position_norm": "keypose_bounds"}),
                    data=DataConfig(name="metaworld", path=str(data), workers=0, eval_keysteps=2),
                    train=TrainConfig(B=2, M=2, steps=1, eval_every=1, ckpt_every=1, device="cpu", progress=False,
                                      sampler="ddim", sampler_steps=2))
    record = run_training(cfg, tmp_path / "run")
    low, high = keypose_bounds(data)
    assert record["keypose_bounds"] == {"low": low, "high": high}
    state = torch.load(tmp_path / "run" / "ckpt" / "last.pt", weights_only=True)["model"]
    torch.testing.assert_close(state["pos_low"], torch.tensor(low))
