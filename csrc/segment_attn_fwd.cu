// Segment attention forward (inference) for sm_80 / sm_90: FlashAttention-2
// style tiles on mma.sync tensor cores.
//
// For target b, head h, the keys/values are the concatenation
//     [ k[b] ; ref_k[e] for e in S_b ]      S_b = ref_index[b, :] minus -1
// (every pool entry when ref_index is null; duplicates counted).  The kernel
// walks those segments one after the other inside a single online-softmax
// loop: no concatenation, no partial outputs rounded to bf16, no merge pass.
//
// Work split: one CTA = 64 query rows of one (b, h), 4 warps x 16 rows.  Each
// iteration stages a 64-key tile of K and V in shared memory with cp.async
// (single buffers, software-pipelined: see attend_all), then every warp
//   S(16x64)  = Q(16xD) K^T            mma.m16n8k16, fp32 accumulators
//   online softmax on S in registers  (base-2 exponent, scale folded in)
//   O(16xD)  += P(16x64) V(64xD)      P re-packed from the S accumulators
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit inputs; g = lane / 4,
// t = lane % 4):
//   A (16x16): reg0 = (row g,   cols 2t,2t+1)   reg1 = (row g+8, cols 2t,2t+1)
//              reg2 = (row g,   cols 2t+8,+9)   reg3 = (row g+8, cols 2t+8,+9)
//   B (16x8):  reg0 = (rows 2t,2t+1, col g)     reg1 = (rows 2t+8,+9, col g)
//   C (16x8):  c0,c1 = (row g, cols 2t,2t+1)    c2,c3 = (row g+8, cols 2t,2t+1)
// C tiles n and n+1 of S therefore are exactly the A fragment of P for the
// k-step covering those 16 keys (no shuffle or shared-memory round trip).
// K^T is the B operand with rows = head dim, cols = keys: plain ldmatrix of the
// [key][dim] tile; V is the B operand with rows = keys, cols = head dim:
// ldmatrix.trans of the same [key][dim] layout.
//
// Shared-memory rows are padded by 8 elements (16 B) so the eight 16-byte row
// reads of one ldmatrix phase fall in distinct banks.
//
// The lse is returned in natural log: the loop works in log2 units
// (exp2 is one instruction) and converts once at the end.
//
// Each PTX wrapper below also has a STORYATTN_EMULATE_CUDA branch: the
// test-only host emulation (tests/cuda_emu) that runs this file on the CPU.
#include "common.cuh"
#include "storyattn_kernels.h"

