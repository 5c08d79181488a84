"""Test helpers: put a plugin's installed form (module + ``*.dist-info/entry_points.txt``) on ``sys.path``
with the policy registry of harness/policy.py isolated, and the environment a subprocess needs to see it.

    from tests.plugins.toy_env import TOY_DIR, isolated_registry, subprocess_env

``isolated_registry(*dirs)`` snapshots the registry (``_REGISTRY``, ``_PLUGIN_ERRORS``), puts
``dirs`` first on ``sys.path`` and on exit restores all of it and forgets the modules imported from
``dirs``, so no plugin a test loads is seen by any other test.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import harness.policy as registry

PLUGINS = Path(__file__).resolve().parent
TOY_DIR = PLUGINS / "mdh_toy_policy"  # the folder a `pip install` of the toy plugin would be equivalent to
REPO = PLUGINS.parents[1]


@contextlib.contextmanager
def isolated_registry(*dirs: str | os.PathLike):
    saved = dict(registry._REGISTRY), dict(registry._PLUGIN_ERRORS)
    saved_path = list(sys.path)
    roots = [str(Path(d).resolve()) for d in dirs]
    sys.path[:0] = roots
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name, module in list(sys.modules.items()):
            if any(str(getattr(module, "__file__", None) or "").startswith(r + os.sep) for r in roots):
                del sys.modules[name]
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved[0])
        registry._PLUGIN_ERRORS.clear()
        registry._PLUGIN_ERRORS.update(saved[1])


def subprocess_env(*dirs: str | os.PathLike, **extra: str) -> dict[str, str]:
    """``os.environ`` with ``PYTHONPATH=<dirs>:<repo>[:<old PYTHONPATH>]`` (a child process then finds the
    plugins' dist-info through its entry points) and one intra-op thread (the test machine is shared)."""
    old = os.environ.get("PYTHONPATH")
    path = os.pathsep.join([*(str(Path(d).resolve()) for d in dirs), str(REPO), *([old] if old else [])])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
