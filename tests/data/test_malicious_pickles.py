"""Nothing read from disk runs code: a corpus of hostile pickles against every loader of pickled files.

Each payload tries to create a marker file (``touch``) when loaded. The payloads are hand-assembled from
pickle opcodes (pickling real dangerous objects does not round-trip) and ``test_corpus_is_live`` proves that
an unrestricted unpickler does run each of them; every loader must refuse them with a ``DataError`` naming
the file and the refused global, before anything runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shlex
import shutil
import struct
import time
import warnings
from pathlib import Path

import blosc
import numpy as np
import pytest
import torch

from harness.data.errors import DataError
from harness.data.formats import dda_dat, rlbench_raw
from harness.data.formats.instructions import read_instr_embeds, write_instr_embeds
from harness.data.formats.rlbench_raw import RLBenchRawSource, load_demo, load_pickle
from harness.safe_pickle import loads

FIXTURE = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "rlbench"
VAR_DIR = FIXTURE / "reach_target" / "variation0"
EP0 = VAR_DIR / "episodes" / "episode0"
RLBENCH = {("rlbench.backend.observation", "Observation"): rlbench_raw.Observation,
           ("rlbench.demo", "Demo"): rlbench_raw.Demo}

# ------------------------------------------------------------------------------------ a tiny assembler

PROTO = {n: b"\x80" + bytes([n]) for n in range(2, 6)}
MARK, STOP, TUPLE, TUPLE1, TUPLE2, TUPLE3 = b"(", b".", b"t", b"\x85", b"\x86", b"\x87"
REDUCE, BUILD, NEWOBJ, STACK_GLOBAL, MEMOIZE = b"R", b"b", b"\x81", b"\x93", b"\x94"
EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, SETITEM, APPEND, APPENDS = b"}", b"]", b")", b"s", b"a", b"e"
NONE, NEWTRUE, NEWFALSE = b"N", b"\x88", b"\x89"


def g(module: str, name: str) -> bytes:
    """GLOBAL (protocols 0-3): module and name as text lines."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def u(s: str) -> bytes:
    """BINUNICODE."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def su(s: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4+)."""
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def i1(n: int) -> bytes:
    return b"K" + bytes([n])


def bb(data: bytes) -> bytes:
    """SHORT_BINBYTES."""
    return b"C" + bytes([len(data)]) + data


def get(n: int) -> bytes:
    return b"h" + bytes([n])


def frame(body: bytes) -> bytes:
    """FRAME (protocol 4+) around ``body``."""
    return b"\x95" + struct.pack("<Q", len(body)) + body


