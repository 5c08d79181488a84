"""The Meta-World environment as we use it: our cameras, seeded placements, and facts about the scene.

- ``make_env(task)``: the task's env class, subclassed so that its model is compiled from the XML *with our
  cameras added* (``cameras.add_cameras``), goal observable (the experts read the goal from the
  observation), and usable without a ``metaworld.Task``.
- ``reset_to_seed(env, seed)``: metaworld 3.1.1 draws the object/goal placement (``_last_rand_vec``) from
  ``env.np_random`` when ``seeded_rand_vec`` is True and ``_freeze_rand_vec`` is False (the same path its
  goal-observable classes use); we seed, reset, then freeze so that the placement is a pure function of
  the seed. ``MT10(seed)``'s 50 fixed ``Task`` objects per env would cap an episode count at 50.
- Body labels: ``mask``/``sem`` values are MuJoCo body ids, permuted per task so that the Sawyer's 29
  bodies always get the same ids (3..31, their ids in 46 of the 50 tasks and in all of MT10). In the
  other 4 tasks (coffee-button/pull/push, hand-insert, sweep-into) extra or missing bodies before the robot
  shift its ids; ``body_labels`` moves the robot block back to 3..31 and the displaced bodies into the
  freed slots, keeping every label unique. Background (no geometry: sky, far plane) is ``BACKGROUND``.
- Scene constants (verified on the models): table top z = 0 (``tablelink``'s top box face; 0.05 in
  hand-insert and sweep-into, whose table has a raised surface with a hole), robot base at the origin.
"""

from __future__ import annotations

import os

import numpy as np

from harness.data.metaworld.cameras import CAMERAS, CameraSpec, add_cameras

BACKGROUND = -1
TABLE_HEIGHT = 0.0
ROBOT_BASE = (0.0, 0.0, 0.0)
# ((xmin, ymin, zmin), (xmax, ymax, zmax)): the table top and the space the hand can reach above it
# (the union of metaworld's mocap boxes over the 50 tasks is x in [-0.5, 0.5], y in [0.35, 1.0],
# z in [-0.15, 0.5], the low z only in hand-insert's hole); z starts below the table top so that the table
# stays in the crop and table removal (z <= table_height + margin) decides.
WORKSPACE_BOUNDS = ((-0.6, 0.25, -0.1), (0.6, 1.1, 0.7))

# The Sawyer's bodies in model order (the subtree of "base" in metaworld's xyz_base.xml) and the ids they
# get as labels. "hand" and its four finger/pad bodies form the gripper; the rest is the arm (incl. the
# pedestal, head and "right_hand", the wrist flange the gripper is mounted on).
SAWYER_BODIES: tuple[str, ...] = (
    "base", "controller_box", "pedestal_feet", "torso", "pedestal", "right_arm_base_link", "right_l0", "head",
    "screen", "head_camera", "right_torso_itb", "right_l1", "right_l2", "right_l3", "right_l4",
    "right_arm_itb", "right_l5", "right_hand_camera", "right_wrist", "right_l6", "right_hand", "hand",
    "rightclaw", "rightpad", "leftclaw", "leftpad", "right_l4_2", "right_l2_2", "right_l1_2",
)
SAWYER_FIRST_LABEL = 3
GRIPPER_BODIES: tuple[str, ...] = ("hand", "rightclaw", "rightpad", "leftclaw", "leftpad")
GRIPPER_LABELS: list[int] = [SAWYER_FIRST_LABEL + SAWYER_BODIES.index(b) for b in GRIPPER_BODIES]
ARM_LABELS: list[int] = [SAWYER_FIRST_LABEL + i for i, b in enumerate(SAWYER_BODIES)
                         if b not in GRIPPER_BODIES]

# Physical gripper state from obs[3] (finger separation / 0.1 m, clipped to [0, 1]): about 1.0 open,
# 0.26 closed on nothing, 0.29-0.41 closed on the MT10 objects. 0.6 puts the "closed" keyframe where the
# fingers are mostly shut, i.e. at the final grasp height (the experts keep descending while closing); on
# MT10 x 20 demos the oracle replay succeeds 198/200 with 0.6, 0/20 peg-insert-side with 0.8, and 0.5
# misses push's 0.6-effort grasp (gap ~0.41 with the puck) half the time.
OPEN_THRESHOLD = 0.6


