"""The report's tables, built from run records only: runs and their states, Table 2 (efficiency, measured
beside published), Table 3 (batching and component ablations vs their bases, beside the paper's claims),
convergence thresholds (Fig. 4) and comparability (what differs between runs, and from the paper's setup).

Only ``done`` runs enter the numbers. Every measured cell cites its run ids (the ``run`` columns), so a
number can be traced to ``<results>/<run id>/record.json``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from harness.report.collect import OPTION_PREFIX, SEED_KEY, Run, closed_loop_success
from harness.report.reference import PaperNumbers
from harness.report.render import DASH, Col, Table, fmt_value
from harness.report.stats import mean_t_interval, wilson_interval

GIB = 2**30
PAPER_DATA = "rlbench18"        # the paper trains and evaluates on PerAct-18 RLBench
PAPER_NUM_POINTS = 4000         # README command of the released code (paper_numbers.md)
# Full-recipe training steps the paper states, by model-name prefix (shared/reference/paper_numbers.md):
# Mini-Diffuser 800 epochs = ~95.2k steps at B = 100 (harness/conf/train/paper.yaml); 3DDA 600k iterations.
PAPER_RECIPE_STEPS = {"minidiffuser": 95200, "diffuser_actor": 600000, "3dda": 600000}
COMPONENT_SWITCHES = ("rope3d", "local_query", "backbone", "head")


def is_3dda(model: str | None) -> bool:
    m = (model or "").lower()
    return m.startswith(("diffuser_actor", "3dda"))


def recipe_steps(run: Run) -> tuple[int | None, str | None]:
    """Steps of the run's named full recipe: ``train.recipe_steps`` when set, else the paper's for the model."""
    t = run.sub("config", "train").get("recipe_steps")
    if t:
        return int(t), "train.recipe_steps"
    model = (run.get("model") or "").lower()
    for prefix, n in PAPER_RECIPE_STEPS.items():
        if model.startswith(prefix):
            return n, f"paper recipe ({n} steps)"
    return None, None


def _short_meta(meta) -> str | None:
    if not isinstance(meta, str):
        return None
    return "file (meta.json)" if meta.startswith("file:") else meta


def compared_values(run: Run) -> dict:
    """What changes results: the semantic configuration plus device, data and input settings that live
    outside it (cameras and image size where the model config or data config names them)."""
    mc, dc = run.sub("model_config"), run.sub("config", "data")
    out = dict(run.semantic)
    out.update({
        "device.kind": run.device_kind,
        "device.name": run.device_name,
        "num_points": run.num_points,
        "cameras": mc.get("cameras", dc.get("cameras")),
        "image_size": mc.get("image_size", dc.get("image_size")),
        "data.meta": _short_meta(run.sub("data").get("meta")),
        "data.train_keysteps": run.sub("data").get("train_keysteps"),
        "data.eval_keysteps": run.sub("data").get("eval_keysteps"),
        "data.eval_split": run.sub("data").get("eval_split"),
        "data.taskvars": len(run.sub("data", "identity").get("taskvars") or []) or None,
    })
    return out


def _key_text(v) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return v if isinstance(v, str) else json.dumps(v)


def differing_keys(runs: list[Run], varied: Callable[[str], bool]) -> dict[str, dict[str, list[str]]]:
    """{key: {value: [run ids]}} for every compared key (``compared_values``) that is not ``varied`` and
    does not hold one value across ``runs`` (a key a run lacks counts as ``<unset>``)."""
    values = {r.id: compared_values(r) for r in runs}
    keys = sorted({k for v in values.values() for k in v})
    out = {}
    for key in keys:
        if varied(key):
            continue
        by_value: dict[str, list[str]] = defaultdict(list)
        for rid, v in values.items():
            by_value["<unset>" if v.get(key) is None else _key_text(v[key])].append(rid)
        if len(by_value) > 1:
            out[key] = dict(by_value)
    return out


def odd_keys(run: Run, diffs: dict[str, dict[str, list[str]]]) -> list[str]:
    """``key=value`` where ``run`` is not with the most common value of a differing key."""
    out = []
    for key, by_value in diffs.items():
        mode = max(by_value.items(), key=lambda kv: (len(kv[1]), kv[0] == "<unset>"))[0]
        for value, ids in by_value.items():
            if run.id in ids and value != mode:
                out.append(f"{key}={value}")
    return out


def paper_flags(run: Run) -> list[str]:
    """Where a run departs from the paper's setting: not a GPU, not RLBench-18, other point count, fewer
    steps than its named recipe, unfinished."""
    flags = []
    if run.device_kind != "cuda":
        flags.append(f"device={run.device_kind or '?'}")
    if run.data_name != PAPER_DATA:
        flags.append(f"data={run.data_name or '?'}")
    split = run.sub("data").get("eval_split")
    if split is not None and split == run.sub("config", "data").get("split", "train"):
        flags.append(f"eval on the training split ({split})")
    if run.num_points is not None and run.num_points != PAPER_NUM_POINTS:
        flags.append(f"points={fmt_value(run.num_points)}")
    steps, _ = recipe_steps(run)
    done, total = run.get("steps_done"), run.get("steps_total")
    if steps and done is not None and done < steps:
        flags.append(f"steps={done}/{steps}")
    if done is not None and total and done < total:
        flags.append("unfinished")
    return flags


def differences_table(name: str, title: str, diffs: dict[str, dict[str, list[str]]]) -> Table:
    rows = [{"key": k, "value": v, "runs": ids} for k, by in diffs.items() for v, ids in by.items()]
    return Table(name, title, [Col("key", "setting"), Col("value", "value"), Col("runs", "runs")], rows,
                 notes=[("Settings that change results and differ between the runs of the table, besides "
                         "the ones the table varies on purpose. Empty: the runs agree on everything else.")])


# --------------------------------------------------------------------------------------------- runs


def runs_table(runs: list[Run]) -> Table:
    rows = []
    for r in runs:
        rows.append({"run": r.id, "state": r.state, "in_numbers": r.done, "model": r.get("model"),
                     "preset": r.get("preset"), "B": r.get("B"), "M": r.get("M"), "seed": r.seed,
                     "steps_done": r.get("steps_done"), "steps_total": r.get("steps_total"),
                     "device_kind": r.device_kind, "device_name": r.device_name, "sweep": r.sweep,
                     "cell": " ".join(r.cell) if r.cell else None, "metrics_rows": len(r.metrics),
                     "error": r.error})
    counts = Counter(r.state for r in runs)
    cols = [Col("run", "run"), Col("state", "state"),
            Col("in_numbers", "in numbers", lambda v, _: "yes" if v else "no (excluded)"),
            Col("model", "model"), Col("preset", "preset"), Col("B", "B"), Col("M", "M"), Col("seed", "seed"),
            Col("steps_done", "steps", lambda v, r: f"{fmt_value(v)}/{fmt_value(r.get('steps_total'))}"),
            Col("steps_total", show=False), Col("device_kind", "device"), Col("device_name", show=False),
            Col("sweep", "sweep"), Col("cell", show=False), Col("metrics_rows", "eval rows"),
            Col("error", "error", lambda v, _: (v[:80] + "...") if isinstance(v, str) and len(v) > 83 else v)]
    note = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    return Table("runs", "Runs found and their state", cols, rows,
                 notes=[(f"{len(runs)} runs: {note}. Only `done` runs enter the tables and figures; the "
                         "others are listed here only (a `running` record without a live lock holder reads "
                         "`died`).")])


# --------------------------------------------------------------------------------------------- Table 2


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _ratio_pct(a, b) -> float | None:
    return None if a is None or not b else 100.0 * a / b


def _device_text(kind, name, count) -> str:
    if kind == "cpu":
        return f"CPU ({name or '?'})"
    if kind is None:
        return DASH
    return f"{'GPU' if kind == 'cuda' else kind}: {name or '?'}" + (f" x{count}" if count and count > 1 else "")


def _hours_text(_, row) -> str:
    if row.get("cpu_hours") is not None:
        return f"CPU {row['cpu_hours']:.3g} CPU-h"
    if row.get("gpu_hours") is not None:
        return f"{row['gpu_hours']:.3g} GPU-h" + ("" if row.get("v100_factor") else " (no V100 factor)")
    return DASH


def _success_text(v, row) -> str:
    if v is None:
        return DASH
    text = f"{v:.1f}"
    if row.get("success_ci_low") is not None:
        text += f" [{row['success_ci_low']:.1f}, {row['success_ci_high']:.1f}]"
    if row.get("success_episodes"):
        text += f" (n={row['success_episodes']} ep.)"
    return text


def _memory_text(v, row) -> str:
    if v is None:
        return DASH
    src = row.get("memory_source")
    return f"{v:.3g}" + (f" ({src})" if src else "")


def table2(runs: list[Run], paper: PaperNumbers) -> tuple[Table, Table]:
    """Table 2 (efficiency): one row per done run, then the published rows; and its differences table."""
    done = [r for r in runs if r.done]
    ref = [r for r in done if is_3dda(r.get("model"))]
    diffs = differing_keys(done, lambda k: k.startswith("model.") or k in ("train.B", "train.M", SEED_KEY,
                                                                            "train.steps"))
    rows = []
    for r in done:
        o, cost, mem = r.overall, r.sub("cost"), r.sub("memory")
        success, episodes = closed_loop_success(r)
        lo = hi = None
        if success is not None and episodes:
            k = round(success / 100.0 * episodes)
            if 0 <= k <= episodes:
                lo, hi = (100.0 * x for x in wilson_interval(k, episodes))
        v100 = r.v100_allowed()
        peak = r.peak_memory_bytes
        row = {
            "source": "measured", "run": r.id, "method": f"{r.get('model', '?')} / {r.get('preset', '?')}",
            "key": None,
            "year": None, "model": r.get("model"), "preset": r.get("preset"), "B": r.get("B"), "M": r.get("M"),
            "seed": r.seed, "steps_done": r.get("steps_done"), "steps_total": r.get("steps_total"),
            "device_kind": r.device_kind, "device_name": r.device_name,
            "device_count": r.sub("device").get("count"),
            "eval_keysteps": o.get("n"), "pct_within_1cm": o.get("pct_within_1cm"),
            "pct_within_3deg": o.get("pct_within_3deg"), "pct_all": o.get("pct_all"),
            "success_pct": success, "success_episodes": episodes, "success_ci_low": lo, "success_ci_high": hi,
            "train_time_v100x8_days": cost.get("v100x8_days") if v100 else None,
            "projected_recipe_v100x8_days": cost.get("projected_recipe_v100x8_days") if v100 else None,
            "v100_factor": cost.get("factor") if v100 else None,
            "cpu_hours": cost.get("cpu_hours") if r.device_kind == "cpu" else None,
            "gpu_hours": cost.get("gpu_hours") if r.device_kind == "cuda" else None,
            "memory_gb": None if peak is None else peak / GIB, "memory_source": mem.get("memory_source"),
            "flags": paper_flags(r) + odd_keys(r, diffs),
        }
        if ref:
            row.update(_vs_measured_3dda(r, ref, success))
        rows.append(row)
    pub3dda = next((p for p in paper.table2 if p.key == "3dda"), None)
    for p in paper.table2:
        row = {"source": "published", "run": None, "method": p.method, "key": p.key, "year": p.year,
               "success_pct": p.success_pct, "train_time_v100x8_days": p.train_time_v100x8_days,
               "memory_gb": p.memory_gb, "memory_source": "paper", "note": p.note or None, "flags": []}
        if ref and pub3dda is not None:
            row.update(pct_of_3dda_success=_ratio_pct(p.success_pct, pub3dda.success_pct),
                       pct_of_3dda_time=_ratio_pct(p.train_time_v100x8_days, pub3dda.train_time_v100x8_days),
                       pct_of_3dda_memory=_ratio_pct(p.memory_gb, pub3dda.memory_gb),
                       ref_3dda_runs="published 3DDA")
        rows.append(row)
    cols = [
        Col("source", "source"), Col("run", "run"),
        Col("method", "method", lambda v, r: f"{v} ({r['year']})" if r.get("year") else v),
        Col("key", show=False), Col("year", show=False), Col("model", show=False), Col("preset", show=False),
        Col("B", "B x M", lambda v, r: f"{fmt_value(v)} x {fmt_value(r.get('M'))}" if v is not None else None),
        Col("M", show=False), Col("seed", "seed"),
        Col("steps_done", "steps", lambda v, r: None if v is None else f"{v}/{fmt_value(r.get('steps_total'))}"),
        Col("steps_total", show=False),
        Col("device_kind", "device", lambda v, r: _device_text(v, r.get("device_name"), r.get("device_count"))
            if r["source"] == "measured" else "GPU (paper)"),
        Col("device_name", show=False), Col("device_count", show=False),
        Col("eval_keysteps", "n eval keysteps"),
        Col("pct_within_1cm", "% within 1 cm", ".1f"), Col("pct_within_3deg", "% within 3 deg", ".1f"),
        Col("pct_all", "% all (1 cm, 3 deg, gripper)", ".1f"),
        Col("success_pct", "success % [Wilson 95 %]", _success_text),
        Col("success_episodes", show=False), Col("success_ci_low", show=False),
        Col("success_ci_high", show=False),
        Col("train_time_v100x8_days", "train time (V100 x 8 x day)", ".3g"),
        Col("projected_recipe_v100x8_days", "projected recipe (V100 x 8 x day)", ".3g"),
        Col("v100_factor", show=False),
        Col("cpu_hours", "device-hours (no V100 figure)", _hours_text), Col("gpu_hours", show=False),
        Col("memory_gb", "peak memory GB (source)", _memory_text), Col("memory_source", show=False),
    ]
    if ref:
        cols += [Col("pct_of_3dda_success", "success % of 3DDA", ".1f"),
                 Col("pct_of_3dda_offline", "% all, % of 3DDA", ".1f"),
                 Col("pct_of_3dda_time", "time % of 3DDA", ".1f"),
                 Col("pct_of_3dda_memory", "memory % of 3DDA", ".1f"), Col("ref_3dda_runs", show=False)]
    cols += [Col("flags", "comparability flags"), Col("note", show=False)]
    n_keys = sorted({r.overall.get("n") for r in done if r.overall.get("n") is not None})
    notes = [
        ("Units: training time in V100 x 8 x day (one unit = 8 V100-GPU-days, the paper's unit); memory in "
         "GB (2^30 bytes; measured: the record's peak_memory_bytes and its memory_source - GPU allocator/NVML "
         "for CUDA runs, process RSS for CPU runs); offline metrics in % of evaluated keysteps."),
        ("V100 figures only for CUDA runs whose GPU has a factor in harness/measure/gpu_factors.csv; CPU rows "
         "show CPU-hours (machine-hours) and GPUs without a factor show GPU-hours, never a V100 figure. "
         "Measured time is the run's own wall time (steps shown); 'projected recipe' is median step time x "
         "recipe steps."),
        (f"{len(done)} measured runs (one row each, seed shown); evaluated keysteps per run: "
         f"{', '.join(fmt_value(n) for n in n_keys) or '-'}; closed-loop success only where a record has it "
         "(Wilson 95 % interval when the episode count is known). Published rows: "
         f"{paper.source}, paper_numbers.csv version {paper.version}."),
    ]
    if ref:
        notes.append("% of 3DDA: measured rows vs the mean of the measured 3DDA runs "
                     f"({', '.join(r.id for r in ref)}; time and memory only on the same device kind; time = "
                     "median step time x each model's own recipe steps (Mini-Diffuser 95.2k, 3DDA 600k, or "
                     "train.recipe_steps), V100-normalised across GPUs with a factor, else on the same device "
                     "only, at each run's own B and M); published rows vs the published 3DDA row.")
    notes += [f"{p.method} (published): {p.note}" for p in paper.table2 if p.note]
    notes.append("Flags: departures from the paper's setting (device, data, points, steps vs recipe) and "
                 "settings where a run differs from most runs of the table (see table2_differences).")
    t = Table("table2_efficiency", "Table 2: training efficiency, measured and published", cols, rows, notes)
    d = differences_table("table2_differences", "Table 2: settings that differ between measured runs", diffs)
    return t, d


def _vs_measured_3dda(r: Run, ref: list[Run], success: float | None) -> dict:
    same = [x for x in ref if x.device_kind == r.device_kind]
    ref_success = _mean(closed_loop_success(x)[0] for x in ref)
    out = {"pct_of_3dda_success": _ratio_pct(success, ref_success),
           "pct_of_3dda_offline": _ratio_pct(r.overall.get("pct_all"),
                                             _mean(x.overall.get("pct_all") for x in ref)),
           "pct_of_3dda_memory": _ratio_pct(r.peak_memory_bytes, _mean(x.peak_memory_bytes for x in same)),
           "pct_of_3dda_time": None, "ref_3dda_runs": [x.id for x in ref]}
    # time: each run's median step time x its OWN model's recipe steps (recipe_steps), so runs of different
    # lengths (a 400-step Mini-Diffuser run beside a 100-step 3DDA cost run) are not compared by run length;
    # V100-normalised across GPUs with factors, else only on the same device
    if r.v100_allowed() and any(x.v100_allowed() for x in ref):
        mine = _recipe_device_hours(r, v100=True)
        theirs = _mean(_recipe_device_hours(x, v100=True) for x in ref if x.v100_allowed())
    else:
        mine = _recipe_device_hours(r)
        theirs = _mean(_recipe_device_hours(x) for x in same if x.device_name == r.device_name)
    out["pct_of_3dda_time"] = _ratio_pct(mine, theirs)
    return out


def _recipe_device_hours(run: Run, v100: bool = False) -> float | None:
    """Median step time x the run's model recipe steps x devices, in device-hours (V100-hours with ``v100``)."""
    steps, _ = recipe_steps(run)
    if run.step_time is None or steps is None:
        return None
    hours = run.step_time * steps * (run.sub("device").get("count") or 1) / 3600
    return hours * run.sub("cost").get("factor") if v100 else hours


