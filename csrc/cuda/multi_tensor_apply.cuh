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
// Who owns the tables, and why a captured graph builds its own: multi_tensor_tables.h.
// tables_of() gives a call the current owner's kept tables (rebuilt only when an address or
// size changed), or tables of its own.
//
// An op is a functor with `__device__ void operator()(const mta::Chunk&) const`, run by every
// thread of the block that owns the chunk, and `__device__ bool skip() const`, asked first:
// true ends the block before it reads the tables (Adam with found_inf set writes nothing).
// launch<kThreads>(tables, op, stream) runs it.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDACachingAllocator.h>

#include <cstdint>
#include <vector>

#include "fusedtrain/multi_tensor_tables.h"

namespace fusedtrain {
namespace mta {

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

namespace detail {

inline int64_t blocks_of(int64_t numel, const Layout& layout) {
  const int64_t nb = (numel + layout.chunk - 1) / layout.chunk;
  return nb > 0 ? nb : (layout.empty_block ? 1 : 0);
}

// The rows table on the host (multi_tensor_tables.h); nblocks: the blocks of all tensors.
inline std::vector<int64_t> rows_of(const std::vector<at::TensorList>& lists, const Layout& layout,
                                    int64_t& nblocks) {
  std::vector<int64_t> rows = mta::rows_of(lists);
  const size_t ncols = lists.size() + 1;
  nblocks = 0;
  for (size_t r = ncols - 1; r < rows.size(); r += ncols) nblocks += blocks_of(rows[r], layout);
  TORCH_CHECK(nblocks < (int64_t(1) << 31), "multi-tensor apply: too many blocks");
  return rows;
}

// The rows, then every block's (tensor, chunk) as two int32 in one int64 word, uploaded.
inline DeviceTables upload(const std::vector<int64_t>& rows, int32_t nlists, int64_t nblocks, const Layout& layout,
                           const at::Device& device) {
  const int32_t ncols = nlists + 1;
  const int64_t n = static_cast<int64_t>(rows.size()) / ncols;
  std::vector<int64_t> words(static_cast<size_t>(n * ncols + nblocks));
  std::copy(rows.begin(), rows.end(), words.begin());
  int32_t* hb = reinterpret_cast<int32_t*>(words.data() + n * ncols);
  int64_t b = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t nb = blocks_of(rows[t * ncols + nlists], layout);
    for (int64_t k = 0; k < nb; ++k, ++b) {
      hb[2 * b] = static_cast<int32_t>(t);
      hb[2 * b + 1] = static_cast<int32_t>(k);
    }
  }
  at::Tensor dev = upload_words(words.data(), static_cast<int64_t>(words.size()), device);
  const int64_t* d = dev.data_ptr<int64_t>();
  return {dev, Tables{d, reinterpret_cast<const int32_t*>(d + n * ncols), ncols, nlists, nblocks, layout.chunk}};
}

}  // namespace detail

// The tables of one call: lists[l][t] is tensor t of list l; a list may be empty (its column
// holds 0). All tensors on `device`, the current device. The current owner's kept tables
// when there is one and the stream is not capturing, else tables of this call's own. Hold
// the result until the launch is queued.
inline DeviceTables tables_of(const std::vector<at::TensorList>& lists, const Layout& layout,
                              const at::Device& device) {
  int64_t nblocks = 0;
  std::vector<int64_t> rows = detail::rows_of(lists, layout, nblocks);
  const int32_t nlists = static_cast<int32_t>(lists.size());
  KeptTables* owner = current_owner();
  if (owner == nullptr || at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None)
    return detail::upload(rows, nlists, nblocks, layout, device);
  const c10::Stream stream = at::cuda::getCurrentCUDAStream();
  if (owner->kept.storage.defined() && owner->kept.tables.nlists == nlists && owner->rows == rows &&
      owner->chunk == layout.chunk && owner->empty_block == layout.empty_block && owner->kept.storage.device() == device) {
    // kept tables read on another stream than the one they were allocated on: their memory
    // must not be reused before that stream's work is done when the owner replaces them
    if (stream != *owner->stream)
      c10::cuda::CUDACachingAllocator::recordStream(owner->kept.storage.storage().data_ptr(),
                                                    at::cuda::CUDAStream(at::cuda::CUDAStream::UNCHECKED, stream));
    return owner->kept;
  }
  owner->kept = detail::upload(rows, nlists, nblocks, layout, device);
  owner->rows = std::move(rows);
  owner->chunk = layout.chunk;
  owner->empty_block = layout.empty_block;
  owner->stream = stream;
  return owner->kept;
}

}  // namespace mta
}  // namespace fusedtrain
