#pragma once
// Vector loads and stores of the CUDA kernels (adam.cu, unscale.cu, bce.cu): N elements of
// type T moved as one aligned Pack of N * sizeof(T) bytes (16 bytes: one LDG.128 / STG.128;
// a 32-byte Pack is two). A kernel checks alignment (aligned<T, N>, head<T, N>) and keeps a
// scalar path for what is not aligned.
#include <cstdint>

namespace fusedtrain {
namespace vec_io {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// p may be read and written as Pack<T, N>.
template <typename T, int N>
__host__ __device__ __forceinline__ bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

// Elements from p to the next address aligned<T, N> (0 when p is): a kernel peels them off
// as scalars and moves the rest as Packs (a view that starts inside a buffer, e.g. a grad of
// DDP's gradient_as_bucket_view, still gets vector accesses).
template <typename T, int N>
__host__ __device__ __forceinline__ int64_t head(const void* p) {
  constexpr uintptr_t bytes = sizeof(T) * N;
  return static_cast<int64_t>(((bytes - reinterpret_cast<uintptr_t>(p) % bytes) % bytes) / sizeof(T));
}

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& x) {
  *reinterpret_cast<Pack<T, N>*>(p) = x;
}

// out[k] = U(p[k]) from one aligned access (p: aligned<T, N>).
template <typename T, typename U, int N>
__device__ __forceinline__ void load_vec(const T* p, U (&out)[N]) {
  const Pack<T, N> x = load_pack<N>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = static_cast<U>(x.v[k]);
}

// p[k] = T(in[k]) as one aligned access (p: aligned<T, N>).
template <typename T, typename U, int N>
__device__ __forceinline__ void store_vec(T* p, const U (&in)[N]) {
  Pack<T, N> x;
#pragma unroll
  for (int k = 0; k < N; ++k) x.v[k] = static_cast<T>(in[k]);
  store_pack<N>(p, x);
}

// The first n (<= N) elements: one aligned access when vec (then n == N), else n scalar
// accesses (out[k] = 0 for k >= n).
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, bool vec, int n, T (&out)[N]) {
  if (vec) {
    load_vec(p, out);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = j < n ? p[j] : T(0);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, bool vec, int n, const T (&in)[N]) {
  if (vec) {
    store_vec(p, in);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < n) p[j] = in[j];
  }
}

}  // namespace vec_io
}  // namespace fusedtrain
