"""q/k RMSNorm + rotary embedding of FLUX attention layers, fused, and the
rotary helpers that place cached reference keys.

diffusers' ``FluxAttnProcessor`` does, on ``[B, L, H, D]`` projections::

    q = attn.norm_q(q); k = attn.norm_k(k)              # torch.nn.RMSNorm, eps 1e-6
    q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
    k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

with ``image_rotary_emb = (cos, sin)``, each ``[L, D]`` fp32 from ``FluxPosEmbed``
(repeat-interleaved, so adjacent pairs ``(x[2i], x[2i+1])`` rotate together).
:func:`qk_norm_rope` computes exactly that, with the same dtype behaviour: the
norm runs in fp32 and its output is rounded to the input dtype, the rotation runs
in fp32 from that rounded value and is rounded again. The ``triton`` backend does
q and k in one pass, as does the ``cuda`` backend (the precompiled kernel of
``csrc/qk_norm_rope.cu``, when ``storyattn._C`` is built); the ``torch`` backend
calls the norm modules themselves and the same rotation formula
(differentiable, any device).

:func:`qk_norm_rope_into_cache` also writes the image tokens' keys (optionally
rotated once more, see docs/design.md, "Where reference keys sit") and values into a
preallocated reference pool in that pass. :func:`reference_key_rotary` gives the
extra rotation of entry ``i`` (ids ``(i + 1, 0, 0)``) from the model's own
``FluxPosEmbed``; :func:`rotate_keys` applies it to keys already rotated.

The backend is picked by the registry that picks segment attention's
(:mod:`storyattn.backends`: availability, per-call checks, priorities), and the fused
kernels run inside ``torch.library`` custom ops (``storyattn::qk_norm_rope_fused`` and
``..._into_pool``), so errors and ``torch.compile`` behave as for
:func:`storyattn.segment_attention`.  Triton is imported only when the ``triton`` backend
runs.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from . import backends as _backends
from .backends._custom_op import run_qk
from .backends._qk import apply_rotary, is_diffusers_rmsnorm
from .backends.base import QK_NORM_ROPE, QKNormRopeInputs, QKPool, Rotary

__all__ = [
    "qk_norm_rope",
    "qk_norm_rope_into_cache",
    "rotate_keys",
    "reference_key_rotary",
    "QK_NORM_ROPE_BACKENDS",
]

# the backends of the registry that implement this op (storyattn.backends)
QK_NORM_ROPE_BACKENDS = ("torch", "triton", "cuda")


def rotate_keys(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate keys that already carry their own RoPE by one more fixed angle.

    Used to place a reference's cached image-token keys at another rotary position:
    RoPE is a rotation per pair, so ``R(a) R(p) k = R(a + p) k`` and keys computed at
    ids ``(0, row, col)`` move to ``(i + 1, row, col)`` by one extra rotation with
    the (cos, sin) of ids ``(i + 1, 0, 0)`` (see :func:`reference_key_rotary`).
    Values are never rotated.

    Args:
        k: ``[N, L, H, D]`` keys (any float dtype; computed in fp32, returned in
            ``k.dtype``, the rounding diffusers' ``apply_rotary_emb`` uses).
        cos, sin: ``[D]`` (one angle for every row) or ``[N, D]`` (one per row of k,
            e.g. one per pool entry).

    Returns:
        A new ``[N, L, H, D]`` tensor.

    Example::

        cos, sin = reference_key_rotary(transformer.pos_embed, num_entries=3)
        placed = rotate_keys(ref_k, cos, sin)      # ref_k: [3, Lr, H, D]
    """
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a [N, L, H, D] tensor, got "
                         f"{tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}")
    if not k.is_floating_point():
        raise TypeError(f"k must be a floating tensor, got {k.dtype}")
    N, _, _, D = k.shape
    if D % 2:
        raise ValueError(f"head dim of k must be even to rotate pairs, got D = {D}")
    for t, name in ((cos, "cos"), (sin, "sin")):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor")
        if tuple(t.shape) not in ((D,), (N, D)):
            raise ValueError(f"{name} must have shape ({D},) or ({N}, {D}) for k of shape "
                             f"{tuple(k.shape)}, got {tuple(t.shape)}")
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device} but k is on {k.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    if cos.dim() == 2:
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]
    return apply_rotary(k, cos, sin)


