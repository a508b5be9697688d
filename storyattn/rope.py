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

Triton is imported only when the ``triton`` backend runs.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "qk_norm_rope",
    "qk_norm_rope_into_cache",
    "rotate_keys",
    "reference_key_rotary",
    "QK_NORM_ROPE_BACKENDS",
]

QK_NORM_ROPE_BACKENDS = ("torch", "triton", "cuda")

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TRITON_MAX_HEAD_DIM = 256

Rotary = Tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- torch math

def _rotate_half_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x[2i], x[2i+1]) -> (-x[2i+1], x[2i]) on the last dim (FLUX pairing)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`` formula.

    ``cos``/``sin`` must already broadcast against ``x``. The products run in fp32
    (``x.float()``) and the result is cast back to ``x.dtype``, as diffusers does,
    so a bf16 input is rounded exactly once by the rotation.
    """
    return (x.float() * cos + _rotate_half_pairs(x).float() * sin).to(x.dtype)


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
    return _apply_rotary(k, cos, sin)


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
    elif _is_diffusers_rmsnorm(norm):
        shape = norm.dim
    else:  # another module: the torch backend calls it as it is
        return
    if tuple(shape) != (head_dim,):
        raise ValueError(f"{name} normalises shape {tuple(shape)} but the head dim is {head_dim}")


def _is_diffusers_rmsnorm(norm) -> bool:
    cls = type(norm)
    return cls.__name__ == "RMSNorm" and cls.__module__.startswith("diffusers.")


def _norm_params(norm, dtype: torch.dtype):
    """``(weight, eps, round_before_weight)`` that make the kernel equal ``norm``,
    or a string saying why the kernel cannot reproduce it."""
    if norm is None:
        return None
    if isinstance(norm, torch.nn.RMSNorm):
        # torch: fp32 normalise, multiply by the weight in fp32, one cast back.
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        return norm.weight, float(eps), False
    if _is_diffusers_rmsnorm(norm):
        weight = norm.weight
        if getattr(norm, "bias", None) is not None:
            return "diffusers RMSNorm with a bias"
        if weight is None or (weight.dtype == dtype == torch.float32):
            return weight, float(norm.eps), False
        if weight.dtype == dtype and dtype in (torch.float16, torch.bfloat16):
            # diffusers casts the normalised value to the half weight dtype first.
            return weight, float(norm.eps), True
        return (f"diffusers RMSNorm with a {weight.dtype} weight changes a {dtype} input's "
                "dtype; only the torch backend reproduces that")
    return f"norm module {type(norm).__name__} (only torch.nn.RMSNorm and diffusers RMSNorm)"


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _fused_reason(q, k, norm_q, norm_k, extra, kernel: str, max_head_dim: int
                  ) -> Optional[str]:
    """What both fused kernels (triton, cuda) need: a supported dtype and head dim,
    norms they can reproduce, on q's device, and no gradients."""
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} (supported: float32, float16, bfloat16)"
    if q.shape[-1] > max_head_dim:
        return f"head dim {q.shape[-1]} > {max_head_dim}"
    for norm, name in ((norm_q, "norm_q"), (norm_k, "norm_k")):
        p = _norm_params(norm, q.dtype)
        if isinstance(p, str):
            return f"{name}: {p}"
        if p is not None and p[0] is not None and p[0].device != q.device:
            return f"{name} weight is on {p[0].device} but q is on {q.device}"
    weights = [getattr(n, "weight", None) for n in (norm_q, norm_k) if n is not None]
    if _grad_needed(q, k, *weights, *extra):
        return (f"gradients are required and the {kernel} kernel is forward only; use "
                "backend='torch' or run under torch.no_grad()")
    return None


