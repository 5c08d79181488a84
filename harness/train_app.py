"""``mdh train`` as a Hydra app over the typed schemas of harness/config.py (config tree: harness/conf/).

    mdh train model=minidiffuser model.preset=small data=metaworld data.path=DIR train.B=8 train.M=64

The run folder is Hydra's run dir (``hydra.run.dir=...``; by default a readable prefix from the model, data,
B, M and seed plus the fingerprint of the semantic configuration, so re-running the same command resumes
the same run and two different configurations never share a folder). A folder this command made and then
refused at start (a bad value, data that does not fit) is removed again (harness/train.py
``remove_refused_folder``); ``RunFolderNote`` tells which folders did not exist before Hydra made them.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from harness.checkpoint import CheckpointError
from harness.config import ConfigError, RunConfig
from harness.data.errors import DataError
from harness.fingerprint import register_resolver
from harness.model_schemas import register_model_schemas
from harness.record import DiskFullError

ConfigStore.instance().store(name="run_schema", node=RunConfig)
register_resolver()  # ${mdh_fingerprint:...} in the default run folder name
register_model_schemas()  # model=<name> for every registered policy, plugins included
log = logging.getLogger("mdh.train")
_NEW_FOLDERS: dict[str, bool] = {}  # absolute run folder -> whether it did not exist when the run started


class RunFolderNote(Callback):
    """Hydra callback: notes whether the run folder exists before Hydra makes it (``on_run_start`` comes
    before the folder and its log file are made), so a refused configuration removes only a folder of its
    own making."""

    def on_run_start(self, config, **kwargs) -> None:
        try:
            path = os.path.abspath(str(config.hydra.run.dir))
        except Exception:  # noqa: BLE001  (unknown: the folder is then treated as pre-existing, never removed)
            return
        _NEW_FOLDERS[path] = not os.path.exists(path)


CALLBACK_OVERRIDE = f"++hydra.callbacks.mdh_run_folder._target_={__name__}.RunFolderNote"


def with_run_folder_note(argv: list[str]) -> list[str]:
    """``argv`` with ``CALLBACK_OVERRIDE`` among its overrides: just before the first one (Hydra's argparse
    takes its overrides as one run of positionals, e.g. ``model=toy --help`` must stay one run), or first
    when there is none. ``argv`` unchanged when Hydra's parser refuses it (Hydra then says why)."""
    import contextlib
    import io

    try:
        from hydra._internal.utils import get_args_parser

        with contextlib.redirect_stderr(io.StringIO()):
            overrides = get_args_parser().parse_args(argv).overrides
    except (Exception, SystemExit):  # noqa: BLE001
        return list(argv)
    n = len(overrides)
    at = next((i for i in range(len(argv) - n + 1) if argv[i:i + n] == overrides), 0) if n else 0
    return [*argv[:at], CALLBACK_OVERRIDE, *argv[at:]]


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from harness.train import run_training

    run_dir = HydraConfig.get().runtime.output_dir
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        run_cfg: RunConfig = OmegaConf.to_object(cfg)
        record = run_training(run_cfg, run_dir, resolved=resolved, config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
                              overrides=list(HydraConfig.get().overrides.task),
                              new_folder=_NEW_FOLDERS.get(os.path.abspath(run_dir), False))
    except (ConfigError, DataError, DiskFullError, CheckpointError) as e:
        print(f"mdh train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0") or 0) == 0:  # one summary per run, not one per data-parallel process
        print(summary_line(record, run_dir))


def summary_line(record: dict, run_dir: str) -> str:
    m = (record.get("final_metrics") or {}).get("overall", {})
    timing = record.get("timing") or {}
    return (f"{run_dir}: {record.get('status')} at step {record.get('steps_done')}/{record.get('steps_total')}; "
            f"within 1 cm {m.get('pct_within_1cm', float('nan')):.1f}%, pos error {m.get('pos_err_cm', float('nan')):.2f} cm; "
            f"median step {timing.get('step_time_median_s') or float('nan'):.3f} s")


def run(argv: list[str]) -> int:
    """Entry from ``mdh train ARGS``: hand the overrides to Hydra."""
    sys.argv = ["mdh-train", *with_run_folder_note(argv)]
    try:
        main()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0
