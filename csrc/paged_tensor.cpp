// Unified-memory tensors (see paged_tensor.h). The CUDA runtime calls live in kernels/paged_memory.cu; this file
// wraps their allocations as torch storages whose deleter frees them (bitsandbytes never frees its paged buffers).
#include "paged_tensor.h"

#include <ATen/ATen.h>
#include <c10/core/Storage.h>

#include <atomic>
#include <vector>

#ifdef QLORA_KERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/paged_memory.h"
#endif

namespace qlora_kernels {
namespace {

std::atomic<int64_t> managed_bytes_in_use{0};

struct ManagedAllocation {
  void* pointer;
  size_t bytes;
};

// The storage deleter of every paged tensor; is_paged() recognises paged storages by it.
void delete_managed(void* context) {
  auto* allocation = static_cast<ManagedAllocation*>(context);
#ifdef QLORA_KERNELS_WITH_CUDA
  // cudaFree waits for work that may still use the pages. Its error is ignored: a deleter must not throw, and at
  // interpreter exit the CUDA runtime may already be gone (the process is releasing everything anyway).
  (void)cuda::managed_free(allocation->pointer);
#endif
  managed_bytes_in_use -= static_cast<int64_t>(allocation->bytes);
  delete allocation;
}

std::vector<int64_t> row_major_strides(at::IntArrayRef size) {
  std::vector<int64_t> strides(size.size());
  int64_t stride = 1;
  for (int64_t d = static_cast<int64_t>(size.size()) - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= std::max<int64_t>(size[d], 1);
  }
  return strides;
}

#ifdef QLORA_KERNELS_WITH_CUDA
void check_cuda(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "qlora_kernels: ", what, " failed: ", cudaGetErrorString(status));
}

bool device_supports_prefetch(int device) {
  bool supported = false;
  (void)cuda::device_supports_prefetch(device, &supported);
  return supported;
}

void prefetch_storage(const at::Tensor& tensor, bool to_host) {
  const c10::cuda::CUDAGuard guard(tensor.device());
  const int device = tensor.device().index();
  if (!device_supports_prefetch(device)) return;  // pages still migrate on demand
  const c10::Storage& storage = tensor.storage();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  check_cuda(cuda::managed_prefetch(storage.data(), storage.nbytes(), to_host ? -1 : device, stream),
             to_host ? "cudaMemPrefetchAsync to the host" : "cudaMemPrefetchAsync to the GPU");
}
#endif

}  // namespace

at::Tensor paged_empty(at::IntArrayRef size, at::ScalarType dtype, at::Device device) {
  for (const int64_t extent : size) TORCH_CHECK_VALUE(extent >= 0, "paged_empty: negative size ", size);
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), "paged_empty: device must be cpu or cuda, got ", device);
  const auto options = at::TensorOptions().dtype(dtype);
  if (device.is_cpu()) return at::empty(size, options.device(device));  // paging is a no-op on the CPU
#ifdef QLORA_KERNELS_WITH_CUDA
  const c10::cuda::CUDAGuard guard(device);
  const int index = c10::cuda::current_device();
  int64_t numel = 1;
  for (const int64_t extent : size) numel *= extent;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  if (bytes == 0) return at::empty(size, options.device(at::kCUDA, index));  // nothing to page

  // Unified memory can exceed the GPU and be paged out, but one allocation larger than all the memory the card
  // has free would thrash from its first use: refuse it, before allocating, with the numbers.
  size_t free_bytes = 0, total_bytes = 0;
  check_cuda(cuda::device_memory_info(&free_bytes, &total_bytes), "cudaMemGetInfo");
  TORCH_CHECK_WITH(OutOfMemoryError, bytes <= free_bytes, "qlora_kernels.paged: refusing to allocate ", bytes,
                   " bytes of unified memory on cuda:", index, ", which has only ", free_bytes, " of ", total_bytes,
                   " bytes free");
  void* pointer = nullptr;
  check_cuda(cuda::managed_allocate(&pointer, bytes), "cudaMallocManaged");
  managed_bytes_in_use += static_cast<int64_t>(bytes);
  c10::DataPtr data(pointer, new ManagedAllocation{pointer, bytes}, &delete_managed,
                    c10::Device(at::kCUDA, static_cast<c10::DeviceIndex>(index)));
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(data), /*allocator=*/nullptr,
                       /*resizable=*/false);
  at::Tensor tensor = at::empty({0}, options.device(at::kCUDA, index));
  tensor.set_(storage, 0, size, row_major_strides(size));
  return tensor;
#else
  TORCH_CHECK(false, "qlora_kernels._C was built without CUDA; rebuild it where torch has CUDA and nvcc is found");
#endif
}

bool is_paged(const at::Tensor& tensor) {
  return tensor.defined() && tensor.has_storage() && tensor.storage().data_ptr().get_deleter() == &delete_managed;
}

namespace {
void move_pages(const at::Tensor& tensor, bool to_host, const char* what) {
  if (tensor.device().is_cpu()) return;
  TORCH_CHECK_VALUE(is_paged(tensor), what, ": the tensor is not in unified memory (allocate it with "
                                      "qlora_kernels.paged.empty/zeros)");
#ifdef QLORA_KERNELS_WITH_CUDA
  prefetch_storage(tensor, to_host);
#else
  (void)to_host;
#endif
}
}  // namespace

void paged_prefetch(const at::Tensor& tensor) { move_pages(tensor, /*to_host=*/false, "paged_prefetch"); }

void paged_evict(const at::Tensor& tensor) { move_pages(tensor, /*to_host=*/true, "paged_evict"); }

int64_t paged_bytes_in_use() { return managed_bytes_in_use.load(); }

void prefetch_if_paged(const at::Tensor& tensor) {
#ifdef QLORA_KERNELS_WITH_CUDA
  if (tensor.defined() && tensor.is_cuda() && is_paged(tensor)) prefetch_storage(tensor, /*to_host=*/false);
#else
  (void)tensor;
#endif
}

}  // namespace qlora_kernels