def reference_key_rotary(pos_embed: torch.nn.Module, num_entries: int, *,
                         first_entry: int = 0,
                         device: Optional[Union[str, torch.device]] = None) -> Rotary:
    """Per-entry extra rotation that places reference ``i``'s keys at index position ``i + 1``.

    Returns the (cos, sin) of ids ``(i + 1, 0, ..., 0)`` for ``i = first_entry ..
    first_entry + num_entries - 1``, computed by calling ``pos_embed`` itself (a
    diffusers ``FluxPosEmbed``, e.g. ``transformer.pos_embed``, ``theta=10000,
    axes_dim=[16, 56, 56]`` for FLUX.1), so the angles are the model's to the bit.
    Only the first ``axes_dim[0]`` columns rotate; the others have cos 1, sin 0.

    Args:
        pos_embed: module mapping float ids ``[S, n_axes]`` to ``(cos, sin)`` ``[S, D]``;
            ``n_axes`` is read from its ``axes_dim``.
        num_entries: number of entries (rows of the result), ``>= 0``.
        first_entry: number of the first entry (a cache extended later keeps its
            entries' positions).
        device: where to compute; defaults to the device of ``pos_embed``'s
            parameters or buffers, else CPU.

    Returns:
        ``(cos, sin)``, each ``[num_entries, D]`` as ``pos_embed`` returns them (fp32
        for ``FluxPosEmbed``); feed them to :func:`rotate_keys` or as
        ``pool_rotary`` of :func:`qk_norm_rope_into_cache` (one row per written row).
    """
    axes = getattr(pos_embed, "axes_dim", None)
    if not callable(pos_embed) or axes is None:
        raise TypeError("pos_embed must be a FluxPosEmbed-like module with an `axes_dim` "
                        f"attribute, got {type(pos_embed).__name__}")
    if int(num_entries) != num_entries or num_entries < 0:
        raise ValueError(f"num_entries must be a non-negative int, got {num_entries!r}")
    if int(first_entry) != first_entry or first_entry < 0:
        raise ValueError(f"first_entry must be a non-negative int, got {first_entry!r}")
    if device is None:
        tensors = list(pos_embed.parameters()) + list(pos_embed.buffers()) \
            if isinstance(pos_embed, torch.nn.Module) else []
        device = tensors[0].device if tensors else torch.device("cpu")
    ids = torch.zeros(int(num_entries), len(axes), device=device)
    ids[:, 0] = torch.arange(first_entry + 1, first_entry + num_entries + 1, device=device,
                             dtype=ids.dtype)
    cos, sin = pos_embed(ids)
    return cos, sin


# ----------------------------------------------------------------------------- checks

