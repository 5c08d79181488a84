"""The project's one restricted unpickler: nothing read from disk may run code.

``pickle`` has no allow-list API: the only hook is ``Unpickler.find_class``, and a pickle that gets hold of
any callable through it can call that callable (REDUCE), instantiate classes (NEWOBJ, INST, OBJ) and set
attributes on whatever it built (BUILD). So this module is hand-written on top of the pure-Python
``pickle._Unpickler``, whose opcode table a subclass can replace, and controls four things:

- ``find_class`` answers EXACT ``(module, name)`` pairs from a table; it never imports, never follows dotted
  names and never matches a module by prefix. Anything else raises ``DataError`` naming ``module.name``.
- REDUCE calls only the table's callables, each a wrapper that checks its arguments; NEWOBJ / INST / OBJ and
  ``copyreg._reconstructor`` instantiate only caller-supplied classes (``allowed_extra``).
- BUILD applies only to instances of caller-supplied classes (their ``__dict__``), to arrays that
  ``_reconstruct`` just made (once each) and to dtypes that ``numpy.dtype`` just made (once each, and the
  result must equal a dtype numpy builds itself: a pickled dtype state can otherwise claim "no objects" for
  an object field, and an array over plain bytes then dereferences attacker pointers).
- APPEND(S) / SETITEM(S) / ADDITEMS touch only plain ``list`` / ``dict`` / ``set`` objects, so an attribute
  set by BUILD can never be called as ``extend`` or ``append``.

Numpy object arrays (dtype=object) unpickle their elements through this same unpickler, so an allowed array
opens no path to other globals. The allow-list (``_ALLOWED``), and why each entry is there:

- ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (numpy 1.x / 2.x name):
  every ndarray pickle at protocols 0-4 calls it with the ``numpy.ndarray`` marker to make an empty array
  that BUILD then fills. Only ``numpy.ndarray`` itself is accepted as the subtype.
- ``numpy.ndarray``: that marker. It is never callable here (calling it could make views of other memory).
- ``numpy.dtype``: every pickled dtype (arrays, scalars, structured, datetime) is ``dtype(str, align, copy)``
  plus a BUILD state. Only legacy dtypes from a string spec; always a fresh copy (never numpy's singletons).
- ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar``: numpy scalars (``np.float32(1)``).
- ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer``: arrays at protocol 5; the buffer
  must be ``bytes`` or ``bytearray`` (never another array: that would be a view of its memory).
- ``_codecs.encode``: protocols 0-2 write ``bytes`` (numpy's raw data) as ``encode(text, "latin1")``; only
  that encoding is accepted.
- ``builtins.bytes`` / ``__builtin__.bytes``: protocols 0-2 write empty ``bytes`` as ``bytes()``; only with
  no arguments.
- ``copyreg._reconstructor`` / ``copy_reg._reconstructor`` with ``builtins.object`` / ``__builtin__.object``:
  protocols 0-1 write plain class instances as ``_reconstructor(cls, object, None)``; only a caller-supplied
  class on base ``object`` (so ``base.__new__``/``base.__init__`` can only be ``object``'s).
- ``allowed_extra``: caller-supplied pairs, e.g. RLBench's ``Observation``/``Demo`` mapped to local stand-ins.
  A class there can be instantiated without calling ``__init__`` and have its ``__dict__`` filled; any other
  object can only be passed around (it is never called).

Python 2 names (``__builtin__``, ``copy_reg``) are here because Python 3 writes them at protocols 0-2.
Containers (list, dict, tuple, set, frozenset), str, bytes, int, float, bool and None need no global.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from harness.data.errors import DataError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.multiarray import scalar as _np_scalar
    from numpy.core.numeric import _frombuffer as _np_frombuffer

__all__ = ["SafeUnpickler", "loads", "safe_load"]

# Roles of the table's entries (see SafeUnpickler._table).
_CALL, _MARK = "call", "mark"
# (module, name) -> (role, method name or object)
_ALLOWED: dict[tuple[str, str], tuple[str, object]] = {
    ("numpy.core.multiarray", "_reconstruct"): (_CALL, "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): (_CALL, "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): (_CALL, "_scalar"),
    ("numpy._core.multiarray", "scalar"): (_CALL, "_scalar"),
    ("numpy.core.numeric", "_frombuffer"): (_CALL, "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): (_CALL, "_frombuffer"),
    ("numpy", "dtype"): (_CALL, "_dtype"),
    ("numpy", "ndarray"): (_MARK, np.ndarray),
    ("_codecs", "encode"): (_CALL, "_encode"),
    ("builtins", "bytes"): (_CALL, "_bytes"),
    ("__builtin__", "bytes"): (_CALL, "_bytes"),
    ("copyreg", "_reconstructor"): (_CALL, "_reconstructor"),
    ("copy_reg", "_reconstructor"): (_CALL, "_reconstructor"),
    ("builtins", "object"): (_MARK, object),
    ("__builtin__", "object"): (_MARK, object),
}
_LEGACY_KINDS = frozenset("biufcmMOSUV")

# What a truncated or garbled pickle can raise while loading.
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, KeyError,
                    TypeError, ValueError, OverflowError, MemoryError, RecursionError, OSError, struct.error,
                    RuntimeError)


class _Refused(Exception):
    """Raised inside the unpickler; ``SafeUnpickler.load`` turns it into ``DataError`` with path and key."""


def _canonical_dtype(d: np.dtype, memo: dict | None = None) -> np.dtype:
    """A dtype numpy builds from ``d``'s public description (never from a pickled state)."""
    memo = {} if memo is None else memo  # shared sub-dtypes are rebuilt once
    if id(d) in memo:
        return memo[id(d)]
    if d.subdtype is not None:
        base, shape = d.subdtype
        c = np.dtype((_canonical_dtype(base, memo), shape))
    elif d.names is not None:
        formats, offsets, titles = [], [], []
        for n in d.names:
            f = d.fields[n]
            formats.append(_canonical_dtype(f[0], memo))
            offsets.append(f[1])
            titles.append(f[2] if len(f) > 2 else None)
        c = np.dtype({"names": list(d.names), "formats": formats, "offsets": offsets, "titles": titles,
                      "itemsize": d.itemsize}, align=d.isalignedstruct)
    elif d.kind not in _LEGACY_KINDS:
        raise _Refused(f"dtype {d!r} is not a plain numpy dtype")
    else:
        c = np.dtype(d.str)
    memo[id(d)] = c
    return c