# --------------------------------------------------------------------------------------------- groups


@dataclass
class Group:
    """Done runs that differ only in their seed (same semantic configuration, same device)."""

    key: str
    runs: list[Run] = field(default_factory=list)

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def B(self):
        return self.first.get("B")

    @property
    def M(self):
        return self.first.get("M")

    @property
    def switches(self) -> dict:
        return self.first.switches

    @property
    def family(self) -> tuple:
        r = self.first
        return r.get("model"), r.get("preset"), r.device_kind, r.device_name

    def mean(self, fn: Callable[[Run], float | None]):
        return mean_t_interval(fn(r) for r in self.runs)

    def other(self) -> dict:
        """Compared values besides B, M, seed and the model options (for 'fewest differences' matching)."""
        v = compared_values(self.first)
        return {k: x for k, x in v.items() if not _table3_varied(k)}


def _table3_varied(key: str) -> bool:
    return key in ("train.B", "train.M", SEED_KEY) or key.startswith(OPTION_PREFIX)


def seed_groups(runs: list[Run]) -> list[Group]:
    groups: dict[str, Group] = {}
    for r in runs:
        if not r.done:
            continue
        sem = {k: v for k, v in r.semantic.items() if k != SEED_KEY}
        key = json.dumps([sem, r.device_kind, r.device_name], sort_keys=True, default=str)
        groups.setdefault(key, Group(key)).runs.append(r)
    return sorted(groups.values(), key=lambda g: g.first.id)


