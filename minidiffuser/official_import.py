"""Map the RELEASED official Mini-Diffuser checkpoint onto this repository's ``MiniDiffuser`` (preset ``paper``).

The official model is ``DiffPolicyPTV3`` (utomm/mini-diffuse-actor @ 913fb94, reference
``shared/reference/minidiffuser.md`` §1); its state-dict names, shapes and dtypes are listed in
``shared/reference/official_minidiffuser_state_dict.tsv`` (611 entries). Our model holds the same
tensors under other names (our module tree is organised by role, not by the official attribute names),
with one layout difference (spconv kernels). The mapping is by meaning, derived from the reference spec,
never from the order of the entries. Loading files is the caller's job:
``torch.load(path, map_location="cpu", weights_only=True)``, then :func:`unwrap_state_dict`, then
:func:`convert_official_state_dict`, then ``model.load_state_dict(result, strict=True)``.

Mapping by block (official ``ptv3_model.`` prefix abbreviated ``P.``; ``s`` = stage index):

=====================================================  =====================================================
official                                               ours
=====================================================  =====================================================
``txt_fc.*`` (Linear 512->256)                          ``text.proj.*``
``txt_attn_fc.*`` (Linear 512->1, token weights)        ``text.attn.*``
``P.embedding.stem.conv.weight`` (spconv k=5, no bias)  ``backbone.embedding.conv.weight`` (layout, below)
``P.embedding.stem.norm.*`` (BatchNorm, 5 tensors)      ``backbone.embedding.norm.0.*``
``P.enc.enc{s}.down.proj.*`` (s >= 1, pooling Linear)   ``backbone.pools.{s-1}.proj.*``
``P.enc.enc{s}.down.norm.0.*`` (BatchNorm)              ``backbone.pools.{s-1}.norm.0.*``
``P.enc.enc{s}.block0.*`` (PTv3 Block)                  ``backbone.enc_blocks.{s}.*`` (Block table)
``P.enc.enc{s}.ca_block0.*`` (text CABlock)             ``backbone.enc_cross.{s}.*`` (CABlock table)
``P.mid_conv.conv.{0,1,2}`` (bottleneck ConvBlock)      ``backbone.mid_conv.{conv,post.0,post.1}``
``P.dec.dec{s}.up.proj.{0,1}`` (unpool, coarse path)    ``backbone.unpools.{s}.proj.{0,1.0}``
``P.dec.dec{s}.up.proj_skip.{0,1}`` (unpool, skip)      ``backbone.unpools.{s}.proj_skip.{0,1.0}``
``P.dec.dec{s}.block0.*`` / ``ca_block0.*``             ``backbone.dec_blocks.{s}.*`` / ``dec_cross.{s}.*``
``P.dec.dec{s}.conv0.conv.{0,1,2}`` (local ConvBlock)   ``backbone.dec_convs.{s}.{conv,post.0,post.1}``
``P.anchor_proj.0.fc1`` / ``fc2`` (3->12->72)           ``query.anchor_proj.0`` / ``query.anchor_proj.2``
``P.nec.neck3`` (kv = bottleneck, 384)                  ``query.necks.0``
``P.nec.neck2`` (kv = decoder stage 3 output, 192)      ``query.necks.1``
``P.nec.neck1`` (kv = decoder stage 2 output, 144)      ``query.necks.2``
``P.nec.neck0`` (kv = decoder stage 1 output, 72)       ``query.necks.3``
``P.nec.neck_final`` (kv = decoder stage 0 output, 72)  ``query.necks.4``
``act_proj_head.denoise_mlp.{0,3}`` (eps head)          ``query.denoise_mlp.{0,3}``
``act_proj_head.action_mlp.{0,3}`` (rotation/open)      ``head.mlp.{0,3}``
=====================================================  =====================================================

Inside the blocks (official suffix -> our suffix): Block: ``cpe.0`` (spconv k=3 + bias) -> ``cpe_conv``,
``cpe.1`` (Linear) -> ``cpe.0``, ``cpe.2`` (LayerNorm) -> ``cpe.1``, ``norm1.0``/``norm2.0`` ->
``norm1``/``norm2``, ``attn.{qkv,proj,q_norm,k_norm}`` -> same, ``mlp.0.fc1``/``mlp.0.fc2`` ->
``mlp.0``/``mlp.3``. CABlock: ``norm1.0``/``norm2.0`` -> ``norm1``/``norm2``,
``attn.{q,kv,proj,q_norm,k_norm}`` -> same, ``mlp.0.fc{1,2}`` -> ``mlp.{0,3}``. NeckBlock:
``norm{1,2}.0.norm`` -> ``norm{1,2}.norm`` (LayerNorm), ``norm{1,2}.0.modulation.1`` ->
``norm{1,2}.modulation.1`` (FiLM Linear 256->144), attention and MLP as in CABlock.

Why the neck order is reversed: the official necks are named after the decoder stage they precede:
``neck{s}`` reads the level that FEEDS decoder stage ``s`` (its kv width proves it: neck3 384 = bottleneck,
neck2 192 = stage-3 output, neck1 144 = stage-2 output), so ``neck0`` reads the stage-1 output and
``neck_final`` the stage-0 output (both 72 wide: only the naming pattern, reference §1.4, separates these
two). Our ``query.necks`` are in call order, coarsest first.

Packed projections, copied unchanged because both sides use the same packing:

- ``attn.qkv`` (3C, C) of the serialized self-attention: rows ordered (q|k|v, head, head_dim), as
  Pointcept PTv3's ``qkv.reshape(-1, K, 3, H, C // H)`` and the flash path's ``reshape(-1, 3, H, D)``;
  ours views the output as ``(..., 3, heads, head_dim)``.
- ``attn.kv`` (2C, C_kv) of the text cross-attention and of the neck cross-attention: rows ordered
  (k|v, head, head_dim), as FlashAttention's ``kvpacked`` layout (total, 2, H, D) and the spec's
  ``k_norm(kv[:, 0])`` (k first); ours views it as ``(..., 2, heads, head_dim)``.
- FiLM ``modulation.1`` (2C, 256): first C rows = shift, last C = scale (spec §1.7), as our ``chunk(2)``.
- ``action_mlp.3`` (217, 72): row ``bin * 3 + axis`` for the 216 Euler logits, row 216 = gripper-open
  (spec §1.10), as our ``reshape(-1, n_bins, 3)`` / ``[:, -1]``.

spconv kernel layout (:func:`spconv_to_ours_weight`): spconv 2.x (``SubMConv3d``) stores ``(C_out, k0, k1,
k2, C_in)`` ("KRSC"). Its kernel index is the row-major flattening ``o = (r0 * k + r1) * k + r2`` of the
kernel coordinates (``filters.reshape(C_out, -1, C_in)`` in spconv's ``ops.py``; ``ConvLocIter`` with
the last axis fastest) and a submanifold layer pairs output site ``p`` with input site ``p + (r - k // 2)``
(``npq_to_nhw``: ``in = out * stride - padding + r``, and for submanifold layers spconv forces
``padding = k // 2``, so the stem's ``padding=1`` with ``k=5`` has no effect): a cross-correlation, like
``torch.nn.Conv3d``, with no kernel flip. The spatial axes (0, 1, 2) are the columns of Pointcept's
``grid_coord`` = (x, y, z) (``sparsify`` builds ``indices = [batch, grid_coord]``). Our
``SubMConv3d.weight`` is ``(k**3, C_in, C_out)`` with row ``o = i*k*k + j*k + l`` = displacement
``(i - r, j - r, l - r)`` along our grid's (x, y, z), also a cross-correlation. Hence
``ours = official.permute(1, 2, 3, 4, 0).reshape(k**3, C_in, C_out)``. This was read from the spconv 2.x
source, not executed against spconv (no CUDA here); if it ever proves wrong, only
:func:`spconv_to_ours_weight` / :func:`ours_to_spconv_shape` need changing.

Ignored official tensors (:data:`OFFICIAL_IGNORED`): ``anchor_embeding`` (a (1, 3) Parameter, never used
in the official forward, spec §1.1) and ``act_proj_head.heatmap_mlp.*`` (the 3D-LOTUS heat-map head, built
but unused with ``pos_pred_type: diffuse``, spec §1.10). Everything else must be present; everything of ours
is filled (BatchNorm running stats and ``num_batches_tracked`` included). Ours-only: the 3D-RoPE
frequencies ``query.necks.*.attn.rope.freqs`` are non-persistent buffers (not in ``state_dict``),
deterministic constants of the head dim; the official code computes the same table on the fly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

OFFICIAL_IGNORED = ("anchor_embeding", "act_proj_head.heatmap_mlp.")
"""Official tensors that have no counterpart and are dropped: exact names, or prefixes ending in '.'."""

# Where checkpoints nest the state dict; tried in this order when several hold tensors of equal fit.
_NESTING_KEYS = ("model", "state_dict", "model_state_dict", "ema", "module", "net")
# Leading name components of the official model's tensors; used to pick the nested dict that fits.
_OFFICIAL_ROOTS = ("ptv3_model.", "txt_fc.", "txt_attn_fc.", "act_proj_head.", "anchor_embeding")
_MAX_LISTED = 10


class OfficialCheckpointError(ValueError):
    """The official state dict does not fit the model. ``missing``, ``unexpected``, ``mis_shaped``
    (name, got shape, expected shape) and ``bad_dtype`` (name, got dtype, expected kind) hold all problems."""

    def __init__(self, missing: list[str], unexpected: list[str],
                 mis_shaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
                 bad_dtype: list[tuple[str, torch.dtype, str]] | None = None):
        self.missing, self.unexpected, self.mis_shaped = missing, unexpected, mis_shaped
        self.bad_dtype = bad_dtype or []
        parts = ["the official Mini-Diffuser state dict does not fit this model:"]

        def listing(title: str, items: list[str]) -> None:
            if items:
                more = f" (first {_MAX_LISTED} shown)" if len(items) > _MAX_LISTED else ""
                parts.append(f"{len(items)} {title}{more}:")
                parts.extend(f"  {it}" for it in items[:_MAX_LISTED])

        listing("missing official tensors", missing)
        listing("unexpected (unknown) tensors", unexpected)
        listing("mis-shaped tensors (name: got -> expected)",
                [f"{n}: got {tuple(g)} -> expected {tuple(e)}" for n, g, e in mis_shaped])
        listing("tensors of the wrong dtype kind (name: got -> expected)",
                [f"{n}: got {d} -> expected {k}" for n, d, k in self.bad_dtype])
        super().__init__("\n".join(parts))


# ------------------------------------------------------------------------------------------ reference list


def read_reference_list(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Parse the reference TSV (``name<TAB>(d0, d1, ...)<TAB>dtype``; ``#`` lines are comments).

    Returns ``{name: (shape, dtype name)}`` in file order, e.g. ``((36, 5, 5, 5, 7), "float32")``; ``()``
    is a scalar. Raises ValueError on a malformed line (with its number) or a duplicated name.
    """
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 3:
            raise ValueError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(cols)}: {line!r}")
        name, shape_text, dtype = (c.strip() for c in cols)
        inner = shape_text.strip()
        if not (inner.startswith("(") and inner.endswith(")")):
            raise ValueError(f"{path}:{lineno}: shape must look like '(d0, d1)', got {shape_text!r}")
        try:
            shape = tuple(int(d) for d in inner[1:-1].split(",") if d.strip())
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: bad shape {shape_text!r}") from e
        if name in out:
            raise ValueError(f"{path}:{lineno}: duplicate name {name!r}")
        out[name] = (shape, dtype)
    return out


