// CUDA kernel bodies of dynconv::ddf_*. All tensors are contiguous NCHW; acc_t is float for half types.
//
// Thread mapping: forward and grad_x use one thread per output / input element (gathers, no atomics), for any k.
// The filter gradients have two forms. Specialised (k a template parameter, k * k accumulators in registers): grad of
// the spatial filter one thread per (sample, head, output pixel) summing over the head's channels, grad of the channel
// filter one block per (sample, channel) summing over pixels with a block reduction. Per tap (any k): one thread per
// element of grad_sf, and one warp per element (sample, channel, tap) of grad_cf.
#pragma once

#include <ATen/OpMathType.h>
#include <cuda_runtime.h>

#include "../ddf.h"

namespace dynconv {

constexpr int kThreads = 256;

// F = sf * cf ('mul') or sf + cf ('add'); an absent filter (nullptr) contributes the identity of the combination.
template <typename acc_t, bool kMul, typename scalar_t>
__device__ __forceinline__ acc_t combine_filters(const scalar_t* sf, int64_t sf_index, const scalar_t* cf,
                                                 int64_t cf_index) {
  const acc_t ident = kMul ? acc_t(1) : acc_t(0);
  const acc_t fs = sf != nullptr ? static_cast<acc_t>(sf[sf_index]) : ident;
  const acc_t fc = cf != nullptr ? static_cast<acc_t>(cf[cf_index]) : ident;
  return kMul ? fs * fc : fs + fc;
}

template <typename scalar_t, bool kMul>
__global__ void ddf_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ cf,
                                   const scalar_t* __restrict__ sf, scalar_t* __restrict__ out, const DDFSizes p,
                                   const int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.kernel_size, kk = k * k, oh = p.out_height, ow = p.out_width, hw_out = oh * ow;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t j = idx % ow, i = (idx / ow) % oh, plane = idx / hw_out;
    const int64_t c = plane % p.channels, b = plane / p.channels, g = c / p.group_channels;
    const scalar_t* xp = x + plane * p.height * p.width;
    const int64_t sf_base = (b * p.head + g) * kk * hw_out + i * ow + j;
    acc_t acc = 0;
    for (int64_t u = 0; u < k; ++u) {
      const int64_t y = i * p.stride - p.pad + u * p.dilation;
      if (y < 0 || y >= p.height) {
        continue;
      }
      for (int64_t v = 0; v < k; ++v) {
        const int64_t xx = j * p.stride - p.pad + v * p.dilation;
        if (xx < 0 || xx >= p.width) {
          continue;
        }
        const int64_t t = u * k + v;
        acc += static_cast<acc_t>(xp[y * p.width + xx]) *
               combine_filters<acc_t, kMul>(sf, sf_base + t * hw_out, cf, plane * kk + t);
      }
    }
    out[idx] = static_cast<scalar_t>(acc);
  }
}

// grad_x[y, x] gathers the outputs (i, j) whose tap (u, v) lands on it: i * s - pad + u * d == y.
template <typename scalar_t, bool kMul>
__global__ void ddf_backward_input_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ cf,
                                          const scalar_t* __restrict__ sf, scalar_t* __restrict__ gx,
                                          const DDFSizes p, const int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.kernel_size, kk = k * k, s = p.stride, oh = p.out_height, ow = p.out_width;
  const int64_t hw_out = oh * ow;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t xx = idx % p.width, y = (idx / p.width) % p.height, plane = idx / (p.height * p.width);
    const int64_t c = plane % p.channels, b = plane / p.channels, g = c / p.group_channels;
    const int64_t sf_base = (b * p.head + g) * kk * hw_out;
    acc_t acc = 0;
    for (int64_t u = 0; u < k; ++u) {
      const int64_t ty = y + p.pad - u * p.dilation;
      if (ty < 0 || ty % s != 0 || ty / s >= oh) {
        continue;
      }
      const int64_t i = ty / s;
      for (int64_t v = 0; v < k; ++v) {
        const int64_t tx = xx + p.pad - v * p.dilation;
        if (tx < 0 || tx % s != 0 || tx / s >= ow) {
          continue;
        }
        const int64_t j = tx / s, t = u * k + v;
        acc += static_cast<acc_t>(go[(plane * oh + i) * ow + j]) *
               combine_filters<acc_t, kMul>(sf, sf_base + t * hw_out + i * ow + j, cf, plane * kk + t);
      }
    }
    gx[idx] = static_cast<scalar_t>(acc);
  }
}