def _n_differences(a: Group, b: Group) -> int:
    x, y = a.other(), b.other()
    return sum(x.get(k) != y.get(k) for k in set(x) | set(y))


def _closest(row: Group, candidates: list[Group]) -> Group | None:
    if not candidates:
        return None
    return min(candidates, key=lambda b: (_n_differences(row, b), -len(b.runs), b.first.id))


def _switch_text(sw: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(sw.items())) or "full model (default options)"


def _claim_for_switches(sw: dict) -> tuple[str | None, float]:
    """(claim key, sign): the paper states local query as 'with vs without', so a row without it gets -1."""
    if "backbone" in sw or "head" in sw:
        return "backbone_head_3dda", 1.0
    if sw.get("rope3d") is False:
        return "no_rope3d", 1.0
    if sw.get("local_query") is False:
        return "local_query", -1.0
    return None, 1.0


METHOD = "minidiffuser"


def _other_model_row(g: Group) -> tuple[str, str | None]:
    """(row name, paper claim key) of another model's group: 3D Diffuser Actor is "3DDA" with the original,
    invasive head and "3DDA, minimal modification" with the shared (non-invasive) head, which is the
    paper's "3DDA backbone + action head" inside Mini-Diffuser's two-level batching."""
    model = g.first.get("model")
    if not is_3dda(model):
        return f"{model} ({_switch_text(g.switches)})", None
    level2 = g.first.sub("model_config").get("level2") or g.switches.get("level2") or "replicate"
    if level2 == "shared":
        return "3DDA, minimal modification (level2=shared)", "backbone_head_3dda"
    return f"3DDA (level2={level2})", None