def _check_dtype(d: np.dtype) -> None:
    """Refuse a dtype whose fields, size, alignment or flags differ from what numpy itself would build."""
    try:
        c = _canonical_dtype(d)
        same = (c == d and c.itemsize == d.itemsize and c.flags == d.flags and c.alignment == d.alignment
                and c.names == d.names)
    except _Refused:
        raise
    except (TypeError, ValueError, KeyError, IndexError) as e:  # a state numpy took but cannot rebuild
        raise _Refused(f"inconsistent pickled dtype ({type(e).__name__}: {e})") from None
    if not same:
        raise _Refused(f"inconsistent pickled dtype {d!r} (flags {d.flags}, itemsize {d.itemsize}, "
                       f"alignment {d.alignment}); numpy builds {c!r} (flags {c.flags}, itemsize {c.itemsize}, "
                       f"alignment {c.alignment})")


def _dtypes_in(obj) -> list[np.dtype]:
    """Every ``np.dtype`` inside nested tuples/lists/dicts (a dtype state's fields, subarray, metadata)."""
    found, seen, todo = [], set(), [obj]
    while todo:  # iterative, and each container once: states may nest deeply or share sub-containers
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, np.dtype):
            found.append(o)
        elif isinstance(o, (tuple, list)):
            todo.extend(o)
        elif isinstance(o, dict):
            todo.extend(o.keys())
            todo.extend(o.values())
    return found


