// fusedtrain._C.AdamPlan: one param group's fusedtrain::adam_ calls, kept from step to step.
//
// FusedAdam.step reads a group's grads and states in Python (_init_group), cuts them into one
// call per dtype and hands the lists to the op. At 1000 params that is about 1 ms a step, half
// of a 1000x4096 fp32 step, most of it Python reading 5000 dict entries and the dispatcher
// boxing 5000 tensors. A plan keeps what the last step read and, at the next, checks in C
// that nothing it came from has changed: the same params in the group, the same of them with
// a grad, the same state dict of each and the same object under each of its keys (compared
// by identity, so an assignment anywhere is seen and the step takes the Python path again),
// each call's params still of the device and dtype it was cut for. Then it takes the grads
// from the params and calls the op. Benchmark rows "host: step of 1000 params of 4" and
// "..., plan" (fusedtrain/benchmarks/adam.py).
//
// Between steps the plan holds Python references (traversed by the garbage collector) and the
// state tensors, never a param or a grad (unpack() says why).
#include <torch/extension.h>

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <vector>

#include "fusedtrain/adam_lists.h"
#include "fusedtrain/adam_math.h"
#include "fusedtrain/multi_tensor_tables.h"

namespace fusedtrain {
namespace {

namespace py = pybind11;
using Tensors = std::vector<at::Tensor>;

// The state keys a step reads: the first three always, in this order; the others where present.
enum Key { kStep, kExpAvg, kExpAvgSq };

struct Call {
  std::vector<size_t> index;  // positions in the group's params
  bool master;                // whether the call updates master params
  c10::Device device{c10::kCPU};
  at::ScalarType dtype;
  Tensors params, grads;  // this step's (empty between steps)
  Tensors exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params;  // kept
  Tensors exp_avg_absmax, exp_avg_sq_absmax, max_exp_avg_sq_absmax;     // kept: 8-bit states'
  mta::KeptTables tables;  // the CUDA kernel's, built at the first launch (multi_tensor_tables.h)
};

class AdamPlan {
 public:
  // group_params: the group's "params" list; state: the optimizer's state; keys: the state
  // keys the step reads ("step", "exp_avg", "exp_avg_sq", then "max_exp_avg_sq" with amsgrad,
  // "master_param" with master weights, the absmax keys with 8-bit states); calls: (index,
  // master) of each call of this step as the Python path cut it; contiguous: the kernel needs
  // contiguous tensors (the Triton one; the native op stages others itself). The plan is then
  // gathered for this step.
  AdamPlan(const py::list& group_params, const py::dict& state, const std::vector<py::str>& keys,
           const std::vector<std::pair<std::vector<size_t>, bool>>& calls, bool amsgrad, bool contiguous)
      : state_(state), keys_(keys.begin(), keys.end()), amsgrad_(amsgrad), contiguous_(contiguous) {
    TORCH_CHECK(keys_.size() >= 3 && key_at(kStep) == "step" && key_at(kExpAvg) == "exp_avg" &&
                    key_at(kExpAvgSq) == "exp_avg_sq",
                "AdamPlan: unexpected keys");
    const bool master_key = key_index("master_param") >= 0;
    TORCH_CHECK(!amsgrad || key_index("max_exp_avg_sq") >= 0, "AdamPlan: amsgrad without \"max_exp_avg_sq\"");
    const size_t n = group_params.size();
    for (const auto& p : group_params) objects_.push_back(py::reinterpret_borrow<py::object>(p));
    with_grad_.assign(n, false);
    for (const auto& [index, master] : calls) {
      Call& c = calls_.emplace_back();
      c.index = index;
      c.master = master;
      TORCH_CHECK(!master || master_key, "AdamPlan: master params without the \"master_param\" key");
      for (size_t i : index) {
        TORCH_CHECK(i < n, "AdamPlan: index ", i, " out of range");
        with_grad_[i] = true;
      }
    }
    dicts_.resize(n);
    values_.resize(n * keys_.size());
    for (size_t i = 0; i < n; ++i) {
      if (!with_grad_[i]) continue;
      dicts_[i] = get(state_.ptr(), objects_[i].ptr());
      // exactly dicts: a subclass's own __getitem__ would be skipped by the lookups here
      TORCH_CHECK(dicts_[i] && PyDict_CheckExact(dicts_[i].ptr()), "AdamPlan: a param's state is not a dict");
      for (size_t k = 0; k < keys_.size(); ++k) values_[i * keys_.size() + k] = get(dicts_[i].ptr(), keys_[k].ptr());
    }
    // unpack() reads these objects as tensors without checking their type each step: the
    // identity checks of gather() keep them the objects checked here
    for (const auto* v : {&objects_, &values_})
      for (const py::object& o : *v)
        if (o && !THPVariable_Check(o.ptr())) throw py::type_error("fusedtrain adam: a param or state is not a tensor");
    keep_states();
    unpack();
    for (Call& c : calls_) {
      TORCH_CHECK(!c.params.empty(), "AdamPlan: an empty call");
      c.device = c.params[0].device();
      c.dtype = c.params[0].scalar_type();
    }
    check_or_release();
  }

