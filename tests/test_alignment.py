"""backends._primitives.vector_ready: what fused CUDA kernels may read with 16-byte loads.

Found on the first GPU run: torch's flash kernel, called directly, faulted with
"misaligned address" on q sliced out of a fused qkv row (benchmarks/results/gpu_h200/)."""
import torch

from storyattn.backends._primitives import vector_ready


def test_aligned_contiguous_and_strided_views_pass_through():
    t = torch.randn(2, 8, 3, 64)
    assert vector_ready(t) is t
    wide = torch.randn(2, 8, 3, 3 * 64)       # q/k/v side by side: strides multiple of 8
    q = wide[..., :64]
    assert vector_ready(q) is q


def test_misaligned_or_odd_strides_are_copied_aligned_and_equal():
    fused = torch.randn(2, 8, 3, 3 * 64 + 1)
    q = fused[..., 1:65]                      # starts one element in: 2- or 4-byte aligned
    assert q.data_ptr() % 16 != 0
    out = vector_ready(q)
    assert out is not q and out.data_ptr() % 16 == 0 and out.is_contiguous()
    assert torch.equal(out, q)
    odd = torch.randn(2, 8, 3, 72)[..., :64].transpose(1, 2)   # strides fine, order changed
    assert torch.equal(vector_ready(odd), odd)
    assert vector_ready(None) is None
