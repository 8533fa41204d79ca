#pragma once
// Vector loads and stores of the CPU kernels (adam.cpp, unscale.cpp, bce.cpp): 2 * W
// elements of storage type T as two at::vec::Vectorized<op_t> of W lanes each, op_t the
// math type (float; double for fp64). fp32 / fp64 storage is two plain vector loads;
// bf16 / fp16 storage is one Vectorized<T> (2 * W elements) widened to fp32, and narrowed
// again (rounded once) by the store.
#include <ATen/cpu/vec/vec.h>

#include <tuple>
#include <type_traits>

namespace fusedtrain {
namespace vec_io {

template <typename op_t, typename T>
inline void load2(const T* p, at::vec::Vectorized<op_t>& a, at::vec::Vectorized<op_t>& b) {
  using V = at::vec::Vectorized<op_t>;
  if constexpr (std::is_same_v<T, op_t>) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
  } else {
    static_assert(at::vec::Vectorized<T>::size() == 2 * V::size(), "Vectorized<T> must hold 2 opmath vectors");
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

template <typename op_t, typename T>
inline void store2(T* p, const at::vec::Vectorized<op_t>& a, const at::vec::Vectorized<op_t>& b) {
  using V = at::vec::Vectorized<op_t>;
  if constexpr (std::is_same_v<T, op_t>) {
    a.store(p);
    b.store(p + V::size());
  } else {
    static_assert(at::vec::Vectorized<T>::size() == 2 * V::size(), "Vectorized<T> must hold 2 opmath vectors");
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

}  // namespace vec_io
}  // namespace fusedtrain
