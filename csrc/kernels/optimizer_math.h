// Per-element math of the paged optimizers, shared by the CUDA kernel (optimizer_kernels.cu) and the CPU
// implementation (../optimizer_step.cpp) so that both devices run the same arithmetic in the same order.
//
// No torch and no CUDA headers: the types below are plain C++ so that `nvcc -c` compiles the .cu files alone and
// the CPU build (no CUDA toolkit) compiles the .cpp files.
//
// The update follows torch.optim.AdamW / bitsandbytes' CPU path in float32:
//     m = beta1 * m + (1 - beta1) * g
//     v = beta2 * v + (1 - beta2) * g * g
//     p = p * (1 - lr * weight_decay)                      (decoupled weight decay, before the step)
//     p = p + (-lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// and Lion (Chen et al. 2023) as bitsandbytes implements it:
//     p = p * (1 - lr * weight_decay);  p = p - lr * sign(beta1 * m + (1 - beta1) * g)
//     m = beta2 * m + (1 - beta2) * g
// Bias corrections and the decay factor are computed on the host from the integer step, in double, and passed as
// float, so the device never needs to be read to launch a step.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define QK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define QK_HOST_DEVICE inline
#endif

namespace qlora_kernels {

// Elements per absmax block of the 8-bit state (bitsandbytes' blockwise optimizers use 256), and the unit of work
// of the multi-tensor step (one CUDA warp or one CPU task per chunk).
constexpr int kChunkSize = 256;
constexpr int kCodeSize = 256;  // levels of an 8-bit quantization map

enum OptimizerAlgorithm : int32_t { kAdamW = 0, kLion = 1 };
enum StateKind : int32_t { kStateFloat32 = 0, kStateBlockwise8bit = 1 };
enum ParamDType : int32_t { kParamFloat32 = 0, kParamFloat16 = 1, kParamBFloat16 = 2 };

// Scalars shared by every tensor of a parameter group; all computed on the host.
struct GroupHyperParams {
  float beta1;
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float eps;
  float lr;
  float decay;  // 1 - lr * weight_decay
};

// One tensor of a multi-tensor step. The table of these lives in device memory on CUDA (copied asynchronously from
// pinned host memory) so that one launch serves any number of tensors.
struct TensorEntry {
  void* param;                // ParamDType, numel elements, contiguous
  const void* grad;           // same dtype and numel as param
  void* exp_avg;              // float32[numel] or uint8[numel] (StateKind)
  void* exp_avg_sq;           // same kind as exp_avg; unused (null) for Lion
  float* exp_avg_absmax;      // float32[ceil(numel / kChunkSize)] for 8-bit state, else null
  float* exp_avg_sq_absmax;   // likewise for exp_avg_sq
  int64_t numel;
  int64_t first_chunk;        // index of this tensor's first chunk in the launch (prefix sum)
  float step_size;            // AdamW: lr / (1 - beta1^step); Lion: lr
  float bias_correction2_sqrt;  // AdamW: sqrt(1 - beta2^step); Lion: unused
  int32_t param_dtype;        // ParamDType
  int32_t state_kind;         // StateKind
};

// max that propagates NaN (fmaxf drops it): a NaN moment must poison its block's absmax, so that a NaN gradient
// shows up in the parameters as it does with torch.optim.AdamW instead of being silently discarded.
QK_HOST_DEVICE float nan_propagating_max(float a, float b) { return (a != a || a > b) ? a : b; }

QK_HOST_DEVICE float absolute(float x) { return x < 0.0f ? -x : x; }

// Index of the nearest level of a sorted 256-level map, given its 255 midpoints (midpoints[i] = (code[i] +
// code[i+1]) / 2 in float32): the number of midpoints strictly below x, so a value exactly on a midpoint goes to
// the lower level (the rule of reference.quantize_blockwise_8bit). NaN maps to 0 (every comparison is false).
QK_HOST_DEVICE int nearest_code_index(const float* midpoints, float x) {
  int index = 0;
  for (int step = 128; step > 0; step >>= 1) {
    const int probe = index + step;  // candidate count; midpoints[probe - 1] is its last midpoint
    if (probe <= kCodeSize - 1 && midpoints[probe - 1] < x) index = probe;
  }
  return index;
}

// Quantize a first moment onto the signed map. A negative moment never rounds to the +0 level: its sign is what
// the update direction depends on (bitsandbytes' CUDA kernel keeps the sign the same way).
QK_HOST_DEVICE uint8_t quantize_signed(const float* code, const float* midpoints, float x) {
  int index = nearest_code_index(midpoints, x);
  if (x < 0.0f && code[index] >= 0.0f) index -= 1;
  return static_cast<uint8_t>(index);
}

QK_HOST_DEVICE uint8_t quantize_unsigned(const float* midpoints, float x) {
  return static_cast<uint8_t>(nearest_code_index(midpoints, x));
}

// 1 / absmax, or 0 for an all-zero block (its codes then all decode to 0 whatever they are).
QK_HOST_DEVICE float inverse_absmax(float absmax) {
  return absmax > 0.0f ? 1.0f / absmax : (absmax == 0.0f ? 0.0f : absmax);  // NaN stays NaN
}

QK_HOST_DEVICE void adamw_update_moments(float& m, float& v, float g, const GroupHyperParams& h) {
  m = h.beta1 * m + h.one_minus_beta1 * g;
  v = h.beta2 * v + (h.one_minus_beta2 * g) * g;
}

QK_HOST_DEVICE float adamw_new_param(float p, float m, float v, float step_size, float bias_correction2_sqrt,
                                     const GroupHyperParams& h) {
  const float denom = sqrtf(v) / bias_correction2_sqrt + h.eps;
  p = p * h.decay;
  return p + (-step_size * m) / denom;
}

QK_HOST_DEVICE float sign_propagating_nan(float x) {
  return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == 0.0f ? 0.0f : x));
}

// The largest finite float32, and a clamp into [-kFloatMax, kFloatMax] that leaves NaN as NaN.
constexpr float kFloatMax = 3.4028234663852886e38f;
QK_HOST_DEVICE float clamp_to_float_range(float x) { return x > kFloatMax ? kFloatMax : (x < -kFloatMax ? -kFloatMax : x); }

// Lion: returns the new parameter and updates m in place. An infinite gradient element is what Lion's sign() is
// made for: its parameter takes the finite +-lr step, as bitsandbytes' Lion and Lion8bit do, and its momentum is
// kept at the float32 limit instead of +-inf, so that on 8-bit state the block's absmax stays finite (an infinite
// absmax would decode the block's zero codes to NaN and poison 256 parameters for good). A NaN gradient element
// stays NaN (its parameter becomes NaN, as under AdamW).
QK_HOST_DEVICE float lion_step(float p, float& m, float g, float lr, const GroupHyperParams& h) {
  const float direction = sign_propagating_nan(h.beta1 * m + h.one_minus_beta1 * g);
  p = p * h.decay;
  p = p - lr * direction;
  m = clamp_to_float_range(h.beta2 * m + h.one_minus_beta2 * g);
  return p;
}

}  // namespace qlora_kernels