def touch(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def eval_via_numpy_dtypes(code: str) -> bytes:
    """The route the old loader let through: STACK_GLOBAL numpy.dtypes / "__builtins__.get" -> dict.get,
    dict.get("eval") -> eval, eval(code)."""
    return su("numpy.dtypes") + su("__builtins__.get") + STACK_GLOBAL + su("eval") + TUPLE1 + REDUCE \
        + u(code) + TUPLE1 + REDUCE


def os_system_call(cmd: str) -> bytes:
    return g("os", "system") + u(cmd) + TUPLE1 + REDUCE


def shell_code(marker: Path) -> str:
    return f"__import__('os').system({touch(marker)!r})"


def object_array(element: bytes) -> bytes:
    """``np.array([element], dtype=object)`` the way numpy pickles it (protocols 2-3 opcodes)."""
    dtype_o = g("numpy", "dtype") + u("O8") + NEWFALSE + NEWTRUE + TUPLE3 + REDUCE \
        + MARK + i1(3) + u("|") + NONE + NONE + NONE + b"J\xff\xff\xff\xff" + b"J\xff\xff\xff\xff" + i1(63) \
        + TUPLE + BUILD
    return g("numpy._core.multiarray", "_reconstruct") + g("numpy", "ndarray") + i1(0) + TUPLE1 + bb(b"b") \
        + TUPLE3 + REDUCE + MARK + i1(1) + i1(1) + TUPLE1 + dtype_o + NEWFALSE + EMPTY_LIST + element \
        + APPEND + TUPLE + BUILD


def demo_with(field_value: bytes) -> bytes:
    """A Demo of one Observation whose ``gripper_pose`` is ``field_value`` (protocols 2-3 opcodes)."""
    obs = g("rlbench.backend.observation", "Observation") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT \
        + u("gripper_pose") + field_value + SETITEM + BUILD
    return g("rlbench.demo", "Demo") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + u("_observations") + EMPTY_LIST \
        + obs + APPEND + SETITEM + BUILD


def popen_via_reconstructor(marker: Path) -> bytes:
    """copyreg._reconstructor(Popen, Popen, ["sh", "-c", cmd]) runs Popen.__init__(obj, cmd); Popen itself is
    fetched through the numpy.dtypes route: getattr(__import__("subprocess"), "Popen")."""
    return PROTO[4] + su("copyreg") + su("_reconstructor") + STACK_GLOBAL \
        + su("numpy.dtypes") + su("__builtins__.get") + STACK_GLOBAL + MEMOIZE \
        + su("getattr") + TUPLE1 + REDUCE + get(0) + su("__import__") + TUPLE1 + REDUCE \
        + su("subprocess") + TUPLE1 + REDUCE + su("Popen") + TUPLE2 + REDUCE + MEMOIZE + get(1) \
        + EMPTY_LIST + MARK + su("sh") + su("-c") + u(touch(marker)) + APPENDS + TUPLE3 + REDUCE + STOP


# name -> (builder(marker) -> pickle bytes, the refused global the error must name, runs asynchronously)
# instruction-embedding files allow no rlbench class, so there the first refusal is the class (NPY_REFUSED)
PAYLOADS = {
    "os_system_protocol0": (lambda m: b"cos\nsystem\n(V" + touch(m).encode() + b"\ntR.", "os.system", False),
    "os_system_protocol2": (lambda m: PROTO[2] + os_system_call(touch(m)) + STOP, "os.system", False),
    "posix_system_protocol3": (lambda m: PROTO[3] + g("posix", "system") + u(touch(m)) + TUPLE1 + REDUCE + STOP,
                               "posix.system", False),
    "builtins_eval_global": (lambda m: PROTO[2] + g("builtins", "eval") + u(shell_code(m)) + TUPLE1 + REDUCE
                             + STOP, "builtins.eval", False),
    "numpy_dtypes_route_protocol4": (lambda m: PROTO[4] + eval_via_numpy_dtypes(shell_code(m)) + STOP,
                                     "numpy.dtypes.__builtins__.get", False),
    "numpy_dtypes_route_protocol5_frame": (
        lambda m: PROTO[5] + frame(eval_via_numpy_dtypes(shell_code(m)) + STOP),
        "numpy.dtypes.__builtins__.get", False),
    "copyreg_reconstructor_subprocess_global": (
        lambda m: PROTO[2] + g("copyreg", "_reconstructor") + g("subprocess", "Popen") + g("subprocess", "Popen")
        + EMPTY_LIST + MARK + u("sh") + u("-c") + u(touch(m)) + APPENDS + TUPLE3 + REDUCE + STOP,
        "subprocess.Popen", True),
    "copyreg_reconstructor_popen_via_numpy_dtypes": (popen_via_reconstructor, "numpy.dtypes.__builtins__.get",
                                                     True),
    "nested_in_dict": (lambda m: PROTO[3] + EMPTY_DICT + u("misc") + os_system_call(touch(m)) + SETITEM + STOP,
                       "os.system", False),
    "nested_in_observation_dict": (lambda m: PROTO[4] + demo_with(eval_via_numpy_dtypes(shell_code(m))) + STOP,
                                   "numpy.dtypes.__builtins__.get", False),
    "nested_in_observation_protocol0": (
        lambda m: b"ccopy_reg\n_reconstructor\n(crlbench.backend.observation\nObservation\nc__builtin__\nobject\n"
        b"NtR(dVgripper_pose\n" + b"cos\nsystem\n(V" + touch(m).encode() + b"\ntRsb.",
        "os.system", False),
    "inside_object_array": (lambda m: PROTO[2] + object_array(os_system_call(touch(m))) + STOP, "os.system", False),
    "inside_object_array_numpy_dtypes_route": (
        lambda m: PROTO[4] + frame(object_array(eval_via_numpy_dtypes(shell_code(m))) + STOP),
        "numpy.dtypes.__builtins__.get", False),
}


NPY_REFUSED = {"nested_in_observation_dict": "rlbench.demo.Demo",
               "nested_in_observation_protocol0": "rlbench.backend.observation.Observation"}


class _Unrestricted(pickle.Unpickler):
    """What an unrestricted loader does (plus the RLBench stand-ins): used only to prove the corpus is live."""

    def find_class(self, module, name):
        return RLBENCH.get((module, name)) or super().find_class(module, name)


def _wait_for(marker: Path, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not marker.exists() and time.monotonic() < end:
        time.sleep(0.02)
    return marker.exists()


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_corpus_is_live(tmp_path, name):
    build, _, _ = PAYLOADS[name]
    marker = tmp_path / "pwned"
    with contextlib.suppress(Exception):  # some payloads break after running (os.system's int as a Demo)
        _Unrestricted(io.BytesIO(build(marker))).load()
    assert _wait_for(marker, 5.0), f"payload {name} did not run under an unrestricted unpickler"


# ------------------------------------------------------------------------------------ every loader


def _need_fixture() -> None:
    if not (EP0 / "low_dim_obs.pkl").is_file():
        pytest.skip(f"RLBench fixture not found at {FIXTURE}")


def _linked_copy(src: Path, dst: Path) -> Path:
    """A writable copy of a fixture folder made of symlinks (the fixture itself is read-only)."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    return dst


def _replace(path: Path, data: bytes) -> Path:
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    return path


def _low_dim(tmp_path, data, load):
    path = _replace(tmp_path / "low_dim_obs.pkl", data)
    return path, lambda: load(path)


def _read_episode(tmp_path, data):
    _need_fixture()
    ep = _linked_copy(EP0, tmp_path / "data" / "reach_target" / "variation0" / "episodes" / "episode0")
    path = _replace(ep / "low_dim_obs.pkl", data)
    return path, lambda: RLBenchRawSource(tmp_path / "data").read_episode("reach_target+0", "episode0")


def _descriptions(tmp_path, data):
    _need_fixture()
    var = tmp_path / "data" / "reach_target" / "variation0"
    _linked_copy(EP0, var / "episodes" / "episode0")
    path = _replace(var / "variation_descriptions.pkl", data)
    return path, lambda: RLBenchRawSource(tmp_path / "data").instructions("reach_target+0")


def _variation_number(tmp_path, data):
    _need_fixture()
    ep = _linked_copy(EP0, tmp_path / "data" / "reach_target" / "all_variations" / "episodes" / "episode0")
    path = _replace(ep / "variation_number.pkl", data)
    return path, lambda: RLBenchRawSource(tmp_path / "data").taskvars()


def npy_with_pickle(payload: bytes) -> bytes:
    """A valid .npy header for a 0-d object array, followed by ``payload`` where np.save puts the pickle."""
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
    return f.getvalue() + payload


def _instr_embeds(tmp_path, data):
    path = _replace(tmp_path / "instr_embeds_clip.npy", npy_with_pickle(data))
    return path, lambda: read_instr_embeds(path)


LOADERS = {
    "load_pickle": lambda t, d: _low_dim(t, d, load_pickle),
    "load_demo": lambda t, d: _low_dim(t, d, load_demo),
    "read_episode_low_dim_obs": _read_episode,
    "variation_descriptions": _descriptions,
    "variation_number_all_variations": _variation_number,
    "read_instr_embeds_npy": _instr_embeds,
}


def _expect_refused(tmp_path, make_loader, build, name: str, loader: str, refused: str, runs_async: bool) -> None:
    """Feed payload ``name`` through ``loader``: no marker file, and a DataError naming file and global."""
    marker = tmp_path / "pwned"
    path, load = make_loader(tmp_path, build(marker))
    try:
        load()
    except Exception as e:  # noqa: BLE001 - checked below, after the marker, which matters most
        err = e
    else:
        err = None
    assert not _wait_for(marker, 0.3 if runs_async else 0.0), f"{name} ran through {loader}: marker created"
    assert isinstance(err, DataError), f"{loader} on {name}: expected DataError, got {err!r}"
    assert str(path) in str(err) and refused in str(err), err


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_loaders_refuse_malicious_pickles(tmp_path, name, loader):
    build, refused, runs_async = PAYLOADS[name]
    if loader == "read_instr_embeds_npy":
        refused = NPY_REFUSED.get(name, refused)
    _expect_refused(tmp_path, LOADERS[loader], build, name, loader, refused, runs_async)


def test_npy_payload_is_live(tmp_path):
    """The .npy variant really runs under the original loader, np.load(allow_pickle=True)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "instr_embeds_clip.npy"
    path.write_bytes(npy_with_pickle(PROTO[4] + eval_via_numpy_dtypes(shell_code(marker)) + STOP))
    np.load(path, allow_pickle=True)
    assert marker.exists()


# ------------------------------------------------------------------------------------ allowed globals, misused


def _o(name: str) -> bytes:
    return g("rlbench.backend.observation", "Observation") if name == "obs" else g("rlbench.demo", "Demo")


def _dtype(spec: str, state: bytes | None = None) -> bytes:
    out = g("numpy", "dtype") + u(spec) + NEWFALSE + NEWTRUE + TUPLE3 + REDUCE
    return out + (state + BUILD if state is not None else b"")


def _void_state_with_object_field(flags: int) -> bytes:
    """dtype state (3, '|', None, ('f',), {'f': (dtype('O'), 0)}, 8, 1, flags) of a V8 dtype."""
    return MARK + i1(3) + u("|") + NONE + u("f") + TUPLE1 + EMPTY_DICT + u("f") + _dtype("O8") + i1(0) + TUPLE2 \
        + SETITEM + i1(8) + i1(1) + i1(flags) + TUPLE


def _frombuffer(buf: bytes, dtype: bytes) -> bytes:
    """``numpy._core.numeric._frombuffer(buf, dtype, (1,), "C")``, as protocol 5 pickles arrays."""
    return g("numpy._core.numeric", "_frombuffer") + MARK + bb(buf) + dtype + i1(1) + TUPLE1 + u("C") + TUPLE \
        + REDUCE


MISUSE = {
    # a dtype state that says "no objects" for an object field: the array over plain bytes then holds
    # attacker-chosen pointers (under plain pickle, reading it segfaults)
    "dtype_state_hides_object_field": (
        PROTO[2] + _frombuffer(b"A" * 8, _dtype("V8", _void_state_with_object_field(0))) + STOP,
        "inconsistent pickled dtype"),
    # a consistent object-field state, but set on a dtype that an array over plain bytes already uses
    "dtype_state_changed_after_use": (
        PROTO[2] + _dtype("V8") + b"q\x00" + _frombuffer(b"A" * 8, get(0)) + b"q\x01" + b"0"
        + _void_state_with_object_field(int(np.dtype([("f", "O")]).flags)) + BUILD + get(1) + TUPLE2 + STOP,
        "sets the state of"),
    "ndarray_is_not_callable": (PROTO[2] + g("numpy", "ndarray") + i1(1) + TUPLE1 + REDUCE + STOP,
                                "calls numpy.ndarray, which may not be called"),
    "ndarray_newobj": (PROTO[2] + g("numpy", "ndarray") + EMPTY_TUPLE + NEWOBJ + STOP,
                       "numpy.ndarray, which is not an allowed class"),
    "reconstruct_other_subtype": (PROTO[2] + g("numpy._core.multiarray", "_reconstruct") + _o("obs") + i1(0)
                                  + TUPLE1 + bb(b"b") + TUPLE3 + REDUCE + STOP, "not numpy.ndarray"),
    "codecs_other_encoding": (PROTO[2] + g("_codecs", "encode") + u("eJwDAAAAAAE=") + u("base64") + TUPLE2
                              + REDUCE + STOP, "only latin1"),
    "bytes_with_size": (PROTO[2] + g("builtins", "bytes") + b"J\x00\x00\x00\x7f" + TUPLE1 + REDUCE + STOP,
                        "builtins.bytes called with arguments"),
    "reconstructor_other_base": (PROTO[2] + g("copyreg", "_reconstructor") + _o("obs") + g("numpy", "ndarray")
                                 + NONE + TUPLE3 + REDUCE + STOP, "base numpy.ndarray"),
    "reconstructor_other_class": (PROTO[2] + g("copyreg", "_reconstructor") + g("builtins", "object")
                                  + g("builtins", "object") + NONE + TUPLE3 + REDUCE + STOP,
                                  "builtins.object, which is not an allowed class"),
    "build_on_a_class": (PROTO[2] + _o("obs") + NONE + EMPTY_DICT + u("__len__") + _o("demo") + SETITEM + TUPLE2
                         + BUILD + STOP, "sets the state of rlbench.backend.observation.Observation"),
    "append_through_instance_attribute": (
        PROTO[2] + _o("obs") + EMPTY_TUPLE + NEWOBJ + EMPTY_DICT + u("append") + g("_codecs", "encode") + SETITEM
        + BUILD + u("x") + APPEND + STOP, "APPEND on"),
    "dotted_numpy_name": (PROTO[4] + su("numpy") + su("_core.multiarray._reconstruct") + STACK_GLOBAL + STOP,
                          "(module 'numpy', dotted name '_core.multiarray._reconstruct'), which is not an allowed"),
    "persistent_id": (PROTO[2] + u("x") + b"Q" + STOP, "persistent id"),
}


@pytest.mark.parametrize("name", sorted(MISUSE))
def test_allowed_globals_cannot_be_misused(name):
    data, words = MISUSE[name]
    before = dict(vars(rlbench_raw.Observation))
    with pytest.raises(DataError, match="unsafe pickle") as err:
        loads(data, allowed_extra=RLBENCH, path="evil.pkl", key="k")
    assert words in str(err.value) and "path=evil.pkl" in str(err.value) and "key=k" in str(err.value)
    assert dict(vars(rlbench_raw.Observation)) == before


# ------------------------------------------------------------------------------------ what must still load

DTYPES = ["f4", "f8", "f2", "i1", "i8", "u2", "?", "c16", "U5", "S3", "V4", "M8[s]", "m8[ns]", ">i4",
          [("a", "<f4"), ("b", "i8", (2,))], [("o", "O"), ("f", "f8")], ("f4", (2, 3)), "O"]


def _examples(dtype) -> list:
    d = np.dtype(dtype)
    if d.hasobject or d.subdtype is not None:
        a = np.empty((2, 3), dtype=d) if d.hasobject else np.ones((2, 3), dtype=d)
    else:  # arbitrary bytes: pickles copy them raw
        a = np.frombuffer(np.random.default_rng(0).bytes(6 * d.itemsize), dtype=d).reshape(2, 3)
    return [a, np.asfortranarray(a), a[:, ::2], d] + ([] if d.hasobject and not d.names else [a[1, 2]])


@pytest.mark.parametrize("protocol", range(6))
def test_numpy_round_trips(protocol):
    objs = [x for d in DTYPES for x in _examples(d)]
    objs += [np.array([1, "a", None, np.arange(3), {"k": np.float32(2)}], dtype=object), np.zeros(0),
             np.array(3.5), np.float64(1.5), np.int64(-3), np.bool_(True), np.str_("x"), b"", b"abc",
             {"a": [1, (2.0, None)], "b": {"c": np.ones(2, np.float32)}}]
    for obj in objs:
        data = pickle.dumps(obj, protocol=protocol)
        ref, back = pickle.loads(data), loads(data)
        assert type(back) is type(ref), obj
        if isinstance(ref, np.ndarray):
            assert back.dtype == ref.dtype and back.shape == ref.shape and back.strides == ref.strides
            assert pickle.dumps(back, protocol=4) == pickle.dumps(ref, protocol=4)
        elif isinstance(ref, np.dtype):
            assert back == ref and back.flags == ref.flags and back.itemsize == ref.itemsize
        elif isinstance(ref, dict):
            assert pickle.dumps(back, protocol=4) == pickle.dumps(ref, protocol=4)
        else:
            assert back == ref


@pytest.mark.parametrize("protocol", range(6))
def test_real_episode_repickled_at_every_protocol(tmp_path, monkeypatch, protocol, fake_rlbench):
    _need_fixture()
    real = load_demo(EP0 / "low_dim_obs.pkl")
    demo = fake_rlbench.copy_demo(real)
    path = tmp_path / "low_dim_obs.pkl"
    path.write_bytes(pickle.dumps(demo, protocol=protocol))
    back = load_demo(path)
    assert len(back) == len(real)
    for a, b in zip(back, real):
        assert vars(a).keys() == vars(b).keys()
        np.testing.assert_array_equal(a.gripper_pose, b.gripper_pose)
        np.testing.assert_array_equal(a.misc["front_camera_extrinsics"], b.misc["front_camera_extrinsics"])
        assert a.gripper_open == b.gripper_open


def test_instr_embeds_round_trip(tmp_path):
    embeds = {"close the jar": np.random.default_rng(0).normal(size=(7, 512)), "open it": np.ones((3, 512))}
    path = tmp_path / "instr_embeds_clip.npy"
    write_instr_embeds(path, embeds)
    back = read_instr_embeds(path)
    assert sorted(back) == sorted(embeds)
    for k, v in embeds.items():
        assert back[k].dtype == np.float32
        np.testing.assert_array_equal(back[k], v.astype(np.float32))


def test_instr_embeds_written_by_numpy_1(tmp_path):
    """The published 3D-LOTUS files: np.save under numpy 1.x, i.e. protocol 3 and ``numpy.core`` names."""
    embeds = {"push the button": np.full((4, 512), 0.5, np.float32)}
    data = pickle.dumps(np.asarray(embeds, dtype=object), protocol=3).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray\n_reconstruct" in data
    path = tmp_path / "instr_embeds_clip.npy"
    path.write_bytes(npy_with_pickle(data))
    np.testing.assert_array_equal(read_instr_embeds(path)["push the button"], embeds["push the button"])


def test_instr_embeds_header_must_match_the_pickle(tmp_path):
    path = tmp_path / "instr_embeds_clip.npy"
    path.write_bytes(npy_with_pickle(pickle.dumps(np.zeros((2, 3), dtype=object), protocol=4)))
    with pytest.raises(DataError, match="array it announces") as err:
        read_instr_embeds(path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------ 3DDA packaged episodes
# ``ep<N>.dat`` = blosc.compress(pickle.dumps([frame_ids, obs, targets, camera_dicts, currents, trajectories]))
# and ``instructions.pkl``: both hold torch tensors, which pickle through torch._utils._rebuild_tensor_v2,
# torch.storage._load_from_bytes (torch.load with weights_only=False inside) and collections.OrderedDict.


def binbytes(data: bytes) -> bytes:
    """BINBYTES (protocol 3+)."""
    return b"B" + struct.pack("<I", len(data)) + data


def dda_list(element: bytes, index: int) -> bytes:
    """A 3DDA 6-element episode list whose element ``index`` is ``element`` (the others empty lists)."""
    parts = [EMPTY_LIST] * 6
    parts[index] = element
    return PROTO[4] + EMPTY_LIST + MARK + b"".join(parts) + APPENDS + STOP


class _RunsShell:
    """Pickles as os.system(cmd) (posix.system on Linux): only used to build torch.save bytes below."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def torch_saved(obj, zipfile: bool = False) -> bytes:
    """``torch.save(obj)`` bytes; legacy format (``zipfile=False``) is what a pickled storage embeds."""
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zipfile)
    return buf.getvalue()


def load_from_bytes(data: bytes) -> bytes:
    return g("torch.storage", "_load_from_bytes") + binbytes(data) + TUPLE1 + REDUCE


OD_EMPTY = g("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE


def rebuild_v2(storage: bytes, offset: bytes = i1(0), size: bytes = i1(8) + TUPLE1, stride: bytes = i1(1) + TUPLE1,
               grad: bytes = NEWFALSE, hooks: bytes = OD_EMPTY, extra: bytes = b"") -> bytes:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, *extra)``."""
    return g("torch._utils", "_rebuild_tensor_v2") + MARK + storage + offset + size + stride + grad + hooks \
        + extra + TUPLE + REDUCE


def _storage8() -> bytes:
    """A real pickled storage of 8 float32 (0..7), as torch's TypedStorage.__reduce__ writes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, (data,) = torch.arange(8, dtype=torch.float32)._typed_storage().__reduce__()
    return load_from_bytes(data)


# name -> (builder(marker) -> pickle bytes, refused global the error must name); every one runs under 3DDA's
# own loader, pickle.loads(blosc.decompress(...)) (test_dda_corpus_is_live)
DDA_PAYLOADS = {
    "dda_os_system_among_targets": (lambda m: dda_list(EMPTY_LIST + os_system_call(touch(m)) + APPEND, 2),
                                    "os.system"),
    "dda_eval_in_camera_dict": (
        lambda m: dda_list(EMPTY_LIST + EMPTY_DICT + u("front") + g("builtins", "eval") + u(shell_code(m))
                           + TUPLE1 + REDUCE + SETITEM + APPEND, 3), "builtins.eval"),
    "dda_numpy_dtypes_route_as_observations": (lambda m: dda_list(eval_via_numpy_dtypes(shell_code(m)), 1),
                                               "numpy.dtypes.__builtins__.get"),
    "dda_object_array_as_observations": (lambda m: dda_list(object_array(os_system_call(touch(m))), 1),
                                         "os.system"),
    "dda_tensor_storage_runs_shell": (  # torch's own _load_from_bytes: torch.load(weights_only=False)
        lambda m: dda_list(EMPTY_LIST + rebuild_v2(load_from_bytes(torch_saved(_RunsShell(touch(m)))))
                           + APPEND, 4), "posix.system"),
    "dda_tensor_storage_runs_shell_zipfile": (
        lambda m: dda_list(EMPTY_LIST + load_from_bytes(torch_saved(_RunsShell(touch(m)), zipfile=True))
                           + APPEND, 5), "posix.system"),
}


def _dda_dat(tmp_path, data):
    path = tmp_path / "train" / "close_jar+0" / "ep0.dat"
    path.parent.mkdir(parents=True)
    path.write_bytes(blosc.compress(data))
    return path, lambda: dda_dat.DdaDatSource(tmp_path).read_episode("close_jar+0", "ep0")


def _dda_instructions(tmp_path, data):
    rgb = np.zeros((1, 1, 2, 2, 3), np.uint8)
    dda_dat.write_dda_episode(tmp_path / "train" / "close_jar+0" / "ep0.dat", rgb, np.zeros(rgb.shape),
                              np.zeros((1, 8)), np.zeros((1, 8)), ["front"])
    path = _replace(tmp_path / "instructions.pkl", data)
    return path, lambda: dda_dat.DdaDatSource(tmp_path).instructions("close_jar+0")


DDA_LOADERS = {"dda_dat_read_episode": _dda_dat, "dda_instructions_pkl": _dda_instructions}


@pytest.mark.parametrize("name", sorted(DDA_PAYLOADS))
def test_dda_corpus_is_live(tmp_path, name):
    build, _ = DDA_PAYLOADS[name]
    marker = tmp_path / "pwned"
    with contextlib.suppress(Exception):  # _rebuild_tensor_v2 fails on os.system's int, after it ran
        pickle.loads(blosc.decompress(blosc.compress(build(marker))))
    assert marker.exists(), f"payload {name} did not run under 3DDA's loader"


@pytest.mark.parametrize("loader", sorted(DDA_LOADERS))
@pytest.mark.parametrize("name", sorted(PAYLOADS) + sorted(DDA_PAYLOADS))
def test_dda_loaders_refuse_malicious_pickles(tmp_path, name, loader):
    if name in DDA_PAYLOADS:
        (build, refused), runs_async = DDA_PAYLOADS[name], False
    else:
        build, refused, runs_async = PAYLOADS[name]
        refused = NPY_REFUSED.get(name, refused)  # no rlbench class is allowed here either
    _expect_refused(tmp_path, DDA_LOADERS[loader], build, name, loader, refused, runs_async)


DDA_MISUSE = {
    "load_from_bytes_of_text": (PROTO[2] + g("torch.storage", "_load_from_bytes") + u("x") + TUPLE1 + REDUCE + STOP,
                                "called with a builtins.str object, not bytes"),
    "load_from_bytes_gives_a_dict": (PROTO[4] + load_from_bytes(torch_saved({"a": 1})) + STOP,
                                     "gave a builtins.dict, not a torch TypedStorage"),
    "load_from_bytes_gives_a_tensor": (PROTO[4] + load_from_bytes(torch_saved(torch.ones(2))) + STOP,
                                       "not a torch TypedStorage"),
    "ordered_dict_with_items": (PROTO[2] + g("collections", "OrderedDict") + EMPTY_LIST + TUPLE1 + REDUCE + STOP,
                                "collections.OrderedDict called with arguments"),
    "ordered_dict_setitem": (PROTO[2] + OD_EMPTY + u("k") + u("v") + SETITEM + STOP,
                             "SETITEM on a collections.OrderedDict object"),
    "rebuild_over_plain_bytes": (PROTO[4] + rebuild_v2(binbytes(b"A" * 32)) + STOP,
                                 "not one made by torch.storage._load_from_bytes"),
    "rebuild_past_the_storage": (PROTO[4] + rebuild_v2(_storage8(), size=i1(9) + TUPLE1) + STOP,
                                 "reach element 8 of a storage of 8"),
    "rebuild_offset_past_the_storage": (PROTO[4] + rebuild_v2(_storage8(), offset=b"J\x00\x00\x01\x00",
                                                              size=i1(1) + TUPLE1) + STOP, "reach element"),
    "rebuild_negative_stride": (PROTO[4] + rebuild_v2(_storage8(), stride=b"J\xff\xff\xff\xff" + TUPLE1) + STOP,
                                "stride (-1,) is not a tuple"),
    "rebuild_with_plain_dict_hooks": (PROTO[4] + rebuild_v2(_storage8(), hooks=EMPTY_DICT) + STOP,
                                      "only an empty collections.OrderedDict() is allowed"),
    "rebuild_with_metadata": (PROTO[4] + rebuild_v2(_storage8(), extra=EMPTY_DICT + u("neg") + NEWTRUE + SETITEM)
                              + STOP, "tensor metadata"),
    "rebuild_requires_grad_not_bool": (PROTO[4] + rebuild_v2(_storage8(), grad=i1(1)) + STOP,
                                       "requires_grad a builtins.int object, not a bool"),
    "rebuild_tensor_v3": (PROTO[2] + g("torch._utils", "_rebuild_tensor_v3") + STOP,
                          "torch._utils._rebuild_tensor_v3, which is not an allowed global"),
    "torch_load": (PROTO[2] + g("torch", "load") + STOP, "torch.load, which is not an allowed global"),
    "torch_float_storage": (PROTO[2] + g("torch", "FloatStorage") + STOP, "torch.FloatStorage, which is not"),
}


@pytest.mark.parametrize("name", sorted(DDA_MISUSE))
def test_dda_torch_globals_cannot_be_misused(name):
    data, words = DDA_MISUSE[name]
    with pytest.raises(DataError, match="unsafe pickle") as err:
        dda_dat.loads(data, path="evil.dat", key="k")
    assert words in str(err.value) and "path=evil.dat" in str(err.value) and "key=k" in str(err.value)


def test_dda_hand_assembled_tensor_still_loads():
    """The assembler's tensor pickle is the real thing: the misuse cases above differ in one argument each."""
    back = dda_dat.loads(PROTO[4] + rebuild_v2(_storage8(), offset=i1(2), size=i1(3) + TUPLE1) + STOP)
    assert torch.equal(back, torch.tensor([2.0, 3.0, 4.0]))
    assert torch.equal(pickle.loads(PROTO[4] + rebuild_v2(_storage8()) + STOP), torch.arange(8.0))


# ------------------------------------------------------------------------------------ LMDB values
# msgpack_numpy stores an object array as a pickle and decodes it with pickle.loads: an LMDB episode value
# is a pickle carrier too. Every payload goes into a value's "xyz" as such an array.


def _msgpack_object_array(payload: bytes) -> bytes:
    import msgpack

    return msgpack.packb({"xyz": [{b"nd": True, b"kind": b"O", b"type": "|O", b"shape": [1], b"data": payload}],
                          "action": np.zeros((2, 8), np.float32), "key_frameids": [0, 1]},
                         default=__import__("msgpack_numpy").encode, use_bin_type=True)


def _lmdb_with(tmp_path, data: bytes) -> Path:
    import lmdb

    folder = tmp_path / "lmdbs" / "close_jar+0"
    folder.mkdir(parents=True)
    env = lmdb.open(str(folder), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"episode0", _msgpack_object_array(data))
    env.close()
    return folder


def _lmdb_unpack(tmp_path, data):
    from harness.data.formats.lotus_lmdb import unpack

    path = tmp_path / "value.msgpack"
    return path, lambda: unpack(_msgpack_object_array(data), path, "episode0")


def _lmdb_dataset(tmp_path, data):
    from harness.data.dataset import KeystepDataset

    folder = _lmdb_with(tmp_path, data)
    return folder, lambda: KeystepDataset(folder.parent, require_text=False, meta_preset="rlbench18")


LMDB_LOADERS = {"lotus_lmdb_unpack": _lmdb_unpack, "keystep_dataset_lmdb": _lmdb_dataset}


@pytest.mark.parametrize("loader", sorted(LMDB_LOADERS))
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_lmdb_values_refuse_malicious_pickles(tmp_path, name, loader):
    build, refused, runs_async = PAYLOADS[name]
    refused = NPY_REFUSED.get(name, refused)  # no rlbench class is allowed in an LMDB value either
    _expect_refused(tmp_path, LMDB_LOADERS[loader], build, name, loader, refused, runs_async)


def test_lmdb_value_with_an_object_dtype_field_is_refused(tmp_path):
    """A structured dtype with an object field would make np.ndarray read the file's bytes as pointers."""
    import msgpack

    from harness.data.formats.lotus_lmdb import unpack

    value = msgpack.packb({"xyz": {b"nd": True, b"kind": b"V", b"type": [["a", "|O"]], b"shape": [1],
                                   b"data": b"\x41" * 8}})
    with pytest.raises(DataError, match=r"holds Python objects.*\[path=P, key=episode0\]"):
        unpack(value, "P", "episode0")


def test_lmdb_object_arrays_of_plain_data_still_load():
    from harness.data.formats.lotus_lmdb import pack, unpack

    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.ones(2, np.float32), np.zeros(3, np.float32)
    got = unpack(pack({"xyz": ragged}))["xyz"]
    assert got.dtype == object and got[1].shape == (3,)
