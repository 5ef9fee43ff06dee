// The CPU kernel of qlora_kernels::multi_tensor_optimizer_step (optimizer_cpu.cpp) and the plan it runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "kernels/optimizer_math.h"

namespace qlora_kernels {

// A checked optimizer step: one TensorEntry per non-empty tensor (bias corrections already computed on the host).
struct StepPlan {
  OptimizerAlgorithm algorithm = kAdamW;
  GroupHyperParams hyper{};
  std::vector<TensorEntry> entries;  // in order, first_chunk ascending
  int64_t total_chunks = 0;
  bool has_8bit_state = false;
  at::Device device = at::kCPU;
};

// Runs `plan` on CPU tensors with at::parallel_for over 256-element chunks. The quantization maps (float32[256])
// are read only when the plan has 8-bit state.
void run_step_cpu(const StepPlan& plan, const at::Tensor& signed_code, const at::Tensor& unsigned_code);

// Index of the nearest level of the sorted 256-level map `code` for each (already scaled) value, with the
// first-moment sign rule when `keep_sign`: exactly what the 8-bit state stores. With `binary_search`, by the CUDA
// kernel's search (optimizer_math.h), else by the CPU kernel's bucketed search. Exposed so tests can check both
// against each other and against the reference on edge cases (midpoints, their neighbours, NaN, +-inf).
at::Tensor nearest_code_indices_cpu(const at::Tensor& scaled, const at::Tensor& code, bool keep_sign,
                                    bool binary_search);

}  // namespace qlora_kernels
