#pragma once
// The CPU multi-tensor engine of adam.cpp and unscale.cpp: one at::parallel_for over all
// elements of all tensors of a call.
//
// Every tensor is cut into units of `unit` elements (its last unit may be shorter; an empty
// tensor has none), the units are numbered in tensor order (a prefix sum of unit counts per
// tensor), and at::parallel_for hands out contiguous runs of units. A run maps back to one
// span of elements [lo, hi) per tensor it touches, in tensor order. The units depend on the
// tensor sizes only, never on the thread count, so a kernel that keeps one result per unit
// and combines them in unit order is deterministic across runs and thread counts.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fusedtrain {
namespace mta {

class Units {
 public:
  // numel_of(t): the element count of tensor t, for t in [0, n_tensors).
  template <typename NumelOf>
  Units(int64_t n_tensors, int64_t unit, NumelOf&& numel_of)
      : unit_(unit), numel_(n_tensors), start_(n_tensors + 1, 0) {
    for (int64_t t = 0; t < n_tensors; ++t) {
      numel_[t] = numel_of(t);
      start_[t + 1] = start_[t] + (numel_[t] + unit - 1) / unit;
    }
  }

  int64_t unit() const { return unit_; }
  int64_t count() const { return start_.back(); }  // units of all tensors
  int64_t first(int64_t t) const { return start_[t]; }  // the number of tensor t's first unit

  // f(t, lo, hi, next) for elements [lo, hi) (lo < hi) of every tensor t with elements in
  // units [ub, ue), in tensor order. lo is a multiple of unit(). next: tensor t + 1 starts
  // inside [ub, ue) too, so the same thread goes on with it (a kernel may prefetch into it).
  template <typename F>
  void for_spans(int64_t ub, int64_t ue, F&& f) const {
    const int64_t n = static_cast<int64_t>(numel_.size());
    int64_t t = std::upper_bound(start_.begin(), start_.end(), ub) - start_.begin() - 1;
    for (; t < n && start_[t] < ue; ++t) {
      const int64_t lo = std::max<int64_t>(ub - start_[t], 0) * unit_;
      const int64_t hi = std::min<int64_t>((ue - start_[t]) * unit_, numel_[t]);
      if (lo < hi) f(t, lo, hi, t + 1 < n && start_[t + 1] < ue);
    }
  }

  // All units, f as for for_spans: on the calling thread when serial, else through
  // at::parallel_for with at least `grain` units per task.
  template <typename F>
  void parallel(int64_t grain, bool serial, F&& f) const {
    const int64_t units = count();
    if (units == 0) return;
    if (serial) {
      for_spans(0, units, f);
    } else {
      at::parallel_for(0, units, grain, [&](int64_t ub, int64_t ue) { for_spans(ub, ue, f); });
    }
  }

 private:
  int64_t unit_;
  std::vector<int64_t> numel_;
  std::vector<int64_t> start_;  // start_[t]: first unit of tensor t; start_[n]: all units
};

}  // namespace mta
}  // namespace fusedtrain
