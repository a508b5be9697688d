"""Clean-reference key/value cache of Group-Shared Attention (see docs/design.md and docs/cache-format.md).

A :class:`ReferenceKVCache` holds, for every attention layer of a FLUX transformer,
the pool ``(ref_k, ref_v)`` of the reference images' **image tokens** after q/k
RMSNorm and RoPE, keys already *placed* (one extra rotation of entry ``i`` by the
angle of ids ``(i + 1, 0, 0)`` under the default placement), in the model's dtype
and on its device.  Entry ``i`` is the ``i``-th reference recorded.

Storage is one contiguous ``[capacity, Lr, H, D]`` tensor per layer for keys and
one for values; replay hands ``storage[:len(cache)]`` (a contiguous view, no copy,
no per-call concatenation) straight to :func:`storyattn.segment_attention`.

The cache is filled by ``GroupSharedAttention.record(cache)`` and read by
``GroupSharedAttention.replay(cache)``; it records the model shape it was built for
(:class:`CacheSignature`) and refuses to be replayed into another one.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["ReferenceKVCache", "CacheSignature", "model_signature"]

FORMAT_NAME = "storyattn.ReferenceKVCache"
FORMAT_VERSION = 1

_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise TypeError(f"ReferenceKVCache stores float32/float16/bfloat16/float64 keys, got {dtype}")


@dataclass(frozen=True)
class CacheSignature:
    """What a cache was recorded for; replay into anything else is refused.

    ``num_double_layers``/``num_single_layers``: FLUX double-/single-stream blocks
    (cache layer ``l`` is double block ``l`` for ``l < num_double_layers``, else
    single block ``l - num_double_layers``); ``num_heads``/``head_dim``: per
    attention layer; ``dtype``: name of the stored dtype; ``num_image_tokens``:
    tokens per entry (``Lr``); ``placement``: how keys were placed (``"index"``,
    ``"none"`` or ``"custom:<name>"``).
    """

    num_double_layers: int
    num_single_layers: int
    num_heads: int
    head_dim: int
    dtype: str
    num_image_tokens: int
    placement: str

    @property
    def num_layers(self) -> int:
        return self.num_double_layers + self.num_single_layers


def _config_of(transformer_or_config) -> dict:
    cfg = getattr(transformer_or_config, "config", transformer_or_config)
    if not hasattr(cfg, "get"):  # diffusers FrozenDict is a dict; accept plain dicts too
        raise TypeError("expected a FluxTransformer2DModel or its config dict, got "
                        f"{type(transformer_or_config).__name__}")
    missing = [k for k in ("num_layers", "num_single_layers", "num_attention_heads",
                           "attention_head_dim") if cfg.get(k) is None]
    if missing:
        raise ValueError(f"transformer config lacks {missing}; is this a FLUX transformer config?")
    return cfg


def model_signature(transformer_or_config) -> Tuple[int, int, int, int]:
    """``(num_double_layers, num_single_layers, num_heads, head_dim)`` of a FLUX
    transformer or its config dict."""
    cfg = _config_of(transformer_or_config)
    return (int(cfg["num_layers"]), int(cfg["num_single_layers"]),
            int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"]))


class ReferenceKVCache:
    """Per-layer pool of cached reference keys/values (image tokens only).

    Args:
        capacity: entries to allocate room for at the first write (the pool grows
            exactly to what is needed otherwise, so ``allocated_nbytes`` stays
            predictable; pass the final entry count when recording in several
            forwards to avoid re-allocations).

    Typical use (through :class:`storyattn.GroupSharedAttention`)::

        cache = ReferenceKVCache()
        with gsa.record(cache):           # references at timestep 0
            transformer(...)
        with gsa.replay(cache):           # targets read every entry
            transformer(...)
        cache.save("round3.safetensors"); cache = ReferenceKVCache.load("round3.safetensors")

    ``len(cache)`` is the number of entries, ``cache.nbytes`` the bytes they hold.
    """

    def __init__(self, capacity: Optional[int] = None):
        if capacity is not None and (int(capacity) != capacity or capacity < 0):
            raise ValueError(f"capacity must be a non-negative int or None, got {capacity!r}")
        self._capacity_hint = int(capacity or 0)
        self._k: List[Optional[torch.Tensor]] = []
        self._v: List[Optional[torch.Tensor]] = []
        self._len = 0
        self._signature: Optional[CacheSignature] = None
        self._pending_sig: Optional[CacheSignature] = None

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        if self._signature is None:
            return f"ReferenceKVCache(empty, entries={self._len})"
        s = self._signature
        return (f"ReferenceKVCache(entries={self._len}, layers={s.num_layers}, heads={s.num_heads}, "
                f"head_dim={s.head_dim}, image_tokens={s.num_image_tokens}, dtype={s.dtype}, "
                f"placement={s.placement!r}, device={self.device}, nbytes={self.nbytes})")

    @property
    def signature(self) -> Optional[CacheSignature]:
        """The :class:`CacheSignature` of the recorded entries (None when empty)."""
        return self._signature

    @property
    def num_layers(self) -> int:
        return 0 if self._signature is None else self._signature.num_layers

    @property
    def num_image_tokens(self) -> Optional[int]:
        return None if self._signature is None else self._signature.num_image_tokens

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return None if self._signature is None else _DTYPES[self._signature.dtype]

    @property
    def device(self) -> Optional[torch.device]:
        for t in self._k:
            if t is not None:
                return t.device
        return None

    @property
    def capacity(self) -> int:
        """Entries the allocated storage can hold without growing."""
        caps = [t.shape[0] for t in self._k if t is not None]
        return min(caps) if caps else 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the entries (keys + values, every layer)."""
        if self._signature is None:
            return 0
        return self._len * self._entry_nbytes(self._signature)

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of the allocated storage (>= ``nbytes`` when capacity was reserved)."""
        return sum(t.numel() * t.element_size() for t in self._k + self._v if t is not None)

    @staticmethod
    def _entry_nbytes(sig: CacheSignature) -> int:
        item = torch.empty((), dtype=_DTYPES[sig.dtype]).element_size()
        return 2 * sig.num_layers * sig.num_image_tokens * sig.num_heads * sig.head_dim * item

    @staticmethod
    def estimate_bytes(transformer_or_config, num_entries: int, num_image_tokens: int,
                       dtype: Optional[torch.dtype] = None) -> int:
        """Bytes ``nbytes`` will be after recording ``num_entries`` references of
        ``num_image_tokens`` image tokens each, before anything is recorded.

        Args:
            transformer_or_config: a ``FluxTransformer2DModel`` or its config dict.
            num_entries: references to cache.
            num_image_tokens: packed image tokens per reference
                (``(height // 16) * (width // 16)`` for FLUX.1: 4096 at 1024^2).
            dtype: stored dtype; defaults to the transformer's dtype (required
                with a config dict).

        Example: FLUX.1-dev, 3 references at 1024^2 in bf16:
        ``2 * 57 layers * 3 * 4096 * 24 * 128 * 2 bytes`` = 8.6 GB.
        """
        nd, ns, H, D = model_signature(transformer_or_config)
        if dtype is None:
            dtype = getattr(transformer_or_config, "dtype", None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError("dtype is required when a config dict is given")
        for name, val in (("num_entries", num_entries), ("num_image_tokens", num_image_tokens)):
            if int(val) != val or val < 0:
                raise ValueError(f"{name} must be a non-negative int, got {val!r}")
        sig = CacheSignature(nd, ns, H, D, _dtype_name(dtype), int(num_image_tokens), "index")
        return int(num_entries) * ReferenceKVCache._entry_nbytes(sig)

    def layer(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(ref_k, ref_v)`` of layer ``index``: contiguous views ``[len, Lr, H, D]``
        of the storage (no copy)."""
        if self._signature is None or self._len == 0:
            raise ValueError("the ReferenceKVCache is empty: record references first "
                             "(GroupSharedAttention.record(cache))")
        if not 0 <= index < self._signature.num_layers:
            raise IndexError(f"layer {index} out of range: the cache has "
                             f"{self._signature.num_layers} layers")
        return self._k[index][:self._len], self._v[index][:self._len]

    # ------------------------------------------------------------------ mutation
    def clear(self) -> None:
        """Drop every entry and free the storage (the cache can then record anything)."""
        self._k, self._v = [], []
        self._len = 0
        self._signature = None

    def reset(self) -> None:
        """Drop every entry but keep the allocated storage (a new Story-Iter round
        of the same shape re-uses it); the next record may have another shape."""
        self._len = 0
        self._signature = None

    def reserve(self, num_entries: int) -> None:
        """Grow the storage of a non-empty cache to hold ``num_entries`` entries."""
        if self._signature is None:
            self._capacity_hint = max(self._capacity_hint, int(num_entries))
            return
        for layer in range(self._signature.num_layers):
            k = self._k[layer]
            self._grow(layer, int(num_entries), tuple(k.shape[1:]), k.dtype, k.device)

    def to(self, device: Union[str, torch.device, None] = None,
           dtype: Optional[torch.dtype] = None) -> "ReferenceKVCache":
        """Move (and/or cast) the storage in place; returns ``self``.  Casting
        re-rounds the cached keys/values, so replay equals in-batch only to the
        precision of the new dtype."""
        if dtype is not None:
            _dtype_name(dtype)
        self._k = [None if t is None else t.to(device=device, dtype=dtype) for t in self._k]
        self._v = [None if t is None else t.to(device=device, dtype=dtype) for t in self._v]
        if dtype is not None and self._signature is not None:
            self._signature = CacheSignature(**{**asdict(self._signature),
                                                "dtype": _dtype_name(dtype)})
        return self

    def extend(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
               signature: Optional[CacheSignature] = None) -> range:
        """Append entries given per layer (low-level; ``GroupSharedAttention.record``
        is the usual way).

        Args:
            keys, values: one ``[n, Lr, H, D]`` tensor per layer.  Keys must already
                be placed for the entry numbers they get (``len(self) + j``).
            signature: required when the cache is empty; must equal the cache's
                signature otherwise.

        Returns the entry numbers written.
        """
        if len(keys) != len(values):
            raise ValueError(f"got {len(keys)} key layers and {len(values)} value layers")
        if self._signature is None:
            if signature is None:
                raise ValueError("extending an empty cache needs its signature= (model shape, "
                                 "dtype, image token count, placement)")
        elif signature is not None and signature != self._signature:
            raise ValueError(f"signature {signature} differs from the cache's {self._signature}")
        sig = self._signature or signature
        if len(keys) != sig.num_layers:
            raise ValueError(f"got {len(keys)} layers, the signature has {sig.num_layers}")
        n = keys[0].shape[0] if keys else 0
        start = self._len
        self._begin(sig)
        for layer, (k, v) in enumerate(zip(keys, values)):
            if k.shape[0] != n or v.shape != k.shape:
                raise ValueError(f"layer {layer}: keys {tuple(k.shape)} / values {tuple(v.shape)} "
                                 f"do not both have {n} entries of the same shape")
            self._write(layer, start, k, v)
        self._commit(start, n, range(sig.num_layers))
        return range(start, start + n)

    def replace(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
                signature: Optional[CacheSignature] = None) -> range:
        """Make these the only entries (a new Story-Iter round), re-using the storage
        when it is large enough.  Same arguments as :meth:`extend`; keys placed for
        entry numbers ``0 .. n-1``."""
        sig = signature or self._signature
        self.reset()
        return self.extend(keys, values, signature=sig)

    # ------------------------------------------------------------------ record protocol
    # Used by GroupSharedAttention, all of it in eager code around the forward (so a
    # compiled transformer never sees the cache's entry count, storage growth or
    # signature, which change from call to call): _begin and _record_slots before a
    # record forward, each layer's processor writes into its slot, _commit after the
    # forward.  Entries become visible (len, nbytes) only at _commit, so a failed
    # forward leaves the cache as it was (its storage possibly grown).
    def _begin(self, sig: CacheSignature) -> int:
        if self._signature is not None and self._len > 0:
            self.check_signature(sig, what="record into")
        elif self._signature is not None and self._signature != sig:
            self._signature = None
        if len(self._k) != sig.num_layers:
            self._k = [None] * sig.num_layers
            self._v = [None] * sig.num_layers
        self._pending_sig = sig
        return self._len

    def _grow(self, layer: int, need: int, entry_shape: Tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> None:
        cur = self._k[layer]
        if (cur is not None and cur.shape[0] >= need and tuple(cur.shape[1:]) == entry_shape
                and cur.dtype == dtype and cur.device == device):
            return
        cap = max(need, self._capacity_hint)
        new_k = torch.empty((cap,) + entry_shape, dtype=dtype, device=device)
        new_v = torch.empty_like(new_k)
        if cur is not None and self._len:
            # Same per-entry shape and dtype (the signature guarantees it); copy_ also
            # moves entries recorded on another device.
            new_k[:self._len].copy_(cur[:self._len])
            new_v[:self._len].copy_(self._v[layer][:self._len])
        self._k[layer], self._v[layer] = new_k, new_v

    def _entry_shape(self) -> Tuple[int, int, int]:
        sig = self._pending_sig
        return sig.num_image_tokens, sig.num_heads, sig.head_dim

    def _record_slots(self, start: int, n: int, device: torch.device
                      ) -> Tuple[Tuple[torch.Tensor, torch.Tensor], ...]:
        """Per layer, storage views ``[start:start+n]`` (``[n, Lr, H, D]``, storage
        grown first) for the record forward's processors to write in place."""
        shape, dtype = self._entry_shape(), _DTYPES[self._pending_sig.dtype]
        slots = []
        for layer in range(self._pending_sig.num_layers):
            self._grow(layer, start + n, shape, dtype, torch.device(device))
            slots.append((self._k[layer][start:start + n], self._v[layer][start:start + n]))
        return tuple(slots)

    def _write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        sig = self._pending_sig
        want = self._entry_shape()
        if tuple(k.shape[1:]) != want or _dtype_name(k.dtype) != sig.dtype:
            raise ValueError(f"layer {layer}: reference keys {tuple(k.shape)} {k.dtype} do not "
                             f"match the cache signature [*, {want[0]}, {want[1]}, {want[2]}] "
                             f"{sig.dtype}")
        self._grow(layer, start + k.shape[0], want, k.dtype, k.device)
        with torch.no_grad():
            self._k[layer][start:start + k.shape[0]].copy_(k)
            self._v[layer][start:start + k.shape[0]].copy_(v)

    def _commit(self, start: int, n: int, written: Sequence[int]) -> None:
        sig = self._pending_sig
        short = sorted(set(range(sig.num_layers)) - set(written))
        if short:
            raise RuntimeError(f"record forward did not write cache layers {short}; every "
                               "attention layer must run GroupSharedFluxAttnProcessor")
        self._signature = sig
        self._len = start + n

    # ------------------------------------------------------------------ checks
    def check_signature(self, sig: CacheSignature, *, what: str = "replay into") -> None:
        """Raise ``ValueError`` naming every field where ``sig`` differs from the cache's."""
        mine = self._signature
        if mine is None:
            raise ValueError(f"cannot {what} a model: the ReferenceKVCache is empty")
        diffs = []
        labels = {
            "num_double_layers": "double-stream layers", "num_single_layers": "single-stream layers",
            "num_heads": "heads", "head_dim": "head dim", "dtype": "dtype",
            "num_image_tokens": "image tokens per reference", "placement": "placement",
        }
        for field, label in labels.items():
            a, b = getattr(mine, field), getattr(sig, field)
            if a is not None and b is not None and a != b:
                diffs.append(f"{label}: cache {a!r} vs model {b!r}")
        if diffs:
            raise ValueError(f"cannot {what} this model: the ReferenceKVCache was recorded for "
                             f"another shape ({'; '.join(diffs)})")
        self._check_storage()

    def _check_storage(self) -> None:
        sig = self._signature
        want = (sig.num_image_tokens, sig.num_heads, sig.head_dim)
        for layer in range(sig.num_layers):
            for name, t in (("keys", self._k[layer]), ("values", self._v[layer])):
                if t is None or tuple(t.shape[1:]) != want or t.shape[0] < self._len:
                    got = None if t is None else tuple(t.shape)
                    raise ValueError(f"cache layer {layer} {name} {got} do not match what was "
                                     f"recorded: {self._len} entries of {want} (token count "
                                     f"{sig.num_image_tokens})")
                if _dtype_name(t.dtype) != sig.dtype:
                    raise ValueError(f"cache layer {layer} {name} are {t.dtype}, recorded as "
                                     f"{sig.dtype}")

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the entries and signature to a safetensors file (bit-exact)."""
        from safetensors.torch import save_file

        if self._signature is None or self._len == 0:
            raise ValueError("refusing to save an empty ReferenceKVCache")
        tensors = {}
        for layer in range(self._signature.num_layers):
            k, v = self.layer(layer)
            # save_file wants tensors that own their storage exactly.
            tensors[f"layers.{layer}.k"] = k.detach().to("cpu").clone()
            tensors[f"layers.{layer}.v"] = v.detach().to("cpu").clone()
        meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "num_entries": str(self._len), "signature": json.dumps(asdict(self._signature))}
        tmp = f"{os.fspath(path)}.tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike],
             device: Union[str, torch.device, None] = None) -> "ReferenceKVCache":
        """Read a cache written by :meth:`save` (onto ``device``, default CPU) and check
        that every tensor matches the recorded signature."""
        from safetensors import safe_open

        dev = "cpu" if device is None else str(device)
        with safe_open(os.fspath(path), framework="pt", device=dev) as f:
            meta: Any = f.metadata() or {}
            if meta.get("format") != FORMAT_NAME:
                raise ValueError(f"{path} is not a storyattn ReferenceKVCache file "
                                 f"(format {meta.get('format')!r})")
            version = int(meta.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise ValueError(f"{path} has cache format version {version}; this storyattn "
                                 f"reads version {FORMAT_VERSION}")
            sig = CacheSignature(**json.loads(meta["signature"]))
            n = int(meta["num_entries"])
            cache = cls()
            cache._k = [None] * sig.num_layers
            cache._v = [None] * sig.num_layers
            for layer in range(sig.num_layers):
                for kind, store in (("k", cache._k), ("v", cache._v)):
                    name = f"layers.{layer}.{kind}"
                    if name not in f.keys():
                        raise ValueError(f"{path} lacks tensor {name!r} for {sig.num_layers} layers")
                    store[layer] = f.get_tensor(name)
        cache._signature = sig
        cache._len = n
        for layer in range(sig.num_layers):
            if cache._k[layer].shape[0] != n:
                raise ValueError(f"{path}: layer {layer} holds {cache._k[layer].shape[0]} entries, "
                                 f"metadata says {n}")
        cache._check_storage()
        return cache
