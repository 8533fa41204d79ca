// The Python module fusedtrain._C: importing it loads the TORCH_LIBRARY registrations, and
// three helpers of the optimizer's per-step path (fusedtrain/ops/adam.py) that take Python
// lists of tensors as they are, without boxing each tensor into a dispatcher list.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include "fusedtrain/adam_direct.h"

namespace py = pybind11;

namespace {

PyObject* parameter_type() {
  static PyObject* t = py::object(py::module::import("torch.nn").attr("Parameter")).release().ptr();
  return t;
}

// A torch.Tensor / nn.Parameter (no subclass with a __torch_function__ of its own) holding a
// plain strided CPU tensor: nothing the dispatcher would do for it besides calling the kernel.
const at::Tensor* plain_cpu(PyObject* o) {
  if (!THPVariable_CheckExact(o) && Py_TYPE(o) != reinterpret_cast<PyTypeObject*>(parameter_type())) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o);
  if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() || t.is_neg() || t.is_conj() ||
      t.is_inference())
    return nullptr;
  const auto ks = t.key_set();
  if (ks.has(c10::DispatchKey::Python) || ks.has(c10::DispatchKey::PythonTLSSnapshot) ||
      ks.has(c10::DispatchKey::Functionalize))
    return nullptr;
  return &t;
}

bool to_ptrs(py::handle seq, fusedtrain::PtrList& out) {
  PyObject* o = seq.ptr();
  if (!PyList_Check(o)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(o);
  out.v.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* t = plain_cpu(PyList_GET_ITEM(o, i));
    if (!t) return false;
    out.v[i] = t;
  }
  return true;
}

bool opt_tensor(py::handle h, const at::Tensor*& out) {
  out = nullptr;
  if (h.is_none()) return true;
  out = plain_cpu(h.ptr());
  return out != nullptr;
}

// fusedtrain::adam_ on CPU tensors, same checks and kernel as the op. Returns false (having
// done nothing) when some tensor is not a plain CPU tensor: the caller then calls the op.
bool adam_cpu_direct(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
                     py::handle max_exp_avg_sqs, py::handle steps, py::handle master_params, double lr,
                     py::handle lr_tensor, double beta1, double beta2, double eps, double weight_decay,
                     bool amsgrad, bool maximize, bool decoupled_weight_decay, py::handle grad_mult,
                     py::handle found_inf) {
  fusedtrain::PtrList l[7];
  py::handle in[7] = {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, master_params};
  for (int k = 0; k < 7; ++k)
    if (!to_ptrs(in[k], l[k])) return false;
  const at::Tensor *lt, *gm, *fi;
  if (!opt_tensor(lr_tensor, lt) || !opt_tensor(grad_mult, gm) || !opt_tensor(found_inf, fi)) return false;
  {
    py::gil_scoped_release nogil;
    fusedtrain::adam_cpu_direct(l[0], l[1], l[2], l[3], l[4], l[5], l[6], lr, lt, beta1, beta2, eps, weight_decay,
                                amsgrad, maximize, decoupled_weight_decay, gm, fi);
  }
  // version counters: untouched, as through the op (its autograd fallback bumps none here)
  return true;
}

// The per-step grad check of a trusted plan (fusedtrain/ops/adam.py prepare): 0 when every
// grad is a strided tensor with its param's dtype and shape on params[0]'s device, all
// contiguous; 1 the same with some grad not contiguous; 2 anything else (the Python check
// then says what).
int adam_check_grads(py::handle params, py::handle grads) {
  PyObject* ps = params.ptr();
  PyObject* gs = grads.ptr();
  if (!PyList_Check(ps) || !PyList_Check(gs) || PyList_GET_SIZE(ps) != PyList_GET_SIZE(gs)) return 2;
  const Py_ssize_t n = PyList_GET_SIZE(ps);
  if (n == 0) return 0;
  int res = 0;
  std::optional<c10::Device> dev;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* po = PyList_GET_ITEM(ps, i);
    PyObject* go = PyList_GET_ITEM(gs, i);
    if (!THPVariable_Check(po) || !THPVariable_Check(go)) return 2;
    const at::Tensor& p = THPVariable_Unpack(po);
    const at::Tensor& g = THPVariable_Unpack(go);
    if (!p.defined() || !g.defined()) return 2;
    if (!dev) dev = p.device();
    if (g.layout() != at::kStrided || g.scalar_type() != p.scalar_type() || g.device() != *dev ||
        g.sizes() != p.sizes())
      return 2;
    if (!g.is_contiguous()) res = 1;
  }
  return res;
}

// [p.grad for p in params] without the interpreter (FusedAdam's per-step gather), or None
// when params is not a list of plain tensors/Parameters (a subclass may define grad its own
// way) or some grad is None: the caller then does it in Python.
py::object grads_of(py::handle params) {
  PyObject* ps = params.ptr();
  if (!PyList_Check(ps)) return py::none();
  const Py_ssize_t n = PyList_GET_SIZE(ps);
  py::list out(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* o = PyList_GET_ITEM(ps, i);
    if (!THPVariable_CheckExact(o) && Py_TYPE(o) != reinterpret_cast<PyTypeObject*>(parameter_type()))
      return py::none();
    const at::Tensor& g = THPVariable_Unpack(o).grad();
    if (!g.defined()) return py::none();
    PyList_SET_ITEM(out.ptr(), i, THPVariable_Wrap(g));  // what p.grad returns: a new reference
  }
  return std::move(out);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedtrain compiled kernels (ops are under torch.ops.fusedtrain)";
#ifdef FUSEDTRAIN_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
#if defined(CPU_CAPABILITY_AVX2)
  m.attr("cpu_capability") = "AVX2";
#else
  m.attr("cpu_capability") = "DEFAULT";
#endif
  m.def("adam_cpu_direct", &adam_cpu_direct);
  m.def("adam_check_grads", &adam_check_grads);
  m.def("grads_of", &grads_of);
}
