from __future__ import annotations

import pytest

from harness.policy import Policy, build_policy, policy_names, register_policy


def test_minidiffuser_is_registered_and_implements_the_protocol():
    assert "minidiffuser" in policy_names()
    p = build_policy("minidiffuser", preset="tiny")
    assert isinstance(p, Policy)
    assert p.action_dim == 3 and p.shares_condition
    assert build_policy("minidiffuser", preset="tiny", head="joint").action_dim == 9


def test_unknown_policy_lists_choices():
    with pytest.raises(KeyError, match="minidiffuser"):
        build_policy("no-such-policy")


def test_unknown_preset_and_field_list_choices():
    with pytest.raises(ValueError, match="choices: \\['paper', 'small', 'tiny'\\]"):
        build_policy("minidiffuser", preset="huge")
    with pytest.raises(ValueError, match="unknown MiniDiffuserConfig fields \\['rope'\\]"):
        build_policy("minidiffuser", preset="tiny", rope=True)


def test_double_registration_is_refused():
    @register_policy("_test_dummy")
    def make():
        return None

    with pytest.raises(ValueError, match="already registered"):
        register_policy("_test_dummy")(lambda: None)


PLUGIN_MODULE = '''
import torch
from torch import nn


class ConstantPolicy(nn.Module):
    """Predicts zero noise; enough to prove the registry found it."""

    action_dim = 3
    shares_condition = True
    requires = ("points",)

    def __init__(self, value=0.0):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))


def make(**config):
    return ConstantPolicy(**config)
'''


def test_third_party_policy_found_through_entry_point(tmp_path, monkeypatch):
    """A separate package declares `[project.entry-points."mdh.policies"] constant = "mdh_constant:make"`;
    here its installed form (module + dist-info with entry_points.txt) is put on sys.path."""
    (tmp_path / "mdh_constant.py").write_text(PLUGIN_MODULE)
    dist = tmp_path / "mdh_constant-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mdh-constant\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mdh.policies]\nconstant = mdh_constant:make\n"
                                           "broken = mdh_constant:does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "constant" in policy_names()
    policy = build_policy("constant", value=2.5)
    assert float(policy.value.detach()) == 2.5 and policy.action_dim == 3
    with pytest.raises(KeyError, match="broken.*failed to load"):
        build_policy("broken")
