"""Instruction text encoders: the offline hash encoder and the CLIP fallback."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

from harness.data import text
from harness.data.text import HashTextEncoder, get_text_encoder


def test_hash_encoder_shapes_and_dtype():
    enc = HashTextEncoder()
    texts = ["push the maroon button", "close the jar", "a"]
    out = enc.encode(texts)
    assert len(out) == 3
    for s, e in zip(texts, out):
        assert e.dtype == np.float32 and e.ndim == 2 and e.shape[1] == 512
        assert e.shape[0] == len(s.split()) + 2  # <sos> words <eos>
        assert np.isfinite(e).all()
    assert enc.encode([""])[0].shape == (2, 512)
    assert HashTextEncoder(dim=64).encode(["x y"])[0].shape == (4, 64)


def test_hash_encoder_is_deterministic_and_distinguishes_strings():
    a = HashTextEncoder().encode(["push the red button", "push the blue button", "Push the RED button"])
    b = HashTextEncoder().encode(["push the red button"])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], a[2])  # lower-cased
    assert a[0].shape == a[1].shape and not np.allclose(a[0], a[1])
    # only the differing word's token differs
    differs = ~np.isclose(a[0], a[1]).all(axis=1)
    np.testing.assert_array_equal(differs, [False, False, False, True, False, False])
    # the same word at two positions gets two vectors (position code)
    twice = HashTextEncoder().encode(["go go"])[0]
    assert not np.allclose(twice[1], twice[2])


def test_hash_encoder_is_stable_across_processes():
    code = ("from harness.data.text import HashTextEncoder; "
            "print(repr(float(HashTextEncoder().encode(['open the drawer'])[0].sum())))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                       env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) == float(HashTextEncoder().encode(["open the drawer"])[0].sum())


def test_get_text_encoder_hash_and_unknown():
    assert get_text_encoder("hash").name == "hash"
    with pytest.raises(ValueError, match="unknown text encoder"):
        get_text_encoder("bert")


def test_clip_without_weights_falls_back_to_hash_with_a_warning(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MDH_CLIP_PATH", str(tmp_path / "no_weights_here"))
    with caplog.at_level(logging.WARNING, logger="harness.data.text"):
        enc = get_text_encoder("clip")
    assert enc.name == "hash" and isinstance(enc, HashTextEncoder)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "clip" in msg and "fell back" in msg.lower() and "hash" in msg
    assert enc.encode(["x"])[0].shape == (3, 512)


def test_clip_without_fallback_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MDH_CLIP_PATH", str(tmp_path / "no_weights_here"))
    with pytest.raises((ImportError, OSError)):  # no transformers, or no weights on disk
        get_text_encoder("clip", fallback=False)


def test_fallback_survives_an_exception_without_a_message(monkeypatch, caplog):
    class Broken:
        def __init__(self):
            raise OSError()

    monkeypatch.setitem(text.ENCODERS, "clip", Broken)
    with caplog.at_level(logging.WARNING, logger="harness.data.text"):
        assert get_text_encoder("clip").name == "hash"
    assert "OSError" in caplog.text
