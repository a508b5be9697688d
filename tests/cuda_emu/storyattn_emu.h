// Host emulation of the CUDA execution model, for testing csrc/ without a GPU.
//
// tests/_cuda_emu.py compiles the real csrc/*.cu sources as C++ with
// -DSTORYATTN_EMULATE_CUDA and this folder first on the include path (its
// cuda_runtime.h / cuda_fp16.h / cuda_bf16.h stand in for the toolkit's), so
// the kernels' own indexing, masking, barriers and pipelining run on the CPU:
//
//   * every CUDA thread of a block is an OS thread; blocks run one after
//     another, so `__shared__` (defined as `static`) is one buffer per kernel
//     shared by the running block, as on the device;
//   * __syncthreads is a barrier over the block's live threads and warp
//     shuffles a barrier over the warp; a thread that returns leaves both
//     (as an exited thread stops counting on the device);
//   * mma.sync.m16n8k16 and ldmatrix(.trans).x4 are warp collectives that
//     gather every lane's registers and hand each lane what the PTX ISA's
//     fragment layouts say it holds (so a wrong layout gives wrong numbers);
//   * cp.async copies land at the latest moment the device may complete them
//     (the wait_group that makes them due), so reading a shared tile before
//     waiting for it reads stale data -- or, with STORYATTN_EMU_CP_ASYNC=early,
//     at the earliest (issue), so a reload racing with readers of the old tile
//     corrupts it; src-size 0 zero-fills;
//   * misaligned ldmatrix / cp.async addresses, partial-warp shuffles and
//     barrier deadlocks are recorded and reported by the launch (the bindings
//     raise them), never silently accepted.
//
// 16-bit floats are bit patterns with round-to-nearest-even conversions
// written here (the tests compare the results with torch's own roundings).
// Everything is test-only: nothing in the package includes this file.
#pragma once

#include <chrono>
#include <cmath>
#include <math.h>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------
// qualifiers and launch-related keywords
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 4 };

struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// ---------------------------------------------------------------------------
// 16-bit float types: bit patterns, RNE conversions
// ---------------------------------------------------------------------------
struct alignas(2) __half {
  uint16_t bits;
};
struct alignas(2) __nv_bfloat16 {
  uint16_t bits;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace storyattn_emu {
inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_half_bits(float f) {
  uint32_t x = f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return static_cast<uint16_t>(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (x < 0x38800000u) {
    // below the smallest normal half (2^-14): multiples of 2^-24, nearest even
    // (the scaling is exact; nearbyint rounds half to even in the default mode)
    const uint32_t m = static_cast<uint32_t>(std::nearbyint(u2f(x) * 16777216.0f));
    return static_cast<uint16_t>(sign | m);  // m == 0x400 is the smallest normal: same encoding
  }
  const uint32_t r = x + 0x0fffu + ((x >> 13) & 1u);  // drop 13 mantissa bits, nearest even
  return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));  // rebias 127 -> 15
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }

template <typename T> float bits_to_float(uint16_t b);
template <> inline float bits_to_float<__half>(uint16_t b) { return half_bits_to_float(b); }
template <> inline float bits_to_float<__nv_bfloat16>(uint16_t b) { return bf16_bits_to_float(b); }
}  // namespace storyattn_emu