  // Whether this step's lists are still what the Python path would gather from group_params
  // and state and cut into the same calls, and pass the op's checks; if so the plan holds
  // them for launch(). False: the step gathers the group in Python.
  bool gather(const py::handle& group_params, const py::handle& state) {
    PyObject* l = group_params.ptr();
    if (state.ptr() != state_.ptr() || !PyList_CheckExact(l) || static_cast<size_t>(PyList_GET_SIZE(l)) != objects_.size())
      return false;
    const size_t nk = keys_.size();
    for (size_t i = 0; i < objects_.size(); ++i) {
      if (PyList_GET_ITEM(l, i) != objects_[i].ptr()) return false;
      if (!with_grad_[i]) {
        if (has_grad(objects_[i])) return false;
        continue;
      }
      PyObject* d = lookup(state_.ptr(), objects_[i].ptr());
      if (d != dicts_[i].ptr()) return false;
      for (size_t k = 0; k < nk; ++k)
        if (lookup(d, keys_[k].ptr()) != values_[i * nk + k].ptr()) return false;
    }
    unpack();
    for (const Call& c : calls_) {
      for (const at::Tensor& g : c.grads) {
        if (!g.defined()) return release(), false;
      }
      if (c.params[0].device() != c.device || c.params[0].scalar_type() != c.dtype) return release(), false;
    }
    try {
      check_or_release();
    } catch (const c10::Error&) {  // a param or grad changed (dtype, device, shape, layout): the
      return false;                // Python path cuts the calls again, or raises the same message
    }
    return true;
  }

  // Run the calls gathered by gather() on the native op: the scalars are on the plan's device.
  // sr_seed: the group's stochastic-rounding seed (call k gets sr_call_seed(sr_seed, k));
  // sr_params: round the params stochastically; sr_exp_avg_sq: exp_avg_sq of calls with bf16
  // states (gather() checked that every call's params may be).
  void launch(double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
              double weight_decay, bool maximize, bool decoupled_weight_decay,
              const std::optional<at::Tensor>& grad_mult, const std::optional<at::Tensor>& found_inf,
              int64_t sr_seed, bool sr_params, bool sr_exp_avg_sq) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("fusedtrain::adam_", "")
            .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                        at::TensorList, at::TensorList, at::TensorList, at::TensorList, double, const std::optional<at::Tensor>&, double, double, double, double, bool,
                        bool, bool, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, bool,
                        bool)>();
    struct Release {
      AdamPlan* plan;
      ~Release() { plan->release(); }
    } release{this};
    for (const Call& c : calls_) TORCH_CHECK(c.grads.size() == c.params.size(), "AdamPlan.launch without gather");
    py::gil_scoped_release no_gil;
    // the params require grad: below autograd the op's kernel is called unboxed, as the
    // kernels of torch's own in-place ops are under no_grad
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (size_t k = 0; k < calls_.size(); ++k) {
      Call& c = calls_[k];
      const mta::UseTables use(&c.tables);  // the CUDA kernel reads tables the plan keeps
      const bool sr_v = sr_exp_avg_sq && c.exp_avgs[0].scalar_type() == at::kBFloat16;
      const int64_t seed = adam::sr_call_seed(static_cast<uint32_t>(sr_seed), static_cast<uint32_t>(k));
      op.call(c.params, c.grads, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs, c.steps, c.master_params,
              c.exp_avg_absmax, c.exp_avg_sq_absmax, c.max_exp_avg_sq_absmax, lr, lr_tensor,
              beta1, beta2, eps, weight_decay, amsgrad_, maximize, decoupled_weight_decay, grad_mult, found_inf, seed,
              sr_params, sr_v);
    }
  }

