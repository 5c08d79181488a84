"""``mdh report runs DIR...``: the key figures of several run records side by side."""

from __future__ import annotations

import json
from pathlib import Path

from harness.data.errors import DataError
from harness.runlock import observed_status

FIELDS = [
    ("status", lambda r: r.get("status")),
    ("model / preset", lambda r: f"{r.get('model')} / {r.get('preset')}"),
    ("B x M", lambda r: f"{r.get('B')} x {r.get('M')}"),
    ("steps", lambda r: f"{r.get('steps_done')}/{r.get('steps_total')}"),
    ("params", lambda r: f"{r.get('params'):,}" if r.get("params") else None),
    ("device", lambda r: (r.get("device") or {}).get("name")),
    ("median step (s)", lambda r: _fmt((r.get("timing") or {}).get("step_time_median_s"), 3)),
    ("p90 step (s)", lambda r: _fmt((r.get("timing") or {}).get("step_time_p90_s"), 3)),
    ("samples/s (B*M)", lambda r: _fmt((r.get("timing") or {}).get("samples_per_s"), 0)),
    ("wall time (s)", lambda r: _fmt((r.get("timing") or {}).get("wall_time_s"), 0)),
    ("peak memory (MiB)", lambda r: _fmt(((r.get("memory") or {}).get("peak_memory_bytes") or 0) / 2**20, 0)),
    ("memory source", lambda r: (r.get("memory") or {}).get("memory_source")),
    ("CPU-hours", lambda r: _fmt((r.get("cost") or {}).get("cpu_hours"), 4)),
    ("GPU-hours", lambda r: _fmt((r.get("cost") or {}).get("gpu_hours"), 4)),
    ("V100-days", lambda r: _fmt((r.get("cost") or {}).get("v100_days"), 4)),
    ("pos error (cm)", lambda r: _fmt(_overall(r).get("pos_err_cm"), 2)),
    ("% within 1 cm", lambda r: _fmt(_overall(r).get("pct_within_1cm"), 1)),
    ("rot error (deg)", lambda r: _fmt(_overall(r).get("rot_err_deg"), 1)),
    ("% within 3 deg", lambda r: _fmt(_overall(r).get("pct_within_3deg"), 1)),
    ("gripper acc (%)", lambda r: _fmt(_overall(r).get("gripper_acc"), 1)),
    ("% all three", lambda r: _fmt(_overall(r).get("pct_all"), 1)),
]


def _overall(r: dict) -> dict:
    return (r.get("final_metrics") or {}).get("overall") or {}


def _fmt(v, digits: int):
    return None if v is None else f"{v:.{digits}f}"


def load_runs(run_dirs: list[str]) -> list[dict]:
    runs = []
    for d in run_dirs:
        path = Path(d) / "record.json"
        try:
            run = {"dir": str(d), **json.loads(path.read_text())}
        except FileNotFoundError:
            raise DataError("no record.json in this run folder", path) from None
        except json.JSONDecodeError as e:
            raise DataError(f"record.json is not valid JSON: {e}", path) from None
        run["status"] = observed_status(d, run.get("status"))
        runs.append(run)
    return runs


def format_runs(runs: list[dict]) -> str:
    from tabulate import tabulate

    rows = [[name, *[(fn(r) if fn(r) is not None else "-") for r in runs]] for name, fn in FIELDS]
    return tabulate(rows, ["", *[Path(r["dir"]).name for r in runs]], tablefmt="github")
