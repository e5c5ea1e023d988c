// Kernels that test the emulation itself (tests/test_cuda_emulated.py): warp collectives against their CUDA
// definitions, a block reduction, the order of execution, and misuse that must raise instead of passing silently.
// Built only by tests/cuda_emu; exposed as torch.ops.cuda_emu_selftest.*.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <string>

namespace {

constexpr unsigned kFull = 0xffffffffu;

// Per thread: shfl(src 3), shfl_up(1), shfl_down(1), shfl_xor(1) of its value v, with the given width; then
// ballot(v % 3 == 0), any(v == 5), all(v < 40) over the warp.
__global__ void warp_ops_kernel(const int* value, int* out, int width) {
  const int i = threadIdx.x;
  const int v = value[i];
  int* o = out + i * 7;
  o[0] = __shfl_sync(kFull, v, 3, width);
  o[1] = __shfl_up_sync(kFull, v, 1, width);
  o[2] = __shfl_down_sync(kFull, v, 1, width);
  o[3] = __shfl_xor_sync(kFull, v, 1, width);
  o[4] = int(__ballot_sync(kFull, v % 3 == 0));
  o[5] = __any_sync(kFull, v == 5);
  __syncwarp();
  o[6] = __all_sync(kFull, v < 40);
}

// out[b] = sum of x over block b: warp shuffles, then one value per warp through shared memory.
__global__ void block_sum_kernel(const double* x, double* out, int64_t n) {
  __shared__ double partial[32];
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  double v = i < n ? x[i] : 0.0;
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(kFull, v, offset);
  }
  if (lane == 0) {
    partial[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < int(blockDim.x + 31) / 32 ? partial[lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) {
      v += __shfl_down_sync(kFull, v, offset);
    }
    if (lane == 0) {
      out[blockIdx.x] = v;
    }
  }
}

// order[global thread] = how many threads of the grid ran before it; first = the global index of the first one.
__global__ void order_kernel(int* counter, int* first, int* order) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  order[i] = atomicAdd(counter, 1);
  atomicCAS(first, -1, i);
}

// Reads shared memory nobody wrote.
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float tile[64];
  out[threadIdx.x] = tile[threadIdx.x];
}

__global__ void barrier_in_branch_kernel() {
  if (threadIdx.x < 16) {
    __syncthreads();
  }
}

__global__ void barrier_after_exit_kernel() {
  if (threadIdx.x == 7) {
    return;
  }
  __syncthreads();
}

__global__ void different_barriers_kernel() {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void divergent_shuffle_kernel(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 2) {
    v = __shfl_down_sync(kFull, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void shuffle_then_barrier_kernel(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x != 3) {
    v = __shfl_down_sync(kFull, v, 1);
  }
  __syncthreads();
  out[threadIdx.x] = v;
}

// A full mask in a block of 48 threads: lanes 16..31 of the second warp do not exist.
__global__ void partial_warp_shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(kFull, float(threadIdx.x), 1);
}

__global__ void mask_without_caller_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0x2u, float(threadIdx.x), 1);
}

__global__ void read_outside_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffu, float(threadIdx.x), 1);
}

__global__ void too_much_shared_kernel(double* out) {
  __shared__ double big[4096];
  __shared__ double more[2049];
  out[threadIdx.x] = big[threadIdx.x] + more[threadIdx.x];
}

__global__ void empty_kernel() {}

at::Tensor warp_ops(const at::Tensor& value, int64_t width) {
  at::Tensor out = at::empty({value.size(0), 7}, value.options());
  warp_ops_kernel<<<1, unsigned(value.size(0)), 0, at::cuda::getCurrentCUDAStream()>>>(
      value.const_data_ptr<int>(), out.mutable_data_ptr<int>(), int(width));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor block_sum(const at::Tensor& x, int64_t threads) {
  const int64_t blocks = (x.numel() + threads - 1) / threads;
  at::Tensor out = at::empty({blocks}, x.options());
  block_sum_kernel<<<unsigned(blocks), unsigned(threads)>>>(x.const_data_ptr<double>(), out.mutable_data_ptr<double>(),
                                                            x.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The order of the threads, then the first thread.
at::Tensor order(int64_t blocks, int64_t threads) {
  const auto options = at::TensorOptions().dtype(at::kInt);
  at::Tensor counter = at::zeros({1}, options);
  at::Tensor out = at::full({blocks * threads + 1}, -1, options);
  int* o = out.mutable_data_ptr<int>();
  order_kernel<<<unsigned(blocks), unsigned(threads)>>>(counter.mutable_data_ptr<int>(), o + blocks * threads, o);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor unwritten_shared() {
  at::Tensor out = at::empty({64}, at::TensorOptions().dtype(at::kFloat));
  unwritten_shared_kernel<<<1, 64>>>(out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Launches the misuse named `what`; every one must raise.
void misuse(c10::string_view what) {
  at::Tensor out = at::zeros({64}, at::TensorOptions().dtype(at::kDouble));
  float* f = reinterpret_cast<float*>(out.mutable_data_ptr<double>());
  const std::string name(what);
  if (name == "barrier_in_branch") {
    barrier_in_branch_kernel<<<1, 32>>>();
  } else if (name == "barrier_after_exit") {
    barrier_after_exit_kernel<<<1, 32>>>();
  } else if (name == "different_barriers") {
    different_barriers_kernel<<<1, 32>>>();
  } else if (name == "divergent_shuffle") {
    divergent_shuffle_kernel<<<1, 32>>>(f);
  } else if (name == "shuffle_then_barrier") {
    shuffle_then_barrier_kernel<<<1, 32>>>(f);
  } else if (name == "partial_warp_shuffle") {
    partial_warp_shuffle_kernel<<<1, 48>>>(f);
  } else if (name == "mask_without_caller") {
    mask_without_caller_kernel<<<1, 32>>>(f);
  } else if (name == "read_outside_mask") {
    read_outside_mask_kernel<<<1, 16>>>(f);
  } else if (name == "too_much_shared") {
    too_much_shared_kernel<<<1, 32>>>(out.mutable_data_ptr<double>());
  } else if (name == "block_too_large") {
    empty_kernel<<<1, 2048>>>();
  } else if (name == "empty_grid") {
    empty_kernel<<<0, 32>>>();
  } else if (name == "dynamic_shared") {
    empty_kernel<<<1, 32, 256>>>();
  } else {
    TORCH_CHECK(false, "unknown misuse ", name);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cuda_emu_selftest, m) {
  m.def("warp_ops", &warp_ops);
  m.def("block_sum", &block_sum);
  m.def("order", &order);
  m.def("unwritten_shared", &unwritten_shared);
  m.def("misuse", &misuse);
}