def table3(runs: list[Run], paper: PaperNumbers) -> tuple[Table, Table]:
    """Table 3: every comparison of a seed group with its base - batching (M vs M = 1 at the same B; B vs
    the next smaller B at the same M), components (switches vs the full model at the same B, M: the
    group with the fewest ``model.options`` among those whose options are a proper subset of the row's) and
    models (another architecture vs Mini-Diffuser's full model at the same B, M, preset and device)."""
    groups = seed_groups(runs)
    comparisons: list[tuple[str, Group, Group, str, str | None, float]] = []
    for g in groups:
        fam = [b for b in groups if b is not g and b.family == g.family]
        if g.M != 1:
            base = _closest(g, [b for b in fam if b.M == 1 and b.B == g.B and b.switches == g.switches])
            if base is not None:
                comparisons.append(("batching", g, base, f"M={g.M} vs M=1 at B={g.B}",
                                    "batching_M64_vs_M1" if g.M == 64 else None, 1.0))
        smaller = [b for b in fam if b.M == g.M and b.switches == g.switches and b.B is not None
                   and g.B is not None and b.B < g.B]
        if smaller:
            top = max(b.B for b in smaller)
            base = _closest(g, [b for b in smaller if b.B == top])
            claim = "batch_B_doubled" if g.B == 2 * base.B else None
            comparisons.append(("batching", g, base, f"B={g.B} vs B={base.B} at M={g.M}", claim, 1.0))
        if g.switches:
            # the full model: among groups whose options are a proper subset of this one's, the fewest set
            # (options every run of a sweep sets, e.g. shuffle_orders, are then on both sides)
            subsets = [b for b in fam if b.B == g.B and b.M == g.M and len(b.switches) < len(g.switches)
                       and all(g.switches.get(k, object()) == v for k, v in b.switches.items())]
            if subsets:
                fewest = min(len(b.switches) for b in subsets)
                base = _closest(g, [b for b in subsets if len(b.switches) == fewest])
                extra = {k: v for k, v in g.switches.items() if k not in base.switches}
                claim, sign = _claim_for_switches(extra)
                what = f"{_switch_text(extra)} vs full model at B={g.B}, M={g.M}"
                comparisons.append(("component", g, base, what, claim, sign))
        if g.first.get("model") != METHOD:
            # another architecture against the method under study at the same B and M (the paper's
            # "3DDA backbone + head" row): Mini-Diffuser's full model, same preset and device
            mds = [b for b in groups if b.first.get("model") == METHOD and b.family[1:] == g.family[1:]
                   and b.B == g.B and b.M == g.M]
            if mds:
                fewest = min(len(b.switches) for b in mds)
                base = _closest(g, [b for b in mds if len(b.switches) == fewest])
                name, claim = _other_model_row(g)
                what = f"{name} vs {METHOD} ({_switch_text(base.switches)}) at B={g.B}, M={g.M}"
                comparisons.append(("model", g, base, what, claim, 1.0))
    rows = []
    involved: list[Run] = []
    for kind, g, base, what, claim_key, sign in sorted(comparisons, key=lambda c: (c[0], c[1].first.id)):
        claim = paper.claims.get(claim_key) if claim_key else None
        rows.append(_comparison_row(kind, g, base, what, claim, sign))
        involved += [r for r in g.runs + base.runs if r not in involved]
    diffs = differing_keys(involved, _table3_varied)
    for row in rows:
        flags = {f for rid in row["row_runs"] + row["base_runs"] for r in involved if r.id == rid
                 for f in odd_keys(r, diffs)}
        row["flags"] = sorted(flags) + (["memory sources differ"] if row["memory_source_differs"] else [])
    cols = [
        Col("kind", "group"), Col("comparison", "row vs base"),
        Col("model", "model / preset", lambda v, r: f"{v} / {r.get('preset')}"), Col("preset", show=False),
        Col("device", "device"), Col("row_runs", "row runs"), Col("base_runs", "base runs"),
        Col("row_seeds", "seeds row / base", lambda v, r: f"{len(v)} / {len(r['base_seeds'])}"),
        Col("base_seeds", show=False),
        Col("row_step_time_s", "median step s row / base",
            lambda v, r: f"{fmt_value(v, '.4g')} / {fmt_value(r.get('base_step_time_s'), '.4g')}"),
        Col("base_step_time_s", show=False), Col("delta_time_pct", "Δ time %", "+.1f"),
        Col("row_memory_gb", "peak memory GB row / base",
            lambda v, r: f"{fmt_value(v, '.4g')} / {fmt_value(r.get('base_memory_gb'), '.4g')}"),
        Col("base_memory_gb", show=False), Col("delta_memory_pct", "Δ memory %", "+.1f"),
        Col("memory_source", "memory source"), Col("memory_source_differs", show=False),
        Col("row_pct_all", "% all row [t 95 %]", _ci_text("row_pct_all")),
        Col("row_pct_all_ci_low", show=False), Col("row_pct_all_ci_high", show=False),
        Col("base_pct_all", "% all base", ".1f"), Col("delta_pct_all_points", "Δ % all (points)", "+.1f"),
        Col("row_pct_within_1cm", "% within 1 cm row / base",
            lambda v, r: f"{fmt_value(v, '.1f')} / {fmt_value(r.get('base_pct_within_1cm'), '.1f')}"),
        Col("base_pct_within_1cm", show=False),
        Col("row_success_pct", "success row / base",
            lambda v, r: None if v is None and r.get("base_success_pct") is None else
            f"{fmt_value(v, '.1f')} / {fmt_value(r.get('base_success_pct'), '.1f')}"),
        Col("base_success_pct", show=False), Col("delta_success_points", "Δ success (points)", "+.1f"),
        Col("eval_keysteps", "n eval keysteps"),
        Col("paper_claim", "paper claim key", show=False),
        Col("paper_delta_time_pct", "paper Δ time %", "+.0f"),
        Col("paper_delta_memory_pct", "paper Δ memory %", "+.0f"),
        Col("paper_delta_success_points", "paper Δ success", "+.1f"),
        Col("paper_claim_text", "paper's claim"),
        Col("flags", "comparability flags"),
    ]
    notes = [
        ("Δ time % and Δ memory %: 100 x (row / base - 1) of the mean over seeds of the median step time "
         "(record timing.step_time_median_s, warm-up excluded) and of peak memory (memory.peak_memory_bytes). "
         "Base: batching rows - the same model and options at M = 1 and the same B, or at the next smaller B "
         "and the same M; component rows - the full model at the same B and M (the fewest model.options set "
         "among groups whose options are a subset of the row's; the row names only the options it adds); model "
         "rows - Mini-Diffuser's full model at the same B, M, preset and device (3D Diffuser Actor: '3DDA' with "
         "its own invasive head, '3DDA, minimal modification' with the shared head, which the paper compares "
         "as '3DDA backbone + action head'). Among several candidate bases the one with the fewest other differences is used (listed in flags)."),
        ("% all = keysteps within 1 cm and 3 deg with the right gripper state; mean over seeds with a Student-t "
         "95 % interval (none with one seed). Paper claims from paper_numbers.csv (version "
         f"{paper.version}; 'roughly doubles' = +100 %), stated for B = 100, M = 64 on three RLBench tasks."),
    ]
    t = Table("table3_ablations", "Table 3: batching, component and model comparisons vs their base", cols, rows, notes)
    d = differences_table("table3_differences", "Table 3: settings that differ between compared runs", diffs)
    return t, d


