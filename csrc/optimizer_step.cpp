// qlora_kernels::multi_tensor_optimizer_step: one AdamW or Lion step for every tensor of a parameter group.
//
// Both devices share the per-element math of kernels/optimizer_math.h and the same plan (a table of TensorEntry,
// one per non-empty tensor, with host-computed bias corrections): the CPU runs it with at::parallel_for over
// 256-element chunks, CUDA with one launch of kernels/optimizer_kernels.cu on the current stream. Every argument is
// checked here, before anything runs, so a bad call raises instead of writing out of bounds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/optimizer_math.h"
#include "optimizer_cpu.h"
#include "paged_tensor.h"

#ifdef QLORA_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/optimizer_kernels.h"
#endif

namespace qlora_kernels {
namespace {

int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

int32_t param_dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return kParamFloat32;
    case at::kHalf:
      return kParamFloat16;
    case at::kBFloat16:
      return kParamBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "multi_tensor_optimizer_step: parameters must be float32, float16 or bfloat16, got ",
                       dtype);
  }
  return kParamFloat32;  // unreachable
}

void check_same_device(const at::Tensor& tensor, const at::Device& device, const char* what, size_t i) {
  TORCH_CHECK_VALUE(tensor.device() == device, "multi_tensor_optimizer_step: ", what, "[", i, "] is on ",
                    tensor.device(), " but params[0] is on ", device, " (one group, one device)");
}

void check_dense_contiguous(const at::Tensor& tensor, const char* what, size_t i) {
  TORCH_CHECK_TYPE(tensor.layout() == at::kStrided, "multi_tensor_optimizer_step: ", what, "[", i,
                   "] must be a dense (strided) tensor, got layout ", tensor.layout());
  TORCH_CHECK_VALUE(tensor.is_contiguous(), "multi_tensor_optimizer_step: ", what, "[", i, "] must be contiguous");
}

// Checks one moment tensor (exp_avg or exp_avg_sq) and its absmax; returns whether the state is 8-bit.
bool check_state(const at::Tensor& state, const at::Tensor& absmax, int64_t numel, const at::Device& device,
                 const char* what, const char* absmax_what, size_t i) {
  check_same_device(state, device, what, i);
  check_dense_contiguous(state, what, i);
  TORCH_CHECK_VALUE(state.numel() == numel, "multi_tensor_optimizer_step: ", what, "[", i, "] has ", state.numel(),
                    " elements, params[", i, "] has ", numel);
  const bool quantized = state.scalar_type() == at::kByte;
  TORCH_CHECK_TYPE(quantized || state.scalar_type() == at::kFloat, "multi_tensor_optimizer_step: ", what, "[", i,
                   "] must be float32 (32-bit state) or uint8 (8-bit state), got ", state.scalar_type());
  if (quantized) {
    check_same_device(absmax, device, absmax_what, i);
    check_dense_contiguous(absmax, absmax_what, i);
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, "multi_tensor_optimizer_step: ", absmax_what, "[", i,
                     "] must be float32, got ", absmax.scalar_type());
    TORCH_CHECK_VALUE(absmax.numel() == chunks_of(numel), "multi_tensor_optimizer_step: ", absmax_what, "[", i,
                      "] must have ceil(numel / ", kChunkSize, ") = ", chunks_of(numel), " elements, got ",
                      absmax.numel());
  }
  return quantized;
}

void check_code(const at::Tensor& code, const at::Device& device, const char* what) {
  TORCH_CHECK_VALUE(code.defined() && code.device() == device && code.scalar_type() == at::kFloat &&
                        code.numel() == kCodeSize && code.is_contiguous(),
                    "multi_tensor_optimizer_step: ", what, " must be a contiguous float32[", kCodeSize,
                    "] quantization map on ", device);
}