inline float __half2float(__half h) { return storyattn_emu::half_bits_to_float(h.bits); }
inline float __bfloat162float(__nv_bfloat16 h) { return storyattn_emu::bf16_bits_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{storyattn_emu::float_to_half_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{storyattn_emu::float_to_bf16_bits(f)};
}
inline __half2 __floats2half2_rn(float lo, float hi) {
  return __half2{__float2half_rn(lo), __float2half_rn(hi)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// ---------------------------------------------------------------------------
// float intrinsics (IEEE on the host: compile with -ffp-contract=off)
// ---------------------------------------------------------------------------
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __log2f(float a) { return std::log2(a); }
// expf, exp2f, logf, fmaxf: the C library's (<math.h>)

namespace storyattn_emu {

// ---------------------------------------------------------------------------
// errors: recorded by any thread, read (and cleared) by the launching thread
// ---------------------------------------------------------------------------
inline std::mutex& error_mutex() {
  static std::mutex m;
  return m;
}
inline std::string& error_text() {
  static std::string s;
  return s;
}
inline void record_error(const std::string& what) {
  std::lock_guard<std::mutex> g(error_mutex());
  if (error_text().empty()) error_text() = what;
}
// The first error since the last call ("" when none).
inline std::string take_error() {
  std::lock_guard<std::mutex> g(error_mutex());
  std::string s;
  s.swap(error_text());
  return s;
}

// A reusable barrier whose party shrinks when a thread leaves (returns from
// the kernel).  A wait that lasts a minute is a deadlock: the kernel reached a
// barrier in divergent code.  That is reported and the process aborted, since
// the stuck threads can no longer be joined.
class Barrier {
 public:
  explicit Barrier(int n) : expected_(n) {}
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> l(m_);
    const uint64_t gen = gen_;
    if (++arrived_ == expected_) {
      release();
      return;
    }
    if (!cv_.wait_for(l, std::chrono::seconds(60), [&] { return gen_ != gen; })) {
      std::fprintf(stderr,
                   "storyattn_emu: deadlock at %s (%d of %d threads arrived): a barrier in "
                   "divergent code\n",
                   what, arrived_, expected_);
      std::abort();
    }
  }
  void leave() {
    std::lock_guard<std::mutex> l(m_);
    --expected_;
    if (expected_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int expected_;
  int arrived_ = 0;
  uint64_t gen_ = 0;
};

struct Warp {
  explicit Warp(int n) : size(n), bar(n) {}
  int size;
  Barrier bar;
  // exchange area: each lane's operands of the current collective
  uint32_t regs[32][6];
  const void* addr[32];
  float f[32];
  void sync(const char* what) { bar.arrive_and_wait(what); }
};

struct Block {
  explicit Block(int n) : bar(n) {}
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

// one deferred cp.async: copy src_bytes (0..16) and zero-fill the rest of 16
struct AsyncCopy {
  void* dst;
  const void* src;
  int src_bytes;
};

struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  Block* block = nullptr;
  Warp* warp = nullptr;
  int lane = 0;
  bool cp_async_early = false;
  std::vector<AsyncCopy> open_group;           // issued, not yet committed
  std::deque<std::vector<AsyncCopy>> groups;   // committed, oldest first
};
inline thread_local ThreadState tls;

}  // namespace storyattn_emu

#define threadIdx (::storyattn_emu::tls.thread_idx)
#define blockIdx (::storyattn_emu::tls.block_idx)
#define blockDim (::storyattn_emu::tls.block_dim)
#define gridDim (::storyattn_emu::tls.grid_dim)

inline void __syncthreads() { storyattn_emu::tls.block->bar.arrive_and_wait("__syncthreads"); }

[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "storyattn_emu: __trap()\n");
  std::abort();
}

namespace storyattn_emu {
inline bool full_warp_mask(unsigned mask) {
  return mask == 0xffffffffu && tls.warp->size == 32;
}
}  // namespace storyattn_emu

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  using namespace storyattn_emu;
  Warp& w = *tls.warp;
  if (!full_warp_mask(mask)) record_error("__shfl_xor_sync with a partial warp or mask");
  w.f[tls.lane] = v;
  w.sync("__shfl_xor_sync");
  const int src = tls.lane ^ lane_mask;
  const float r = src < w.size ? w.f[src] : v;
  w.sync("__shfl_xor_sync");
  return r;
}

namespace storyattn_emu {

// ---------------------------------------------------------------------------
// PTX instructions used by csrc/segment_attn_fwd.cu (warp collectives)
// ---------------------------------------------------------------------------
inline uint16_t lo16(uint32_t v) { return static_cast<uint16_t>(v & 0xffffu); }
inline uint16_t hi16(uint32_t v) { return static_cast<uint16_t>(v >> 16); }

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, d += a * b.
// Fragment layouts (g = lane / 4, t = lane % 4), PTX ISA "mma.m16n8k16":
//   A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C/D: d0,d1 = (g, 2t..2t+1), d2,d3 = (g+8, 2t..2t+1)
// The lower 16 bits of a register hold the lower-indexed element.
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Warp& w = *tls.warp;
  if (w.size != 32) record_error("mma.sync in a partial warp");
  const int lane = tls.lane;
  for (int i = 0; i < 4; ++i) w.regs[lane][i] = a[i];
  w.regs[lane][4] = b0;
  w.regs[lane][5] = b1;
  w.sync("mma.sync");
  auto A = [&](int r, int k) {
    const uint32_t v = w.regs[(r % 8) * 4 + (k % 8) / 2][(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return bits_to_float<T>((k & 1) ? hi16(v) : lo16(v));
  };
  auto B = [&](int k, int n) {
    const uint32_t v = w.regs[n * 4 + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)];
    return bits_to_float<T>((k & 1) ? hi16(v) : lo16(v));
  };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int r = g + (i >= 2 ? 8 : 0);
    const int c = 2 * t + (i & 1);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, c);  // products are exact in fp32
    out[i] = acc;
  }
  w.sync("mma.sync");
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address
// of row l % 8 of matrix l / 8 (16-byte aligned); register i of lane l gets
// matrix i's (row l/4, cols 2(l%4), 2(l%4)+1), or with .trans its
// (rows 2(l%4), 2(l%4)+1, col l/4).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_addr, bool trans) {
  Warp& w = *tls.warp;
  if (w.size != 32) record_error("ldmatrix in a partial warp");
  if (reinterpret_cast<uintptr_t>(row_addr) % 16 != 0)
    record_error("ldmatrix: a row address is not 16-byte aligned");
  const int lane = tls.lane;
  w.addr[lane] = row_addr;
  w.sync("ldmatrix");
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = static_cast<const uint16_t*>(w.addr[8 * i + lane / 4]);
      lo = row[2 * (lane % 4)];
      hi = row[2 * (lane % 4) + 1];
    } else {
      lo = static_cast<const uint16_t*>(w.addr[8 * i + 2 * (lane % 4)])[lane / 4];
      hi = static_cast<const uint16_t*>(w.addr[8 * i + 2 * (lane % 4) + 1])[lane / 4];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  w.sync("ldmatrix");
}

inline void perform(const AsyncCopy& c) {
  unsigned char* d = static_cast<unsigned char*>(c.dst);
  if (c.src_bytes > 0) std::memcpy(d, c.src, static_cast<size_t>(c.src_bytes));
  std::memset(d + c.src_bytes, 0, static_cast<size_t>(16 - c.src_bytes));
}
inline void perform(const std::vector<AsyncCopy>& group) {
  for (const AsyncCopy& c : group) perform(c);
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes.  The device may land
// the copy anywhere between issue and the wait that covers it; the emulation
// takes one end (tls.cp_async_early, set per launch from STORYATTN_EMU_CP_ASYNC):
//   late (default): at the wait -- a tile read before its wait is stale;
//   early: at issue -- a reload issued while another warp still reads the
//     old tile (a missing barrier) overwrites it under that warp.
inline void cp_async16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0)
    record_error("cp.async: 16-byte copy with a misaligned address");
  if (src_bytes < 0 || src_bytes > 16) record_error("cp.async: src-size outside 0..16");
  if (tls.cp_async_early)
    perform(AsyncCopy{dst, src, src_bytes});
  else
    tls.open_group.push_back(AsyncCopy{dst, src, src_bytes});
}
inline void cp_async_commit() {
  tls.groups.push_back(std::move(tls.open_group));
  tls.open_group.clear();
}
// cp.async.wait_group n: every committed group but the newest n has landed.
inline void cp_async_wait(int n) {
  while (static_cast<int>(tls.groups.size()) > n) {
    perform(tls.groups.front());
    tls.groups.pop_front();
  }
}