class SafeUnpickler(pickle._Unpickler):
    """Pure-Python unpickler that builds only numpy arrays/scalars/dtypes, builtin containers and the classes
    in ``allowed_extra``; everything else raises ``DataError`` naming ``path``, ``key`` and the refused global.

    ``allowed_extra`` maps ``(module, name)`` to the object to use instead (classes: instantiable, state goes
    into ``__dict__``; other objects: passed around, never called). ``hint`` is appended to refusals.
    A subclass may answer more globals with its own checked stand-ins: ``checked_calls`` maps ``(module,
    name)`` to the name of a method that validates its arguments (REDUCE calls only these and the table's).
    """

    dispatch: ClassVar[dict] = dict(pickle._Unpickler.dispatch)
    checked_calls: ClassVar[dict[tuple[str, str], str]] = {}

    def __init__(self, file, *, allowed_extra: Mapping[tuple[str, str], object] | None = None,
                 path: object = None, key: object = None, hint: str = "", encoding: str = "ASCII"):
        super().__init__(file, fix_imports=False, encoding=encoding)
        self.path, self.key, self.hint = path, key, hint
        self._table: dict[tuple[str, str], object] = {}
        self._callables: dict[int, object] = {}
        self._classes: dict[int, type] = {}
        self._names: dict[int, str] = {}
        bound: dict[str, object] = {}  # one bound method per name, so identity checks hold
        for pair, (role, what) in {**_ALLOWED, **{p: (_CALL, m) for p, m in self.checked_calls.items()}}.items():
            obj = bound.setdefault(what, getattr(self, what)) if role == _CALL else what
            if role == _CALL:
                self._callables[id(obj)] = obj
            self._table[pair] = obj
            self._names.setdefault(id(obj), f"{pair[0]}.{pair[1]}")
        for (module, name), obj in (allowed_extra or {}).items():
            if not (isinstance(module, str) and isinstance(name, str)):
                raise TypeError(f"allowed_extra keys must be (module, name) strings, got {(module, name)!r}")
            self._table[(module, name)] = obj
            self._names.setdefault(id(obj), f"{module}.{name}")
            if isinstance(obj, type):
                self._classes[id(obj)] = obj
        self._fresh_arrays: dict[int, np.ndarray] = {}  # made by _reconstruct, not yet BUILT
        self._fresh_dtypes: dict[int, np.dtype] = {}  # made by numpy.dtype, not yet BUILT nor used
        self._keep: list[object] = []  # keeps ids above unique for the whole load

    # ------------------------------------------------------------------------------------------ entry points

    def load(self):
        try:
            return super().load()
        except _Refused as e:
            raise DataError(f"unsafe pickle: {e}{self.hint}", self.path, self.key) from None

    def find_class(self, module, name):
        try:
            return self._table[(module, name)]
        except (KeyError, TypeError):
            extra = "".join(f", {self._names[id(c)]}" for c in self._classes.values())
            dotted = f" (module {module!r}, dotted name {name!r})" if "." in str(name) else ""
            raise _Refused(f"it refers to {module}.{name}{dotted}, which is not an allowed global (allowed: "
                           f"numpy arrays, scalars and dtypes{extra})") from None

    # ------------------------------------------------------------------------------------------ opcodes

    def _name(self, obj) -> str:
        return self._names.get(id(obj)) or f"a {type(obj).__module__}.{type(obj).__qualname__} object"

    def _class(self, cls, what: str) -> type:
        if not isinstance(cls, type) or self._classes.get(id(cls)) is not cls:
            raise _Refused(f"{what} of {self._name(cls)}, which is not an allowed class")
        return cls

    def load_reduce(self):
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        if self._callables.get(id(func)) is not func:
            raise _Refused(f"it calls {self._name(func)}, which may not be called")
        if not isinstance(args, tuple):
            raise _Refused(f"arguments of {self._name(func)} are not a tuple")
        stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def _new(self, cls, args=(), kwargs=None, what="NEWOBJ") -> object:
        cls = self._class(cls, f"{what} (instantiation)")
        if args or kwargs:
            raise _Refused(f"{what} passes arguments to {self._name(cls)}")
        obj = cls.__new__(cls)
        self._keep.append(obj)
        return obj

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs, "NEWOBJ_EX"))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass, args):  # INST and OBJ
        self.append(self._new(klass, args, what="INST/OBJ"))

    def load_build(self):
        stack = self.stack
        state = stack.pop()
        inst = stack[-1]
        if type(inst) is np.ndarray and self._fresh_arrays.pop(id(inst), None) is inst:
            self._build_array(inst, state)
        elif isinstance(inst, np.dtype) and self._fresh_dtypes.pop(id(inst), None) is inst:
            for d in _dtypes_in(state):  # seal the field dtypes first: they may not change after the check
                self._fresh_dtypes.pop(id(d), None)
            inst.__setstate__(state)
            _check_dtype(inst)
        elif self._classes.get(id(type(inst))) is type(inst):
            self._build_instance(inst, state)
        else:
            raise _Refused(f"it sets the state of {self._name(inst)}, which is not allowed (only arrays and "
                           "dtypes just made, and instances of allowed classes)")

    dispatch[pickle.BUILD[0]] = load_build

    def _build_instance(self, inst, state):
        setstate = getattr(type(inst), "__setstate__", None)
        if setstate is not None and setstate is not getattr(object, "__setstate__", None):
            setstate(inst, state)  # the caller's own class, trusted
            return
        slotstate = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slotstate = state
        for part in (state, slotstate):
            if part is not None and (not isinstance(part, dict) or not all(isinstance(k, str) for k in part)):
                raise _Refused(f"state of {self._name(type(inst))} is not a dict of str keys")
        if state:
            inst.__dict__.update({sys.intern(k): v for k, v in state.items()})
        for k, v in (slotstate or {}).items():
            if k.startswith("__"):
                raise _Refused(f"state of {self._name(type(inst))} sets {k}")
            setattr(inst, k, v)

    def _build_array(self, arr: np.ndarray, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused("array state is not numpy's (version, shape, dtype, fortran, data)")
        dtype, data = state[-3], state[-1]
        if not isinstance(dtype, np.dtype):
            raise _Refused(f"array dtype is {self._name(dtype)}, not a numpy dtype")
        if not isinstance(data, (bytes, bytearray, list, str)):
            raise _Refused(f"array data is {self._name(data)}, not bytes or a list")
        self._use_dtype(dtype)
        arr.__setstate__(state)

    def _container(self, kind: type, opname: str):
        obj = self.stack[-1]
        if type(obj) is not kind:
            raise _Refused(f"{opname} on {self._name(obj)}, which is not a {kind.__name__}")
        return obj

    def load_append(self):
        value = self.stack.pop()
        self._container(list, "APPEND").append(value)

    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        self._container(list, "APPENDS").extend(items)

    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._container(dict, "SETITEM")[key] = value

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        d = self._container(dict, "SETITEMS")
        for i in range(0, len(items), 2):
            d[items[i]] = items[i + 1]

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self):
        items = self.pop_mark()
        self._container(set, "ADDITEMS").update(items)

    dispatch[pickle.ADDITEMS[0]] = load_additems

    def persistent_load(self, pid):
        raise _Refused("it holds a persistent id, which is not supported")

    # ------------------------------------------------------------------------------------------ callables

    def _use_dtype(self, d) -> np.dtype:
        """A dtype argument: a fresh dtype is sealed (its state may no longer change); str specs are parsed."""
        if isinstance(d, np.dtype):
            self._fresh_dtypes.pop(id(d), None)
            return d
        if isinstance(d, (str, bytes)):  # a type code such as _reconstruct's b"b"
            d = self._dtype(d.decode("ascii") if isinstance(d, bytes) else d, False, True)
            self._fresh_dtypes.pop(id(d))
            return d
        raise _Refused(f"dtype argument is {self._name(d)}, not a numpy dtype")

    def _dtype(self, spec, align=False, copy=False):
        if not isinstance(spec, str) or not isinstance(align, (bool, int)) or not isinstance(copy, (bool, int)):
            raise _Refused(f"numpy.dtype called with {type(spec).__name__} {spec!r:.60}, not a type string")
        d = np.dtype(spec, align=bool(align), copy=True)  # a copy: never numpy's shared singletons
        if d.kind not in _LEGACY_KINDS:
            raise _Refused(f"dtype {d!r} is not a plain numpy dtype")
        self._fresh_dtypes[id(d)] = d
        self._keep.append(d)
        return d

    def _reconstruct(self, subtype, shape, dtype):
        if subtype is not np.ndarray:
            raise _Refused(f"_reconstruct of {self._name(subtype)}, not numpy.ndarray")
        arr = _np_reconstruct(np.ndarray, shape, self._use_dtype(dtype))
        self._fresh_arrays[id(arr)] = arr
        self._keep.append(arr)
        return arr

    def _scalar(self, dtype, obj=None):
        dtype = self._use_dtype(dtype)
        if not isinstance(obj, (bytes, str, np.ndarray)):
            raise _Refused(f"numpy scalar data is {self._name(obj)}, not bytes")
        if isinstance(obj, np.ndarray):
            self._fresh_arrays.pop(id(obj), None)
        return _np_scalar(dtype, obj)

    def _frombuffer(self, buf, dtype, shape, order):
        if type(buf) not in (bytes, bytearray):  # never an array: that would be a view of its memory
            raise _Refused(f"_frombuffer buffer is {self._name(buf)}, not bytes")
        return _np_frombuffer(buf, self._use_dtype(dtype), shape, order)

    def _encode(self, text, encoding="utf-8", errors="strict"):
        if type(text) is not str or encoding not in ("latin1", "latin-1") or errors != "strict":
            raise _Refused(f"_codecs.encode called with encoding {encoding!r:.40}; only latin1 text is allowed")
        return text.encode("latin-1")

    def _bytes(self, *args):
        if args:
            raise _Refused("builtins.bytes called with arguments")
        return b""

    def _reconstructor(self, cls, base, state=None):
        if base is not object or state is not None:
            raise _Refused(f"copyreg._reconstructor with base {self._name(base)}; only object is allowed")
        return self._new(cls, what="copyreg._reconstructor")