StepPlan make_plan(c10::string_view algorithm, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList exp_avg_absmaxes,
                   at::TensorList exp_avg_sq_absmaxes, at::IntArrayRef steps, double lr, double beta1, double beta2,
                   double eps, double weight_decay, const at::Tensor& signed_code,
                   const at::Tensor& unsigned_code) {
  StepPlan plan;
  if (algorithm == "adamw") {
    plan.algorithm = kAdamW;
  } else if (algorithm == "lion") {
    plan.algorithm = kLion;
  } else {
    TORCH_CHECK_VALUE(false, "multi_tensor_optimizer_step: algorithm must be 'adamw' or 'lion', got '",
                      std::string(algorithm), "'");
  }
  const bool adamw = plan.algorithm == kAdamW;
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_absmaxes.size() == n && steps.size() == n,
                    "multi_tensor_optimizer_step: params, grads, exp_avgs, exp_avg_absmaxes and steps must have the "
                    "same length, got ",
                    n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_absmaxes.size(), ", ", steps.size());
  const size_t second_moments = adamw ? n : 0;
  TORCH_CHECK_VALUE(exp_avg_sqs.size() == second_moments && exp_avg_sq_absmaxes.size() == second_moments,
                    "multi_tensor_optimizer_step: exp_avg_sqs and exp_avg_sq_absmaxes must have ", second_moments,
                    " entries for ", std::string(algorithm), ", got ", exp_avg_sqs.size(), " and ",
                    exp_avg_sq_absmaxes.size());
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0.0, "multi_tensor_optimizer_step: lr must be finite and >= 0, got ",
                    lr);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "multi_tensor_optimizer_step: beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "multi_tensor_optimizer_step: beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "multi_tensor_optimizer_step: eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(std::isfinite(weight_decay) && weight_decay >= 0.0,
                    "multi_tensor_optimizer_step: weight_decay must be >= 0, got ", weight_decay);

  plan.hyper.beta1 = static_cast<float>(beta1);
  plan.hyper.beta2 = static_cast<float>(beta2);
  plan.hyper.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  plan.hyper.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  plan.hyper.eps = static_cast<float>(eps);
  plan.hyper.lr = static_cast<float>(lr);
  plan.hyper.decay = static_cast<float>(1.0 - lr * weight_decay);
  // The kernels compute in float32: a value that is finite in double but not in float would turn every parameter
  // into +-inf or NaN (lr = 1e39 is finite in double).
  TORCH_CHECK_VALUE(std::isfinite(plan.hyper.lr) && std::isfinite(plan.hyper.eps),
                    "multi_tensor_optimizer_step: lr and eps must be within float32's range, got lr=", lr,
                    ", eps=", eps);
  TORCH_CHECK_VALUE(std::isfinite(plan.hyper.decay),
                    "multi_tensor_optimizer_step: 1 - lr * weight_decay must be within float32's range, got lr=", lr,
                    ", weight_decay=", weight_decay);
  if (n == 0) return plan;

  plan.device = params[0].device();
  TORCH_CHECK_VALUE(plan.device.is_cpu() || plan.device.is_cuda(),
                    "multi_tensor_optimizer_step: parameters must be on cpu or cuda, got ", plan.device);
  const at::Tensor empty;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    const at::Tensor& grad = grads[i];
    TORCH_CHECK_VALUE(param.defined() && grad.defined(), "multi_tensor_optimizer_step: params[", i, "] and grads[",
                      i, "] must be defined");
    check_same_device(param, plan.device, "params", i);
    check_same_device(grad, plan.device, "grads", i);
    check_dense_contiguous(param, "params", i);
    check_dense_contiguous(grad, "grads", i);
    const int32_t dtype = param_dtype_code(param.scalar_type());
    TORCH_CHECK_TYPE(grad.scalar_type() == param.scalar_type(), "multi_tensor_optimizer_step: grads[", i, "] is ",
                     grad.scalar_type(), " but params[", i, "] is ", param.scalar_type());
    const int64_t numel = param.numel();
    TORCH_CHECK_VALUE(grad.numel() == numel, "multi_tensor_optimizer_step: grads[", i, "] has ", grad.numel(),
                      " elements, params[", i, "] has ", numel);
    TORCH_CHECK_VALUE(steps[i] >= 1, "multi_tensor_optimizer_step: steps[", i, "] must be >= 1, got ", steps[i]);

    const bool quantized = check_state(exp_avgs[i], exp_avg_absmaxes[i], numel, plan.device, "exp_avgs",
                                       "exp_avg_absmaxes", i);
    if (adamw) {
      const bool quantized_sq = check_state(exp_avg_sqs[i], exp_avg_sq_absmaxes[i], numel, plan.device,
                                            "exp_avg_sqs", "exp_avg_sq_absmaxes", i);
      TORCH_CHECK_VALUE(quantized_sq == quantized, "multi_tensor_optimizer_step: exp_avgs[", i, "] and exp_avg_sqs[",
                        i, "] must both be 8-bit or both be float32");
    }
    plan.has_8bit_state = plan.has_8bit_state || quantized;
    if (numel == 0) continue;

    TensorEntry entry{};
    entry.param = param.data_ptr();
    entry.grad = grad.data_ptr();
    entry.exp_avg = exp_avgs[i].data_ptr();
    entry.exp_avg_sq = adamw ? exp_avg_sqs[i].data_ptr() : nullptr;
    entry.exp_avg_absmax = quantized ? exp_avg_absmaxes[i].data_ptr<float>() : nullptr;
    entry.exp_avg_sq_absmax = quantized && adamw ? exp_avg_sq_absmaxes[i].data_ptr<float>() : nullptr;
    entry.numel = numel;
    entry.first_chunk = plan.total_chunks;
    // Bias corrections in double from the integer step, as torch.optim.AdamW computes them in Python.
    const double step = static_cast<double>(steps[i]);
    entry.step_size = static_cast<float>(adamw ? lr / (1.0 - std::pow(beta1, step)) : lr);
    entry.bias_correction2_sqrt = static_cast<float>(adamw ? std::sqrt(1.0 - std::pow(beta2, step)) : 1.0);
    TORCH_CHECK_VALUE(std::isfinite(entry.step_size) && entry.bias_correction2_sqrt > 0.0f,
                      "multi_tensor_optimizer_step: at steps[", i, "] = ", steps[i], " the bias-corrected step size "
                      "lr / (1 - beta1^step) = ", lr / (1.0 - std::pow(beta1, step)),
                      " or sqrt(1 - beta2^step) is outside float32's range (lr=", lr, ", betas=(", beta1, ", ", beta2,
                      "))");
    entry.param_dtype = dtype;
    entry.state_kind = quantized ? kStateBlockwise8bit : kStateFloat32;
    plan.entries.push_back(entry);
    plan.total_chunks += chunks_of(numel);
  }
  if (plan.has_8bit_state) {
    check_code(signed_code, plan.device, "signed_code");
    if (adamw) check_code(unsigned_code, plan.device, "unsigned_code");
  }
  return plan;
}

