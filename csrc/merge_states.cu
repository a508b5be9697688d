// In-place merge of two attention states (out, lse) over disjoint key sets.
//
// Math (natural-log lse, fp32): with m = max(lse_a, lse_b),
//   w_a = exp(lse_a - m), w_b = exp(lse_b - m), s = w_a + w_b
//   lse = m + log(s),  out = (w_a * out_a + w_b * out_b) / s
// Subtracting m keeps exp() in range for any lse magnitude; a side whose weight
// is exactly 0 is never read, so garbage (even NaN) in a masked-out or empty
// segment cannot leak into the result; m = -inf (no keys on either side) gives
// out = 0, lse = -inf instead of 0/0.
//
// Layout: out [B, L, H, D] (head_dim contiguous), lse [B, H, L] float32.
// One block row (threadIdx.y) owns one (b, l, h) row; threadIdx.x walks its D
// elements in VEC-wide chunks (16-byte accesses when alignment allows: the op
// is purely memory bound).  A row never straddles blocks, which is what makes
// the in-place lse update safe: every thread of the row reads lse_a before the
// barrier, and only threadIdx.x == 0 writes it after.
#include "common.cuh"
#include "storyattn_kernels.h"

namespace storyattn {
namespace {

using detail::from_float;
using detail::to_float;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__global__ void merge_states_kernel(MergeParams p, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = row < rows;
  const float NEG_INF = -__int_as_float(0x7f800000);

  int64_t b = 0, l = 0, h = 0;
  float la = NEG_INF, lb = NEG_INF;
  if (live) {
    h = row % p.H;
    const int64_t t = row / p.H;
    l = t % p.L;
    b = t / p.L;
    la = p.lse_a[b * p.la_sb + h * p.la_sh + l * p.la_sl];
    const bool take = p.mask == nullptr || p.mask[b * p.mask_sb + l * p.mask_sl] != 0;
    if (take) lb = p.lse_b[b * p.lb_sb + h * p.lb_sh + l * p.lb_sl];
  }
  __syncthreads();
  if (!live) return;

  const float m = fmaxf(la, lb);
  float wa = 0.f, wb = 0.f, lse = NEG_INF;
  if (m != NEG_INF) {
    wa = expf(la - m);
    wb = expf(lb - m);
    const float s = wa + wb;
    lse = m + logf(s);
    wa /= s;
    wb /= s;
    // Segment b contributes nothing (masked out, empty, or negligible): the
    // state is already the answer, so skip the memory traffic entirely.
    if (wb == 0.f) return;
  }
  if (threadIdx.x == 0) p.lse_a[b * p.la_sb + h * p.la_sh + l * p.la_sl] = lse;

  T* oa = static_cast<T*>(p.out_a) + b * p.oa_sb + l * p.oa_sl + h * p.oa_sh;
  const T* ob = static_cast<const T*>(p.out_b) + b * p.ob_sb + l * p.ob_sl + h * p.ob_sh;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < p.D;
       c += static_cast<int64_t>(blockDim.x) * VEC) {
    Pack<T, VEC> r;
    if (m == NEG_INF) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) r.v[i] = from_float<T>(0.f);
    } else {
      Pack<T, VEC> xb = *reinterpret_cast<const Pack<T, VEC>*>(ob + c);
      if (wa == 0.f) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) r.v[i] = from_float<T>(wb * to_float(xb.v[i]));
      } else {
        Pack<T, VEC> xa = *reinterpret_cast<const Pack<T, VEC>*>(oa + c);
#pragma unroll
        for (int i = 0; i < VEC; ++i)
          r.v[i] = from_float<T>(wa * to_float(xa.v[i]) + wb * to_float(xb.v[i]));
      }
    }
    *reinterpret_cast<Pack<T, VEC>*>(oa + c) = r;
  }
}

template <typename T, int VEC>
void launch_typed(const MergeParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.L * p.H;
  const int chunks = static_cast<int>((p.D + VEC - 1) / VEC);
  const int tx = chunks < 256 ? chunks : 256;
  const int ty = 256 / tx > 0 ? 256 / tx : 1;
  const dim3 block(tx, ty);
  const dim3 grid(detail::ceil_div(rows, ty));
  merge_states_kernel<T, VEC><<<grid, block, 0, stream>>>(p, rows);
}

bool aligned(const void* ptr, int bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename T>
void dispatch_vec(const MergeParams& p, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const bool vec_ok = p.D % V == 0 && aligned(p.out_a, 16) && aligned(p.out_b, 16) &&
                      p.oa_sb % V == 0 && p.oa_sl % V == 0 && p.oa_sh % V == 0 &&
                      p.ob_sb % V == 0 && p.ob_sl % V == 0 && p.ob_sh % V == 0;
  if (vec_ok)
    launch_typed<T, V>(p, stream);
  else
    launch_typed<T, 1>(p, stream);
}

}  // namespace

const char* launch_merge_states(const MergeParams& p, cudaStream_t stream) {
  if (p.B * p.L * p.H == 0 || p.D == 0) return nullptr;
  switch (p.dtype) {
    case DType::kFloat32: dispatch_vec<float>(p, stream); break;
    case DType::kFloat16: dispatch_vec<__half>(p, stream); break;
    case DType::kBFloat16: dispatch_vec<__nv_bfloat16>(p, stream); break;
    default: return "merge_states: unsupported dtype";
  }
  return nullptr;
}

}  // namespace storyattn