# ------------------------------------------------------------------------------------------ unwrapping


def _is_tensor_dict(obj: object) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _strip_module(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a DataParallel/DDP ``module.`` prefix (the official saver strips it, others may not)."""
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _official_fit(sd: Mapping[str, torch.Tensor]) -> int:
    return sum(k.startswith(_OFFICIAL_ROOTS) for k in sd)


def unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` state dict inside a loaded checkpoint object.

    ``obj`` may be the state dict itself or a dict nesting it (up to two levels) under one of
    ``model``, ``state_dict``, ``model_state_dict``, ``ema``, ``module``, ``net``. When several candidates
    hold tensors, the one with most names of the official model (``ptv3_model.*``, ``txt_fc.*`` ...)
    wins; ties go to the earlier key in that list (so plain weights beat an EMA copy only when equally
    official-looking). A leading ``module.`` is stripped from every name.

    Raises:
        ValueError: no dict of tensors found (the message lists the top-level keys seen).
    """
    candidates: list[tuple[str, Mapping[str, torch.Tensor]]] = []

    def collect(o: object, path: str, depth: int) -> None:
        if _is_tensor_dict(o):
            candidates.append((path, o))
            return
        if depth >= 2 or not isinstance(o, Mapping):
            return
        for key in _NESTING_KEYS:
            if key in o:
                collect(o[key], f"{path}[{key!r}]", depth + 1)

    collect(obj, "checkpoint", 0)
    if not candidates:
        keys = list(obj.keys())[:20] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            "no state dict of tensors found in the checkpoint: expected {name: Tensor} itself or nested under "
            f"one of {list(_NESTING_KEYS)}; got {keys}")
    stripped = [(path, _strip_module(sd)) for path, sd in candidates]
    best = max(range(len(stripped)), key=lambda i: (_official_fit(stripped[i][1]), -i))
    return stripped[best][1]


