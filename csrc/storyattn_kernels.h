// Host-side interface of the storyattn CUDA kernels.
//
// The kernels (csrc/*.cu) see only raw pointers, element strides and a
// cudaStream_t; all torch glue (checks, allocation, current stream, device
// guard) lives in csrc/bindings.cpp.  Keeping torch out of the .cu files means
// they compile with plain nvcc (cuda_runtime + cuda_fp16/cuda_bf16 only), so
// the CI can compile-check them on machines whose torch is a CPU build.
//
// Conventions shared by every op:
//   * activations use the diffusers layout [batch, tokens, heads, head_dim];
//     the head_dim axis must be contiguous (stride 1), the other three are
//     given as element strides so views (e.g. a slice of a fused qkv) work;
//   * lse is float32, natural log, [batch, heads, tokens] (strides given);
//   * every launcher returns nullptr on success or a static message naming
//     the unsupported configuration; CUDA launch errors are left for the
//     caller to read with cudaGetLastError (the bindings do, via
//     C10_CUDA_KERNEL_LAUNCH_CHECK) so launches stay capturable in a graph.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace storyattn {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------
// merge of attention states (csrc/merge_states.cu)
// ---------------------------------------------------------------------------
// (out_a, lse_a) <- merge((out_a, lse_a), (out_b, lse_b)), in place:
//   lse = logaddexp(lse_a, lse_b)
//   out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b
// Rows whose lse is -inf on both sides get out = 0, lse = -inf (no NaN), and a
// side whose weight is exactly zero is never read (its out may be garbage).
// mask (optional, 1 byte per entry, bool or uint8): row (b, l) takes segment b
// only where mask[b * mask_sb + l * mask_sl] != 0; mask_sl = 0 gives one flag
// per batch row.  The launch shape does not depend on the mask, so a merge can
// be captured once in a CUDA graph and steered by rewriting the mask.
struct MergeParams {
  DType dtype;
  void* out_a;
  float* lse_a;
  const void* out_b;
  const float* lse_b;
  const uint8_t* mask;  // nullable
  int64_t B, L, H, D;
  int64_t oa_sb, oa_sl, oa_sh;  // element strides of out_a (head_dim contiguous)
  int64_t ob_sb, ob_sl, ob_sh;
  int64_t la_sb, la_sh, la_sl;  // element strides of lse_a [B, H, L]
  int64_t lb_sb, lb_sh, lb_sl;
  int64_t mask_sb, mask_sl;
};
const char* launch_merge_states(const MergeParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------
// fused q/k RMSNorm + RoPE (+ reference pool write) (csrc/qk_norm_rope.cu)
// ---------------------------------------------------------------------------
// For every row x = t[b, l, h, :] of q and of k (either may be absent):
//   y   = x / sqrt(mean(x^2) + eps)                    (fp32, IEEE sqrt/div)
//   y   = round(y) if round_before_weight               (diffusers' RMSNorm with a
//                                                        half weight casts first)
//   y   = y * weight;  y = round(y) if round_norm       (the norm's output tensor)
//   out[2i]   = y[2i]   * cos[l, 2i]   - y[2i+1] * sin[l, 2i]      (fp32, no FMA)
//   out[2i+1] = y[2i+1] * cos[l, 2i+1] + y[2i]   * sin[l, 2i+1]
// round() = to the activation dtype, nearest-even.  With round_norm this is
// torch.nn.RMSNorm / diffusers RMSNorm followed by apply_rotary_emb(
// use_real=True, use_real_unbind_dim=-1) -- the FLUX pairing of (x[2i],
// x[2i+1]) -- with diffusers' roundings (the Triton kernel makes the same
// choices); round_norm = 0 keeps the normalised row in fp32 (more accurate,
// not bit-comparable).  out may alias the input (in place).
//
// Pool write (optional, pool_k != nullptr): for batch row b with
// entry_ids[b] >= 0, the k rows l in [img_start, img_start + Lr) are written
// to pool_k[entry_ids[b], l - img_start, h, :], optionally rotated once more by
// (extra_cos[b, :], extra_sin[b, :]) with the same pairing (the position shift
// that places a reference at its own index-axis position), and the matching
// rows of v are copied to pool_v.  The extra rotation starts from the rounded
// k output, as a second pass over the stored keys would.  The k output itself
// is not extra-rotated.
struct QKNormRopeParams {
  DType dtype;          // of q, k, q_out, k_out, v, pool_k, pool_v
  int64_t B, L, H, D;   // D even, D <= 256
  float eps;
  int round_norm;                // round the norm output to dtype before RoPE
  int q_round_before_weight;     // round before the weight multiply (q / k)
  int k_round_before_weight;
  // q (nullable as a pair) and its output
  const void* q;
  void* q_out;
  int64_t q_sb, q_sl, q_sh, qo_sb, qo_sl, qo_sh;
  const void* q_weight;  // nullable: no affine weight
  DType q_weight_dtype;
  // k (nullable as a pair) and its output
  const void* k;
  void* k_out;
  int64_t k_sb, k_sl, k_sh, ko_sb, ko_sl, ko_sh;
  const void* k_weight;
  DType k_weight_dtype;
  // rotary tables, float32 [L, D] with row stride cs_sl (inner stride 1)
  const float* cos;
  const float* sin;
  int64_t cs_sl;
  // pool write (all nullable together except extra_*)
  const void* v;
  int64_t v_sb, v_sl, v_sh;
  void* pool_k;
  void* pool_v;
  int64_t P, Lr;
  int64_t pk_sp, pk_sl, pk_sh;
  int64_t pv_sp, pv_sl, pv_sh;
  const int64_t* entry_ids;  // [B], -1 = do not write this row
  int64_t img_start;
  const float* extra_cos;  // nullable, float32 [B, D] with row stride ex_sb
  const float* extra_sin;
  int64_t ex_sb;
};
const char* launch_qk_norm_rope(const QKNormRopeParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------
// segment attention forward (csrc/segment_attn_fwd.cu)
// ---------------------------------------------------------------------------
// out[b] = softmax(scale * q[b] [k[b]; ref_k[e] for e in S_b]^T) [v[b]; ref_v[e] ...]
// S_b = all P entries (ref_index == nullptr) or ref_index[b, 0..R) with -1
// skipped and duplicates counted.  fp16/bf16 in, fp32 accumulation, online
// softmax; lse float32 natural log (-inf and out = 0 for a row with no keys).
// Requires sm_80+ (mma.sync bf16/fp16), D in {64, 128}, 16-byte aligned
// base pointers and token/head/batch strides that are multiples of 8 elements.
struct SegmentAttnParams {
  DType dtype;  // kFloat16 or kBFloat16
  const void* q;
  const void* k;
  const void* v;
  const void* ref_k;  // nullable (P = 0)
  const void* ref_v;
  const int64_t* ref_index;  // nullable: every target reads all P entries
  void* out;
  float* lse;
  int64_t B, Lq, Lk, H, D, P, Lr, R;
  int64_t q_sb, q_sl, q_sh;
  int64_t k_sb, k_sl, k_sh;
  int64_t v_sb, v_sl, v_sh;
  int64_t rk_sp, rk_sl, rk_sh;
  int64_t rv_sp, rv_sl, rv_sh;
  int64_t ri_sb, ri_sr;
  int64_t o_sb, o_sl, o_sh;
  int64_t lse_sb, lse_sh, lse_sl;
  float scale;
};
const char* launch_segment_attn_fwd(const SegmentAttnParams& p, cudaStream_t stream);

}  // namespace storyattn
