// The Python module entskip._C. Importing it loads this library, which runs the op
// registrations (csrc/ops.cpp and the kernels' files). It holds
//   openmp       1 when the CPU kernels were compiled with OpenMP, the backend of
//                at::parallel_for in torch's builds: without it they run on one thread;
//   avx512_bf16  1 when they were compiled for a CPU with AVX512-BF16, which gives the
//                bfloat16 kernels their dot-product paths (ENTSKIP_CPU_AVX512_BF16=0 turns them off);
//   amx          1 when this CPU has AMX-BF16 and the process may use its tiles: the
//                bfloat16 forward and dx of the block kernels then run on them
//                (ENTSKIP_CPU_AMX=0 turns that off);
// and direct calls of the elementwise ops, for eager calls from Python:
//   identity_skip_add(x, alpha, branch)                    = torch.ops.entskip.identity_skip_add
//   permutation_skip_add(x, index, inverse, alpha, branch) = torch.ops.entskip.permutation_skip_add
//                                                            (features last)
//   plain_skip_add(x, index, inverse, branch, alpha, features): one of the two for skip_add's
//                                                            common CPU call, with its checks
// They call the op through the dispatcher, as torch.ops does (autograd, dispatch modes and
// every dispatch key included), without torch.ops' argument matching against the schema,
// which costs more than the ViT-sized op itself does on small inputs. They take plain tensors
// only: no __torch_function__ handling (python/entskip/direct_calls.py decides when they may run).
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/python_numbers.h>

#include <cmath>
#include <optional>

#include "checks.h"
#include "cpu/amx_support.h"

namespace {

// args[i] as a tensor; branch (nullable) as an optional one. TypeError for anything else.
at::Tensor tensor_arg(PyObject* arg, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(arg), name, " must be a tensor, got ", Py_TYPE(arg)->tp_name);
  return THPVariable_Unpack(arg);
}

std::optional<at::Tensor> optional_tensor_arg(PyObject* arg, const char* name) {
  if (arg == Py_None) return std::nullopt;
  return tensor_arg(arg, name);
}

void check_count(Py_ssize_t n, Py_ssize_t expected, const char* fn) {
  TORCH_CHECK_TYPE(n == expected, fn, " takes ", expected, " arguments, got ", n);
}

// The ops' typed dispatcher handles.
auto identity_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("entskip::identity_skip_add", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
}

auto permutation_op() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("entskip::permutation_skip_add", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const std::optional<at::Tensor>&, bool)>();
}

PyObject* identity_skip_add(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 3, "identity_skip_add");
  static const auto op = identity_op();
  const at::Tensor x = tensor_arg(args[0], "x"), alpha = tensor_arg(args[1], "alpha");
  const std::optional<at::Tensor> branch = optional_tensor_arg(args[2], "branch");
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = op.call(x, alpha, branch);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyObject* permutation_skip_add(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 5, "permutation_skip_add");
  static const auto op = permutation_op();
  const at::Tensor x = tensor_arg(args[0], "x"), index = tensor_arg(args[1], "index"),
                   inverse = tensor_arg(args[2], "inverse"), alpha = tensor_arg(args[3], "alpha");
  const std::optional<at::Tensor> branch = optional_tensor_arg(args[4], "branch");
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = op.call(x, index, inverse, alpha, branch, false);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// alpha's value (a 0-d CPU tensor of a floating dtype the ops take), if it is finite in the
// compute dtype (float64 for float64 x, else float32; as entskip.ops checks it).
std::optional<double> finite_alpha(const at::Tensor& alpha, at::ScalarType x_dtype) {
  double a;
  switch (alpha.scalar_type()) {
    case at::kFloat: a = *alpha.const_data_ptr<float>(); break;
    case at::kDouble: a = *alpha.const_data_ptr<double>(); break;
    case at::kBFloat16: a = static_cast<double>(*alpha.const_data_ptr<c10::BFloat16>()); break;
    case at::kHalf: a = static_cast<double>(*alpha.const_data_ptr<c10::Half>()); break;
    default: return std::nullopt;
  }
  constexpr double kFloat32Overflow = 0x1p128 - 0x1p103;  // the least double that rounds to float32 infinity
  if (!std::isfinite(a) || (x_dtype != at::kDouble && std::abs(a) >= kFloat32Overflow)) return std::nullopt;
  return a;
}

