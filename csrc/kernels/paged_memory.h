// CUDA unified ("managed") memory for paged optimizer state: allocate, prefetch to a GPU or to the host, free.
// Raw pointers and streams only, no torch; ../paged_memory.cpp wraps these as tensors.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>

namespace qlora_kernels {
namespace cuda {

// Free and total memory of the current device, in bytes.
cudaError_t device_memory_info(size_t* free_bytes, size_t* total_bytes);

// Whether `device` can migrate managed memory on request (cudaDevAttrConcurrentManagedAccess); without it,
// prefetching is not allowed and pages move only on demand.
cudaError_t device_supports_prefetch(int device, bool* supported);

// cudaMallocManaged, attached globally (any stream may touch it). `bytes` must be > 0.
cudaError_t managed_allocate(void** pointer, size_t bytes);

cudaError_t managed_free(void* pointer);

// Enqueue a migration of [pointer, pointer + bytes) to `device`'s memory, or to host memory when device < 0, on
// `stream`. Asynchronous: nothing waits for the copy, and work later on the same stream sees the data in place.
cudaError_t managed_prefetch(const void* pointer, size_t bytes, int device, cudaStream_t stream);

}  // namespace cuda
}  // namespace qlora_kernels