def _check_qk(q, k, image_rotary_emb) -> Optional[Rotary]:
    for t, name in ((q, "q"), (k, "k")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, L, H, D] (diffusers layout), got shape "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(k.shape) != tuple(q.shape):
        raise ValueError(f"k must have the shape of q: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must share a dtype: q {q.dtype}, k {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"q and k must be on one device: q {q.device}, k {k.device}")
    if image_rotary_emb is None:
        return None
    _, L, _, D = q.shape
    cos, sin = _check_rotary_pair(image_rotary_emb, "image_rotary_emb", "[L, D]", (L, D),
                                  f"for q of shape {tuple(q.shape)}", q)
    if D % 2:
        raise ValueError(f"head dim must be even to rotate pairs, got D = {D}")
    return cos, sin


def _check_rotary_pair(pair, name: str, layout: str, shape, hint: str, q) -> Rotary:
    """A ``(cos, sin)`` pair of floating tensors of ``shape`` on q's device."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} must be a (cos, sin) pair of {layout} tensors or None, "
                        f"got {type(pair).__name__}")
    for t, part in zip(pair, ("cos", "sin")):
        label = f"{name} {part}"
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{label} must be a floating tensor")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{label} must be {layout} = {tuple(shape)} {hint}, got "
                             f"{tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{label} is on {t.device} but q is on {q.device}")
    return pair[0], pair[1]


def _check_norm(norm, name: str, head_dim: int):
    if norm is None:
        return
    if not isinstance(norm, torch.nn.Module):
        raise TypeError(f"{name} must be an RMSNorm module or None, got {type(norm).__name__}")
    if isinstance(norm, torch.nn.RMSNorm):
        shape = norm.normalized_shape
    elif is_diffusers_rmsnorm(norm):
        shape = norm.dim
    else:  # another module: the torch backend calls it as it is
        return
    if tuple(shape) != (head_dim,):
        raise ValueError(f"{name} normalises shape {tuple(shape)} but the head dim is {head_dim}")


# ----------------------------------------------------------------------------- public ops

def qk_norm_rope(q: torch.Tensor, k: torch.Tensor,
                 norm_q: Optional[torch.nn.Module], norm_k: Optional[torch.nn.Module],
                 image_rotary_emb: Optional[Rotary], *,
                 backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``norm_q(q)``, ``norm_k(k)`` then FLUX RoPE on both, as ``FluxAttnProcessor`` does.

    Args:
        q, k: ``[B, L, H, D]`` (diffusers layout: batch, tokens, heads, head dim),
            same shape, dtype and device. Any strides (slices of a fused qkv
            projection are fine).
        norm_q, norm_k: the attention's ``norm_q``/``norm_k`` (``torch.nn.RMSNorm``,
            as in ``FluxAttention``, or diffusers' ``RMSNorm``), or ``None`` to skip
            that norm. Weight and eps are read from them.
        image_rotary_emb: ``(cos, sin)``, each ``[L, D]`` (from ``FluxPosEmbed``), or
            ``None`` to skip the rotation.
        backend: ``"torch"`` (any device, differentiable), ``"triton"`` (one fused
            pass; CUDA, or CPU under ``TRITON_INTERPRET=1``; forward only),
            ``"cuda"`` (the precompiled ``csrc`` kernel of ``storyattn._C``; forward
            only, both norms and the rotation present, one eps) or ``None``: triton
            on CUDA when no gradient is needed and the kernel can reproduce the
            norms, else torch.

    Returns:
        New ``(q, k)``, ``[B, L, H, D]``, in the dtype diffusers would give (the input
        dtype for ``torch.nn.RMSNorm``). The triton result equals the stock path
        up to the last-bit order of the fp32 sum of squares.

    Double-stream blocks norm text tokens with ``norm_added_q/k`` and image tokens
    with ``norm_q/k`` before one rotation over the concatenation: call this once per
    stream with the matching rows of ``cos``/``sin`` (``cos[:T]``, ``cos[T:]``) and
    concatenate, which gives the same result.

    Example::

        q, k = qk_norm_rope(q, k, attn.norm_q, attn.norm_k, image_rotary_emb)
    """
    rotary = _check_qk(q, k, image_rotary_emb)
    D = q.shape[-1]
    _check_norm(norm_q, "norm_q", D)
    _check_norm(norm_k, "norm_k", D)
    inputs = QKNormRopeInputs(q, k, norm_q, norm_k, rotary)
    return run_qk(_backends.select(inputs, backend, QK_NORM_ROPE), inputs)


def _as_index(pool_index, B: int, P: int, device) -> Tuple[torch.Tensor, Optional[list]]:
    """``pool_index`` as an int64 tensor on ``device``, checked, and the rows it writes
    (a list) or None (every row, under torch.compile with a tensor index).

    A list of ints is checked in Python (at trace time under torch.compile: no
    device work).  A tensor is checked on the host in eager mode; inside a compiled
    graph a host read would break the graph, so there its range is asserted on the
    device instead (duplicates are then the caller's promise)."""
    if isinstance(pool_index, torch.Tensor):
        if pool_index.is_floating_point() or pool_index.dtype == torch.bool:
            raise TypeError(f"pool_index must be an integer tensor, got {pool_index.dtype}")
        shape = tuple(pool_index.shape)
    elif isinstance(pool_index, Sequence):
        ints = [int(i) for i in pool_index]
        shape = (len(ints),)
    else:
        raise TypeError(f"pool_index must be an int tensor or a list of ints, got "
                        f"{type(pool_index).__name__}")
    if shape != (B,):
        raise ValueError(f"pool_index must have shape ({B},) (one entry per row of k), got "
                         f"{shape}")
    if isinstance(pool_index, torch.Tensor):
        idx = pool_index.to(device=device, dtype=torch.int64)
        if torch.compiler.is_compiling():
            torch._assert_async(idx.ge(0).all() & idx.lt(P).all(),
                                f"pool_index values must lie in [0, P = {P}) under torch.compile "
                                "(pass a list of ints to skip rows with -1)")
            return idx, None
        ints = idx.cpu().tolist()
    if B and (min(ints) < -1 or max(ints) >= P):
        raise ValueError(f"pool_index values must lie in [-1, P = {P}), got {ints}")
    used = [e for e in ints if e >= 0]
    if len(used) != len(set(used)):
        raise ValueError(f"pool_index has duplicate entries: {ints}")
    if not isinstance(pool_index, torch.Tensor):
        idx = torch.tensor(ints, dtype=torch.int64, device=device)
    return idx, [b for b, e in enumerate(ints) if e >= 0]


def qk_norm_rope_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            norm_q: Optional[torch.nn.Module],
                            norm_k: Optional[torch.nn.Module],
                            image_rotary_emb: Optional[Rotary],
                            pool_k: torch.Tensor, pool_v: torch.Tensor,
                            pool_index: Union[torch.Tensor, Sequence[int]], *,
                            pool_start: int = 0,
                            pool_rotary: Optional[Rotary] = None,
                            backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`qk_norm_rope`, and in the same pass write row b's keys and values from
    token ``pool_start`` on into entry ``pool_index[b]`` of a reference pool.

    For every row ``b`` with ``pool_index[b] = e >= 0``::

        pool_k[e] = rotate_keys(k_out[b, pool_start:], *pool_rotary[b])   (or k_out[b, pool_start:])
        pool_v[e] = v[b, pool_start:]

    Other pool entries are left untouched. This is the record step of the clean
    reference cache: ``pool_start`` is the text length of the sequence (only
    image tokens are cached) and ``pool_rotary`` the rows of
    :func:`reference_key_rotary` for the entries written (keys placed at index
    position ``e + 1``).

    Args:
        q, k, v: ``[B, L, H, D]``; v has k's dtype and device.
        norm_q, norm_k, image_rotary_emb, backend: as in :func:`qk_norm_rope`.
        pool_k, pool_v: ``[P, L - pool_start, H, D]``, dtype and device of k;
            written in place (outside autograd: the pool holds constants).
        pool_index: ``[B]`` ints in ``[-1, P)``, ``-1`` = do not write this row;
            distinct non-negative entries.  A list of ints is checked in Python (under
            ``torch.compile`` at trace time, so the call compiles into one graph); a
            tensor is checked on the host in eager mode, and inside a compiled graph
            (no host reads there) only asserted on the device to lie in ``[0, P)``.
        pool_start: first pooled token, ``0 <= pool_start <= L``.
        pool_rotary: ``(cos, sin)``, each ``[B, D]`` (one row per row of k), or None.

    Returns:
        ``(q, k)`` exactly as :func:`qk_norm_rope` returns them (not placed).
    """
    rotary = _check_qk(q, k, image_rotary_emb)
    B, L, H, D = q.shape
    _check_norm(norm_q, "norm_q", D)
    _check_norm(norm_k, "norm_k", D)
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != (B, L, H, D):
        raise ValueError(f"v must be a tensor of the shape of k {(B, L, H, D)}, got "
                         f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    if v.dtype != k.dtype or v.device != k.device:
        raise TypeError(f"v ({v.dtype}, {v.device}) must match k ({k.dtype}, {k.device})")
    if isinstance(pool_start, bool) or int(pool_start) != pool_start or not 0 <= pool_start <= L:
        raise ValueError(f"pool_start must be an int in [0, L = {L}], got {pool_start!r}")
    pool_start = int(pool_start)
    for t, name in ((pool_k, "pool_k"), (pool_v, "pool_v")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a [P, Lr, H, D] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        want = (t.shape[0], L - pool_start, H, D)
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape [P, L - pool_start, H, D] = {want} for k "
                             f"{tuple(k.shape)} and pool_start {pool_start}, got {tuple(t.shape)}")
        if t.dtype != k.dtype or t.device != k.device:
            raise TypeError(f"{name} ({t.dtype}, {t.device}) must match k ({k.dtype}, {k.device})")
    if pool_v.shape[0] != pool_k.shape[0]:
        raise ValueError(f"pool_k and pool_v hold different entry counts: {pool_k.shape[0]} vs "
                         f"{pool_v.shape[0]}")
    idx, rows = _as_index(pool_index, B, pool_k.shape[0], q.device)
    pcos = psin = None
    if pool_rotary is not None:
        pcos, psin = _check_rotary_pair(pool_rotary, "pool_rotary", "[B, D]", (B, D),
                                        "(one row per row of k)", q)

    inputs = QKNormRopeInputs(q, k, norm_q, norm_k, rotary)
    pool = QKPool(v, pool_k, pool_v, idx, rows, pool_start, pcos, psin)
    return run_qk(_backends.select(inputs, backend, QK_NORM_ROPE), inputs, pool)