def _ci_text(prefix: str):
    def fmt(v, r):
        if v is None:
            return None
        lo, hi = r.get(f"{prefix}_ci_low"), r.get(f"{prefix}_ci_high")
        n = len(r.get("row_seeds") or [])
        return f"{v:.1f}" + (f" [{lo:.1f}, {hi:.1f}]" if lo is not None else f" (n={n})")
    return fmt


def _success_mean(g: Group) -> float | None:
    """Mean closed-loop success over the group's seeds, only when every seed has one."""
    values = [closed_loop_success(r)[0] for r in g.runs]
    return None if None in values else mean_t_interval(values).mean


def _comparison_row(kind: str, g: Group, base: Group, what: str, claim, sign: float) -> dict:
    def pct(a, b):
        return None if a is None or not b else 100.0 * (a / b - 1.0)

    def diff(a, b):
        return None if a is None or b is None else a - b

    t_row, t_base = g.mean(lambda r: r.step_time).mean, base.mean(lambda r: r.step_time).mean
    m_row, m_base = g.mean(lambda r: r.peak_memory_bytes).mean, base.mean(lambda r: r.peak_memory_bytes).mean
    acc = g.mean(lambda r: r.overall.get("pct_all"))
    acc_base = base.mean(lambda r: r.overall.get("pct_all")).mean
    s_row, s_base = _success_mean(g), _success_mean(base)
    sources = sorted({r.sub("memory").get("memory_source") or "?" for r in g.runs + base.runs})

    def claimed(v):
        return None if v is None else sign * v

    return {
        "kind": kind, "comparison": what, "model": g.first.get("model"), "preset": g.first.get("preset"),
        "device": _device_text(g.first.device_kind, g.first.device_name, g.first.sub("device").get("count")),
        "switches": _switch_text(g.switches), "B": g.B, "M": g.M,
        "row_runs": [r.id for r in g.runs], "base_runs": [r.id for r in base.runs],
        "row_seeds": [r.seed for r in g.runs], "base_seeds": [r.seed for r in base.runs],
        "row_step_time_s": t_row, "base_step_time_s": t_base, "delta_time_pct": pct(t_row, t_base),
        "row_memory_gb": None if m_row is None else m_row / GIB,
        "base_memory_gb": None if m_base is None else m_base / GIB, "delta_memory_pct": pct(m_row, m_base),
        "memory_source": "/".join(sources), "memory_source_differs": len(sources) > 1,
        "row_pct_all": acc.mean, "row_pct_all_ci_low": acc.low, "row_pct_all_ci_high": acc.high,
        "base_pct_all": acc_base, "delta_pct_all_points": diff(acc.mean, acc_base),
        "row_pct_within_1cm": g.mean(lambda r: r.overall.get("pct_within_1cm")).mean,
        "base_pct_within_1cm": base.mean(lambda r: r.overall.get("pct_within_1cm")).mean,
        "row_success_pct": s_row, "base_success_pct": s_base, "delta_success_points": diff(s_row, s_base),
        "eval_keysteps": g.first.overall.get("n"),
        "paper_claim": claim.key if claim else None,
        "paper_delta_time_pct": claimed(claim.delta_time_pct) if claim else None,
        "paper_delta_memory_pct": claimed(claim.delta_memory_pct) if claim else None,
        "paper_delta_success_points": claimed(claim.delta_success_points) if claim else None,
        "paper_claim_text": (claim.note + (" (sign reversed: this row removes it)" if sign < 0 else ""))
        if claim else None,
    }