# ------------------------------------------------------------------------------------------ layouts


def spconv_to_ours_weight(weight: torch.Tensor) -> torch.Tensor:
    """spconv 2.x SubMConv3d weight (C_out, k, k, k, C_in) -> ours (k**3, C_in, C_out).

    THE single place that fixes the kernel-offset correspondence (module docstring): spconv kernel
    coordinate (r0, r1, r2) along (x, y, z) -> our row ``(r0 * k + r1) * k + r2``; both are
    cross-correlations, so no flip. Change this and :func:`ours_to_spconv_shape` together if needed.
    """
    if weight.dim() != 5 or not (weight.shape[1] == weight.shape[2] == weight.shape[3]):
        raise ValueError(f"spconv weight must be (C_out, k, k, k, C_in), got {tuple(weight.shape)}")
    c_out, k, c_in = weight.shape[0], weight.shape[1], weight.shape[4]
    return weight.permute(1, 2, 3, 4, 0).reshape(k**3, c_in, c_out).contiguous()


def ours_to_spconv_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our (k**3, C_in, C_out) -> the official (C_out, k, k, k, C_in) shape (to check checkpoint shapes)."""
    kv, c_in, c_out = shape
    k = round(kv ** (1 / 3))
    if k**3 != kv:
        raise ValueError(f"our sparse-conv weight has {kv} kernel rows, not a cube")
    return (c_out, k, k, k, c_in)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


# kind -> (official tensor -> our tensor, our shape -> official shape)
_KINDS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[tuple[int, ...]], tuple[int, ...]]]] = {
    "copy": (_identity, lambda s: s),
    "spconv": (spconv_to_ours_weight, ours_to_spconv_shape),
}


# ------------------------------------------------------------------------------------------ name map

_WB = ("weight", "bias")
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# (official suffix, our suffix, tensor names, kind) per block type; kind "spconv" applies to the weight only
_Rule = tuple[str, str, tuple[str, ...], str]
_BLOCK: tuple[_Rule, ...] = (
    ("cpe.0", "cpe_conv", _WB, "spconv"),
    ("cpe.1", "cpe.0", _WB, "copy"),
    ("cpe.2", "cpe.1", _WB, "copy"),
    ("norm1.0", "norm1", _WB, "copy"),
    ("norm2.0", "norm2", _WB, "copy"),
    ("attn.qkv", "attn.qkv", _WB, "copy"),
    ("attn.proj", "attn.proj", _WB, "copy"),
    ("attn.q_norm", "attn.q_norm", _WB, "copy"),
    ("attn.k_norm", "attn.k_norm", _WB, "copy"),
    ("mlp.0.fc1", "mlp.0", _WB, "copy"),
    ("mlp.0.fc2", "mlp.3", _WB, "copy"),
)
_CROSS_ATTN: tuple[_Rule, ...] = tuple(
    (f"attn.{n}", f"attn.{n}", _WB, "copy") for n in ("q", "kv", "proj", "q_norm", "k_norm"))
_MLP: tuple[_Rule, ...] = (("mlp.0.fc1", "mlp.0", _WB, "copy"), ("mlp.0.fc2", "mlp.3", _WB, "copy"))
_CABLOCK: tuple[_Rule, ...] = (
    ("norm1.0", "norm1", _WB, "copy"), ("norm2.0", "norm2", _WB, "copy"), *_CROSS_ATTN, *_MLP)
_NECK: tuple[_Rule, ...] = (
    ("norm1.0.norm", "norm1.norm", _WB, "copy"),
    ("norm1.0.modulation.1", "norm1.modulation.1", _WB, "copy"),
    ("norm2.0.norm", "norm2.norm", _WB, "copy"),
    ("norm2.0.modulation.1", "norm2.modulation.1", _WB, "copy"),
    *_CROSS_ATTN, *_MLP,
)
_CONVBLOCK: tuple[_Rule, ...] = (
    ("conv.0", "conv", _WB, "spconv"), ("conv.1", "post.0", _WB, "copy"), ("conv.2", "post.1", _WB, "copy"))
_POOL: tuple[_Rule, ...] = (("proj", "proj", _WB, "copy"), ("norm.0", "norm.0", _BN, "copy"))
_UNPOOL: tuple[_Rule, ...] = (
    ("proj.0", "proj.0", _WB, "copy"), ("proj.1", "proj.1.0", _BN, "copy"),
    ("proj_skip.0", "proj_skip.0", _WB, "copy"), ("proj_skip.1", "proj_skip.1.0", _BN, "copy"),
)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _expand(off_prefix: str, our_prefix: str, rules: tuple[_Rule, ...], out: dict[str, tuple[str, str]]):
    for off_sfx, our_sfx, names, kind in rules:
        for n in names:
            k = kind if n == "weight" else "copy"
            out[_join(off_prefix, off_sfx, n)] = (_join(our_prefix, our_sfx, n), k)


def official_name_map(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``{official name: (our name, kind)}`` for ``model``; kind is ``"copy"`` or ``"spconv"``.

    Built from the model's stage counts (5 encoder / 4 decoder stages in the paper preset), so the map is
    exactly what our modules hold. Raises ValueError for a model this import cannot describe (the
    transformer backbone, the joint head, or ``local_query=False``, none of which the official model has).
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None or cfg.backbone != "ptv3" or cfg.head != "decoupled" or not cfg.local_query:
        raise ValueError("official weights fit only a MiniDiffuser with backbone='ptv3', head='decoupled' and "
                         "local_query=True (the released architecture; use preset 'paper')")
    bb = model.backbone
    n_enc, n_dec = len(bb.enc_blocks), len(bb.dec_blocks)
    m: dict[str, tuple[str, str]] = {}
    _expand("txt_fc", "text.proj", (("", "", _WB, "copy"),), m)
    _expand("txt_attn_fc", "text.attn", (("", "", _WB, "copy"),), m)
    P = "ptv3_model"
    _expand(f"{P}.embedding.stem", "backbone.embedding",
            (("conv", "conv", ("weight",), "spconv"), ("norm", "norm.0", _BN, "copy")), m)
    for s in range(n_enc):
        if s > 0:
            _expand(f"{P}.enc.enc{s}.down", f"backbone.pools.{s - 1}", _POOL, m)
        _expand(f"{P}.enc.enc{s}.block0", f"backbone.enc_blocks.{s}", _BLOCK, m)
        _expand(f"{P}.enc.enc{s}.ca_block0", f"backbone.enc_cross.{s}", _CABLOCK, m)
    _expand(f"{P}.mid_conv", "backbone.mid_conv", _CONVBLOCK, m)
    for s in range(n_dec):
        _expand(f"{P}.dec.dec{s}.up", f"backbone.unpools.{s}", _UNPOOL, m)
        _expand(f"{P}.dec.dec{s}.block0", f"backbone.dec_blocks.{s}", _BLOCK, m)
        _expand(f"{P}.dec.dec{s}.ca_block0", f"backbone.dec_cross.{s}", _CABLOCK, m)
        _expand(f"{P}.dec.dec{s}.conv0", f"backbone.dec_convs.{s}", _CONVBLOCK, m)
    _expand(f"{P}.anchor_proj.0", "query.anchor_proj",
            (("fc1", "0", _WB, "copy"), ("fc2", "2", _WB, "copy")), m)
    # our necks run coarsest first: bottleneck, then after decoder stages n_dec-1 ... 0 (see module docstring)
    neck_names = [f"neck{s}" for s in reversed(range(n_dec))] + ["neck_final"]
    for i, name in enumerate(neck_names):
        _expand(f"{P}.nec.{name}", f"query.necks.{i}", _NECK, m)
    _expand("act_proj_head", "query", (("denoise_mlp.0", "denoise_mlp.0", _WB, "copy"),
                                       ("denoise_mlp.3", "denoise_mlp.3", _WB, "copy")), m)
    _expand("act_proj_head", "head", (("action_mlp.0", "mlp.0", _WB, "copy"),
                                      ("action_mlp.3", "mlp.3", _WB, "copy")), m)
    return m


def is_ignored(name: str) -> bool:
    """True for the official tensors in :data:`OFFICIAL_IGNORED` (exact names, or prefixes ending in '.')."""
    return any(name == p or (p.endswith(".") and name.startswith(p)) for p in OFFICIAL_IGNORED)


# ------------------------------------------------------------------------------------------ conversion


def convert_official_state_dict(official: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict for ``model`` (our MiniDiffuser, preset ``paper``) from the official one.

    ``official`` is the unwrapped official state dict (:func:`unwrap_state_dict`). Each tensor is
    converted by its kind (spconv kernels re-laid out, everything else unchanged) and cast to the dtype
    of the tensor it replaces. Ignored names (:data:`OFFICIAL_IGNORED`) are dropped. The result has
    exactly ``model.state_dict()``'s keys, so ``model.load_state_dict(result, strict=True)`` works.
    Tensors that need no re-layout may alias ``official``'s storage (``load_state_dict`` copies).

    Raises:
        OfficialCheckpointError: listing every missing official tensor, every unknown one, every shape
            mismatch (in the official layout) and every float/integer mix-up, all at once.
        ValueError: ``model`` is not a MiniDiffuser variant the official weights can describe.
    """
    name_map = official_name_map(model)
    ours = model.state_dict()
    targets = {our for our, _ in name_map.values()}
    if targets != set(ours) or len(targets) != len(name_map):
        lacking, extra = sorted(set(ours) - targets), sorted(targets - set(ours))
        raise ValueError(f"internal name map does not cover the model exactly: model tensors without a source "
                         f"{lacking[:_MAX_LISTED]}, mapped names the model lacks {extra[:_MAX_LISTED]}")
    missing = [n for n in name_map if n not in official]
    unexpected = [n for n in official if n not in name_map and not is_ignored(n)]
    mis_shaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    bad_dtype: list[tuple[str, torch.dtype, str]] = []
    for off_name, (our_name, kind) in name_map.items():
        if off_name not in official:
            continue
        t, target = official[off_name], ours[our_name]
        if not isinstance(t, torch.Tensor):
            mis_shaped.append((off_name, (), tuple(target.shape)))
            continue
        expected = _KINDS[kind][1](tuple(target.shape))
        if tuple(t.shape) != expected:
            mis_shaped.append((off_name, tuple(t.shape), expected))
        if t.is_floating_point() != target.is_floating_point():
            bad_dtype.append((off_name, t.dtype, "floating point" if target.is_floating_point() else "integer"))
    if missing or unexpected or mis_shaped or bad_dtype:
        raise OfficialCheckpointError(missing, unexpected, mis_shaped, bad_dtype)
    out: dict[str, torch.Tensor] = {}
    for off_name, (our_name, kind) in name_map.items():
        out[our_name] = _KINDS[kind][0](official[off_name].detach()).to(dtype=ours[our_name].dtype)
    return {k: out[k] for k in ours}