// Whether index and inverse are int64 CPU vectors of d elements, inverse permutations of
// each other (so both are permutations of 0 .. d - 1; O(d)).
bool permutation_pair(const at::Tensor& index, const at::Tensor& inverse, int64_t d) {
  for (const at::Tensor* t : {&index, &inverse}) {
    if (!t->device().is_cpu() || t->layout() != at::kStrided || t->scalar_type() != at::kLong || t->dim() != 1 ||
        t->size(0) != d || !t->is_contiguous()) {
      return false;
    }
  }
  return entskip::first_unpaired(index.const_data_ptr<int64_t>(), inverse.const_data_ptr<int64_t>(), d) == d;
}

// skip_add's common eager call of an elementwise skip on CPU tensors, checked in one C++ step
// instead of Python's (python/entskip/direct_calls.py: plain_cpu_skip_add): None unless
// x, branch (or None) and alpha are plain tensors (no subclass, no torch function mode) on
// the CPU, x strided with at least one dimension and `features` features in its last (any
// count for -1), of a floating dtype, branch of x's shape and dtype, alpha a 0-d floating
// tensor finite in the compute dtype, and no CPU autocast; for the permutation, index and
// inverse (the mapping's buffers) a valid pair (permutation_pair). It then runs the
// identity op (index None) or the permutation op through the dispatcher, as the calls
// above do. Anything else returns None, and skip_add's general path checks it and raises
// the documented errors (a mapping's index edited in place: its ValueError).
PyObject* plain_skip_add(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 6, "plain_skip_add");
  PyObject *px = args[0], *pindex = args[1], *pinverse = args[2], *pbranch = args[3], *palpha = args[4];
  const int64_t features = THPUtils_unpackLong(args[5]);
  if (!THPVariable_CheckExact(px) || !THPVariable_CheckExact(palpha) ||
      (pbranch != Py_None && !THPVariable_CheckExact(pbranch)) ||
      (pindex != Py_None && (!THPVariable_CheckExact(pindex) || !THPVariable_CheckExact(pinverse))) ||
      at::impl::torch_function_mode_enabled() || at::autocast::is_autocast_enabled(at::kCPU)) {
    Py_RETURN_NONE;
  }
  const at::Tensor& x = THPVariable_Unpack(px);
  const at::Tensor& alpha = THPVariable_Unpack(palpha);
  if (!x.device().is_cpu() || x.layout() != at::kStrided || x.dim() == 0 || !at::isFloatingType(x.scalar_type()) ||
      (features >= 0 && x.size(-1) != features) || !alpha.device().is_cpu() || alpha.layout() != at::kStrided ||
      alpha.dim() != 0 || !finite_alpha(alpha, x.scalar_type()).has_value()) {
    Py_RETURN_NONE;
  }
  std::optional<at::Tensor> branch;
  if (pbranch != Py_None) {
    branch = THPVariable_Unpack(pbranch);
    if (!branch->device().is_cpu() || branch->layout() != at::kStrided || branch->scalar_type() != x.scalar_type() ||
        branch->sizes() != x.sizes()) {
      Py_RETURN_NONE;
    }
  }
  at::Tensor y;
  if (pindex == Py_None) {
    static const auto op = identity_op();
    pybind11::gil_scoped_release no_gil;
    y = op.call(x, alpha, branch);
  } else {
    static const auto op = permutation_op();
    const at::Tensor& index = THPVariable_Unpack(pindex);
    const at::Tensor& inverse = THPVariable_Unpack(pinverse);
    if (!permutation_pair(index, inverse, x.size(-1))) Py_RETURN_NONE;
    pybind11::gil_scoped_release no_gil;
    y = op.call(x, index, inverse, alpha, branch, false);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"identity_skip_add", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&identity_skip_add)),
     METH_FASTCALL, "identity_skip_add(x, alpha, branch): torch.ops.entskip.identity_skip_add without torch.ops"},
    {"permutation_skip_add", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&permutation_skip_add)),
     METH_FASTCALL,
     "permutation_skip_add(x, index, inverse, alpha, branch): torch.ops.entskip.permutation_skip_add "
     "(features last) without torch.ops"},
    {"plain_skip_add", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&plain_skip_add)), METH_FASTCALL,
     "plain_skip_add(x, index, inverse, branch, alpha, features): skip_add's eager elementwise call on plain CPU "
     "tensors, checked in C++; None for anything else"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
#ifdef _OPENMP
  constexpr long openmp = 1;
#else
  constexpr long openmp = 0;
#endif
#ifdef __AVX512BF16__
  constexpr long avx512_bf16 = 1;
#else
  constexpr long avx512_bf16 = 0;
#endif
  if (module != nullptr && (PyModule_AddIntConstant(module, "openmp", openmp) != 0 ||
                            PyModule_AddIntConstant(module, "avx512_bf16", avx512_bf16) != 0 ||
                            PyModule_AddIntConstant(module, "amx", entskip::cpu::amx_supported() ? 1 : 0) != 0)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
