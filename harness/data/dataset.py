"""A map-style dataset of keysteps from any registered source, with instructions and their embeddings.

Index: (taskvar, episode key, t) for t = 0 .. T-2 of every episode (observation t, target t+1), built once
at start-up by reading every episode (as the official code does). Bad episodes raise ``DataError`` unless
``skip_bad`` is set, in which case they are skipped and counted in ``skipped``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from harness.data.episode import Episode
from harness.data.errors import DataError
from harness.data.formats import open_source, parse_taskvar
from harness.data.formats.instructions import (
    find_instruction_files,
    read_instr_embeds,
    read_taskvar_instructions,
)
from harness.data.meta import DatasetMeta, resolve_meta
from harness.data.transforms import KeystepTransform, TransformConfig
from harness.data.validate import check_episode

log = logging.getLogger(__name__)


class KeystepDataset(Dataset):
    """Keysteps of the dataset at ``path``.

    ``split``/``kind`` select ``<path>/<split>/<kind>`` for datasets written by ``mdh data metaworld``.
    ``instructions``/``embeds``: the task-variation -> instructions JSON and the instruction embedding
    file; by default found beside the data (in the folder or up to 3 parents). ``require_text``: a keystep
    whose instruction has no embedding raises ``DataError`` (else it gets no tokens).
    ``transform``: a ``TransformConfig`` (None: raw ``Keystep`` objects are returned).
    Items are deterministic given (``seed``, epoch set by ``set_epoch``, index).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", kind: str = "voxel1cm",
                 fmt: str | None = None, meta: DatasetMeta | None = None, meta_preset: str | None = None,
                 instructions: str | os.PathLike | None = None, embeds: str | os.PathLike | None = None,
                 transform: TransformConfig | None = None, taskvars: list[str] | None = None,
                 n_hist: int = 1, require_text: bool = True, skip_bad: bool = False, seed: int = 0,
                 cache_episodes: int = 2):
        self.path = Path(path)
        if not self.path.exists():
            raise DataError("data folder does not exist", self.path)
        if fmt in (None, "lotus_lmdb"):
            from harness.data.formats.lotus_lmdb import LotusLmdbSource

            self.source = (LotusLmdbSource(self.path, split=split, kind=kind)
                           if fmt == "lotus_lmdb" or LotusLmdbSource.detect(self.path)
                           else open_source(self.path, split=split))
        else:
            self.source = open_source(self.path, fmt, split=split)
        if meta is not None:
            self.meta, self.meta_source = meta, "argument"
        else:
            self.meta, self.meta_source = resolve_meta(getattr(self.source, "path", self.path), meta_preset)
        self.n_hist = n_hist
        self.seed = seed
        self.epoch = 0
        self.skip_bad = skip_bad
        self.require_text = require_text
        self.transform = KeystepTransform(self.meta, transform) if transform is not None else None
        self._load_text(instructions, embeds)
        self.skipped: Counter = Counter()
        self.index: list[tuple[str, str, int]] = []
        self._episodes: dict[tuple[str, str], Episode] = {}
        self._cache_size = cache_episodes
        self._index_episodes(taskvars)
        if self.skipped:
            log.warning("skipped %d bad episodes or folders (--skip-bad): %s", sum(self.skipped.values()),
                        dict(self.skipped))

    # ------------------------------------------------------------------------------------ index
    def _skip(self, e: DataError, count: int = 1) -> None:
        """Re-raise ``e``, or with ``skip_bad`` count it (``count`` episodes, or 1 for a folder)."""
        if not self.skip_bad:
            raise e
        self.skipped[f"{type(e).__name__}: {e.problem}"] += count
        log.warning("skip_bad: skipping %s", e)

    def where(self, taskvar: str) -> Path:
        """The file or folder that holds ``taskvar`` (named in errors)."""
        if hasattr(self.source, "taskvar_path"):
            return self.source.taskvar_path(taskvar)
        return getattr(self.source, "path", self.path)

    def _index_episodes(self, taskvars: list[str] | None) -> None:
        """Read and check every episode once (``harness.data.validate``); fill ``index``."""
        wanted = self.source.taskvars()
        bad = self.source.bad_taskvars() if hasattr(self.source, "bad_taskvars") else {}
        if taskvars is not None:
            unknown = sorted(set(taskvars) - set(wanted) - set(bad))
            if unknown:
                raise DataError(f"task-variations {unknown} not in the dataset; available: {wanted}", self.path)
            wanted = [tv for tv in wanted if tv in set(taskvars)]
            bad = {tv: e for tv, e in bad.items() if tv in set(taskvars)}
        for e in bad.values():  # empty <task>+<var> folders
            self._skip(e)
        cfg = self.transform.cfg if self.transform is not None else None
        for tv in wanted:
            try:
                keys = self.source.episode_keys(tv)
                if not keys:
                    raise DataError(f"task-variation {tv} holds no episodes (an empty LMDB?)", self.where(tv))
            except DataError as e:
                self._skip(e)
                continue
            try:
                self._check_text(tv)  # fail now, not mid-training
            except DataError as e:
                self._skip(e, len(keys))
                continue
            for key in keys:
                try:
                    ep = self.source.read_episode(tv, key)
                    where = ep.extra.get("path") or self.where(tv)
                    check_episode(ep, self.meta, cfg, where, key)
                except DataError as e:
                    self._skip(e)
                    continue
                self.index.extend((tv, key, t) for t in range(ep.num_keysteps))

    # ------------------------------------------------------------------------------------ text
    def _load_text(self, instructions, embeds) -> None:
        found = find_instruction_files(getattr(self.source, "path", self.path))
        self.instructions_path = Path(instructions) if instructions else found.get("instructions")
        self.embeds_path = Path(embeds) if embeds else found.get("embeds")
        self.taskvar_instructions = (read_taskvar_instructions(self.instructions_path)
                                     if self.instructions_path else {})
        self.embeds = read_instr_embeds(self.embeds_path) if self.embeds_path else {}
        if hasattr(self.source, "instruction_embeddings"):  # formats that store embeddings, not text (3DDA)
            for text, tokens in self.source.instruction_embeddings().items():
                self.embeds.setdefault(text, tokens)

    def instructions_for(self, taskvar: str) -> list[str]:
        """Paraphrases of a task-variation: the instructions file, the source's own, or the task name."""
        if taskvar in self.taskvar_instructions:
            return self.taskvar_instructions[taskvar]
        if hasattr(self.source, "instructions"):
            return self.source.instructions(taskvar)
        task, _ = parse_taskvar(taskvar)
        return [task.replace("_", " ").replace("-", " ")]

    def _check_text(self, taskvar: str) -> None:
        """Every paraphrase of ``taskvar`` must have an embedding (when ``require_text``)."""
        if not self.require_text:
            return
        missing = [o for o in self.instructions_for(taskvar) if o not in self.embeds]
        if missing:
            where = self.embeds_path or (f"{self.path} (no instr_embeds_*.npy found beside the data; "
                                         "pass embeds=)")
            raise DataError(f"instruction {missing[0]!r} of {taskvar} has no embedding "
                            f"({len(self.embeds)} embeddings loaded)", where, missing[0])

    def _instruction_for(self, taskvar: str, rng: np.random.Generator | None):
        """(instruction, tokens or None): a random paraphrase in training, the first one otherwise."""
        options = self.instructions_for(taskvar)
        text = options[int(rng.integers(len(options)))] if rng is not None else options[0]
        return text, self.embeds.get(text)

    # --------------------------------------------------------------------------------- items
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def episode(self, taskvar: str, key: str) -> Episode:
        k = (taskvar, key)
        ep = self._episodes.get(k)
        if ep is None:
            ep = self.source.read_episode(taskvar, key)
            if len(self._episodes) >= self._cache_size:
                self._episodes.pop(next(iter(self._episodes)))
            self._episodes[k] = ep
        return ep

    def __getitem__(self, i: int | tuple[int, int]):
        """Item ``i`` (or ``(i, epoch)``, as ``ResumableBatchSampler`` yields, so the augmentation RNG is
        fixed by (seed, epoch, i) in any worker process)."""
        i, epoch = i if isinstance(i, tuple) else (i, self.epoch)
        tv, key, t = self.index[i]
        rng = np.random.default_rng([self.seed, epoch, i])
        train = self.transform is not None and self.transform.cfg.train
        text, tokens = self._instruction_for(tv, rng if train else None)
        ks = self.episode(tv, key).keystep(t, n_hist=self.n_hist, instruction=text, text_tokens=tokens)
        if self.transform is None:
            return ks
        try:
            return self.transform(ks, rng)
        except (ValueError, KeyError) as e:  # data-dependent: nothing left after removal, labels/boxes missing
            raise DataError(f"keystep {t} of {tv}: {e}", self.where(tv), key) from e

    def summary(self) -> dict:
        tasks = sorted({parse_taskvar(tv)[0] for tv, _, _ in self.index})
        return {"path": str(self.path), "keysteps": len(self.index), "tasks": tasks,
                "taskvars": sorted({tv for tv, _, _ in self.index}),
                "episodes": len({(tv, k) for tv, k, _ in self.index}),
                "skipped": dict(self.skipped), "meta": self.meta_source}