# --------------------------------------------------------------------------------------------- Fig. 4


@dataclass
class Family:
    """Done runs that differ only in M and seed: one Fig. 4 panel set."""

    name: str
    runs: list[Run]
    label: str

    def by_m(self) -> dict[int, list[Run]]:
        out: dict[int, list[Run]] = defaultdict(list)
        for r in sorted(self.runs, key=lambda r: (r.get("M") or 0, r.seed or 0, r.id)):
            out[r.get("M")].append(r)
        return dict(out)


def convergence_families(runs: list[Run]) -> list[Family]:
    """Families of done runs with metrics rows that differ only in ``train.M``, the seed and the device name
    (not its kind: bf16 runs on CUDA only); those with two or more values of M (else the largest family,
    so a single-M sweep still gets its curves)."""
    fams: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        if r.done and r.metrics:
            sem = {k: v for k, v in r.semantic.items() if k not in ("train.M", SEED_KEY)}
            fams[json.dumps([sem, r.device_kind], sort_keys=True, default=str)].append(r)
    chosen = [v for v in fams.values() if len({r.get("M") for r in v}) >= 2]
    if not chosen and fams:
        chosen = [max(fams.values(), key=len)]
    chosen.sort(key=lambda v: min(r.id for r in v))
    out = []
    for i, members in enumerate(chosen, start=1):
        r = members[0]
        sw = _switch_text(r.switches) if r.switches else "default options"
        label = (f"{r.get('model')} / {r.get('preset')}, B={r.get('B')}, data={r.data_name or '?'}, "
                 f"{fmt_value(r.semantic.get('train.steps', r.get('steps_total')))} steps, {sw}")
        out.append(Family(f"fig4_convergence_{i}", members, label))
    return out