// grad_sf[b, g, t, i, j] = sum over the head's channels c of go[b, c, i, j] * x[tap t of (i, j)] * (cf[b, c, t] or 1).
template <typename scalar_t, bool kMul, int K>
__global__ void ddf_backward_spatial_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                            const scalar_t* __restrict__ cf, scalar_t* __restrict__ gsf,
                                            const DDFSizes p, const int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int KK = K * K;
  const int64_t oh = p.out_height, ow = p.out_width, hw_out = oh * ow, hw = p.height * p.width;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t pix = idx % hw_out, bg = idx / hw_out;
    const int64_t j = pix % ow, i = pix / ow, g = bg % p.head, b = bg / p.head;
    acc_t acc[KK];
#pragma unroll
    for (int t = 0; t < KK; ++t) {
      acc[t] = 0;
    }
    for (int64_t c = g * p.group_channels; c < (g + 1) * p.group_channels; ++c) {
      const int64_t plane = b * p.channels + c;
      const acc_t gov = static_cast<acc_t>(go[plane * hw_out + pix]);
      const scalar_t* xp = x + plane * hw;
#pragma unroll
      for (int u = 0; u < K; ++u) {
        const int64_t y = i * p.stride - p.pad + u * p.dilation;
#pragma unroll
        for (int v = 0; v < K; ++v) {
          const int64_t xx = j * p.stride - p.pad + v * p.dilation;
          const bool inside = y >= 0 && y < p.height && xx >= 0 && xx < p.width;
          const acc_t xv = inside ? static_cast<acc_t>(xp[y * p.width + xx]) : acc_t(0);
          const acc_t w = (kMul && cf != nullptr) ? static_cast<acc_t>(cf[plane * KK + u * K + v]) : acc_t(1);
          acc[u * K + v] += gov * xv * w;
        }
      }
    }
#pragma unroll
    for (int t = 0; t < KK; ++t) {
      gsf[(bg * KK + t) * hw_out + pix] = static_cast<scalar_t>(acc[t]);
    }
  }
}

