// Argument checks and sizes of dynconv::ddf_*, shared by the CPU and CUDA kernels.
// The Python fake kernels (ops/reference.py: check_ddf_args) apply the same rules with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>

namespace dynconv {

struct DDFSizes {
  int64_t batch, channels, height, width;
  int64_t out_height, out_width;
  int64_t kernel_size, dilation, stride, head;
  int64_t group_channels;  // channels per head
  int64_t pad;  // (k - 1) / 2 * dilation
  bool mul;  // kernel_combine == "mul"
};

inline void check_like_features(
    const at::Tensor& features, const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK(
      t.device() == features.device(), "ddf: ", name, " is on ", t.device(), " but features is on ", features.device());
  TORCH_CHECK(
      t.scalar_type() == features.scalar_type(), "ddf: ", name, " has dtype ", t.scalar_type(),
      " but features has dtype ", features.scalar_type());
  TORCH_CHECK(t.sizes() == expected, "ddf: ", name, " must have shape ", layout, " = ", expected, ", got ", t.sizes());
}

inline DDFSizes check_ddf_args(
    const at::Tensor& features, const std::optional<at::Tensor>& channel_filter,
    const std::optional<at::Tensor>& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
    int64_t head, c10::string_view kernel_combine) {
  TORCH_CHECK(features.dim() == 4, "ddf: features must have shape (B, C, H, W), got ", features.sizes());
  const auto dtype = features.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "ddf: features must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "ddf: kernel_size must be odd and >= 1, got ", kernel_size);
  TORCH_CHECK(dilation >= 1, "ddf: dilation must be >= 1, got ", dilation);
  TORCH_CHECK(stride >= 1, "ddf: stride must be >= 1, got ", stride);
  TORCH_CHECK(head >= 1, "ddf: head must be >= 1, got ", head);
  TORCH_CHECK(
      kernel_combine == "mul" || kernel_combine == "add", "ddf: kernel_combine must be 'mul' or 'add', got '",
      kernel_combine, "'");
  DDFSizes p;
  p.batch = features.size(0);
  p.channels = features.size(1);
  p.height = features.size(2);
  p.width = features.size(3);
  TORCH_CHECK(p.channels % head == 0, "ddf: channels (", p.channels, ") must be divisible by head (", head, ")");
  p.out_height = p.height / stride;
  p.out_width = p.width / stride;
  p.kernel_size = kernel_size;
  p.dilation = dilation;
  p.stride = stride;
  p.head = head;
  p.group_channels = p.channels / head;
  p.pad = (kernel_size - 1) / 2 * dilation;
  p.mul = kernel_combine == "mul";
  if (channel_filter.has_value()) {
    const std::array<int64_t, 4> expected{p.batch, p.channels, kernel_size, kernel_size};
    check_like_features(features, *channel_filter, "channel_filter", expected, "(B, C, k, k)");
  }
  if (spatial_filter.has_value()) {
    const std::array<int64_t, 4> expected{p.batch, head * kernel_size * kernel_size, p.out_height, p.out_width};
    check_like_features(
        features, *spatial_filter, "spatial_filter", expected, "(B, head * k * k, H // stride, W // stride)");
  }
  return p;
}

inline DDFSizes check_ddf_backward_args(
    const at::Tensor& grad_output, const at::Tensor& features, const std::optional<at::Tensor>& channel_filter,
    const std::optional<at::Tensor>& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
    int64_t head, c10::string_view kernel_combine) {
  const DDFSizes p =
      check_ddf_args(features, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine);
  const std::array<int64_t, 4> expected{p.batch, p.channels, p.out_height, p.out_width};
  check_like_features(features, grad_output, "grad_output", expected, "(B, C, H // stride, W // stride)");
  return p;
}

}  // namespace dynconv
