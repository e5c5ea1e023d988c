// Host stand-in for <cuda_runtime.h>: the part of CUDA C++ our kernels use, run on the CPU by runtime.cpp.
//
// Each CUDA thread is a coroutine; __syncthreads, __syncwarp and the warp collectives are its only switch points, so
// memory accesses between two of them never interleave with another thread's (races inside a block show only through
// the order of the threads: set CUDA_EMU_SEED to randomise it). Launches are synchronous. Anything not declared here
// is not emulated and fails the build (tests/cuda_emu/__init__.py also rejects some constructs by name).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

using cudaStream_t = struct CUstream_st*;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);

namespace cuda_emu {

using Site = std::source_location;

namespace detail {
extern uint3 thread_idx, block_idx;
extern dim3 block_dim, grid_dim;
}  // namespace detail

enum class WarpOp { kSync, kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };

// Waits until every lane named in `mask` made the same call (same op, site and mask); returns this lane's result.
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, Site site);

// Address of the block's static __shared__ variable `id` (one per declaration), first filled with NaN bytes.
void* shared_alloc(int id, std::size_t size, std::size_t align, Site site);

// Runs body(call) as every thread of every block; errors of the configuration go to cudaGetLastError().
void run_grid(dim3 grid, dim3 block, std::size_t dynamic_shared, void (*body)(void*), void* call, Site site);

// cudaGetLastError() as C10_CUDA_KERNEL_LAUNCH_CHECK reports it: a c10::Error naming the launcher's line.
void check_last_error(const char* file, int line);

template <typename T>
concept ShuffleType = std::is_same_v<T, int> || std::is_same_v<T, unsigned int> || std::is_same_v<T, long> ||
                      std::is_same_v<T, unsigned long> || std::is_same_v<T, long long> ||
                      std::is_same_v<T, unsigned long long> || std::is_same_v<T, float> || std::is_same_v<T, double>;

template <ShuffleType T>
T shuffle(WarpOp op, unsigned mask, T var, int arg, int width, Site site) {
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_collective(op, mask, bits, arg, width, site);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}

// `__shared__ T name[...];` is rewritten to `auto& name = ::cuda_emu::shared<T[...]>(__COUNTER__);`.
template <typename T>
T& shared(int id, Site site = Site::current()) {
  static_assert(std::is_trivially_default_constructible_v<T>, "__shared__ variables cannot have constructors");
  return *static_cast<T*>(shared_alloc(id, sizeof(T), alignof(T), site));
}

template <typename F>
void invoke(void* f) {
  (*static_cast<F*>(f))();
}

// `kernel<<<grid, block, shared, stream>>>(args)` is rewritten to `::cuda_emu::launch(kernel, grid, ...)(args)`.
template <typename... P>
class Launch {
 public:
  Launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t dynamic_shared, Site site)
      : kernel_(kernel), grid_(grid), block_(block), dynamic_shared_(dynamic_shared), site_(site) {}

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // converted once, as CUDA copies the arguments at the launch; each thread gets its own copy of the parameters
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto call = [&] { std::apply(kernel_, params); };
    run_grid(grid_, block_, dynamic_shared_, &invoke<decltype(call)>, &call, site_);
  }

 private:
  void (*kernel_)(P...);
  dim3 grid_, block_;
  std::size_t dynamic_shared_;
  Site site_;
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t dynamic_shared = 0,
                    cudaStream_t = nullptr, Site site = Site::current()) {
  return Launch<P...>(kernel, grid, block, dynamic_shared, site);
}

}  // namespace cuda_emu

inline const uint3& threadIdx = cuda_emu::detail::thread_idx;
inline const uint3& blockIdx = cuda_emu::detail::block_idx;
inline const dim3& blockDim = cuda_emu::detail::block_dim;
inline const dim3& gridDim = cuda_emu::detail::grid_dim;
inline constexpr int warpSize = 32;

void __syncthreads(cuda_emu::Site site = cuda_emu::Site::current());

inline void __syncwarp(unsigned mask = 0xffffffffu, cuda_emu::Site site = cuda_emu::Site::current()) {
  cuda_emu::warp_collective(cuda_emu::WarpOp::kSync, mask, 0, 0, warpSize, site);
}

template <cuda_emu::ShuffleType T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              cuda_emu::Site site = cuda_emu::Site::current()) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::kShfl, mask, var, src_lane, width, site);
}

template <cuda_emu::ShuffleType T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 cuda_emu::Site site = cuda_emu::Site::current()) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::kShflUp, mask, var, int(delta), width, site);
}

template <cuda_emu::ShuffleType T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   cuda_emu::Site site = cuda_emu::Site::current()) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::kShflDown, mask, var, int(delta), width, site);
}

template <cuda_emu::ShuffleType T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  cuda_emu::Site site = cuda_emu::Site::current()) {
  return cuda_emu::shuffle(cuda_emu::WarpOp::kShflXor, mask, var, lane_mask, width, site);
}

inline unsigned __ballot_sync(unsigned mask, int predicate, cuda_emu::Site site = cuda_emu::Site::current()) {
  return unsigned(cuda_emu::warp_collective(cuda_emu::WarpOp::kBallot, mask, predicate != 0, 0, warpSize, site));
}

inline int __any_sync(unsigned mask, int predicate, cuda_emu::Site site = cuda_emu::Site::current()) {
  return int(cuda_emu::warp_collective(cuda_emu::WarpOp::kAny, mask, predicate != 0, 0, warpSize, site));
}

inline int __all_sync(unsigned mask, int predicate, cuda_emu::Site site = cuda_emu::Site::current()) {
  return int(cuda_emu::warp_collective(cuda_emu::WarpOp::kAll, mask, predicate != 0, 0, warpSize, site));
}

// Atomics need no locking: threads switch only at barriers. Types as in CUDA (no half types: cuda_fp16.h is absent).
template <typename T>
concept AtomicType = std::is_same_v<T, int> || std::is_same_v<T, unsigned int> ||
                     std::is_same_v<T, unsigned long long> || std::is_same_v<T, float> || std::is_same_v<T, double>;

template <AtomicType T>
T atomicAdd(T* address, std::type_identity_t<T> value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <AtomicType T>
  requires std::is_integral_v<T>
T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> value) {
  const T old = *address;
  *address = old == compare ? value : old;
  return old;
}
