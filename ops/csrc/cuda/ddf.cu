// CUDA launchers of dynconv::ddf_forward and dynconv::ddf_backward (kernel bodies in ddf_kernel.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../ddf.h"
#include "ddf_kernel.cuh"

namespace dynconv {
namespace {

int64_t blocks_for(int64_t n) {
  return std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 30);
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// Calls f(std::bool_constant<mul>()): the kernels are compiled for each combination.
template <typename F>
void dispatch_combine(bool mul, F&& f) {
  if (mul) {
    f(std::true_type());
  } else {
    f(std::false_type());
  }
}

// The filter-gradient kernels specialised for the kernel sizes of the released models keep k * k accumulators in
// registers: specialised(std::integral_constant<int, k>()) for those, per_tap() for any other odd k.
template <typename F, typename G>
void dispatch_kernel_size(int64_t k, F&& specialised, G&& per_tap) {
  switch (k) {
    case 1: specialised(std::integral_constant<int, 1>()); break;
    case 3: specialised(std::integral_constant<int, 3>()); break;
    case 5: specialised(std::integral_constant<int, 5>()); break;
    case 7: specialised(std::integral_constant<int, 7>()); break;
    default: per_tap(); break;
  }
}

at::Tensor ddf_forward_cuda(
    const at::Tensor& features, const std::optional<at::Tensor>& channel_filter,
    const std::optional<at::Tensor>& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
    int64_t head, c10::string_view kernel_combine) {
  const DDFSizes p =
      check_ddf_args(features, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor x = features.contiguous();
  const auto cf = contiguous_or_none(channel_filter);
  const auto sf = contiguous_or_none(spatial_filter);
  at::Tensor out = at::empty({p.batch, p.channels, p.out_height, p.out_width}, x.options());
  const int64_t n = out.numel();
  if (n == 0) {
    return out;
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ddf_forward_cuda", [&] {
    dispatch_combine(p.mul, [&](auto mul) {
      constexpr bool kMul = decltype(mul)::value;
      ddf_forward_kernel<scalar_t, kMul><<<blocks_for(n), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(cf), data_or_null<scalar_t>(sf),
          out.mutable_data_ptr<scalar_t>(), p, n);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ddf_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& features, const std::optional<at::Tensor>& channel_filter,
    const std::optional<at::Tensor>& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
    int64_t head, c10::string_view kernel_combine, std::array<bool, 3> output_mask) {
  const DDFSizes p = check_ddf_backward_args(
      grad_output, features, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor x = features.contiguous();
  const auto cf = contiguous_or_none(channel_filter);
  const auto sf = contiguous_or_none(spatial_filter);
  const bool need_x = output_mask[0];
  const bool need_cf = output_mask[1] && cf.has_value();
  const bool need_sf = output_mask[2] && sf.has_value();
  at::Tensor grad_x = need_x ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_cf = need_cf ? at::empty_like(*cf) : at::empty({0}, x.options());
  at::Tensor grad_sf = need_sf ? at::empty_like(*sf) : at::empty({0}, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ddf_backward_cuda", [&] {
    const scalar_t* go_ptr = go.const_data_ptr<scalar_t>();
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* cf_ptr = data_or_null<scalar_t>(cf);
    const scalar_t* sf_ptr = data_or_null<scalar_t>(sf);
    const int64_t n_x = grad_x.numel();
    if (need_x && n_x > 0) {
      dispatch_combine(p.mul, [&](auto mul) {
        constexpr bool kMul = decltype(mul)::value;
        ddf_backward_input_kernel<scalar_t, kMul><<<blocks_for(n_x), kThreads, 0, stream>>>(
            go_ptr, cf_ptr, sf_ptr, grad_x.mutable_data_ptr<scalar_t>(), p, n_x);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t n_sf = grad_sf.numel();
    if (need_sf && n_sf > 0) {
      auto* gsf = grad_sf.mutable_data_ptr<scalar_t>();
      const int64_t pixels = p.batch * p.head * p.out_height * p.out_width;
      dispatch_combine(p.mul, [&](auto mul) {
        constexpr bool kMul = decltype(mul)::value;
        dispatch_kernel_size(
            kernel_size,
            [&](auto k) {
              ddf_backward_spatial_kernel<scalar_t, kMul, k.value><<<blocks_for(pixels), kThreads, 0, stream>>>(
                  go_ptr, x_ptr, cf_ptr, gsf, p, pixels);
            },
            [&] {
              ddf_backward_spatial_tap_kernel<scalar_t, kMul><<<blocks_for(n_sf), kThreads, 0, stream>>>(
                  go_ptr, x_ptr, cf_ptr, gsf, p, n_sf);
            });
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t n_cf = grad_cf.numel();
    if (need_cf && n_cf > 0) {
      auto* gcf = grad_cf.mutable_data_ptr<scalar_t>();
      const int64_t planes = p.batch * p.channels;
      dispatch_combine(p.mul, [&](auto mul) {
        constexpr bool kMul = decltype(mul)::value;
        dispatch_kernel_size(
            kernel_size,
            [&](auto k) {
              ddf_backward_channel_kernel<scalar_t, kMul, k.value><<<planes, kThreads, 0, stream>>>(
                  go_ptr, x_ptr, sf_ptr, gcf, p);
            },
            [&] {
              // one warp per element of grad_cf
              ddf_backward_channel_tap_kernel<scalar_t, kMul><<<blocks_for(n_cf * 32), kThreads, 0, stream>>>(
                  go_ptr, x_ptr, sf_ptr, gcf, p, n_cf);
            });
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, grad_cf, grad_sf};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynconv, CUDA, m) {
  m.impl("ddf_forward", &ddf_forward_cuda);
  m.impl("ddf_backward", &ddf_backward_cuda);
}

}  // namespace dynconv
