// Device helpers shared by the storyattn kernels: scalar conversions and
// two-element vector access for float / half / bfloat16.  Only CUDA headers.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace storyattn {
namespace detail {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two adjacent elements as one aligned access (8 bytes for float, 4 for the
// 16-bit types): the RoPE pair (x[2i], x[2i+1]) is loaded and stored together.
template <typename T> struct Vec2;
template <> struct Vec2<float> { using type = float2; };
template <> struct Vec2<__half> { using type = __half2; };
template <> struct Vec2<__nv_bfloat16> { using type = __nv_bfloat162; };

template <typename T>
__device__ __forceinline__ float2 load2(const T* p) {
  typename Vec2<T>::type v = *reinterpret_cast<const typename Vec2<T>::type*>(p);
  return make_float2(to_float(v.x), to_float(v.y));
}

template <typename T>
__device__ __forceinline__ void store2(T* p, float a, float b) {
  typename Vec2<T>::type v;
  v.x = from_float<T>(a);
  v.y = from_float<T>(b);
  *reinterpret_cast<typename Vec2<T>::type*>(p) = v;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace detail
}  // namespace storyattn
