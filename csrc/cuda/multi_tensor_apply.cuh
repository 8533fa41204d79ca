#pragma once
// The CUDA multi-tensor engine (adam.cu, unscale.cu): one kernel launch applies an op's
// functor to every chunk of every tensor of a call, whatever the number of tensors (kernel
// arguments would cap a launch at a few hundred tensors). The tensors' addresses and sizes
// live in device-resident tables:
//
//   rows[t * ncols + l]  address of tensor t of list l (0 for an empty list), l < nlists
//   rows[t * ncols + nlists]  numel of tensor t (of list 0)
//   blocks[2 * b], blocks[2 * b + 1]  (tensor, chunk) of CUDA block b, in tensor order; a
//                                      tensor owns ceil(numel / chunk) blocks, an empty one
//                                      a block of its own only with Layout::empty_block
//
// build_tables uploads the tables of one call (a caller that keeps its tensors can build
// them once and launch with them every step). tables_for finds them in a small cache keyed
// by their contents, since they hold only addresses and sizes: a step over the same tensors
// launches the kernel and nothing else (no copy, no allocation), which also keeps a
// warmed-up step capturable in a CUDA graph. A miss copies them from pinned host memory
// (non_blocking, stream-ordered).
//
// An op is a functor with `__device__ void operator()(const mta::Chunk&) const`, run by every
// thread of the block that owns the chunk, and `__device__ bool skip() const`, asked first:
// true ends the block before it reads the tables (Adam with found_inf set writes nothing).
// launch<kThreads>(tables, op, stream) runs it.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

