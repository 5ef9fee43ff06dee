// CUDA unified memory helpers (see paged_memory.h).
#include "paged_memory.h"

namespace qlora_kernels {
namespace cuda {

cudaError_t device_memory_info(size_t* free_bytes, size_t* total_bytes) {
  return cudaMemGetInfo(free_bytes, total_bytes);
}

cudaError_t device_supports_prefetch(int device, bool* supported) {
  int value = 0;
  const cudaError_t status = cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, device);
  *supported = status == cudaSuccess && value != 0;
  return status;
}

cudaError_t managed_allocate(void** pointer, size_t bytes) {
  return cudaMallocManaged(pointer, bytes, cudaMemAttachGlobal);
}

cudaError_t managed_free(void* pointer) { return cudaFree(pointer); }

cudaError_t managed_prefetch(const void* pointer, size_t bytes, int device, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  // CUDA 13 replaced the device-ordinal overload with a location + flags one (the host is a location type, no
  // longer the pseudo-device cudaCpuDeviceId).
  cudaMemLocation location = {};
  if (device >= 0) {
    location.type = cudaMemLocationTypeDevice;
    location.id = device;
  } else {
    location.type = cudaMemLocationTypeHost;
    location.id = 0;
  }
  return cudaMemPrefetchAsync(pointer, bytes, location, 0, stream);
#else
  return cudaMemPrefetchAsync(pointer, bytes, device >= 0 ? device : cudaCpuDeviceId, stream);
#endif
}

}  // namespace cuda
}  // namespace qlora_kernels