THRESHOLDS = [  # (column key, header, metric, comparison, value)
    ("pos_le_10cm", "pos err <= 10 cm", "pos_err_cm", "le", 10.0),
    ("pos_le_5cm", "pos err <= 5 cm", "pos_err_cm", "le", 5.0),
    ("pos_le_2cm", "pos err <= 2 cm", "pos_err_cm", "le", 2.0),
    ("within1cm_ge_10", "% within 1 cm >= 10", "pct_within_1cm", "ge", 10.0),
    ("within1cm_ge_25", "% within 1 cm >= 25", "pct_within_1cm", "ge", 25.0),
    ("within1cm_ge_50", "% within 1 cm >= 50", "pct_within_1cm", "ge", 50.0),
]


def first_step(metrics: list[dict], metric: str, op: str, value: float) -> float | None:
    """First evaluated step whose ``metric`` is <= (``le``) or >= (``ge``) ``value``; None if never."""
    for row in metrics:
        v = row.get(metric)
        if isinstance(v, float) and (v <= value if op == "le" else v >= value):
            return row["step"]
    return None


def thresholds_table(families: list[Family]) -> Table:
    rows = []
    for fam in families:
        for m, members in fam.by_m().items():
            row = {"figure": fam.name, "family": fam.label, "M": m, "n_seeds": len(members),
                   "seeds": [r.seed for r in members], "runs": [r.id for r in members],
                   "eval_keysteps": members[0].overall.get("n"),
                   "last_step": _mean(r.metrics[-1]["step"] for r in members)}
            for key, _, metric, op, value in THRESHOLDS:
                steps = [first_step(r.metrics, metric, op, value) for r in members]
                hit = [s for s in steps if s is not None]
                row[f"{key}_mean"] = _mean(hit)
                row[f"{key}_reached"] = len(hit)
                row[f"{key}_per_seed"] = [f"s{fmt_value(r.seed) if r.seed is not None else '?'}:{fmt_value(s)}"
                                          for r, s in zip(members, steps)]
            rows.append(row)

    def reach(key):
        def fmt(v, r):
            return f"{fmt_value(v, '.0f')} ({r[f'{key}_reached']}/{r['n_seeds']})" if v is not None \
                else f"not reached (0/{r['n_seeds']})"
        return fmt

    cols = [Col("figure", "figure"), Col("family", show=False), Col("M", "M"), Col("n_seeds", "n seeds"),
            Col("seeds", show=False), Col("runs", "runs"), Col("eval_keysteps", "n eval keysteps"),
            Col("last_step", "last step", ".0f")]
    for key, header, *_ in THRESHOLDS:
        cols += [Col(f"{key}_mean", header, reach(key)), Col(f"{key}_reached", show=False),
                 Col(f"{key}_per_seed", show=False)]
    notes = [("Steps to first reach each threshold at an evaluation (metrics.csv rows): mean over the seeds "
              "that reached it, with (seeds reached / seeds); per-seed steps in the CSV. Resolution = the "
              "evaluation interval.")] + [f"{f.name}: {f.label}" for f in families]
    return Table("fig4_thresholds", "Fig. 4: steps to reach accuracy thresholds, per M", cols, rows, notes)