namespace fusedtrain {
namespace mta {

// How tensors are cut into blocks: `chunk` elements per block; empty_block gives an empty
// tensor one block (an op that writes something per tensor, e.g. Adam's step).
struct Layout {
  int64_t chunk;
  bool empty_block;
};

struct Tables {
  const int64_t* rows;
  const int32_t* blocks;
  int32_t ncols;    // nlists + 1
  int32_t nlists;
  int64_t nblocks;  // the grid
  int64_t chunk;    // elements per block
};

// What the CUDA block running it owns: elements [lo(), hi()) of tensor `tensor`. (lo and hi
// are computed where they are used: fewer values live across an op's own calls.)
struct Chunk {
  const int64_t* row;  // the tensor's row: row[l] its address in list l
  int64_t tensor;
  int64_t index;       // chunk of the tensor
  int64_t numel;       // of the tensor
  int64_t chunk;       // elements per chunk
  template <typename T>
  __device__ __forceinline__ T* ptr(int list) const {
    return reinterpret_cast<T*>(row[list]);
  }
  __device__ __forceinline__ int64_t lo() const { return index * chunk; }
  __device__ __forceinline__ int64_t hi() const { return lo() + chunk < numel ? lo() + chunk : numel; }
};

template <int kThreads, typename Op>
__global__ void __launch_bounds__(kThreads) apply_kernel(Tables tab, Op op) {
  if (op.skip()) return;
  Chunk c;
  c.tensor = tab.blocks[2 * blockIdx.x];
  c.index = tab.blocks[2 * blockIdx.x + 1];
  c.row = tab.rows + c.tensor * tab.ncols;
  c.numel = c.row[tab.nlists];
  c.chunk = tab.chunk;
  op(c);
}

// One launch of op over every block of tab, kThreads threads per block.
template <int kThreads, typename Op>
void launch(const Tables& tab, const Op& op, cudaStream_t stream) {
  if (tab.nblocks == 0) return;
  apply_kernel<kThreads, Op><<<static_cast<unsigned>(tab.nblocks), kThreads, 0, stream>>>(tab, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Tables on the device and the memory they point into.
struct DeviceTables {
  at::Tensor storage;  // int64: rows, then the blocks table (int32 pairs) packed
  Tables tables;
};

namespace detail {

inline int64_t blocks_of(int64_t numel, const Layout& layout) {
  const int64_t nb = (numel + layout.chunk - 1) / layout.chunk;
  return nb > 0 ? nb : (layout.empty_block ? 1 : 0);
}

// The rows table on the host; nblocks: the blocks of all tensors.
inline std::vector<int64_t> rows_of(const std::vector<at::TensorList>& lists, const Layout& layout,
                                    int64_t& nblocks) {
  const int32_t nlists = static_cast<int32_t>(lists.size());
  const int32_t ncols = nlists + 1;
  const int64_t n = static_cast<int64_t>(lists[0].size());
  TORCH_CHECK(n < (int64_t(1) << 31), "multi-tensor apply: too many tensors");
  std::vector<int64_t> rows(static_cast<size_t>(n * ncols));
  nblocks = 0;
  for (int64_t t = 0; t < n; ++t) {
    for (int32_t l = 0; l < nlists; ++l)
      rows[t * ncols + l] = lists[l].empty() ? 0 : reinterpret_cast<int64_t>(lists[l][t].data_ptr());
    const int64_t numel = lists[0][t].numel();
    rows[t * ncols + nlists] = numel;
    nblocks += blocks_of(numel, layout);
  }
  TORCH_CHECK(nblocks < (int64_t(1) << 31), "multi-tensor apply: too many blocks");
  return rows;
}

inline DeviceTables upload(const std::vector<int64_t>& rows, int32_t nlists, int64_t nblocks, const Layout& layout,
                           const at::Device& device) {
  const int32_t ncols = nlists + 1;
  const int64_t n = static_cast<int64_t>(rows.size()) / ncols;
  const int64_t words = n * ncols + nblocks;  // a block's two int32 fit one int64 word
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::memcpy(h, rows.data(), rows.size() * sizeof(int64_t));
  int32_t* hb = reinterpret_cast<int32_t*>(h + n * ncols);
  int64_t b = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t nb = blocks_of(rows[t * ncols + nlists], layout);
    for (int64_t k = 0; k < nb; ++k, ++b) {
      hb[2 * b] = static_cast<int32_t>(t);
      hb[2 * b + 1] = static_cast<int32_t>(k);
    }
  }
  at::Tensor dev = host.to(device, /*non_blocking=*/true);
  const int64_t* d = dev.data_ptr<int64_t>();
  return {dev, Tables{d, reinterpret_cast<const int32_t*>(d + n * ncols), ncols, nlists, nblocks, layout.chunk}};
}

struct Entry {
  int device;
  Layout layout;
  int32_t nlists;
  std::vector<int64_t> key;  // rows, as on the device
  DeviceTables tables;
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
// `device`. The tables stay valid as long as the returned storage is held.
inline DeviceTables build_tables(const std::vector<at::TensorList>& lists, const Layout& layout,
                                 const at::Device& device) {
  int64_t nblocks = 0;
  const std::vector<int64_t> rows = detail::rows_of(lists, layout, nblocks);
  return detail::upload(rows, static_cast<int32_t>(lists.size()), nblocks, layout, device);
}

// build_tables through the cache. The returned pointers stay valid until the cache evicts
// the entry (32 distinct tensor sets later).
inline Tables tables_for(const std::vector<at::TensorList>& lists, const Layout& layout, const at::Device& device) {
  const int32_t nlists = static_cast<int32_t>(lists.size());
  int64_t nblocks = 0;
  std::vector<int64_t> key = detail::rows_of(lists, layout, nblocks);
  std::lock_guard<std::mutex> lock(detail::cache_mutex());
  auto& c = detail::cache();
  for (auto it = c.begin(); it != c.end(); ++it) {
    if (it->device == device.index() && it->layout.chunk == layout.chunk &&
        it->layout.empty_block == layout.empty_block && it->nlists == nlists && it->key == key) {
      c.splice(c.begin(), c, it);  // most recently used first
      return c.front().tables.tables;
    }
  }
  DeviceTables dt = detail::upload(key, nlists, nblocks, layout, device);
  c.push_front(detail::Entry{static_cast<int>(device.index()), layout, nlists, std::move(key), std::move(dt)});
  if (c.size() > detail::kMaxEntries) c.pop_back();
  return c.front().tables.tables;
}

}  // namespace mta
}  // namespace fusedtrain