  // The address table of call `k` for a kernel that reads the tensors from a table (the
  // Triton one): row t holds the data_ptr of tensor t of each list `columns` names (an
  // AdamTensors field index; 0 for an empty list), then its numel. Valid after gather().
  at::Tensor addresses(size_t k, const std::vector<int>& columns) const {
    TORCH_CHECK(k < calls_.size(), "AdamPlan.addresses: no call ", k);
    const Call& c = calls_[k];
    TORCH_CHECK(!c.params.empty() && c.grads.size() == c.params.size(), "AdamPlan.addresses without gather");
    const Tensors* lists[] = {&c.params, &c.grads, &c.exp_avgs, &c.exp_avg_sqs, &c.max_exp_avg_sqs, &c.steps,
                              &c.master_params};
    std::vector<at::TensorList> cols;
    for (int l : columns) {
      TORCH_CHECK(l >= 0 && l < 7, "AdamPlan.addresses: no list ", l);
      cols.emplace_back(*lists[l]);
    }
    return mta::rows_tensor(cols);
  }

  // (params[0], exp_avgs[0], steps[0]) of call `k`: its dtypes and device for a launch that
  // takes tables. Valid after gather().
  std::tuple<at::Tensor, at::Tensor, at::Tensor> refs(size_t k) const {
    TORCH_CHECK(k < calls_.size() && !calls_[k].params.empty(), "AdamPlan.refs without gather");
    const Call& c = calls_[k];
    return {c.params[0], c.exp_avgs[0], c.steps[0]};
  }

  // Bump the version counters of what the calls wrote (fusedtrain/versions.h), for a launch
  // that did not go through the op (the Triton one). Valid after gather().
  void bump_versions() const {
    for (const Call& c : calls_)
      adam::bump_written(c.params, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs, c.steps, c.master_params);
  }

  // Drop this step's params and grads.
  void release() {
    for (Call& c : calls_) {
      c.params.clear();
      c.grads.clear();
    }
  }

  // For the garbage collector (tp_traverse, tp_clear).
  int traverse(visitproc visit, void* arg) const {
    for (const auto* v : {&objects_, &dicts_, &values_, &keys_})
      for (const py::object& o : *v) Py_VISIT(o.ptr());
    Py_VISIT(state_.ptr());
    return 0;
  }
  void clear_references() {
    release();
    calls_.clear();
    objects_.clear();
    dicts_.clear();
    values_.clear();
    with_grad_.clear();
    state_ = py::dict();
  }

 private:
  // A dict entry or null, never inserting (the state is a defaultdict).
  static PyObject* lookup(PyObject* dict, PyObject* key) {
    PyObject* v = PyDict_GetItemWithError(dict, key);  // borrowed
    if (!v && PyErr_Occurred()) throw py::error_already_set();
    return v;
  }
  static py::object get(PyObject* dict, PyObject* key) {
    return py::reinterpret_borrow<py::object>(lookup(dict, key));
  }

  static bool has_grad(const py::object& param) { return THPVariable_Unpack(param.ptr()).grad().defined(); }

  // The params and grads of this step, read from the param objects every step: a plan holds
  // no param or grad between steps, so torch.utils.swap_tensors works on a param
  // (nn.Module.to under torch.__future__.set_swap_module_params_on_conversion) and the grads
  // are freed by zero_grad. The states are kept as the tensors they were at the build (their
  // objects are checked by identity every step; a state object cannot be swapped while a plan
  // holds it). THPVariable_Unpack is the field read pybind11's tensor caster does after its
  // type check; reading all five lists anew every step, with refcounts, cost 0.2 ms more at
  // 1000 params (benchmark row "host: step of 1000 params of 4").
  void unpack() {
    for (Call& c : calls_) {
      c.params.clear();
      c.grads.clear();
      for (size_t i : c.index) {
        c.params.push_back(THPVariable_Unpack(objects_[i].ptr()));
        c.grads.push_back(c.params.back().grad());
      }
    }
  }

  std::string key_at(size_t k) const { return py::cast<std::string>(keys_[k]); }
  // The position of a state key in keys_, or -1.
  int64_t key_index(const char* name) const {
    for (size_t k = 0; k < keys_.size(); ++k)
      if (key_at(k) == name) return static_cast<int64_t>(k);
    return -1;
  }

