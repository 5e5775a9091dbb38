// The Python module entskip._C. Importing it loads this library, which runs the op
// registrations (csrc/ops.cpp and the kernels' files). It holds
//   openmp       1 when the CPU kernels were compiled with OpenMP, the backend of
//                at::parallel_for in torch's builds: without it they run on one thread;
//   avx512_bf16  1 when they were compiled for a CPU with AVX512-BF16, which gives the
//                bfloat16 kernels their dot-product paths (ENTSKIP_CPU_AVX512_BF16=0 turns them off);
//   amx          1 when this CPU has AMX-BF16 and the process may use its tiles: the
//                bfloat16 forward and dx of the block kernels then run on them
//                (ENTSKIP_CPU_AMX=0 turns that off);
// and two direct calls of the elementwise ops, for eager calls from Python:
//   identity_skip_add(x, alpha, branch)                    = torch.ops.entskip.identity_skip_add
//   permutation_skip_add(x, index, inverse, alpha, branch) = torch.ops.entskip.permutation_skip_add
//                                                            (features last)
// They call the op through the dispatcher, as torch.ops does (autograd, dispatch modes and
// every dispatch key included), without torch.ops' argument matching against the schema,
// which costs more than the ViT-sized op itself does on small inputs. They take plain tensors
// only: no __torch_function__ handling (python/entskip/direct_calls.py decides when they may run).
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

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

PyObject* identity_skip_add(PyObject*, PyObject* const* args, Py_ssize_t n) {
  HANDLE_TH_ERRORS
  check_count(n, 3, "identity_skip_add");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("entskip::identity_skip_add", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
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
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("entskip::permutation_skip_add", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const std::optional<at::Tensor>&, bool)>();
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

PyMethodDef methods[] = {
    {"identity_skip_add", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&identity_skip_add)),
     METH_FASTCALL, "identity_skip_add(x, alpha, branch): torch.ops.entskip.identity_skip_add without torch.ops"},
    {"permutation_skip_add", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&permutation_skip_add)),
     METH_FASTCALL,
     "permutation_skip_add(x, index, inverse, alpha, branch): torch.ops.entskip.permutation_skip_add "
     "(features last) without torch.ops"},
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
