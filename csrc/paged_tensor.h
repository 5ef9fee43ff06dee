// Tensors in CUDA unified memory ("paged"): ordinary CUDA tensors to torch, whose pages the driver may move
// between GPU and host memory, and which this extension frees when the last reference dies.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace qlora_kernels {

// A tensor of `size` and `dtype` on `device`: in unified memory on a CUDA device (refusing, before allocating,
// more bytes than the device has free), an ordinary allocation on the CPU. Uninitialised.
at::Tensor paged_empty(at::IntArrayRef size, at::ScalarType dtype, at::Device device);

// Whether `tensor`'s storage was allocated by paged_empty on a CUDA device.
bool is_paged(const at::Tensor& tensor);

// Migrate a paged tensor's storage to its GPU / to host memory, asynchronously on the current stream. No-ops for
// CPU tensors and on devices that cannot prefetch; a non-paged CUDA tensor is an error.
void paged_prefetch(const at::Tensor& tensor);
void paged_evict(const at::Tensor& tensor);

// Bytes of unified memory currently held by live paged tensors (all devices).
int64_t paged_bytes_in_use();

// Enqueue a prefetch of `tensor` to its GPU when it is paged and the device supports it; otherwise nothing.
void prefetch_if_paged(const at::Tensor& tensor);

}  // namespace qlora_kernels
