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
