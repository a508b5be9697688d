// Fused q/k RMSNorm + RoPE for FLUX attention layers, with an optional write of
// the reference image tokens' K/V straight into a ReferenceKVCache pool.
//
// diffusers runs norm_q, norm_k, apply_rotary_emb(q), apply_rotary_emb(k) and
// (when recording references) a slice + extra rotation + copy into the cache:
// each a separate pass over [B, L, H, D].  Here one warp owns one (b, l, h) row
// and does all of it with the row in registers: read x once, write q/k once,
// write the pool rows once.
//
// Math (fp32; exact statement and rounding points in storyattn_kernels.h):
// y = x / sqrt(mean(x^2) + eps) * w, rounded to the io dtype like diffusers'
// norm output, then the FLUX pairing
//   out[2i]   = y[2i]   cos[l, 2i]   - y[2i+1] sin[l, 2i]
//   out[2i+1] = y[2i+1] cos[l, 2i+1] + y[2i]   sin[l, 2i+1]
// (apply_rotary_emb with use_real_unbind_dim=-1: cos/sin are the
// repeat-interleaved tables, so both entries of a pair normally agree; the
// formula uses each entry as given, exactly like diffusers).
// The products and sums use explicit _rn intrinsics: with FMA contraction (on
// by default in nvcc) a result can differ from torch's separately rounded
// x*cos + rot(x)*sin by an fp32 ulp, which flips a bf16 rounding now and then;
// sqrt and the division are IEEE for the same reason (--use_fast_math would
// otherwise make them approximate).
//
// Lane j of the warp holds pairs i = j, j + 32, ... (NP pairs each), so a warp
// reads 32 consecutive pairs per step: 128 B for 16-bit types, coalesced.
// NP = ceil(D / 64) is a template parameter so the row stays in registers.
#include "common.cuh"
#include "storyattn_kernels.h"

namespace storyattn {
namespace {

using detail::load2;
using detail::store2;

constexpr int kWarpsPerBlock = 8;

template <typename T>
__device__ __forceinline__ float round_io(float x) {
  return detail::to_float(detail::from_float<T>(x));
}

// (a * c - b * s) with each product and the difference rounded separately.
__device__ __forceinline__ float rot_lo(float a, float b, float c, float s) {
  return __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
}
// (b * c + a * s), same rounding.
__device__ __forceinline__ float rot_hi(float a, float b, float c, float s) {
  return __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

__device__ __forceinline__ float2 load_weight2(const void* w, DType dt, int64_t i) {
  if (w == nullptr) return make_float2(1.f, 1.f);
  switch (dt) {
    case DType::kFloat16: return load2(static_cast<const __half*>(w) + i);
    case DType::kBFloat16: return load2(static_cast<const __nv_bfloat16*>(w) + i);
    default: return load2(static_cast<const float*>(w) + i);
  }
}

template <typename T, int NP>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
qk_norm_rope_kernel(QKNormRopeParams p) {
  const bool is_k = blockIdx.y == 1;
  const T* x = static_cast<const T*>(is_k ? p.k : p.q);
  if (x == nullptr) return;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= p.B * p.L * p.H) return;  // uniform per warp: the shuffles below stay full-warp
  const int64_t h = row % p.H;
  const int64_t l = (row / p.H) % p.L;
  const int64_t b = row / (p.H * p.L);

  T* out;
  const void* w;
  DType wdt;
  bool round_before_w;
  if (is_k) {
    x += b * p.k_sb + l * p.k_sl + h * p.k_sh;
    out = static_cast<T*>(p.k_out) + b * p.ko_sb + l * p.ko_sl + h * p.ko_sh;
    w = p.k_weight;
    wdt = p.k_weight_dtype;
    round_before_w = p.k_round_before_weight != 0;
  } else {
    x += b * p.q_sb + l * p.q_sl + h * p.q_sh;
    out = static_cast<T*>(p.q_out) + b * p.qo_sb + l * p.qo_sl + h * p.qo_sh;
    w = p.q_weight;
    wdt = p.q_weight_dtype;
    round_before_w = p.q_round_before_weight != 0;
  }
  const int64_t npairs = p.D / 2;

  float2 xv[NP];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    const int64_t i = lane + 32 * j;
    xv[j] = i < npairs ? load2(x + 2 * i) : make_float2(0.f, 0.f);
    ss += xv[j].x * xv[j].x + xv[j].y * xv[j].y;
  }
  ss = detail::warp_sum(ss);
  const float inv =
      __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, static_cast<float>(p.D)), p.eps)));
  const bool round_norm = p.round_norm != 0;

  // Pool destination for this row, if it is a reference image token to record.
  T* pk = nullptr;
  T* pv = nullptr;
  const T* vsrc = nullptr;
  const float* ecos = nullptr;
  const float* esin = nullptr;
  if (is_k && p.pool_k != nullptr && l >= p.img_start && l < p.img_start + p.Lr) {
    const int64_t e = p.entry_ids[b];
    if (e >= 0 && e < p.P) {
      const int64_t lr = l - p.img_start;
      pk = static_cast<T*>(p.pool_k) + e * p.pk_sp + lr * p.pk_sl + h * p.pk_sh;
      pv = static_cast<T*>(p.pool_v) + e * p.pv_sp + lr * p.pv_sl + h * p.pv_sh;
      vsrc = static_cast<const T*>(p.v) + b * p.v_sb + l * p.v_sl + h * p.v_sh;
      if (p.extra_cos != nullptr) {
        ecos = p.extra_cos + b * p.ex_sb;
        esin = p.extra_sin + b * p.ex_sb;
      }
    }
  }

  const float* crow = p.cos + l * p.cs_sl;
  const float* srow = p.sin + l * p.cs_sl;