// grad_sf[b, g, t, i, j] for any k: one thread per element, so no per-thread arrays of k * k accumulators.
template <typename scalar_t, bool kMul>
__global__ void ddf_backward_spatial_tap_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                                const scalar_t* __restrict__ cf, scalar_t* __restrict__ gsf,
                                                const DDFSizes p, const int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.kernel_size, kk = k * k, oh = p.out_height, ow = p.out_width, hw_out = oh * ow;
  const int64_t hw = p.height * p.width;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
       idx += int64_t(blockDim.x) * gridDim.x) {
    const int64_t pix = idx % hw_out, t = idx / hw_out % kk, bg = idx / (hw_out * kk);
    const int64_t j = pix % ow, i = pix / ow, g = bg % p.head, b = bg / p.head;
    const int64_t y = i * p.stride - p.pad + t / k * p.dilation;
    const int64_t xx = j * p.stride - p.pad + t % k * p.dilation;
    acc_t acc = 0;
    if (y >= 0 && y < p.height && xx >= 0 && xx < p.width) {
      for (int64_t c = g * p.group_channels; c < (g + 1) * p.group_channels; ++c) {
        const int64_t plane = b * p.channels + c;
        const acc_t w = (kMul && cf != nullptr) ? static_cast<acc_t>(cf[plane * kk + t]) : acc_t(1);
        acc += static_cast<acc_t>(go[plane * hw_out + pix]) * static_cast<acc_t>(x[plane * hw + y * p.width + xx]) * w;
      }
    }
    gsf[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// grad_cf[b, c, t] = sum over output pixels of go * x[tap t] * (sf[b, g, t] or 1); one block per (b, c) plane.
template <typename scalar_t, bool kMul, int K>
__global__ void ddf_backward_channel_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                            const scalar_t* __restrict__ sf, scalar_t* __restrict__ gcf,
                                            const DDFSizes p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int KK = K * K;
  constexpr int kWarps = kThreads / 32;
  __shared__ acc_t partial[kWarps][KK];
  const int64_t oh = p.out_height, ow = p.out_width, hw_out = oh * ow;
  const int64_t plane = blockIdx.x, c = plane % p.channels, b = plane / p.channels, g = c / p.group_channels;
  const scalar_t* xp = x + plane * p.height * p.width;
  const int64_t sf_base = (b * p.head + g) * KK * hw_out;
  acc_t acc[KK];
#pragma unroll
  for (int t = 0; t < KK; ++t) {
    acc[t] = 0;
  }
  for (int64_t pix = threadIdx.x; pix < hw_out; pix += kThreads) {
    const int64_t j = pix % ow, i = pix / ow;
    const acc_t gov = static_cast<acc_t>(go[plane * hw_out + pix]);
#pragma unroll
    for (int u = 0; u < K; ++u) {
      const int64_t y = i * p.stride - p.pad + u * p.dilation;
#pragma unroll
      for (int v = 0; v < K; ++v) {
        const int64_t xx = j * p.stride - p.pad + v * p.dilation;
        const bool inside = y >= 0 && y < p.height && xx >= 0 && xx < p.width;
        const acc_t xv = inside ? static_cast<acc_t>(xp[y * p.width + xx]) : acc_t(0);
        const int t = u * K + v;
        const acc_t w = (kMul && sf != nullptr) ? static_cast<acc_t>(sf[sf_base + t * hw_out + pix]) : acc_t(1);
        acc[t] += gov * xv * w;
      }
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int t = 0; t < KK; ++t) {
    const acc_t v = warp_sum(acc[t]);
    if (lane == 0) {
      partial[warp][t] = v;
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < KK; t += kThreads) {
    acc_t sum = 0;
    for (int w = 0; w < kWarps; ++w) {
      sum += partial[w][t];
    }
    gcf[plane * KK + t] = static_cast<scalar_t>(sum);
  }
}

// grad_cf[b, c, t] for any k: one warp per element (b, c, t) summing over the output pixels; n = B * C * k * k.
template <typename scalar_t, bool kMul>
__global__ void ddf_backward_channel_tap_kernel(const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                                                const scalar_t* __restrict__ sf, scalar_t* __restrict__ gcf,
                                                const DDFSizes p, const int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.kernel_size, kk = k * k, oh = p.out_height, ow = p.out_width, hw_out = oh * ow;
  const int lane = threadIdx.x % 32;
  // the item is the same for the 32 lanes of a warp, so they leave the loop together
  for (int64_t item = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; item < n;
       item += int64_t(blockDim.x) / 32 * gridDim.x) {
    const int64_t t = item % kk, plane = item / kk, c = plane % p.channels, b = plane / p.channels;
    const int64_t g = c / p.group_channels, u = t / k, v = t % k;
    const scalar_t* xp = x + plane * p.height * p.width;
    const scalar_t* gop = go + plane * hw_out;
    const scalar_t* sft = sf != nullptr ? sf + ((b * p.head + g) * kk + t) * hw_out : nullptr;
    acc_t acc = 0;
    for (int64_t pix = lane; pix < hw_out; pix += 32) {
      const int64_t j = pix % ow, i = pix / ow;
      const int64_t y = i * p.stride - p.pad + u * p.dilation, xx = j * p.stride - p.pad + v * p.dilation;
      if (y >= 0 && y < p.height && xx >= 0 && xx < p.width) {
        const acc_t w = (kMul && sft != nullptr) ? static_cast<acc_t>(sft[pix]) : acc_t(1);
        acc += static_cast<acc_t>(gop[pix]) * static_cast<acc_t>(xp[y * p.width + xx]) * w;
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      gcf[item] = static_cast<scalar_t>(acc);
    }
  }
}

}  // namespace dynconv