# --------------------------------------------------------------------------------------------- comparability


def comparability_table(runs: list[Run]) -> Table:
    rows = []
    for r in runs:
        if not r.done:
            continue
        v = compared_values(r)
        steps, source = recipe_steps(r)
        done = r.get("steps_done")
        rows.append({"run": r.id, "data": r.data_name, "data_meta": v["data.meta"],
                     "taskvars": v["data.taskvars"], "train_keysteps": v["data.train_keysteps"],
                     "eval_split": v["data.eval_split"], "eval_keysteps": v["data.eval_keysteps"],
                     "cameras": v["cameras"], "image_size": v["image_size"], "num_points": r.num_points,
                     "device_kind": r.device_kind, "device_name": r.device_name, "steps_done": done,
                     "steps_total": r.get("steps_total"), "recipe_steps": steps, "recipe_source": source,
                     "pct_of_recipe": None if not steps or done is None else 100.0 * done / steps,
                     "flags": paper_flags(r)})
    cols = [Col("run", "run"), Col("data", "data"), Col("data_meta", "metadata"),
            Col("taskvars", "task-variations"), Col("train_keysteps", "train keysteps"),
            Col("eval_split", "eval split"), Col("eval_keysteps", "eval keysteps"),
            Col("cameras", "cameras"), Col("image_size", "image size"), Col("num_points", "points"),
            Col("device_kind", "device", lambda v, r: _device_text(v, r.get("device_name"), None)),
            Col("device_name", show=False),
            Col("steps_done", "steps / recipe",
                lambda v, r: f"{fmt_value(v)}/{fmt_value(r.get('recipe_steps'))}"),
            Col("steps_total", show=False), Col("recipe_steps", show=False), Col("recipe_source", "recipe"),
            Col("pct_of_recipe", "% of recipe", ".1f"), Col("flags", "flags vs the paper's setting")]
    notes = [(f"The paper's setting: GPU training on PerAct-18 RLBench ({PAPER_DATA}), {PAPER_NUM_POINTS} "
              "points, the full recipe (Mini-Diffuser ~95.2k steps at B = 100, or train.recipe_steps when a run "
              "sets it). Cameras and image size are shown where the model or data config names them ('-': not "
              "recorded).")]
    return Table("comparability", "Comparability: data, inputs, device and steps of every measured run", cols,
                 rows, notes)