#pragma unroll
  for (int j = 0; j < NP; ++j) {
    const int64_t i = lane + 32 * j;
    if (i >= npairs) break;
    float y0 = __fmul_rn(xv[j].x, inv);
    float y1 = __fmul_rn(xv[j].y, inv);
    if (w != nullptr) {
      if (round_before_w) {
        y0 = round_io<T>(y0);
        y1 = round_io<T>(y1);
      }
      const float2 wv = load_weight2(w, wdt, 2 * i);
      y0 = __fmul_rn(y0, wv.x);
      y1 = __fmul_rn(y1, wv.y);
    }
    if (round_norm) {
      y0 = round_io<T>(y0);
      y1 = round_io<T>(y1);
    }
    const float2 c = load2(crow + 2 * i);
    const float2 s = load2(srow + 2 * i);
    const float o0 = rot_lo(y0, y1, c.x, s.x);
    const float o1 = rot_hi(y0, y1, c.y, s.y);
    store2(out + 2 * i, o0, o1);
    if (pk != nullptr) {
      if (ecos != nullptr) {
        // from the stored (rounded) key, like a second pass over k would
        const float r0 = round_io<T>(o0), r1 = round_io<T>(o1);
        const float2 ec = load2(ecos + 2 * i);
        const float2 es = load2(esin + 2 * i);
        store2(pk + 2 * i, rot_lo(r0, r1, ec.x, es.x), rot_hi(r0, r1, ec.y, es.y));
      } else {
        store2(pk + 2 * i, o0, o1);
      }
      // A copy through fp32 is exact for float/half/bfloat16.
      const float2 vv = load2(vsrc + 2 * i);
      store2(pv + 2 * i, vv.x, vv.y);
    }
  }
}

template <typename T>
const char* dispatch_np(const QKNormRopeParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.L * p.H;
  const dim3 grid(detail::ceil_div(rows, kWarpsPerBlock), 2);
  const dim3 block(kWarpsPerBlock * 32);
  const int np = static_cast<int>((p.D / 2 + 31) / 32);
  switch (np) {
    case 1: qk_norm_rope_kernel<T, 1><<<grid, block, 0, stream>>>(p); break;
    case 2: qk_norm_rope_kernel<T, 2><<<grid, block, 0, stream>>>(p); break;
    case 3: qk_norm_rope_kernel<T, 3><<<grid, block, 0, stream>>>(p); break;
    case 4: qk_norm_rope_kernel<T, 4><<<grid, block, 0, stream>>>(p); break;
    default: return "qk_norm_rope: head_dim must be even and at most 256";
  }
  return nullptr;
}

}  // namespace

const char* launch_qk_norm_rope(const QKNormRopeParams& p, cudaStream_t stream) {
  if (p.D % 2 != 0 || p.D > 256 || p.D <= 0)
    return "qk_norm_rope: head_dim must be even and at most 256";
  if (p.pool_k != nullptr && (p.pool_v == nullptr || p.v == nullptr || p.entry_ids == nullptr))
    return "qk_norm_rope: a pool write needs pool_k, pool_v, v and entry_ids together";
  if (p.B * p.L * p.H == 0) return nullptr;
  switch (p.dtype) {
    case DType::kFloat32: return dispatch_np<float>(p, stream);
    case DType::kFloat16: return dispatch_np<__half>(p, stream);
    case DType::kBFloat16: return dispatch_np<__nv_bfloat16>(p, stream);
  }
  return "qk_norm_rope: unsupported dtype";
}

}  // namespace storyattn
