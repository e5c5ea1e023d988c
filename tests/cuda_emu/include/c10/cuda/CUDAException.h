// Host stand-in for <c10/cuda/CUDAException.h> (tests/cuda_emu).
#pragma once

#include <cuda_runtime.h>

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::cuda_emu::check_last_error(__FILE__, __LINE__)
