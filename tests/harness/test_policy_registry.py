"""The policy registry (harness/policy.py): every policy, the built-in included, is found through the entry
point group ``mdh.policies`` and names a ``PolicyEntry``; bad names, presets, fields, plugins and old-style
factory functions are reported with the choices or the fix.

Plugins are put on ``sys.path`` in their installed form (a module + ``*.dist-info/entry_points.txt``), inside
``isolated_registry`` (tests/plugins/toy_env.py), which restores the registry afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

import harness.policy as registry
from harness.policy import (
    ENTRY_POINT_GROUP,
    MIGRATION_HINT,
    Policy,
    PolicyEntry,
    build_policy,
    get_policy,
    options_schema,
    policy_names,
    register_policy,
)
from tests.plugins.toy_env import REPO, TOY_DIR, isolated_registry, subprocess_env


@pytest.fixture
def clean_registry():
    with isolated_registry():
        yield


def write_plugin(root, dist: str, module: str, source: str, entry_points_txt: str):
    """The installed form of a plugin package under ``root``: ``<module>.py`` and ``<dist>-0.1.dist-info``."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_points_txt}")
    return root


# --------------------------------------------------------------------------------------------- built-in


def test_minidiffuser_is_found_through_its_entry_point():
    (ep,) = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == "minidiffuser"]
    assert ep.value == "minidiffuser.policy:ENTRY"
    assert "minidiffuser" in policy_names()
    assert get_policy("minidiffuser") is ep.load()
    p = build_policy("minidiffuser", preset="tiny")
    assert isinstance(p, Policy)
    assert p.action_dim == 3 and p.shares_condition
    assert build_policy("minidiffuser", preset="tiny", head="joint").action_dim == 9


HARNESS_MODULES = ("harness.cli", "harness.bench.step", "harness.evaluate.offline", "harness.train", "harness.policy")


def model_packages() -> set[str]:
    """Top-level packages of every policy declared in ``mdh.policies`` (plus the built-ins' packages)."""
    return {ep.value.split(":")[0].split(".")[0] for ep in entry_points(group=ENTRY_POINT_GROUP)} | {
        "minidiffuser", "baselines"}


