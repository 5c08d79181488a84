"""3D-LOTUS instruction files: taskvars JSON, taskvar -> instructions JSON, instr_embeds npy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness.data.errors import DataError
from harness.data.formats.instructions import (
    find_instruction_files,
    read_instr_embeds,
    read_taskvar_instructions,
    read_taskvars,
    write_instr_embeds,
    write_taskvar_instructions,
    write_taskvars,
)


def test_taskvars_roundtrip(tmp_path):
    tvs = ["close_jar_peract+0", "push_buttons+12", "stack_blocks+59"]
    write_taskvars(tmp_path / "taskvars.json", tvs)
    assert read_taskvars(tmp_path / "taskvars.json") == tvs
    assert json.loads((tmp_path / "taskvars.json").read_text()) == tvs  # plain JSON list, as the original


def test_instructions_roundtrip(tmp_path):
    instr = {"push_buttons+0": ["push the maroon button", "press the maroon button"],
             "close_jar+3": ["close the green jar"]}
    path = tmp_path / "sub" / "taskvars_instructions.json"
    write_taskvar_instructions(path, instr)
    assert read_taskvar_instructions(path) == instr
    assert json.loads(path.read_text()) == instr
    assert not list(path.parent.glob(".*.tmp"))  # the atomic write left no temporary behind


def test_instr_embeds_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    embeds = {"push the maroon button": rng.standard_normal((7, 512)).astype(np.float32),
              "close the jar": rng.standard_normal((4, 512)).astype(np.float64)}  # written as float32
    path = tmp_path / "instr_embeds_clip.npy"
    write_instr_embeds(path, embeds)
    back = read_instr_embeds(path)
    assert sorted(back) == sorted(embeds)
    for k, v in embeds.items():
        assert back[k].dtype == np.float32 and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v.astype(np.float32))
    # the original loader: np.load(allow_pickle=True).item() gives the same dict
    orig = np.load(path, allow_pickle=True).item()
    assert isinstance(orig, dict) and sorted(orig) == sorted(embeds)
    np.testing.assert_array_equal(orig["close the jar"], embeds["close the jar"].astype(np.float32))
    assert not list(tmp_path.glob(".*tmp*"))


def test_reads_embeds_saved_the_original_way(tmp_path):
    embeds = {"open the drawer": np.ones((3, 512), np.float32)}
    np.save(tmp_path / "instr_embeds_clip.npy", embeds)
    back = read_instr_embeds(tmp_path / "instr_embeds_clip.npy")
    np.testing.assert_array_equal(back["open the drawer"], embeds["open the drawer"])


@pytest.mark.parametrize("content, words", [
    ("{not json", "not valid JSON"),
    ('{"a+0": "x"}', "JSON list"),
    ('["a+0", 3]', "JSON list"),
])
def test_bad_taskvars_file(tmp_path, content, words):
    path = tmp_path / "taskvars.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        read_taskvars(path)
    assert str(path) in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("content, key, words", [
    ("[1, 2", None, "not valid JSON"),
    ('["push+0"]', None, "JSON object"),
    ('{"push+0": []}', "push+0", "non-empty list"),
    ('{"push+0": "push it"}', "push+0", "non-empty list"),
    ('{"ok+0": ["fine"], "push+0": ["push", 7]}', "push+0", "non-empty list"),
])
def test_bad_instructions_file(tmp_path, content, key, words):
    path = tmp_path / "taskvars_instructions.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        read_taskvar_instructions(path)
    msg = str(e.value)
    assert str(path) in msg and words in msg
    if key:
        assert key in msg


def test_missing_files(tmp_path):
    for read in (read_taskvars, read_taskvar_instructions, read_instr_embeds):
        with pytest.raises(DataError) as e:
            read(tmp_path / "absent.file")
        assert str(tmp_path / "absent.file") in str(e.value) and "not found" in str(e.value)


def test_bad_embeds_file(tmp_path):
    path = tmp_path / "instr_embeds_x.npy"
    path.write_bytes(b"garbage, not an npy file")
    with pytest.raises(DataError, match="cannot load") as e:
        read_instr_embeds(path)
    assert str(path) in str(e.value)

    np.save(path, np.zeros((3, 512), np.float32))  # an array, not a dict
    with pytest.raises(DataError, match="pickled dict") as e:
        read_instr_embeds(path)
    assert str(path) in str(e.value)

    np.save(path, {"push it": np.zeros(512, np.float32)})  # one vector, not (n_tokens, D)
    with pytest.raises(DataError, match=r"\(n_tokens, D\)") as e:
        read_instr_embeds(path)
    assert str(path) in str(e.value) and "push it" in str(e.value)

    bad = np.zeros((2, 512), np.float32)
    bad[1, 3] = np.nan
    np.save(path, {"push it": bad})
    with pytest.raises(DataError, match="NaN") as e:
        read_instr_embeds(path)
    assert str(path) in str(e.value) and "push it" in str(e.value)


def test_find_instruction_files_nearest_wins(tmp_path):
    data = tmp_path / "train" / "voxel1cm"
    data.mkdir(parents=True)
    (tmp_path / "taskvars_instructions_peract.json").write_text("{}")
    (tmp_path / "instr_embeds_clip.npy").write_bytes(b"")
    (tmp_path / "train" / "instr_embeds_hash.npy").write_bytes(b"")
    found = find_instruction_files(data)
    assert found["instructions"] == (tmp_path / "taskvars_instructions_peract.json").resolve()
    assert found["embeds"] == (tmp_path / "train" / "instr_embeds_hash.npy").resolve()
    assert find_instruction_files(data, max_up=0) == {}
