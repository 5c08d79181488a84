"""Meta-World v3 task names, their scripted experts, and the seeds of the train/val/test splits.

Seeds: the episode with seed ``s`` is the environment seeded with ``s`` (``scene.reset_to_seed``). Each split
draws candidate seeds from its own block, ``base_seed + SPLIT_OFFSETS[split] + i`` for i = 0, 1, 2, ...; a
candidate whose expert fails is skipped and the next one tried, so the seeds used are deterministic given
``base_seed`` and the blocks never overlap (a split would need a million failed attempts to reach the next).
"""

from __future__ import annotations

# The MT10 task list, in metaworld's order (metaworld.env_dict.MT10_V3); kept literal so that importing
# it (and expanding "mt10") needs no metaworld; resolve_tasks still validates names against metaworld.
MT10: tuple[str, ...] = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
    "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_OFFSETS: dict[str, int] = {"train": 0, "val": 1_000_000, "test": 2_000_000}
SPLIT_BLOCK = 1_000_000  # candidate seeds per split block


def all_tasks() -> list[str]:
    """The 50 Meta-World v3 task names, in metaworld's order."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return list(ALL_V3_ENVIRONMENTS)


def resolve_tasks(tasks: list[str] | tuple[str, ...] | str) -> list[str]:
    """Task names from a list, a comma-separated string, or a suite name ("mt10", "mt50"/"all").

    Raises ValueError naming every unknown task and the valid choices; duplicates are dropped (first kept).
    """
    if isinstance(tasks, str):
        key = tasks.strip().lower()
        if key == "mt10":
            return list(MT10)
        if key in ("mt50", "all"):
            return all_tasks()
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("no Meta-World task given; pass task names like 'pick-place-v3' or 'mt10'")
    known = set(all_tasks())
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown Meta-World task(s) {unknown}; suites: 'mt10', 'mt50'; "
                         f"tasks: {sorted(known)}")
    return tasks


def expert_policy(task: str):
    """A fresh instance of metaworld's scripted expert for ``task`` (stateless; one per rollout is fine)."""
    from metaworld.policies import ENV_POLICY_MAP

    if task not in ENV_POLICY_MAP:
        raise ValueError(f"no scripted expert for {task!r}; experts exist for {sorted(ENV_POLICY_MAP)}")
    return ENV_POLICY_MAP[task]()


def split_seed(base_seed: int, split: str, attempt: int) -> int:
    """The ``attempt``-th candidate seed of ``split`` (see the module docstring)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_OFFSETS)}")
    if not 0 <= attempt < SPLIT_BLOCK:
        raise ValueError(f"seed attempt {attempt} outside the split block [0, {SPLIT_BLOCK})")
    if base_seed < 0:
        raise ValueError(f"seed must be >= 0, got {base_seed}")
    return int(base_seed) + SPLIT_OFFSETS[split] + attempt