def test_the_harness_imports_no_model_package():
    forbidden = model_packages()
    assert {"minidiffuser", "baselines"} <= forbidden
    code = ("import json, sys\n"
            f"for m in {HARNESS_MODULES!r}: __import__(m)\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(forbidden)!r})))\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                         timeout=300, env=subprocess_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"the harness imported model packages: {out.stdout}"


def test_unknown_policy_lists_choices():
    with pytest.raises(KeyError, match=r"unknown policy 'no-such-policy'; choices: \[.*'minidiffuser'"):
        build_policy("no-such-policy")


def test_unknown_preset_and_field_list_choices():
    with pytest.raises(ValueError, match=r"choices: \['paper', 'small', 'tiny'\]"):
        build_policy("minidiffuser", preset="huge")
    with pytest.raises(ValueError, match=r"unknown MiniDiffuserConfig fields \['rope'\]; choices: \[.*'rope3d'"):
        build_policy("minidiffuser", preset="tiny", rope=True)
    with pytest.raises(TypeError, match="either a config or preset/overrides"):
        build_policy("minidiffuser", get_policy("minidiffuser").make_config("tiny"), preset="tiny")


def test_options_schema_types_every_field_and_defaults_to_the_preset():
    schema = options_schema(get_policy("minidiffuser"))
    fields = {f.name: f for f in dataclasses.fields(schema)}
    assert "preset" not in fields and {"rope3d", "num_points", "schedule"} <= set(fields)
    options = schema()
    assert options.rope3d is None and options.schedule.num_train_timesteps is None  # nested, null = preset


# --------------------------------------------------------------------------------------------- registering


@dataclasses.dataclass
class _DummyConfig:
    width: int = 1


def _dummy_entry(name: str = "_test_dummy") -> PolicyEntry:
    return PolicyEntry(name=name, config_class=_DummyConfig, build=lambda config, data_info: None,
                       presets={"one": {"width": 1}}, default_preset="one")


def test_double_registration_is_refused(clean_registry):
    entry = register_policy(_dummy_entry())
    assert register_policy(entry) is entry  # the same entry again is harmless
    with pytest.raises(ValueError, match="'_test_dummy' is already registered"):
        register_policy(_dummy_entry())
    with pytest.raises(ValueError, match="already registered"):
        register_policy(dataclasses.replace(get_policy("minidiffuser")))


def test_register_policy_refuses_a_factory_function(clean_registry):
    def make(**config):
        return None

    with pytest.raises(TypeError, match="expects a PolicyEntry, got function.*Migrating from a factory function"):
        register_policy(make)


def test_policy_entry_checks_itself():
    with pytest.raises(TypeError, match="config_class must be a dataclass"):
        PolicyEntry(name="x", config_class=dict, build=lambda c, d: None)
    with pytest.raises(ValueError, match=r"default_preset 'big' not in presets \['one'\]"):
        PolicyEntry(name="x", config_class=_DummyConfig, build=lambda c, d: None, presets={"one": {}},
                    default_preset="big")


def test_a_built_policy_missing_contract_members_is_refused(clean_registry):
    register_policy(_dummy_entry())
    with pytest.raises(TypeError, match=r"'_test_dummy' \(NoneType\) lacks \['config', 'input_spec'"):
        build_policy("_test_dummy")


def test_checkpoint_importers_come_from_the_policy_registry(clean_registry, tmp_path, capsys):
    """`mdh checkpoint IMPORTER CKPT OUT [--model NAME]` runs the policy's importer (PolicyEntry.checkpoint_importers):
    the harness names no model package; a missing importer lists what every policy offers."""
    from harness.cli import main

    assert callable(get_policy("minidiffuser").checkpoint_importers["import-official"])
    calls = []

    def importer(ckpt, out, data_path):
        calls.append((ckpt, out, data_path))
        if ckpt == "bad.pt":
            raise ValueError("bad.pt is not a dummy checkpoint")
        return {"path": ckpt, "sha256": "ab" * 32, "imported_from": "a dummy format"}

    register_policy(dataclasses.replace(_dummy_entry(), checkpoint_importers={"import-dummy": importer}))
    out = str(tmp_path / "run")
    assert main(["checkpoint", "import-dummy", "a.pt", out, "--model", "_test_dummy", "--data", "d"]) == 0
    assert calls == [("a.pt", out, "d")]
    assert f"wrote {out} (policy _test_dummy, import-dummy: a dummy format) from a.pt" in capsys.readouterr().out
    assert main(["checkpoint", "import-dummy", "bad.pt", out, "--model", "_test_dummy"]) == 2
    assert capsys.readouterr().err.strip() == "mdh checkpoint: error: bad.pt is not a dummy checkpoint"
    assert main(["checkpoint", "import-dummy", "a.pt", out]) == 2  # --model defaults to minidiffuser
    err = capsys.readouterr().err
    assert "policy 'minidiffuser' offers no importer 'import-dummy'" in err and len(err.strip().splitlines()) == 1
    assert "_test_dummy: import-dummy" in err and "minidiffuser: import-official" in err
    assert main(["checkpoint", "import-official", "a.pt", out, "--model", "no-such-policy"]) == 2
    assert "unknown policy 'no-such-policy'" in capsys.readouterr().err
    assert len(calls) == 2
    with pytest.raises(TypeError, match=r"checkpoint_importers\['x'\] is not callable"):
        dataclasses.replace(_dummy_entry(), checkpoint_importers={"x": "not a function"})


# --------------------------------------------------------------------------------------------- plugins


def test_third_party_policy_found_through_its_entry_point():
    """The toy plugin (tests/plugins/mdh_toy_policy) declares `toy = "mdh_toy_policy:ENTRY"`."""
    with isolated_registry(TOY_DIR):
        assert {"minidiffuser", "toy"} <= set(policy_names())
        policy = build_policy("toy", preset="tiny", hidden=8)
        assert isinstance(policy, Policy)
        assert policy.config.hidden == 8 and policy.config.num_points == 64  # override over the preset
        with pytest.raises(ValueError, match=r"unknown preset 'huge' for policy 'toy'; choices: \['base', 'tiny'\]"):
            build_policy("toy", preset="huge")
        with pytest.raises(ValueError, match=r"unknown ToyConfig fields \['width'\]"):
            build_policy("toy", width=3)
    assert "toy" not in policy_names() and "mdh_toy_policy" not in sys.modules  # isolated


BROKEN_MODULE = "raise ImportError('needs a CUDA extension that is not installed')\n"

OLD_STYLE_MODULE = '''
from torch import nn


class Constant(nn.Module):
    action_dim = 3
    shares_condition = True


def build(**config):
    """The mdh 0.1 API: a factory taking the run's options as keyword arguments."""
    return Constant()
'''

MISNAMED_MODULE = '''
import dataclasses
from harness.policy import PolicyEntry


@dataclasses.dataclass
class Config:
    x: int = 0


ENTRY = PolicyEntry(name="other_name", config_class=Config, build=lambda config, data_info: None)
'''


def test_a_broken_plugin_is_reported_without_breaking_the_builtins(tmp_path, caplog):
    write_plugin(tmp_path, "mdh-broken", "mdh_broken", BROKEN_MODULE,
                 "broken = mdh_broken:ENTRY\nmissing = mdh_no_such_module:ENTRY\n")
    with isolated_registry(tmp_path), caplog.at_level(logging.WARNING, logger="harness.policy"):
        names = policy_names()
        assert "minidiffuser" in names and "broken" not in names and "missing" not in names
        with pytest.raises(KeyError, match="policy plugin 'broken' failed to load: mdh_broken:ENTRY: "
                                           "ImportError: needs a CUDA extension"):
            build_policy("broken")
        with pytest.raises(KeyError, match="'missing' failed to load: .*ModuleNotFoundError"):
            get_policy("missing")
        assert build_policy("minidiffuser", preset="tiny").action_dim == 3
        assert "policy plugin 'broken'" in caplog.text and "failed to load" in caplog.text


def test_an_old_style_factory_entry_point_gets_the_migration_hint(tmp_path):
    write_plugin(tmp_path, "mdh-old", "mdh_old", OLD_STYLE_MODULE, "old = mdh_old:build\n")
    with isolated_registry(tmp_path):
        assert "old" not in policy_names() and "minidiffuser" in policy_names()
        for call in (lambda: get_policy("old"), lambda: build_policy("old"), lambda: build_policy("old", value=1)):
            with pytest.raises(KeyError, match="mdh_old:build is a function, not a PolicyEntry") as info:
                call()
            assert MIGRATION_HINT in str(info.value) and "Migrating from a factory function" in str(info.value)


def test_an_entry_point_name_must_match_its_entry(tmp_path):
    write_plugin(tmp_path, "mdh-misnamed", "mdh_misnamed", MISNAMED_MODULE, "misnamed = mdh_misnamed:ENTRY\n")
    with isolated_registry(tmp_path):
        assert "misnamed" not in policy_names() and "other_name" not in policy_names()
        with pytest.raises(KeyError, match="registered as 'misnamed' but its PolicyEntry says 'other_name'"):
            get_policy("misnamed")


def test_isolated_registry_restores_everything(tmp_path):
    before = dict(registry._REGISTRY), dict(registry._PLUGIN_ERRORS), list(sys.path)
    write_plugin(tmp_path, "mdh-old", "mdh_old", OLD_STYLE_MODULE, "old = mdh_old:build\n")
    with isolated_registry(tmp_path, TOY_DIR):
        policy_names()
        assert "toy" in registry._REGISTRY and "old" in registry._PLUGIN_ERRORS
    assert (dict(registry._REGISTRY), dict(registry._PLUGIN_ERRORS), list(sys.path)) == before
    assert "mdh_old" not in sys.modules and "mdh_toy_policy" not in sys.modules


# --------------------------------------------------------------------------------------------- the guide


def test_new_architecture_guide_numbers_its_steps_and_its_example_config_validates(monkeypatch):
    """docs/new_architecture.md: steps numbered 1..n once each; its example config range-checks its fields."""
    import re
    import types

    text = (REPO / "docs" / "new_architecture.md").read_text()
    numbers = [int(n) for n in re.findall(r"^## (\d+)\.", text, flags=re.MULTILINE)]
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    code = text.split("```python\n# my_policy/model.py\n", 1)[1].split("```", 1)[0]
    module = types.ModuleType("my_policy_guide_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(code, "docs/new_architecture.md", "exec"), module.__dict__)  # noqa: S102 - our own documentation
    entry = module.ENTRY
    assert entry.make_config("tiny").hidden == 32
    for bad, message in (({"hidden": 0}, "MyConfig.hidden must be >= 1, got 0"),
                         ({"dropout": float("nan")}, "MyConfig.dropout must be a finite number, got nan"),
                         ({"schedule": {"clip_range": -1.0}}, "MyConfig.schedule.clip_range must be > 0, got -1.0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            entry.make_config("tiny", **bad)