namespace storyattn {
namespace {

constexpr int kBM = 64;       // query rows per CTA
constexpr int kBN = 64;       // keys per tile
constexpr int kWarps = 4;     // 16 query rows each
constexpr int kThreads = kWarps * 32;

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
#if defined(STORYATTN_EMULATE_CUDA)
  storyattn_emu::mma_m16n8k16<__nv_bfloat16>(d, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
#if defined(STORYATTN_EMULATE_CUDA)
  storyattn_emu::mma_m16n8k16<__half>(d, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8x8 b16 matrices; lane l supplies the address of row (l % 8) of matrix
// (l / 8) and receives in reg i the (row l/4, cols 2(l%4), +1) pair of matrix
// i (transposed: the (rows 2(l%4), +1, col l/4) pair).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#if defined(STORYATTN_EMULATE_CUDA)
  storyattn_emu::ldmatrix_x4(r, smem, /*trans=*/false);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
#if defined(STORYATTN_EMULATE_CUDA)
  storyattn_emu::ldmatrix_x4(r, smem, /*trans=*/true);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
#endif
}

// 16-byte global -> shared copy; src_bytes = 0 zero-fills (rows past the end
// of a segment), which keeps garbage (possibly NaN) out of P*V.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if defined(STORYATTN_EMULATE_CUDA)
  storyattn_emu::cp_async16(smem, gmem, src_bytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(gmem),
               "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(STORYATTN_EMULATE_CUDA)
  storyattn_emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(STORYATTN_EMULATE_CUDA)
  storyattn_emu::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <typename T, int D>
struct Smem {
  static constexpr int kLds = D + 8;  // padded row stride (elements)
  alignas(16) T k[kBN * kLds];
  alignas(16) T v[kBN * kLds];
};

// Copies rows [n0, n0 + kBN) of a [n, D] segment (row stride `ld` elements)
// into a padded shared tile, zero-filling rows >= n.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t ld, int64_t n0,
                                          int64_t n) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kLds = Smem<T, D>::kLds;
#pragma unroll
  for (int c = threadIdx.x; c < kBN * kChunks; c += kThreads) {
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    const bool ok = n0 + r < n;
    const T* g = ok ? src + (n0 + r) * ld + col : src;
    cp_async16(dst + r * kLds + col, g, ok ? 16 : 0);
  }
}

template <typename T, int D>
struct Softmax {
  float m[2];  // running max of rows g and g+8 (log2 units, scale folded in)
  float l[2];  // this thread's share of the running row sums
};

// Position in the CTA's walk over key tiles: the own segment (seg = -1), then
// the page-table entries r = 0..nref-1 that name a valid pool entry.  Every
// thread of the CTA holds the same cursor (same b, h), so all branches on it
// are uniform and the barriers below are reached by everyone.
template <typename T>
struct Cursor {
  int64_t seg;  // -1 = own keys, r >= 0 = ref_index column r (or entry r)
  int64_t n0;   // first key of the current tile
  int64_t n;    // keys in the current segment
  const T* k;   // segment base for this (b, h)
  const T* v;
  int64_t lk, lv;  // token strides
};

// Moves c to the first non-empty segment at or after c.seg; false at the end.
template <typename T>
__device__ __forceinline__ bool open_segment(Cursor<T>& c, const SegmentAttnParams& p, int64_t b,
                                             int64_t h, int64_t nref) {
  for (; c.seg < nref; ++c.seg) {
    c.n0 = 0;
    if (c.seg < 0) {
      if (p.Lk <= 0) continue;
      c.n = p.Lk;
      c.k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
      c.v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
      c.lk = p.k_sl;
      c.lv = p.v_sl;
      return true;
    }
    const int64_t e =
        p.ref_index != nullptr ? p.ref_index[b * p.ri_sb + c.seg * p.ri_sr] : c.seg;
    if (e < 0 || e >= p.P || p.Lr <= 0) continue;  // -1 = none; out of range is never read
    c.n = p.Lr;
    c.k = static_cast<const T*>(p.ref_k) + e * p.rk_sp + h * p.rk_sh;
    c.v = static_cast<const T*>(p.ref_v) + e * p.rv_sp + h * p.rv_sh;
    c.lk = p.rk_sl;
    c.lv = p.rv_sl;
    return true;
  }
  return false;
}

template <typename T>
__device__ __forceinline__ bool advance(Cursor<T>& c, const SegmentAttnParams& p, int64_t b,
                                        int64_t h, int64_t nref) {
  c.n0 += kBN;
  if (c.n0 < c.n) return true;
  ++c.seg;
  return open_segment(c, p, b, h, nref);
}

// The key loop, software-pipelined on single K and V buffers:
//   prologue: K(0), V(0) in flight
//   tile j:   wait K(j) | S = Q K(j)^T | barrier | start K(j+1)
//             softmax   | wait V(j)    | O += P V(j) | barrier | start V(j+1)
// so K(j+1) lands under softmax + PV of tile j and V(j+1) under S of tile j+1.
// cp.async groups complete in commit order; one group (possibly empty) is
// committed per load slot, so "wait until at most 1 group is pending" always
// means "the older of the two buffers has landed".
template <typename T, int D>
__device__ __forceinline__ void attend_all(Smem<T, D>& sm, const SegmentAttnParams& p, int64_t b,
                                           int64_t h, const uint32_t (&qf)[D / 16][4],
                                           float (&o)[D / 8][4], Softmax<T, D>& st,
                                           float scale_log2) {
  constexpr int kLds = Smem<T, D>::kLds;
  const float NEG_INF = -__int_as_float(0x7f800000);
  const int lane = threadIdx.x & 31;
  const int t = lane & 3;
  // ldmatrix row-address roles of this lane
  const int lm_mat = lane >> 3;
  const int lm_row = lane & 7;
  const int64_t nref = p.ref_index != nullptr ? p.R : p.P;

  Cursor<T> cur;
  cur.seg = -1;
  bool have = open_segment(cur, p, b, h, nref);
  if (have) load_tile<T, D>(sm.k, cur.k, cur.lk, cur.n0, cur.n);
  cp_async_commit();
  if (have) load_tile<T, D>(sm.v, cur.v, cur.lv, cur.n0, cur.n);
  cp_async_commit();

  while (have) {
    Cursor<T> nxt = cur;
    const bool more = advance(nxt, p, b, h, nref);

    cp_async_wait<1>();  // K(j) has landed; V(j) may still be in flight
    __syncthreads();

    // S = Q K^T.  One ldmatrix.x4 yields B fragments for two k-steps:
    // matrices 0,1 = dims [16ks, 16ks+16), matrices 2,3 = the next 16 dims.
    float s[kBN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < D / 16; ks += 2) {
        uint32_t kb[4];
        ldmatrix_x4(kb, sm.k + (nt * 8 + lm_row) * kLds + ks * 16 + lm_mat * 8);
        mma16816<T>(s[nt], qf[ks], kb[0], kb[1]);
        mma16816<T>(s[nt], qf[ks + 1], kb[2], kb[3]);
      }
    }
    __syncthreads();  // every warp is done reading K(j)
    if (more) load_tile<T, D>(sm.k, nxt.k, nxt.lk, nxt.n0, nxt.n);
    cp_async_commit();

    // Online softmax.  Columns past the segment end get -inf; the running max
    // includes the old max so alpha <= 1.
    const int64_t n0 = cur.n0, n = cur.n;
    const bool partial = n0 + kBN > n;
    float mx[2] = {st.m[0], st.m[1]};
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float x = s[nt][i] * scale_log2;
        if (partial && n0 + nt * 8 + 2 * t + (i & 1) >= n) x = NEG_INF;
        s[nt][i] = x;
        mx[i >> 1] = fmaxf(mx[i >> 1], x);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // the 4 lanes of a quad (same g) hold the 64 columns of a row together
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      // a row that has seen only -inf so far: subtract 0, not -inf (NaN)
      base[r] = mx[r] == NEG_INF ? 0.f : mx[r];
      alpha[r] = exp2f(st.m[r] - base[r]);
      st.m[r] = mx[r];
      st.l[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float pv = exp2f(s[nt][i] - base[i >> 1]);
        s[nt][i] = pv;
        st.l[i >> 1] += pv;
      }
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

    cp_async_wait<1>();  // V(j) has landed; K(j+1) may still be in flight
    __syncthreads();

    // O += P V.  k-step kk covers keys [16kk, 16kk+16): S tiles 2kk and 2kk+1.
    // ldmatrix.trans: matrices 0,1 = keys +0..7 / +8..15 of dims [8dt, 8dt+8),
    // matrices 2,3 = the same keys for dims [8dt+8, 8dt+16).
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sm.v + (kk * 16 + (lm_mat & 1) * 8 + lm_row) * kLds +
                                  (dt + (lm_mat >> 1)) * 8);
        mma16816<T>(o[dt], pa, vb[0], vb[1]);
        mma16816<T>(o[dt + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done reading V(j)
    if (more) load_tile<T, D>(sm.v, nxt.v, nxt.lv, nxt.n0, nxt.n);
    cp_async_commit();

    cur = nxt;
    have = more;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
segment_attn_fwd_kernel(SegmentAttnParams p) {
  static_assert(D % 32 == 0, "head dim must be a multiple of 32 (ldmatrix.x4 pairs)");
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(STORYATTN_EMULATE_CUDA)
  __shared__ Smem<T, D> sm;
  const float NEG_INF = -__int_as_float(0x7f800000);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBM + warp * 16 + g;
  const int64_t r1 = r0 + 8;

  // Q fragments stay in registers for the whole key loop.  Rows past Lq are
  // zero; they produce finite garbage that is never stored.
  uint32_t qf[D / 16][4];
  {
    const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
    const bool ok0 = r0 < p.Lq, ok1 = r1 < p.Lq;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int c = ks * 16 + 2 * t;
      qf[ks][0] = ok0 ? *reinterpret_cast<const uint32_t*>(qb + r0 * p.q_sl + c) : 0u;
      qf[ks][1] = ok1 ? *reinterpret_cast<const uint32_t*>(qb + r1 * p.q_sl + c) : 0u;
      qf[ks][2] = ok0 ? *reinterpret_cast<const uint32_t*>(qb + r0 * p.q_sl + c + 8) : 0u;
      qf[ks][3] = ok1 ? *reinterpret_cast<const uint32_t*>(qb + r1 * p.q_sl + c + 8) : 0u;
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  Softmax<T, D> st;
  st.m[0] = st.m[1] = NEG_INF;
  st.l[0] = st.l[1] = 0.f;
  const float scale_log2 = p.scale * 1.4426950408889634f;

  attend_all<T, D>(sm, p, b, h, qf, o, st, scale_log2);

  // finish: row sums are split over the 4 lanes of a quad
  float inv[2], lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = st.l[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const bool any = l > 0.f;
    inv[r] = any ? 1.f / l : 0.f;
    lse[r] = any ? (st.m[r] + __log2f(l)) * 0.6931471805599453f : NEG_INF;
  }
  T* ob = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh;
  if (r0 < p.Lq) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<uint32_t*>(ob + r0 * p.o_sl + dt * 8 + 2 * t) =
          pack2<T>(o[dt][0] * inv[0], o[dt][1] * inv[0]);
    if (t == 0) p.lse[b * p.lse_sb + h * p.lse_sh + r0 * p.lse_sl] = lse[0];
  }
  if (r1 < p.Lq) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<uint32_t*>(ob + r1 * p.o_sl + dt * 8 + 2 * t) =
          pack2<T>(o[dt][2] * inv[1], o[dt][3] * inv[1]);
    if (t == 0) p.lse[b * p.lse_sb + h * p.lse_sh + r1 * p.lse_sl] = lse[1];
  }
#else
  // Built for an architecture without bf16 mma.sync / cp.async: the host
  // launcher refuses such devices, so reaching this is a packaging error.
  __trap();
#endif
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, int D>
void launch_typed(const SegmentAttnParams& p, cudaStream_t stream) {
  const dim3 grid(detail::ceil_div(p.Lq, kBM), static_cast<unsigned>(p.H),
                  static_cast<unsigned>(p.B));
  segment_attn_fwd_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
}

template <typename T>
const char* dispatch_d(const SegmentAttnParams& p, cudaStream_t stream) {
  switch (p.D) {
    case 64: launch_typed<T, 64>(p, stream); return nullptr;
    case 128: launch_typed<T, 128>(p, stream); return nullptr;
    default: return "segment_attn_fwd: head_dim must be 64 or 128";
  }
}

}  // namespace

const char* launch_segment_attn_fwd(const SegmentAttnParams& p, cudaStream_t stream) {
  if (p.D != 64 && p.D != 128) return "segment_attn_fwd: head_dim must be 64 or 128";
  if (p.H > 65535 || p.B > 65535) return "segment_attn_fwd: batch and heads must be <= 65535";
  // cp.async copies 16-byte chunks and the Q/O fragments are 4-byte accesses.
  const bool ok = aligned16(p.q) && aligned16(p.k) && aligned16(p.v) &&
                  (p.P == 0 || (aligned16(p.ref_k) && aligned16(p.ref_v))) &&
                  p.k_sb % 8 == 0 && p.k_sl % 8 == 0 && p.k_sh % 8 == 0 &&
                  p.v_sb % 8 == 0 && p.v_sl % 8 == 0 && p.v_sh % 8 == 0 &&
                  p.q_sb % 2 == 0 && p.q_sl % 2 == 0 && p.q_sh % 2 == 0 &&
                  p.o_sb % 2 == 0 && p.o_sl % 2 == 0 && p.o_sh % 2 == 0 &&
                  (p.P == 0 || (p.rk_sp % 8 == 0 && p.rk_sl % 8 == 0 && p.rk_sh % 8 == 0 &&
                                p.rv_sp % 8 == 0 && p.rv_sl % 8 == 0 && p.rv_sh % 8 == 0));
  if (!ok)
    return "segment_attn_fwd: q/k/v/ref_k/ref_v need 16-byte aligned data and token/head/"
           "batch strides that are multiples of 8 elements (make them contiguous)";
  if (p.B == 0 || p.Lq == 0 || p.H == 0) return nullptr;
  switch (p.dtype) {
    case DType::kFloat16: return dispatch_d<__half>(p, stream);
    case DType::kBFloat16: return dispatch_d<__nv_bfloat16>(p, stream);
    default: return "segment_attn_fwd: dtype must be float16 or bfloat16";
  }
}

}  // namespace storyattn