  // The state tensors of each call. A call's params have states of one dtype (the Python path
  // cuts calls so); with 8-bit states (uint8 codes) it also keeps their block absmax, the state
  // tensors themselves (1-D: a plan holds no DTensor param, whose kernel reads a view of them).
  void keep_states() {
    const size_t nk = keys_.size();
    const auto tensor = [](const py::object& o) -> const at::Tensor& {
      TORCH_CHECK(o, "AdamPlan: a state the step reads is missing");
      return THPVariable_Unpack(o.ptr());
    };
    const int64_t vmax = key_index("max_exp_avg_sq"), master = key_index("master_param");
    const int64_t am_m = key_index("exp_avg_absmax"), am_v = key_index("exp_avg_sq_absmax"),
                  am_vmax = key_index("max_exp_avg_sq_absmax");
    for (Call& c : calls_) {
      for (size_t i : c.index) {
        const py::object* v = &values_[i * nk];
        c.steps.push_back(tensor(v[kStep]));
        c.exp_avgs.push_back(tensor(v[kExpAvg]));
        c.exp_avg_sqs.push_back(tensor(v[kExpAvgSq]));
        if (amsgrad_) c.max_exp_avg_sqs.push_back(tensor(v[vmax]));
        if (c.master) c.master_params.push_back(tensor(v[master]));
        if (c.exp_avgs.front().scalar_type() == at::kByte) {
          TORCH_CHECK(am_m >= 0 && am_v >= 0 && (!amsgrad_ || am_vmax >= 0), "AdamPlan: 8-bit states without absmax keys");
          c.exp_avg_absmax.push_back(tensor(v[am_m]));
          c.exp_avg_sq_absmax.push_back(tensor(v[am_v]));
          if (amsgrad_) c.max_exp_avg_sq_absmax.push_back(tensor(v[am_vmax]));
        }
      }
    }
  }

  // The op's own checks of every call, before any of them runs (the lists are dropped if one
  // fails).
  void check_or_release() {
    try {
      for (const Call& c : calls_) {
        adam::check_lists(c.params, c.grads, c.exp_avgs, c.exp_avg_sqs, c.max_exp_avg_sqs, c.steps, c.master_params,
                          c.exp_avg_absmax, c.exp_avg_sq_absmax, c.max_exp_avg_sq_absmax, amsgrad_);
        if (!contiguous_) continue;
        for (const Tensors* l : {&c.params, &c.grads, &c.exp_avgs, &c.exp_avg_sqs, &c.max_exp_avg_sqs, &c.master_params})
          for (const at::Tensor& t : *l) TORCH_CHECK(t.is_contiguous(), "AdamPlan: a tensor is not contiguous");
      }
    } catch (...) {
      release();
      throw;
    }
  }

  py::dict state_;
  std::vector<py::object> keys_;
  bool amsgrad_;
  bool contiguous_;
  // Strong references: an object freed and another allocated at its address must not pass
  // for it.
  std::vector<py::object> objects_;  // the group's params
  std::vector<bool> with_grad_;
  std::vector<py::object> dicts_;   // state[param] of each param with a grad
  std::vector<py::object> values_;  // dicts_[i][keys_[k]] at i * keys_.size() + k (null: absent)
  std::vector<Call> calls_;
};

}  // namespace

void bind_adam_plan(py::module_& m) {
  // the garbage-collector hooks of pybind11's custom_type_setup documentation
  py::class_<AdamPlan>(m, "AdamPlan", py::custom_type_setup([](PyHeapTypeObject* heap_type) {
                         auto* type = &heap_type->ht_type;
                         type->tp_flags |= Py_TPFLAGS_HAVE_GC;
                         type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) {
                           Py_VISIT(Py_TYPE(self));
                           if (!py::detail::is_holder_constructed(self)) return 0;
                           return py::cast<const AdamPlan&>(py::handle(self)).traverse(visit, arg);
                         };
                         type->tp_clear = [](PyObject* self) {
                           if (py::detail::is_holder_constructed(self))
                             py::cast<AdamPlan&>(py::handle(self)).clear_references();
                           return 0;
                         };
                       }))
      .def(py::init<const py::list&, const py::dict&, const std::vector<py::str>&,
                    const std::vector<std::pair<std::vector<size_t>, bool>>&, bool, bool>())
      .def("gather", &AdamPlan::gather)
      .def("launch", &AdamPlan::launch)
      .def("addresses", &AdamPlan::addresses)
      .def("refs", &AdamPlan::refs)
      .def("bump_versions", &AdamPlan::bump_versions)
      .def("release", &AdamPlan::release);
}

}  // namespace fusedtrain
