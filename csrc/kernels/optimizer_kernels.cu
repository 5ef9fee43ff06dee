// Fused multi-tensor AdamW / Lion step with float32 or blockwise 8-bit state, for every tensor of a parameter group
// in one launch.
//
// Work split: a chunk is kChunkSize (256) consecutive elements of one tensor, which is also one absmax block of the
// 8-bit state, so a single warp owns a whole block: it dequantizes, updates, reduces the new absmax with shuffles
// and requantizes without touching shared memory or synchronising with other warps. Each lane handles 8 elements,
// lane-interleaved so that every load and store of the warp is coalesced. A warp finds its tensor by binary search
// over the table's first_chunk prefix sums; the table lives in device memory, so the number of tensors per launch
// is unbounded (kernel parameters would cap it at a few dozen).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "optimizer_kernels.h"

namespace qlora_kernels {
namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreadsPerBlock = kWarpSize * kWarpsPerBlock;
constexpr int kElementsPerLane = kChunkSize / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kThreadsPerBlock == kCodeSize, "one thread per quantization level loads the maps into shared memory");
static_assert(kChunkSize % kWarpSize == 0, "a chunk splits evenly over the lanes of a warp");

__device__ __forceinline__ float load_param(const void* base, int32_t dtype, int64_t i) {
  switch (dtype) {
    case kParamFloat16:
      return __half2float(static_cast<const __half*>(base)[i]);
    case kParamBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_param(void* base, int32_t dtype, int64_t i, float value) {
  switch (dtype) {
    case kParamFloat16:
      static_cast<__half*>(base)[i] = __float2half_rn(value);
      break;
    case kParamBFloat16:
      static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(value);
      break;
    default:
      static_cast<float*>(base)[i] = value;
  }
}

__device__ __forceinline__ float warp_absmax(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    value = nan_propagating_max(value, __shfl_xor_sync(kFullMask, value, offset));
  return value;
}

// Index of the entry owning `chunk`: the last entry whose first_chunk <= chunk, searched from `low` (a warp's
// chunks only increase, so the previous answer is a lower bound).
__device__ __forceinline__ int find_entry(const TensorEntry* entries, int num_tensors, int64_t chunk, int low) {
  int high = num_tensors - 1;
  while (low < high) {
    const int mid = (low + high + 1) / 2;
    if (entries[mid].first_chunk <= chunk)
      low = mid;
    else
      high = mid - 1;
  }
  return low;
}

template <int ALGORITHM>
__global__ void __launch_bounds__(kThreadsPerBlock)
    multi_tensor_step_kernel(const TensorEntry* __restrict__ entries, int num_tensors, int64_t total_chunks,
                             bool has_8bit_state, const float* __restrict__ signed_code,
                             const float* __restrict__ unsigned_code, GroupHyperParams hyper) {
  constexpr bool kHasSecondMoment = ALGORITHM == kAdamW;
  __shared__ float code_m[kCodeSize];
  __shared__ float midpoints_m[kCodeSize];
  __shared__ float code_v[kCodeSize];
  __shared__ float midpoints_v[kCodeSize];

  if (has_8bit_state) {
    code_m[threadIdx.x] = signed_code[threadIdx.x];
    if (kHasSecondMoment) code_v[threadIdx.x] = unsigned_code[threadIdx.x];
    __syncthreads();
    if (threadIdx.x < kCodeSize - 1) {
      midpoints_m[threadIdx.x] = (code_m[threadIdx.x] + code_m[threadIdx.x + 1]) * 0.5f;
      if (kHasSecondMoment) midpoints_v[threadIdx.x] = (code_v[threadIdx.x] + code_v[threadIdx.x + 1]) * 0.5f;
    }
    __syncthreads();
  }

  const int lane = threadIdx.x % kWarpSize;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  int entry_index = 0;
  for (int64_t chunk = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
       chunk < total_chunks; chunk += warp_stride) {
    entry_index = find_entry(entries, num_tensors, chunk, entry_index);
    const TensorEntry& e = entries[entry_index];
    const int64_t block = chunk - e.first_chunk;  // chunk index within the tensor == absmax index
    const int64_t base = block * kChunkSize;
    const bool quantized = e.state_kind == kStateBlockwise8bit;

    float m[kElementsPerLane];
    float v[kElementsPerLane];
    float p[kElementsPerLane];
    float old_absmax_m = 0.0f, old_absmax_v = 0.0f;
    if (quantized) {
      old_absmax_m = e.exp_avg_absmax[block];
      if (kHasSecondMoment) old_absmax_v = e.exp_avg_sq_absmax[block];
    }

    float new_absmax_m = 0.0f, new_absmax_v = 0.0f;
#pragma unroll
    for (int k = 0; k < kElementsPerLane; ++k) {
      const int64_t i = base + lane + k * kWarpSize;
      if (i >= e.numel) continue;
      const float g = load_param(e.grad, e.param_dtype, i);
      p[k] = load_param(e.param, e.param_dtype, i);
      if (quantized) {
        m[k] = code_m[static_cast<const uint8_t*>(e.exp_avg)[i]] * old_absmax_m;
        if (kHasSecondMoment) v[k] = code_v[static_cast<const uint8_t*>(e.exp_avg_sq)[i]] * old_absmax_v;
      } else {
        m[k] = static_cast<const float*>(e.exp_avg)[i];
        if (kHasSecondMoment) v[k] = static_cast<const float*>(e.exp_avg_sq)[i];
      }
      if (ALGORITHM == kAdamW) {
        adamw_update_moments(m[k], v[k], g, hyper);
        p[k] = adamw_new_param(p[k], m[k], v[k], e.step_size, e.bias_correction2_sqrt, hyper);
      } else {
        p[k] = lion_step(p[k], m[k], g, e.step_size, hyper);
      }
      store_param(e.param, e.param_dtype, i, p[k]);
      if (quantized) {
        new_absmax_m = nan_propagating_max(new_absmax_m, absolute(m[k]));
        if (kHasSecondMoment) new_absmax_v = nan_propagating_max(new_absmax_v, absolute(v[k]));
      } else {
        static_cast<float*>(e.exp_avg)[i] = m[k];
        if (kHasSecondMoment) static_cast<float*>(e.exp_avg_sq)[i] = v[k];
      }
    }
    if (!quantized) continue;  // uniform across the warp: all lanes work on the same tensor

    // Every lane has read the old absmax before it takes part in the reduction, so lane 0 may overwrite it after.
    new_absmax_m = warp_absmax(new_absmax_m);
    if (kHasSecondMoment) new_absmax_v = warp_absmax(new_absmax_v);
    if (lane == 0) {
      e.exp_avg_absmax[block] = new_absmax_m;
      if (kHasSecondMoment) e.exp_avg_sq_absmax[block] = new_absmax_v;
    }
    const float inverse_m = inverse_absmax(new_absmax_m);
    const float inverse_v = kHasSecondMoment ? inverse_absmax(new_absmax_v) : 0.0f;
#pragma unroll
    for (int k = 0; k < kElementsPerLane; ++k) {
      const int64_t i = base + lane + k * kWarpSize;
      if (i >= e.numel) continue;
      static_cast<uint8_t*>(e.exp_avg)[i] = quantize_signed(code_m, midpoints_m, m[k] * inverse_m);
      if (kHasSecondMoment)
        static_cast<uint8_t*>(e.exp_avg_sq)[i] = quantize_unsigned(midpoints_v, v[k] * inverse_v);
    }
  }
}

}  // namespace

cudaError_t launch_multi_tensor_step(OptimizerAlgorithm algorithm, const TensorEntry* entries, int num_tensors,
                                     int64_t total_chunks, bool has_8bit_state, const float* signed_code,
                                     const float* unsigned_code, const GroupHyperParams& hyper, cudaStream_t stream) {
  if (num_tensors <= 0 || total_chunks <= 0) return cudaSuccess;
  if (has_8bit_state && (signed_code == nullptr || (algorithm == kAdamW && unsigned_code == nullptr)))
    return cudaErrorInvalidValue;

  // Enough blocks to fill the GPU (8 resident blocks of 256 threads per SM); warps loop over the remaining chunks,
  // which also amortises each block's load of the quantization maps.
  int device = 0, multiprocessors = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  status = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
  const int64_t blocks_needed = (total_chunks + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t block_cap = static_cast<int64_t>(multiprocessors > 0 ? multiprocessors : 1) * 8;
  const unsigned blocks = static_cast<unsigned>(blocks_needed < block_cap ? blocks_needed : block_cap);

  if (algorithm == kAdamW) {
    multi_tensor_step_kernel<kAdamW><<<blocks, kThreadsPerBlock, 0, stream>>>(
        entries, num_tensors, total_chunks, has_8bit_state, signed_code, unsigned_code, hyper);
  } else if (algorithm == kLion) {
    multi_tensor_step_kernel<kLion><<<blocks, kThreadsPerBlock, 0, stream>>>(
        entries, num_tensors, total_chunks, has_8bit_state, signed_code, unsigned_code, hyper);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace qlora_kernels