def make_env(task: str, max_image_size: int = 480, cameras: tuple[CameraSpec, ...] = CAMERAS):
    """A ready-to-reset env for ``task`` with ``cameras`` in its model and an offscreen buffer that fits
    ``max_image_size`` px. Call ``reset_to_seed`` before stepping it."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    if task not in ALL_V3_ENVIRONMENTS:
        raise ValueError(f"unknown Meta-World task {task!r}; choices: {sorted(ALL_V3_ENVIRONMENTS)}")
    base = ALL_V3_ENVIRONMENTS[task]
    cls = type(f"{base.__name__}WithCameras", (base,),
               {"_initialize_simulation": _initialize_with_cameras, "_mdh_cameras": tuple(cameras),
                "_mdh_max_size": int(max_image_size)})
    env = cls()
    env._partially_observable = False  # goal in obs[-3:], which the scripted experts read
    env.__dict__.pop("sawyer_observation_space", None)  # cached_property: recompute for the new observability
    env._set_task_called = True  # we set placements through reset_to_seed, not metaworld.Task objects
    return env


def _initialize_with_cameras(self):
    # Replaces gymnasium MujocoEnv._initialize_simulation: same model, plus our cameras.
    import mujoco

    spec = mujoco.MjSpec.from_file(self.fullpath)
    add_cameras(spec, self._mdh_cameras)
    model = spec.compile()
    size = max(self._mdh_max_size, getattr(self, "width", 0) or 0, getattr(self, "height", 0) or 0)
    model.vis.global_.offwidth = max(model.vis.global_.offwidth, size)
    model.vis.global_.offheight = max(model.vis.global_.offheight, size)
    return model, mujoco.MjData(model)


def reset_to_seed(env, seed: int) -> np.ndarray:
    """Reset ``env`` to the placement drawn from ``seed``; returns the first observation (39,) float64.

    Deterministic: the same seed gives the same ``_last_rand_vec`` and the same initial state whatever ran
    before (gymnasium's reset calls ``mj_resetData``).
    """
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env.seed(int(seed))
    obs, _ = env.reset()
    env._freeze_rand_vec = True
    return obs


# The Sawyer ``hand`` body points its x axis down (quat ~ 90 deg about y): that orientation sits at the
# pitch = 90 deg singularity of the 'xyz' Euler angles that Mini-Diffuser's rotation bins use, where roll and
# yaw swing by tens of degrees for a rotation that wobbles by one or two, so the bin targets become noise.
# The recorded pose uses a tool frame instead, with z along the approach direction (the hand's x axis):
# tool = hand * TOOL_FROM_HAND. Pointing down it reads roll 180, pitch 0, yaw 0, as RLBench's Panda tip
# frame does. Meta-World ignores orientation in its actions, so nothing downstream depends on the choice.
TOOL_FROM_HAND = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])


def hand_pose(env) -> tuple[np.ndarray, np.ndarray]:
    """(xyz (3,), quat xyzw (4,)) float64 of the ``hand`` body position and its tool frame (see
    ``TOOL_FROM_HAND``), world frame (MuJoCo's quat is wxyz)."""
    from scipy.spatial.transform import Rotation

    body = env.data.body("hand")
    w, x, y, z = body.xquat
    tool = Rotation.from_quat([x, y, z, w]) * Rotation.from_matrix(TOOL_FROM_HAND)
    return np.array(body.xpos, dtype=np.float64), tool.as_quat().astype(np.float64)


def is_open(obs: np.ndarray, threshold: float = OPEN_THRESHOLD) -> float:
    """Physical gripper state from an observation: 1.0 if the fingers are apart (obs[3] > threshold)."""
    return 1.0 if float(obs[3]) > threshold else 0.0


def body_labels(model) -> np.ndarray:
    """(nbody,) int32 label of every body (see the module docstring): identity unless the robot is shifted.

    Raises ValueError if the model's robot bodies are not ``SAWYER_BODIES`` in that order.
    """
    names = [model.body(i).name for i in range(model.nbody)]
    if "base" not in names:
        raise ValueError("model has no 'base' body; not a metaworld Sawyer model")
    start = names.index("base")
    robot = names[start:start + len(SAWYER_BODIES)]
    if tuple(robot) != SAWYER_BODIES:
        raise ValueError(f"robot bodies from id {start} are {robot}, expected {list(SAWYER_BODIES)}")
    n = model.nbody
    robot_ids = list(range(start, start + len(SAWYER_BODIES)))
    canon = list(range(SAWYER_FIRST_LABEL, SAWYER_FIRST_LABEL + len(SAWYER_BODIES)))
    if n < canon[-1] + 1:
        raise ValueError(f"model has {n} bodies, fewer than the {canon[-1] + 1} the label layout needs")
    labels = np.empty(n, dtype=np.int32)
    labels[robot_ids] = canon
    others = [i for i in range(n) if i not in set(robot_ids)]
    free = [i for i in range(n) if i not in set(canon)]
    labels[others] = free  # both sorted: order-preserving, identity when the robot already sits at 3..31
    return labels


def table_top_z(env) -> float:
    """z of the highest top face of the ``tablelink`` body's box geoms, in metres (world frame)."""
    import mujoco

    model, data = env.model, env.data
    mujoco.mj_kinematics(model, data)
    table = model.body("tablelink").id
    tops = [data.geom_xpos[g][2] + model.geom_size[g][2] for g in range(model.ngeom)
            if model.geom_bodyid[g] == table and model.geom_type[g] == mujoco.mjtGeom.mjGEOM_BOX]
    if not tops:
        raise ValueError("the 'tablelink' body has no box geoms")
    return float(max(tops))


def check_gl() -> str:
    """Render one 8 px frame with the configured back end; returns ``MUJOCO_GL``.

    Raises RuntimeError naming the back end and the fallback when offscreen rendering does not work.
    """
    backend = os.environ.get("MUJOCO_GL", "")
    try:
        import mujoco

        model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='1'/></worldbody></mujoco>")
        with mujoco.Renderer(model, 8, 8) as r:
            r.update_scene(mujoco.MjData(model))
            r.render()
    except Exception as e:  # ImportError, EGL/OSMesa errors of several types
        raise RuntimeError(
            f"offscreen MuJoCo rendering failed with MUJOCO_GL={backend!r} ({type(e).__name__}: {e}). "
            "EGL needs libegl-mesa0 + libgl1-mesa-dri (or an NVIDIA driver); fallback: apt-get install "
            "libosmesa6 and set MUJOCO_GL=osmesa PYOPENGL_PLATFORM=osmesa before Python starts.") from e
    return backend
