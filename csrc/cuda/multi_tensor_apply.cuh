#pragma once
// Multi-tensor apply with device-resident tables: one kernel launch for any number of
// tensors (kernel arguments would cap a launch at a few hundred tensors).
//
//   rows[t * ncols + l]  address of tensor t of list l (0 for an empty list), l < nlists
//   rows[t * ncols + nlists]  numel of tensor t (of list 0)
//   blocks[2 * b], blocks[2 * b + 1]  (tensor, chunk) of CUDA block b; every tensor owns
//                                      max(1, ceil(numel / chunk)) blocks
//
// The tables hold only addresses and sizes, so they are cached on the device keyed by their
// own contents: a step over the same tensors finds them there and launches the kernel and
// nothing else (no copy, no allocation), which also keeps a warmed-up step capturable in a
// CUDA graph. A miss copies them from pinned host memory (non_blocking, stream-ordered).
//
// Generic: the Adam step uses it, and any other multi-tensor op may.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

namespace fusedtrain {
namespace mta {

struct Tables {
  const int64_t* rows;
  const int32_t* blocks;
  int32_t ncols;    // nlists + 1
  int32_t nlists;
  int64_t nblocks;
  int64_t chunk;    // elements per block
};

// Tensor t's row.
__device__ __forceinline__ const int64_t* row_of(const Tables& tab, int64_t t) {
  return tab.rows + t * tab.ncols;
}

namespace detail {
struct Entry {
  int device;
  int64_t chunk;
  std::vector<int64_t> key;  // rows, as on the device
  at::Tensor dev;            // int64: rows, then the blocks table (int32 pairs) packed
  Tables tables;
};
inline std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}
inline std::list<Entry>& cache() {
  static std::list<Entry> c;
  return c;
}
constexpr size_t kMaxEntries = 32;
}  // namespace detail

// lists[l][t]: tensor t of list l; a list may be empty (its column holds 0). All tensors on
// `device`. The returned pointers stay valid until the cache evicts the entry (32 distinct
// tensor sets later).
inline Tables tables_for(const std::vector<at::TensorList>& lists, int64_t chunk, const at::Device& device) {
  const int32_t nlists = static_cast<int32_t>(lists.size());
  const int32_t ncols = nlists + 1;
  const int64_t n = static_cast<int64_t>(lists[0].size());
  std::vector<int64_t> key(static_cast<size_t>(n * ncols));
  int64_t nblocks = 0;
  for (int64_t t = 0; t < n; ++t) {
    for (int32_t l = 0; l < nlists; ++l)
      key[t * ncols + l] = lists[l].empty() ? 0 : reinterpret_cast<int64_t>(lists[l][t].data_ptr());
    const int64_t numel = lists[0][t].numel();
    key[t * ncols + nlists] = numel;
    nblocks += std::max<int64_t>(1, (numel + chunk - 1) / chunk);
  }
  std::lock_guard<std::mutex> lock(detail::cache_mutex());
  auto& c = detail::cache();
  for (auto it = c.begin(); it != c.end(); ++it) {
    if (it->device == device.index() && it->chunk == chunk && it->key == key) {
      c.splice(c.begin(), c, it);  // most recently used first
      return c.front().tables;
    }
  }
  const int64_t words = n * ncols + nblocks;  // a block's two int32 fit one int64 word
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::memcpy(h, key.data(), key.size() * sizeof(int64_t));
  int32_t* hb = reinterpret_cast<int32_t*>(h + n * ncols);
  int64_t b = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t numel = key[t * ncols + nlists];
    const int64_t nb = std::max<int64_t>(1, (numel + chunk - 1) / chunk);
    for (int64_t k = 0; k < nb; ++k, ++b) {
      hb[2 * b] = static_cast<int32_t>(t);
      hb[2 * b + 1] = static_cast<int32_t>(k);
    }
  }
  at::Tensor dev = host.to(device, /*non_blocking=*/true);
  const int64_t* d = dev.data_ptr<int64_t>();
  Tables tab{d, reinterpret_cast<const int32_t*>(d + n * ncols), ncols, nlists, nblocks, chunk};
  c.push_front(detail::Entry{static_cast<int>(device.index()), chunk, std::move(key), dev, tab});
  if (c.size() > detail::kMaxEntries) c.pop_back();
  return tab;
}

// An int32 workspace of at least n zeros on `device`, for kernels that count per tensor and
// reset their counters to zero before they finish (so it stays zero between launches).
inline int32_t* zeroed_counters(int64_t n, const at::Device& device) {
  static std::mutex m;
  static std::vector<at::Tensor> per_device;
  std::lock_guard<std::mutex> lock(m);
  const size_t i = static_cast<size_t>(device.index());
  if (per_device.size() <= i) per_device.resize(i + 1);
  at::Tensor& t = per_device[i];
  if (!t.defined() || t.numel() < n)
    t = at::zeros({std::max<int64_t>(n, 1024)}, at::TensorOptions().dtype(at::kInt).device(device));
  return t.data_ptr<int32_t>();
}

}  // namespace mta
}  // namespace fusedtrain