def safe_load(file_or_path, *, allowed_extra: Mapping[tuple[str, str], object] | None = None,
              path: object = None, key: object = None, hint: str = "") -> object:
    """Unpickle a path or a binary file object with ``SafeUnpickler``.

    Missing file, refused global and corrupt pickle all raise ``DataError`` naming ``path`` (the file's own
    path by default) and ``key``.
    """
    if isinstance(file_or_path, (str, os.PathLike)):
        path = Path(file_or_path) if path is None else path
        try:
            with open(file_or_path, "rb") as f:
                return _load(f, allowed_extra, path, key, hint)
        except FileNotFoundError:
            raise DataError("file not found", path, key) from None
        except IsADirectoryError:
            raise DataError("expected a pickle file, found a folder", path, key) from None
        except OSError as e:
            raise DataError(f"cannot read ({type(e).__name__}: {e})", path, key) from None
    if path is None:
        path = getattr(file_or_path, "name", None)
    return _load(file_or_path, allowed_extra, path, key, hint)


def loads(data: bytes, *, allowed_extra: Mapping[tuple[str, str], object] | None = None,
          path: object = None, key: object = None, hint: str = "") -> object:
    """``safe_load`` for a bytes object."""
    return _load(io.BytesIO(data), allowed_extra, path, key, hint)


def _load(f, allowed_extra, path, key, hint):
    try:
        return SafeUnpickler(f, allowed_extra=allowed_extra, path=path, key=key, hint=hint).load()
    except DataError:
        raise
    except _UNPICKLE_ERRORS as e:  # corrupt pickles raise anything from EOFError to MemoryError
        raise DataError(f"cannot unpickle ({type(e).__name__}: {e})", path, key) from None

