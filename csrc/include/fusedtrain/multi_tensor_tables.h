#pragma once
// The device tables of the CUDA multi-tensor engine (csrc/cuda/multi_tensor_apply.cuh) as
// plain data, so that host code (csrc/adam_plan.cpp) can own them without CUDA headers.
//
// Who owns a call's tables decides whether they are safe:
// - a call made without an owner builds its own tables and frees them after the launch
//   (stream-ordered, by the caching allocator);
// - an owner (an optimizer's plan) keeps them from launch to launch: uploaded again only when
//   an address or a size changed, so a steady-state step copies nothing to the device; they
//   are freed with the owner, never evicted from under it;
// - a call captured in a CUDA graph always builds its tables inside the graph: the words go
//   in kernel parameters (upload_words), the memory comes from the graph's pool. The graph
//   then owns them, and nothing it reads lives on the host or with an owner that may die first.
#include <ATen/core/Tensor.h>
#include <ATen/ops/tensor.h>
#include <c10/util/Exception.h>
#include <c10/core/Stream.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fusedtrain {
namespace mta {

// How tensors are cut into blocks: `chunk` elements per block; empty_block gives an empty
// tensor one block (an op that writes something per tensor, e.g. Adam's step).
struct Layout {
  int64_t chunk;
  bool empty_block;
};

// What a kernel reads (layout in multi_tensor_apply.cuh).
struct Tables {
  const int64_t* rows;
  const int32_t* blocks;
  int32_t ncols;    // nlists + 1
  int32_t nlists;
  int64_t nblocks;  // the grid
  int64_t chunk;    // elements per block
};

// Tables on the device and the memory they point into (hold it until the launch is queued).
struct DeviceTables {
  at::Tensor storage;  // int64: rows, then the blocks table (int32 pairs) packed
  Tables tables;
};

// The rows table of lists[l][t] (tensor t of list l; an empty list gives a column of zeros):
// rows[t * (nlists + 1) + l] the address of tensor t of list l, then its numel (of list 0).
// What an owner compares from call to call; the Triton kernels' rows too
// (fusedtrain/triton/multi_tensor.py, through fusedtrain._C.addresses).
inline std::vector<int64_t> rows_of(const std::vector<at::TensorList>& lists) {
  const size_t nlists = lists.size(), ncols = nlists + 1;
  const size_t n = lists[0].size();
  TORCH_CHECK(n < (size_t(1) << 31), "multi-tensor apply: too many tensors");
  for (size_t l = 1; l < nlists; ++l)
    TORCH_CHECK(lists[l].empty() || lists[l].size() == n, "multi-tensor apply: lists of different lengths");
  std::vector<int64_t> rows(n * ncols);
  for (size_t t = 0; t < n; ++t) {
    for (size_t l = 0; l < nlists; ++l)
      rows[t * ncols + l] = lists[l].empty() ? 0 : reinterpret_cast<int64_t>(lists[l][t].data_ptr());
    rows[t * ncols + nlists] = lists[0][t].numel();
  }
  return rows;
}

// rows_of(lists) as an (n, len(lists) + 1) int64 CPU tensor.
inline at::Tensor rows_tensor(const std::vector<at::TensorList>& lists) {
  const int64_t n = static_cast<int64_t>(lists[0].size()), ncols = static_cast<int64_t>(lists.size()) + 1;
  return at::tensor(rows_of(lists), at::kLong).view({n, ncols});
}

// One call's tables as their owner keeps them.
struct KeptTables {
  std::vector<int64_t> rows;  // the host rows of `kept` (empty: nothing kept yet)
  int64_t chunk = 0;
  bool empty_block = false;
  DeviceTables kept;
  std::optional<c10::Stream> stream;  // the stream `kept` was allocated on
};

// The owner whose tables the CUDA kernels called on this thread use (null: each call builds
// its own). An owner sets it around its calls with UseTables: the ops' schemas carry no table.
inline KeptTables*& current_owner() {
  static thread_local KeptTables* owner = nullptr;
  return owner;
}

struct UseTables {
  KeptTables* previous;
  explicit UseTables(KeptTables* owner) : previous(current_owner()) { current_owner() = owner; }
  ~UseTables() { current_owner() = previous; }
  UseTables(const UseTables&) = delete;
  UseTables& operator=(const UseTables&) = delete;
};

// `words` in a new int64 tensor on `device` (CUDA), on the current stream: from pinned memory
// (non_blocking), or, while the stream is capturing a CUDA graph, by kernels that carry the
// words in their parameters (csrc/cuda/multi_tensor_apply.cu).
at::Tensor upload_words(const int64_t* words, int64_t n, const at::Device& device);

}  // namespace mta
}  // namespace fusedtrain