// Autograd tracks in-place updates by version counters; this op writes through raw pointers, so it bumps them.
void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors)
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

void bump_all_versions(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                       at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sq_absmaxes) {
  bump_versions(params);
  bump_versions(exp_avgs);
  bump_versions(exp_avg_sqs);
  bump_versions(exp_avg_absmaxes);
  bump_versions(exp_avg_sq_absmaxes);
}

// ----------------------------------------------------------------------------------------------------------- CUDA

#ifdef QLORA_KERNELS_WITH_CUDA
void run_step_cuda(const StepPlan& plan, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   const at::Tensor& signed_code, const at::Tensor& unsigned_code) {
  const c10::cuda::CUDAGuard guard(plan.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(plan.device.index()).stream();

  // Paged state comes back to the GPU ahead of the kernel, on the same stream (asynchronous, no host wait).
  for (const at::Tensor& t : exp_avgs) prefetch_if_paged(t);
  for (const at::Tensor& t : exp_avg_sqs) prefetch_if_paged(t);

  // The table goes to the device through pinned memory with a non-blocking copy on the current stream: the
  // caching host allocator keeps the pinned buffer until the copy has run, so nothing here waits for the GPU.
  const int64_t table_bytes = static_cast<int64_t>(plan.entries.size() * sizeof(TensorEntry));
  at::Tensor host_table = at::empty({table_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host_table.data_ptr(), plan.entries.data(), static_cast<size_t>(table_bytes));
  const at::Tensor device_table = host_table.to(plan.device, /*non_blocking=*/true);

  const bool adamw = plan.algorithm == kAdamW;
  const cudaError_t status = cuda::launch_multi_tensor_step(
      plan.algorithm, static_cast<const TensorEntry*>(device_table.data_ptr()),
      static_cast<int>(plan.entries.size()), plan.total_chunks, plan.has_8bit_state,
      plan.has_8bit_state ? signed_code.data_ptr<float>() : nullptr,
      plan.has_8bit_state && adamw ? unsigned_code.data_ptr<float>() : nullptr, plan.hyper, stream);
  TORCH_CHECK(status == cudaSuccess, "multi_tensor_optimizer_step: kernel launch failed: ", cudaGetErrorString(status));
}
#endif

// The kernel registered for both CPU and CUDA: check and plan, then run on the parameters' device.
void multi_tensor_optimizer_step(c10::string_view algorithm, at::TensorList params, at::TensorList grads,
                                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList exp_avg_absmaxes,
                                 at::TensorList exp_avg_sq_absmaxes, at::IntArrayRef steps, double lr, double beta1,
                                 double beta2, double eps, double weight_decay, const at::Tensor& signed_code,
                                 const at::Tensor& unsigned_code) {
  const StepPlan plan = make_plan(algorithm, params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                                  exp_avg_sq_absmaxes, steps, lr, beta1, beta2, eps, weight_decay, signed_code,
                                  unsigned_code);
  if (plan.entries.empty()) return;
  if (plan.device.is_cpu()) {
    run_step_cpu(plan, signed_code, unsigned_code);
  } else {
#ifdef QLORA_KERNELS_WITH_CUDA
    run_step_cuda(plan, exp_avgs, exp_avg_sqs, signed_code, unsigned_code);
#else
    TORCH_CHECK(false, "qlora_kernels._C was built without CUDA; rebuild it where torch has CUDA and nvcc is found");
#endif
  }
  bump_all_versions(params, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes);
}

}  // namespace
}  // namespace qlora_kernels

TORCH_LIBRARY_IMPL(qlora_kernels, CPU, m) {
  m.impl("multi_tensor_optimizer_step", &qlora_kernels::multi_tensor_optimizer_step);
  m.impl("_nearest_code_indices", &qlora_kernels::nearest_code_indices_cpu);
}

#ifdef QLORA_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(qlora_kernels, CUDA, m) {
  m.impl("multi_tensor_optimizer_step", &qlora_kernels::multi_tensor_optimizer_step);
}
#endif