def import_official_checkpoint(ckpt: str | Path, out_dir: str | Path, data_path: str | None = None) -> dict:
    """``mdh checkpoint import-official``: a released checkpoint -> a run folder ``out_dir`` that ``mdh eval``
    reads and ``mdh train ... train.init_weights=OUT_DIR`` fine-tunes from: config.yaml and record.json of
    Mini-Diffuser ``paper`` with ``official_quirks=true`` (status done, 0 steps trained here,
    ``weights_source`` naming the file and its sha256) and ckpt/last.pt with the converted weights.

    The file is read with ``torch.load(weights_only=True)`` (nothing in it can run code); every problem of
    the state dict is listed at once (``OfficialCheckpointError``). An existing run folder is refused."""
    import hashlib
    import time

    from harness.checkpoint import save_checkpoint
    from harness.fingerprint import fingerprint, semantic_config
    from harness.launch import compose_run
    from harness.record import RunRecord
    from harness.train import build_run_policy

    ckpt, out_dir = Path(ckpt).expanduser(), Path(out_dir).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint file {ckpt}")
    if (out_dir / "record.json").exists() or (out_dir / "ckpt").exists():
        raise FileExistsError(f"{out_dir} already holds a run; choose another folder")
    try:
        obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - refused globals, truncated files: one clear line
        raise ValueError(f"cannot read {ckpt} safely (weights only): {str(e).splitlines()[0]}") from None
    official = unwrap_state_dict(obj)
    overrides = ["model=minidiffuser", "model.preset=paper", "model.options.official_quirks=true",
                 *([f"data.path={data_path}"] if data_path else []), f"hydra.run.dir={out_dir}"]
    cfg, resolved, yaml_text, _ = compose_run(overrides)
    policy = build_run_policy(cfg, None)
    policy.load_state_dict(convert_official_state_dict(official, policy), strict=True)
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    source = {"path": str(ckpt.resolve()), "sha256": digest, "imported_from": "official Mini-Diffuser "
              "(utomm/mini-diffuse-actor, DiffPolicyPTV3)", "ignored": [k for k in official if is_ignored(k)]}
    (out_dir / "ckpt").mkdir(parents=True)
    (out_dir / "config.yaml").write_text(yaml_text)
    save_checkpoint(out_dir / "ckpt" / "last.pt", {"model": policy.state_dict(), "step": 0,
                                                  "imported_from": source})
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    RunRecord(out_dir).update(
        run_id=out_dir.name, status="done", config=resolved, semantic_config=semantic_config(cfg),
        fingerprint=fingerprint(cfg), overrides=overrides, model="minidiffuser", preset="paper",
        ablation={"official_quirks": True}, params=sum(p.numel() for p in policy.parameters()),
        steps_total=0, steps_done=0, weights_source=source, started_at=now, finished_at=now)
    return source
