"""Find every run below a results folder and read its record.json and metrics.csv (nothing else).

A run is a folder holding ``record.json``; runs a ``sweep.json`` manifest lists but that have no record yet
are listed as ``pending``. Only ``done`` runs enter the numbers; every other state (``running``,
``failed``, ``interrupted``, ``died``, ``pending``, ``unreadable``) is listed with its state and error line.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from harness.fingerprint import record_semantic_config
from harness.record import RecordError, upgrade_record
from harness.runlock import observed_status

MANIFEST = "sweep.json"
# Settings a table varies on purpose, by table (semantic_config keys); everything else that differs
# between runs of one table is flagged.
SEED_KEY = "train.seed"
OPTION_PREFIX = "model.options."


@dataclass
class Run:
    """One run folder. ``id``: its path relative to the results folder (the key every table cites)."""

    id: str
    dir: Path
    state: str
    record: dict = field(default_factory=dict)
    error: str | None = None
    metrics: list[dict] = field(default_factory=list)
    metrics_note: str | None = None
    semantic: dict = field(default_factory=dict)
    sweep: str | None = None
    cell: list[str] | None = None

    @property
    def done(self) -> bool:
        return self.state == "done"

    def get(self, key: str, default=None):
        v = self.record.get(key)
        return default if v is None else v

    def sub(self, *keys: str) -> dict:
        """``sub("cost")`` -> record["cost"] or {} (also for nested keys)."""
        d = self.record
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d if isinstance(d, dict) else {}

    @property
    def overall(self) -> dict:
        return self.sub("final_metrics", "overall")

    @property
    def seed(self) -> int | None:
        s = self.semantic.get(SEED_KEY)
        if s is None:
            s = self.sub("config", "train").get("seed")
        return None if s is None else int(s)

    @property
    def device_kind(self) -> str | None:
        return self.sub("device").get("kind")

    @property
    def device_name(self) -> str | None:
        return self.sub("device").get("name")

    @property
    def switches(self) -> dict:
        """Non-null ``model.options`` (the ablation switches) from the semantic configuration."""
        out = {k[len(OPTION_PREFIX):]: v for k, v in self.semantic.items() if k.startswith(OPTION_PREFIX)}
        if not out and isinstance(self.record.get("ablation"), dict):
            out = {k: v for k, v in self.record["ablation"].items() if v is not None}
        return out

    @property
    def peak_memory_bytes(self) -> float | None:
        return self.sub("memory").get("peak_memory_bytes")

    @property
    def step_time(self) -> float | None:
        return self.sub("timing").get("step_time_median_s")

    @property
    def num_points(self):
        """``config.data.num_points`` when set, else the model's ``model_config.num_points``."""
        n = self.sub("config", "data").get("num_points")
        return n if n is not None else self.sub("model_config").get("num_points")

    @property
    def data_name(self) -> str | None:
        return self.sub("config", "data").get("name")

    def v100_allowed(self) -> bool:
        """V100 figures only for CUDA runs whose device has a factor (cost.py never invents one)."""
        return self.device_kind == "cuda" and self.sub("cost").get("factor") is not None


def _to_number(text: str):
    if text is None or text.strip() == "":
        return None
    try:
        v = float(text)
    except ValueError:
        return text
    return v if math.isfinite(v) else None


def read_metrics(path: Path) -> tuple[list[dict], str | None]:
    """metrics.csv -> rows of numbers (empty cells None), sorted by step; (rows, note on a problem)."""
    if not path.is_file():
        return [], "no metrics.csv"
    try:
        with open(path, newline="") as f:
            rows = [{k: _to_number(v) for k, v in r.items() if k is not None} for r in csv.DictReader(f)]
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        return [], f"metrics.csv unreadable: {e}"
    rows = [r for r in rows if isinstance(r.get("step"), float)]
    return sorted(rows, key=lambda r: r["step"]), None


def run_semantic(record: dict) -> dict:
    """The record's ``semantic_config``; older records: recomputed from ``config``; else the top fields."""
    found = record_semantic_config(record)
    if found is not None:
        return found
    out = {"model.name": record.get("model"), "model.preset": record.get("preset"),
           "train.B": record.get("B"), "train.M": record.get("M")}
    return {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in out.items()}


def _load(run_dir: Path, run_id: str) -> Run:
    path = run_dir / "record.json"
    try:
        record = upgrade_record(json.loads(path.read_text()), path)
    except (OSError, json.JSONDecodeError, RecordError, UnicodeDecodeError) as e:
        return Run(run_id, run_dir, "unreadable", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
    state = observed_status(run_dir, record.get("status") or "unknown")
    error = record.get("error")
    metrics, note = read_metrics(run_dir / "metrics.csv")
    return Run(run_id, run_dir, state, record=record,
               error=error.strip().splitlines()[0] if isinstance(error, str) and error.strip() else None,
               metrics=metrics, metrics_note=note, semantic=run_semantic(record))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def discover_runs(results_dir: str | Path) -> list[Run]:
    """Every run folder below ``results_dir`` (any depth; hidden folders such as ``.submitit`` skipped),
    plus the runs listed by ``sweep.json`` manifests that have no record yet; sorted by id."""
    root = Path(results_dir)
    runs: dict[Path, Run] = {}
    for rec in sorted(root.rglob("record.json")):
        if _hidden(rec.parent, root):
            continue
        rel = rec.parent.relative_to(root)
        run_id = rel.as_posix() if rel.parts else rec.parent.resolve().name
        runs[rec.parent.resolve()] = _load(rec.parent, run_id)
    for manifest in sorted(root.rglob(MANIFEST)):
        if _hidden(manifest.parent, root):
            continue
        try:
            doc = json.loads(manifest.read_text())
            entries = [e for e in doc.get("runs", []) if isinstance(e, dict) and e.get("run")]
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        for entry in entries:
            run_dir = manifest.parent / str(entry["run"])
            key = run_dir.resolve()
            if key not in runs:
                state = observed_status(run_dir, None)
                runs[key] = Run(run_dir.relative_to(root).as_posix(), run_dir, state, error="no record.json yet")
            runs[key].sweep = doc.get("sweep")
            runs[key].cell = list(entry.get("cell") or [])
    return sorted(runs.values(), key=lambda r: r.id)


def closed_loop_success(run: Run) -> tuple[float | None, int | None]:
    """(success %, episodes) of closed-loop evaluation, or (None, None) when the run has none.

    Looked up, first found wins: ``final_metrics.success`` (a number in %, or an object with
    ``success_pct`` / ``success`` and ``episodes`` / ``n_episodes``), ``final_metrics.overall.success``
    (with ``episodes`` / ``n_episodes`` beside it), the last non-empty ``success`` of metrics.csv.
    Success is in percent (0-100) like every other metric of the record.
    """
    fm = run.sub("final_metrics")

    def episodes(d: dict):
        n = d.get("episodes", d.get("n_episodes"))
        return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None

    s = fm.get("success")
    if isinstance(s, dict):
        pct = s.get("success_pct", s.get("success"))
        if isinstance(pct, (int, float)):
            return float(pct), episodes(s)
    elif isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s), episodes(fm)
    o = run.overall
    for key in ("success", "success_pct"):
        if isinstance(o.get(key), (int, float)) and not isinstance(o.get(key), bool):
            return float(o[key]), episodes(o)
    for row in reversed(run.metrics):
        if isinstance(row.get("success"), float):
            return row["success"], None
    return None, None
