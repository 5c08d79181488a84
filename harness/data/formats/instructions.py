"""3D-LOTUS instruction files (../shared/reference/minidiffuser.md §3.2, §3.4).

- taskvars JSON: a list of "task+var" strings.
- task-variation -> instructions JSON: {"task+var": ["paraphrase", ...]}.
- ``instr_embeds_<encoder>.npy``: a pickled dict {instruction string: (n_tokens, D) float32}, saved with
  ``np.save`` (load with ``np.load(path, allow_pickle=True).item()``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from harness.data.errors import DataError
from harness.data.meta import write_json_atomic
from harness.safe_pickle import safe_load


def write_taskvars(path: str | os.PathLike, taskvars: list[str]) -> None:
    write_json_atomic(Path(path), list(taskvars))


def read_taskvars(path: str | os.PathLike) -> list[str]:
    value = _read_json(path)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError("taskvars file must hold a JSON list of 'task+var' strings", path)
    return value


def write_taskvar_instructions(path: str | os.PathLike, instructions: dict[str, list[str]]) -> None:
    write_json_atomic(Path(path), {k: list(v) for k, v in instructions.items()})


def read_taskvar_instructions(path: str | os.PathLike) -> dict[str, list[str]]:
    value = _read_json(path)
    if not isinstance(value, dict):
        raise DataError("task-variation instructions file must hold a JSON object", path)
    for k, v in value.items():
        if not isinstance(v, list) or not v or not all(isinstance(s, str) for s in v):
            raise DataError("expected a non-empty list of instruction strings", path, k)
    return value


def write_instr_embeds(path: str | os.PathLike, embeds: dict[str, np.ndarray]) -> None:
    from harness.record import atomic_path

    with atomic_path(Path(path), suffix=".npy") as tmp:  # np.save appends .npy to other names
        np.save(tmp, {k: np.asarray(v, dtype=np.float32) for k, v in embeds.items()}, allow_pickle=True)


def read_instr_embeds(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read ``instr_embeds_*.npy`` -> {instruction: (n_tokens, D) float32}.

    The file is an ``np.save``-d dict, i.e. a pickle after the .npy header. It is never given to
    ``np.load(allow_pickle=True)``, which runs whatever the pickle holds: the header is parsed with
    ``numpy.lib.format`` and the pickle goes to the restricted unpickler (``harness.safe_pickle``).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            header = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
            # 3.0 only differs for non-latin1 field names, so never holds the pickled dict
            shape, _, dtype = header[version](f) if version in header else (None, None, None)
            if dtype is not None and dtype.hasobject:
                value = safe_load(f, path=path)
                if not isinstance(value, np.ndarray) or value.shape != shape:
                    raise DataError(f"the pickle after the .npy header is not the {shape} array it announces",
                                    path)
            else:
                f.seek(0)
                value = npy_format.read_array(f, allow_pickle=False)
    except FileNotFoundError:
        raise DataError("instruction embedding file not found", path) from None
    except DataError as e:  # a refused global: keep its words, which name it
        raise DataError(f"cannot load instruction embeddings ({e.problem})", path, e.key) from None
    except (OSError, ValueError, TypeError, EOFError, MemoryError) as e:  # not an .npy file, or truncated
        raise DataError(f"cannot load instruction embeddings ({type(e).__name__}: {e})", path) from None
    value = value.item() if value.dtype == object and value.shape == () else value
    if not isinstance(value, dict):
        raise DataError("instruction embeddings must be a pickled dict {instruction: (L, D) array}", path)
    out = {}
    for k, v in value.items():
        v = np.asarray(v, dtype=np.float32)
        if v.ndim != 2:
            raise DataError(f"embedding has shape {v.shape}, expected (n_tokens, D)", path, k)
        if not np.all(np.isfinite(v)):
            raise DataError("embedding contains NaN or inf", path, k)
        out[k] = v
    return out


def find_instruction_files(path: str | os.PathLike, max_up: int = 3) -> dict[str, Path]:
    """Look in ``path`` and its parents for the instruction files a dataset folder usually sits beside.

    Returns a dict with keys among "instructions" (taskvars_instructions*.json) and "embeds"
    (instr_embeds_*.npy); the nearest folder wins.
    """
    found: dict[str, Path] = {}
    p = Path(path).resolve()
    for _ in range(max_up + 1):
        if "instructions" not in found:
            cands = sorted(p.glob("taskvars_instructions*.json"))
            if cands:
                found["instructions"] = cands[0]
        if "embeds" not in found:
            cands = sorted(p.glob("instr_embeds_*.npy"))
            if cands:
                found["embeds"] = cands[0]
        if p.parent == p:
            break
        p = p.parent
    return found


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e}", path) from None


def write_instruction_files(out: str | os.PathLike, table: dict[str, list[str]], encoder: str) -> tuple[str, Path]:
    """``out/taskvars_instructions.json`` (``table``) and ``out/instr_embeds_<encoder>.npy`` (every distinct
    instruction of ``table`` encoded); returns (the encoder actually used, the embeddings file). The text
    encoder falls back to ``hash`` without CLIP weights (``harness.data.text.get_text_encoder`` says so)."""
    from harness.data.text import get_text_encoder

    out = Path(out)
    write_taskvar_instructions(out / "taskvars_instructions.json", table)
    enc = get_text_encoder(encoder)
    texts = sorted({s for v in table.values() for s in v})
    embeds_path = out / f"instr_embeds_{enc.name}.npy"
    write_instr_embeds(embeds_path, dict(zip(texts, enc.encode(texts))))
    return enc.name, embeds_path


def embed_instructions(path: str | os.PathLike, encoder: str = "clip", fmt: str | None = None,
                       out: str | os.PathLike | None = None) -> dict:
    """Write ``taskvars_instructions.json`` and ``instr_embeds_<encoder>.npy`` for the dataset at ``path``
    (any registered format, every split found), so training finds the instruction embeddings beside it.

    Instructions come from the format (3DFA's instructions JSON, RLBench's ``variation_descriptions.pkl``,
    else the task name); formats that already carry embeddings (3DDA's ``instructions.pkl``) keep theirs.
    ``out``: default ``path`` (the folder holding a ``*.zarr`` store when ``path`` is the store).
    Existing entries of the instructions file are kept; returns {"instructions", "embeds", "encoder",
    "taskvars", "texts"}.
    """
    from harness.data.formats import has_split, open_source

    path = Path(path)
    if out is None:
        out = path.parent if path.suffix == ".zarr" else path
    out = Path(out)
    sources = []
    for split in ("train", "val", "test"):
        if split == "train" or has_split(path, split, "voxel1cm"):
            src = open_source(path, fmt, split=split)
            if split != "train" and getattr(src, "path", None) == getattr(sources[0], "path", None):
                continue  # a single-split folder: the same source again
            sources.append(src)
    instr_path = out / "taskvars_instructions.json"
    table = read_taskvar_instructions(instr_path) if instr_path.is_file() else {}
    for src in sources:
        carried = src.instruction_embeddings() if hasattr(src, "instruction_embeddings") else {}
        for tv in src.taskvars():
            texts = (src.instructions(tv) if hasattr(src, "instructions")
                     else [tv.rpartition("+")[0].replace("_", " ")])
            if not all(t in carried for t in texts):
                table[tv] = texts
    if not table:
        raise DataError("nothing to embed: every task-variation carries its own instruction embeddings", path)
    encoder_used, embeds_path = write_instruction_files(out, table, encoder)
    return {"instructions": str(instr_path), "embeds": str(embeds_path), "encoder": encoder_used,
            "taskvars": len(table), "texts": len({s for v in table.values() for s in v})}
