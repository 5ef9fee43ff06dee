// qlora_kernels._C: the op schemas of the C++/CUDA extension and the Python module object that loads them.
//
// The ops live in the qlora_kernels:: namespace, which Python also extends (qlora_kernels/ops.py registers its
// custom ops through torch.library fragments). A namespace may have one TORCH_LIBRARY block and any number of
// fragments, in either load order, so this file owns the single TORCH_LIBRARY block and Python adds fragments;
// tests/test_paged_memory.py loads the two in both orders to keep that true.
#include <Python.h>
#include <torch/library.h>

#include "paged_tensor.h"

TORCH_LIBRARY(qlora_kernels, m) {
  // Unified-memory tensors (paged_tensor.cpp). No tensor argument decides the device of paged_empty, so these
  // are catch-all kernels that handle CPU and CUDA themselves.
  m.def("paged_empty(int[] size, ScalarType dtype, Device device) -> Tensor", &qlora_kernels::paged_empty);
  m.def("is_paged(Tensor tensor) -> bool", &qlora_kernels::is_paged);
  m.def("paged_prefetch(Tensor tensor) -> ()", &qlora_kernels::paged_prefetch);
  m.def("paged_evict(Tensor tensor) -> ()", &qlora_kernels::paged_evict);
  m.def("paged_bytes_in_use() -> int", &qlora_kernels::paged_bytes_in_use);
  // Whether the CUDA kernels were compiled in (setup.py builds them only where torch has CUDA and nvcc exists).
  m.def("_built_with_cuda() -> bool", []() -> bool {
#ifdef QLORA_KERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  // One optimizer step for every tensor of a parameter group (optimizer_step.cpp: CPU and CUDA kernels).
  // algorithm: "adamw" or "lion". exp_avg_sqs / exp_avg_sq_absmaxes are empty lists for Lion; an absmax is an
  // empty tensor where the state is float32. steps[i] is the 1-based step of tensor i (bias corrections).
  m.def(
      "multi_tensor_optimizer_step(str algorithm, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] exp_avg_absmaxes, Tensor(e!)[] exp_avg_sq_absmaxes, int[] steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, Tensor signed_code, "
      "Tensor unsigned_code) -> ()");
  // Test hook: the 8-bit state's nearest-level search on CPU values (optimizer_cpu.h).
  m.def("_nearest_code_indices(Tensor scaled, Tensor code, bool keep_sign, bool binary_search) -> Tensor");
}

// A plain module object: importing it runs the static registrations above.
static struct PyModuleDef extension_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "qlora_kernels' C++/CUDA extension: ops registered under torch.ops.qlora_kernels.",
    -1,       // no per-module state
    nullptr,  // no methods: the ops are in torch.ops.qlora_kernels
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&extension_module); }
