// Host stand-in for <ATen/cuda/CUDAContext.h> (tests/cuda_emu): the current stream and the launch check.
#pragma once

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

namespace at::cuda {

// Emulated launches run synchronously on the calling thread: every stream is the same.
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(signed char = -1) { return {}; }

}  // namespace at::cuda
