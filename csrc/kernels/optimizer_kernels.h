// Launcher of the fused multi-tensor optimizer step (optimizer_kernels.cu). Raw pointers and a stream, no torch.
#pragma once

#include <cuda_runtime.h>

#include "optimizer_math.h"

namespace qlora_kernels {
namespace cuda {

// One launch for every tensor of a parameter group, on `stream`, with no host synchronisation.
//   entries        device table of `num_tensors` TensorEntry, sorted by first_chunk, none empty
//   total_chunks   sum over tensors of ceil(numel / kChunkSize)
//   has_8bit_state whether any entry has 8-bit state (the quantization maps are then read)
//   signed_code    device float32[256], the first moment's map (signed dynamic map); may be null without 8-bit state
//   unsigned_code  device float32[256], the second moment's map (unsigned dynamic map); AdamW with 8-bit state only
// Returns the launch's error (cudaSuccess when enqueued).
cudaError_t launch_multi_tensor_step(OptimizerAlgorithm algorithm, const TensorEntry* entries, int num_tensors,
                                     int64_t total_chunks, bool has_8bit_state, const float* signed_code,
                                     const float* unsigned_code, const GroupHyperParams& hyper, cudaStream_t stream);

}  // namespace cuda
}  // namespace qlora_kernels