// ---------------------------------------------------------------------------
// kernel launch: kernel<<<grid, block, smem, stream>>>(args...) is rewritten
// by tests/_cuda_emu.py into launch(grid, block, smem, stream, &kernel, args...)
// ---------------------------------------------------------------------------
template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t /*stream*/,
            void (*kernel)(KArgs...), Args&&... args) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  if (n <= 0 || n > 1024) {
    record_error("launch: block size must be 1..1024 threads");
    return;
  }
  const std::tuple<KArgs...> params(std::forward<Args>(args)...);
  const char* mode = std::getenv("STORYATTN_EMU_CP_ASYNC");
  const bool early = mode != nullptr && std::strcmp(mode, "early") == 0;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(n);
        for (int w0 = 0; w0 < n; w0 += 32)
          blk.warps.emplace_back(new Warp(n - w0 < 32 ? n - w0 : 32));
        std::vector<std::thread> threads;
        threads.reserve(static_cast<size_t>(n));
        for (int tid = 0; tid < n; ++tid) {
          threads.emplace_back([&, tid] {
            ThreadState& s = tls;
            s.thread_idx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
            s.block_idx = dim3(bx, by, bz);
            s.block_dim = block;
            s.grid_dim = grid;
            s.block = &blk;
            s.warp = blk.warps[static_cast<size_t>(tid / 32)].get();
            s.lane = tid % 32;
            s.cp_async_early = early;
            s.open_group.clear();
            s.groups.clear();
            std::tuple<KArgs...> mine = params;  // kernel parameters are per-thread copies
            std::apply(kernel, mine);
            // copies still in flight when a thread exits are not observable
            s.open_group.clear();
            s.groups.clear();
            s.warp->bar.leave();
            s.block->bar.leave();
          });
        }
        for (std::thread& t : threads) t.join();
      }
}

}  // namespace storyattn_emu

inline cudaError_t cudaGetLastError() {
  return storyattn_emu::error_text().empty() ? cudaSuccess : cudaErrorLaunchFailure;
}