def _triton_reason(q, k, norm_q, norm_k, extra=(), rotary=None) -> Optional[str]:
    """Why the triton backend cannot run these inputs, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e}); pip install triton"
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return (f"tensors are on {q.device}; the triton kernel needs CUDA "
                "(or TRITON_INTERPRET=1 to run it on the CPU, slowly)")
    return _fused_reason(q, k, norm_q, norm_k, extra, "triton", _TRITON_MAX_HEAD_DIM)


def _cuda_reason(q, k, norm_q, norm_k, extra=(), rotary=None) -> Optional[str]:
    """Why the ``csrc`` kernel cannot run these inputs, or None when it can."""
    from .backends import _cuda_ext

    why = _cuda_ext.extension_error()
    if why is not None:
        return why
    want = _cuda_ext.kernel_device_type()
    if q.device.type != want:
        return f"tensors are on {q.device}; the cuda kernel needs {want} tensors"
    if rotary is None:
        return "no image_rotary_emb: the cuda kernel always rotates (use 'torch' or 'triton')"
    for norm, name in ((norm_q, "norm_q"), (norm_k, "norm_k")):
        if norm is None:
            return f"{name} is None: the cuda kernel always normalises (use 'torch' or 'triton')"
    why = _fused_reason(q, k, norm_q, norm_k, extra, "cuda",
                        _cuda_ext.QK_NORM_ROPE_MAX_HEAD_DIM)
    if why is not None:
        return why
    eps = {_norm_params(n, q.dtype)[1] for n in (norm_q, norm_k)}
    if len(eps) > 1:
        return f"norm_q and norm_k use different eps {sorted(eps)}; the cuda kernel takes one"
    return None


_FUSED_REASONS = {"triton": _triton_reason, "cuda": _cuda_reason}


def _pick_backend(backend, q, k, norm_q, norm_k, extra=(), rotary=None) -> str:
    if backend is None:
        if q.device.type == "cuda" and _triton_reason(q, k, norm_q, norm_k, extra) is None:
            return "triton"
        return "torch"
    if backend not in QK_NORM_ROPE_BACKENDS:
        raise ValueError(f"backend must be one of {QK_NORM_ROPE_BACKENDS} or None, got {backend!r}")
    if backend in _FUSED_REASONS:
        why = _FUSED_REASONS[backend](q, k, norm_q, norm_k, extra, rotary)
        if why is not None:
            raise ValueError(f"qk_norm_rope backend {backend!r} cannot run here: {why}")
    return backend


# ----------------------------------------------------------------------------- public ops

def _torch_qk_norm_rope(q, k, norm_q, norm_k, rotary):
    # Calling the modules keeps whatever they do (and any hooks or adapters on
    # them) identical to the stock processor.
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    if rotary is not None:
        cos, sin = rotary
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        q = _apply_rotary(q, cos, sin)
        k = _apply_rotary(k, cos, sin)
    return q, k


def _triton_call(q, k, norm_q, norm_k, rotary, **pool):
    from storyattn.kernels.qk_norm_rope import qk_norm_rope_fwd

    params = []
    for norm in (norm_q, norm_k):
        p = _norm_params(norm, q.dtype)
        if p is None:  # no norm: the kernel skips it (weight and eps unused)
            params.append((None, 0.0, False, False))
        else:
            w, eps, rnd = p
            params.append((w.detach() if w is not None else None, eps, rnd, True))
    (wq, eq, rq, nq), (wk, ek, rk, nk) = params
    cos, sin = rotary if rotary is not None else (None, None)
    return qk_norm_rope_fwd(q, k, wq, wk, cos, sin, (eq, ek), round_before_weight=(rq, rk),
                            normalize=(nq, nk), **pool)


def _pair_ready(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The cuda kernel moves RoPE pairs as one access: unit stride on the last
    dim, even other strides, pair-aligned address.  Copy only when that fails."""
    if t is None:
        return None
    ok = (t.stride(-1) == 1 and all(s % 2 == 0 for s in t.stride()[:-1])
          and t.data_ptr() % (2 * t.element_size()) == 0)
    return t if ok else t.contiguous()


def _table(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else _pair_ready(t.float())


def _cuda_call(q, k, norm_q, norm_k, rotary, *, v=None, pool_k=None, pool_v=None,
               pool_index=None, pool_start=0, pool_cos=None, pool_sin=None):
    from .backends._cuda_ext import qk_norm_rope_cuda

    wq, eps, rq = _norm_params(norm_q, q.dtype)
    wk, _, rk = _norm_params(norm_k, q.dtype)
    cos, sin = rotary
    for pool, name in ((pool_k, "pool_k"), (pool_v, "pool_v")):
        if pool is not None and _pair_ready(pool) is not pool:
            raise ValueError(f"{name} must have a unit-stride head dim, even strides and a "
                             "pair-aligned address for the cuda backend (it is written in place)")
    return qk_norm_rope_cuda(
        _pair_ready(q), _pair_ready(k),
        None if wq is None else _pair_ready(wq.detach()),
        None if wk is None else _pair_ready(wk.detach()),
        _table(cos), _table(sin), eps, round_norm=True,
        q_round_before_weight=rq, k_round_before_weight=rk,
        v=_pair_ready(v), pool_k=pool_k, pool_v=pool_v,
        entry_ids=None if pool_index is None else pool_index.contiguous(),
        img_start=pool_start, extra_cos=_table(pool_cos), extra_sin=_table(pool_sin))


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
    chosen = _pick_backend(backend, q, k, norm_q, norm_k, rotary=rotary)
    if chosen == "triton":
        return _triton_call(q, k, norm_q, norm_k, rotary)
    if chosen == "cuda":
        return _cuda_call(q, k, norm_q, norm_k, rotary)
    return _torch_qk_norm_rope(q, k, norm_q, norm_k, rotary)


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

    chosen = _pick_backend(backend, q, k, norm_q, norm_k, rotary=rotary)
    if chosen in ("triton", "cuda"):
        call = _triton_call if chosen == "triton" else _cuda_call
        return call(q, k, norm_q, norm_k, rotary, v=v, pool_k=pool_k, pool_v=pool_v,
                    pool_index=idx, pool_start=pool_start, pool_cos=pcos, pool_sin=psin)

    q_out, k_out = _torch_qk_norm_rope(q, k, norm_q, norm_k, rotary)
    if rows is None or len(rows):
        with torch.no_grad():
            keys, vals, entries = k_out.detach()[:, pool_start:], v.detach()[:, pool_start:], idx
            if rows is not None and len(rows) < B:
                sel = torch.tensor(rows, dtype=torch.int64, device=q.device)
                keys, vals, entries = keys[sel], vals[sel], idx[sel]
                if pcos is not None:
                    pcos, psin = pcos[sel], psin[sel]
            if pcos is not None:
                keys = rotate_keys(keys, pcos, psin)
            pool_k.index_copy_(0, entries, keys)
            pool_v.index_copy_(0, entries, vals)
    return q_out, k_out
