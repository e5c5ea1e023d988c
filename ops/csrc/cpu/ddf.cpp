// CPU kernels of dynconv::ddf_forward and dynconv::ddf_backward.
//
// Work is split over (sample, head, tile of rows); inside a task the channels of the head are the inner loop, so the
// tile of the spatial filter (shared by those channels) stays in L1. Each channel's input rows are copied once per
// tile into a zero-padded buffer in the accumulation type, so the tap loops have no bounds checks and the innermost
// loop runs over a contiguous output row (vectorised at -O3 for stride 1).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../ddf.h"

namespace dynconv {
namespace {

constexpr int64_t kTileRows = 8;

// Rows [y0, y0 + rows) of one (H, W) plane, zero outside the image, `pad` zero columns each side, as acc_t.
template <typename scalar_t, typename acc_t>
void load_padded_rows(
    const scalar_t* plane, int64_t height, int64_t width, int64_t y0, int64_t rows, int64_t pad, acc_t* dst) {
  const int64_t pw = width + 2 * pad;
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* d = dst + r * pw;
    const int64_t y = y0 + r;
    if (y < 0 || y >= height) {
      std::fill(d, d + pw, acc_t(0));
      continue;
    }
    std::fill(d, d + pad, acc_t(0));
    std::fill(d + pad + width, d + pw, acc_t(0));
    const scalar_t* s = plane + y * width;
    for (int64_t x = 0; x < width; ++x) {
      d[pad + x] = static_cast<acc_t>(s[x]);
    }
  }
}

// Spatial filter rows [i0, i0 + rows) of head g as acc_t, laid out [row][tap][column]; identity when absent.
template <typename scalar_t, typename acc_t>
void load_spatial_tile(
    const scalar_t* sf, const DDFSizes& p, int64_t b, int64_t g, int64_t i0, int64_t rows, acc_t* dst) {
  const int64_t kk = p.kernel_size * p.kernel_size;
  const int64_t ow = p.out_width;
  if (sf == nullptr) {
    std::fill(dst, dst + rows * kk * ow, acc_t(p.mul ? 1 : 0));
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < kk; ++t) {
      const scalar_t* s = sf + (((b * p.head + g) * kk + t) * p.out_height + i0 + r) * ow;
      acc_t* d = dst + (r * kk + t) * ow;
      for (int64_t j = 0; j < ow; ++j) {
        d[j] = static_cast<acc_t>(s[j]);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void load_channel_taps(const scalar_t* cf, const DDFSizes& p, int64_t b, int64_t c, acc_t* dst) {
  const int64_t kk = p.kernel_size * p.kernel_size;
  for (int64_t t = 0; t < kk; ++t) {
    dst[t] = cf == nullptr ? acc_t(p.mul ? 1 : 0) : static_cast<acc_t>(cf[(b * p.channels + c) * kk + t]);
  }
}

// Sum of a row with independent partial sums (a single accumulator would serialise on the add latency).
template <typename acc_t>
acc_t row_sum(const acc_t* row, int64_t n) {
  constexpr int64_t kLanes = 8;
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += row[j + l];
    }
  }
  for (; j < n; ++j) {
    lanes[0] += row[j];
  }
  acc_t sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    sum += lanes[l];
  }
  return sum;
}

// acc[j] += x[j * s] * (f[j] * w) for 'mul', x[j * s] * (f[j] + w) for 'add'.
template <typename acc_t, bool kMul>
inline void tap_row(
    acc_t* __restrict__ acc, const acc_t* __restrict__ x, const acc_t* __restrict__ f, acc_t w, int64_t n,
    int64_t s) {
  if (s == 1) {
    for (int64_t j = 0; j < n; ++j) {
      acc[j] += x[j] * (kMul ? f[j] * w : f[j] + w);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      acc[j] += x[j * s] * (kMul ? f[j] * w : f[j] + w);
    }
  }
}

// One output row and tap of the filter gradients: gs[j] += go[j] * x[j * s] * w (grad_sf, when gs is given) and
// gc[j] += go[j] * x[j * s] * f[j] (per-pixel terms of grad_cf, when gc is given; f is unused for 'add').
template <typename acc_t, bool kMul, bool kUnitStride>
inline void filter_grad_row(
    acc_t* __restrict__ gs, acc_t* __restrict__ gc, const acc_t* __restrict__ gv, const acc_t* __restrict__ xv,
    const acc_t* __restrict__ f, acc_t w, int64_t n, int64_t stride) {
  const int64_t s = kUnitStride ? 1 : stride;
  if (gs != nullptr && gc != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t p = gv[j] * xv[j * s];
      gs[j] += p * w;
      gc[j] += kMul ? p * f[j] : p;
    }
  } else if (gs != nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      gs[j] += gv[j] * xv[j * s] * w;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      gc[j] += kMul ? gv[j] * xv[j * s] * f[j] : gv[j] * xv[j * s];
    }
  }
}

template <typename scalar_t, bool kMul>
void forward_kernel(
    const scalar_t* x, const scalar_t* cf, const scalar_t* sf, scalar_t* out, const DDFSizes& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.kernel_size, kk = k * k, s = p.stride, d = p.dilation;
  const int64_t oh = p.out_height, ow = p.out_width, pw = p.width + 2 * p.pad;
  const int64_t tiles = (oh + kTileRows - 1) / kTileRows;
  at::parallel_for(0, p.batch * p.head * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sft(kTileRows * kk * ow), xp(((kTileRows - 1) * s + 2 * p.pad + 1) * pw), acc(ow), w(kk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % tiles, bg = task / tiles, g = bg % p.head, b = bg / p.head;
      const int64_t i0 = tile * kTileRows, rows = std::min(kTileRows, oh - i0);
      const int64_t in_rows = (rows - 1) * s + 2 * p.pad + 1;
      load_spatial_tile(sf, p, b, g, i0, rows, sft.data());
      for (int64_t c = g * p.group_channels; c < (g + 1) * p.group_channels; ++c) {
        const int64_t plane = b * p.channels + c;
        load_padded_rows(x + plane * p.height * p.width, p.height, p.width, i0 * s - p.pad, in_rows, p.pad, xp.data());
        load_channel_taps(cf, p, b, c, w.data());
        for (int64_t r = 0; r < rows; ++r) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t u = 0; u < k; ++u) {
            const acc_t* xrow = xp.data() + (r * s + u * d) * pw;
            for (int64_t v = 0; v < k; ++v) {
              tap_row<acc_t, kMul>(
                  acc.data(), xrow + v * d, sft.data() + (r * kk + u * k + v) * ow, w[u * k + v], ow, s);
            }
          }
          scalar_t* o = out + (plane * oh + i0 + r) * ow;
          for (int64_t j = 0; j < ow; ++j) {
            o[j] = static_cast<scalar_t>(acc[j]);
          }
        }
      }
    }
  });
}

// grad_x by gather over tiles of input rows: each input row is owned by one task, so no write conflicts.
template <typename scalar_t, bool kMul>
void backward_input_kernel(
    const scalar_t* go, const scalar_t* cf, const scalar_t* sf, scalar_t* gx, const DDFSizes& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.kernel_size, kk = k * k, s = p.stride, d = p.dilation, pad = p.pad;
  const int64_t oh = p.out_height, ow = p.out_width, pw = p.width + 2 * pad;
  const int64_t tiles = (p.height + kTileRows - 1) / kTileRows;
  // output rows whose taps reach a tile of kTileRows input rows
  const int64_t max_out_rows = (kTileRows - 1 + (k - 1) * d) / s + 1;
  at::parallel_for(0, p.batch * p.head * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sft(max_out_rows * kk * ow), gp(kTileRows * pw), gorow(ow), w(kk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % tiles, bg = task / tiles, g = bg % p.head, b = bg / p.head;
      const int64_t y0 = tile * kTileRows, y1 = std::min(y0 + kTileRows, p.height);
      // output row i reads input rows [i * s - pad, i * s - pad + (k - 1) * d]
      const int64_t first = y0 + pad - (k - 1) * d;
      const int64_t ilo = first <= 0 ? 0 : (first + s - 1) / s;
      const int64_t ihi = std::min(oh, (y1 - 1 + pad) / s + 1);
      if (ihi > ilo) {
        load_spatial_tile(sf, p, b, g, ilo, ihi - ilo, sft.data());
      }
      for (int64_t c = g * p.group_channels; c < (g + 1) * p.group_channels; ++c) {
        const int64_t plane = b * p.channels + c;
        load_channel_taps(cf, p, b, c, w.data());
        std::fill(gp.begin(), gp.end(), acc_t(0));
        for (int64_t i = ilo; i < ihi; ++i) {
          const scalar_t* g_src = go + (plane * oh + i) * ow;
          for (int64_t j = 0; j < ow; ++j) {
            gorow[j] = static_cast<acc_t>(g_src[j]);
          }
          for (int64_t u = 0; u < k; ++u) {
            const int64_t y = i * s + u * d - pad;
            if (y < y0 || y >= y1) {
              continue;
            }
            acc_t* dst = gp.data() + (y - y0) * pw;
            for (int64_t v = 0; v < k; ++v) {
              const acc_t* f = sft.data() + ((i - ilo) * kk + u * k + v) * ow;
              const acc_t wv = w[u * k + v];
              acc_t* __restrict__ dv = dst + v * d;
              const acc_t* __restrict__ gv = gorow.data();
              if (s == 1) {
                for (int64_t j = 0; j < ow; ++j) {
                  dv[j] += gv[j] * (kMul ? f[j] * wv : f[j] + wv);
                }
              } else {
                for (int64_t j = 0; j < ow; ++j) {
                  dv[j * s] += gv[j] * (kMul ? f[j] * wv : f[j] + wv);
                }
              }
            }
          }
        }
        for (int64_t y = y0; y < y1; ++y) {
          scalar_t* dst = gx + (plane * p.height + y) * p.width;
          const acc_t* src = gp.data() + (y - y0) * pw + pad;
          for (int64_t x = 0; x < p.width; ++x) {
            dst[x] = static_cast<scalar_t>(src[x]);
          }
        }
      }
    }
  });
}

// grad of both filters over tiles of output rows. grad_sf sums over the head's channels inside the task; grad_cf
// sums over pixels: per-tile partial sums land in `gcf_part` (B, C, tiles, k * k) and are reduced afterwards.
template <typename scalar_t, bool kMul>
void backward_filter_kernel(
    const scalar_t* go, const scalar_t* x, const scalar_t* cf, const scalar_t* sf, scalar_t* gsf,
    at::opmath_type<scalar_t>* gcf_part, const DDFSizes& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = p.kernel_size, kk = k * k, s = p.stride, d = p.dilation;
  const int64_t oh = p.out_height, ow = p.out_width, pw = p.width + 2 * p.pad;
  const int64_t tiles = (oh + kTileRows - 1) / kTileRows;
  at::parallel_for(0, p.batch * p.head * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sft(kTileRows * kk * ow), gsft(kTileRows * kk * ow), gcf_rows(kk * ow), gorow(ow), w(kk);
    std::vector<acc_t> xp(((kTileRows - 1) * s + 2 * p.pad + 1) * pw);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % tiles, bg = task / tiles, g = bg % p.head, b = bg / p.head;
      const int64_t i0 = tile * kTileRows, rows = std::min(kTileRows, oh - i0);
      const int64_t in_rows = (rows - 1) * s + 2 * p.pad + 1;
      if (kMul && gcf_part != nullptr) {
        load_spatial_tile(sf, p, b, g, i0, rows, sft.data());
      }
      std::fill(gsft.begin(), gsft.end(), acc_t(0));
      for (int64_t c = g * p.group_channels; c < (g + 1) * p.group_channels; ++c) {
        const int64_t plane = b * p.channels + c;
        load_padded_rows(x + plane * p.height * p.width, p.height, p.width, i0 * s - p.pad, in_rows, p.pad, xp.data());
        load_channel_taps(cf, p, b, c, w.data());
        std::fill(gcf_rows.begin(), gcf_rows.end(), acc_t(0));
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* g_src = go + (plane * oh + i0 + r) * ow;
          for (int64_t j = 0; j < ow; ++j) {
            gorow[j] = static_cast<acc_t>(g_src[j]);
          }
          for (int64_t u = 0; u < k; ++u) {
            for (int64_t v = 0; v < k; ++v) {
              const int64_t t = u * k + v;
              const acc_t* xv = xp.data() + (r * s + u * d) * pw + v * d;
              const acc_t* gv = gorow.data();
              acc_t* gs = gsf != nullptr ? gsft.data() + (r * kk + t) * ow : nullptr;
              acc_t* gc = gcf_part != nullptr ? gcf_rows.data() + t * ow : nullptr;
              const acc_t* f = sft.data() + (r * kk + t) * ow;
              const acc_t wv = kMul ? w[t] : acc_t(1);
              if (s == 1) {
                filter_grad_row<acc_t, kMul, true>(gs, gc, gv, xv, f, wv, ow, s);
              } else {
                filter_grad_row<acc_t, kMul, false>(gs, gc, gv, xv, f, wv, ow, s);
              }
            }
          }
        }
        if (gcf_part != nullptr) {
          acc_t* dst = gcf_part + (plane * tiles + tile) * kk;
          for (int64_t t = 0; t < kk; ++t) {
            dst[t] = row_sum(gcf_rows.data() + t * ow, ow);
          }
        }
      }
      if (gsf != nullptr) {
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t t = 0; t < kk; ++t) {
            scalar_t* dst = gsf + (((b * p.head + g) * kk + t) * oh + i0 + r) * ow;
            const acc_t* src = gsft.data() + (r * kk + t) * ow;
            for (int64_t j = 0; j < ow; ++j) {
              dst[j] = static_cast<scalar_t>(src[j]);
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

at::Tensor ddf_forward_cpu(
    const at::Tensor& features, const std::optional<at::Tensor>& channel_filter,
    const std::optional<at::Tensor>& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
    int64_t head, c10::string_view kernel_combine) {
  const DDFSizes p =
      check_ddf_args(features, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine);
  const at::Tensor x = features.contiguous();
  const auto cf = contiguous_or_none(channel_filter);
  const auto sf = contiguous_or_none(spatial_filter);
  at::Tensor out = at::empty({p.batch, p.channels, p.out_height, p.out_width}, x.options());
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ddf_forward_cpu", [&] {
    const scalar_t* cf_ptr = data_or_null<scalar_t>(cf);
    const scalar_t* sf_ptr = data_or_null<scalar_t>(sf);
    if (p.mul) {
      forward_kernel<scalar_t, true>(x.const_data_ptr<scalar_t>(), cf_ptr, sf_ptr, out.mutable_data_ptr<scalar_t>(), p);
    } else {
      forward_kernel<scalar_t, false>(
          x.const_data_ptr<scalar_t>(), cf_ptr, sf_ptr, out.mutable_data_ptr<scalar_t>(), p);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ddf_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& features, const std::optional<at::Tensor>& channel_filter,
    const std::optional<at::Tensor>& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
    int64_t head, c10::string_view kernel_combine, std::array<bool, 3> output_mask) {
  const DDFSizes p = check_ddf_backward_args(
      grad_output, features, channel_filter, spatial_filter, kernel_size, dilation, stride, head, kernel_combine);
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor x = features.contiguous();
  const auto cf = contiguous_or_none(channel_filter);
  const auto sf = contiguous_or_none(spatial_filter);
  const bool need_x = output_mask[0];
  const bool need_cf = output_mask[1] && cf.has_value();
  const bool need_sf = output_mask[2] && sf.has_value();
  const int64_t kk = kernel_size * kernel_size;
  const int64_t tiles = (p.out_height + kTileRows - 1) / kTileRows;
  at::Tensor grad_x = need_x ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor grad_cf = need_cf ? at::empty_like(*cf) : at::empty({0}, x.options());
  at::Tensor grad_sf = need_sf ? at::empty_like(*sf) : at::empty({0}, x.options());
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor gcf_part =
      need_cf ? at::zeros({p.batch, p.channels, tiles, kk}, x.options().dtype(acc_dtype)) : at::Tensor();
  if (x.numel() == 0) {
    grad_x.zero_();
    grad_cf.zero_();
    grad_sf.zero_();
    return {grad_x, grad_cf, grad_sf};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ddf_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* go_ptr = go.const_data_ptr<scalar_t>();
    const scalar_t* cf_ptr = data_or_null<scalar_t>(cf);
    const scalar_t* sf_ptr = data_or_null<scalar_t>(sf);
    if (need_x) {
      auto* gx_ptr = grad_x.mutable_data_ptr<scalar_t>();
      if (p.mul) {
        backward_input_kernel<scalar_t, true>(go_ptr, cf_ptr, sf_ptr, gx_ptr, p);
      } else {
        backward_input_kernel<scalar_t, false>(go_ptr, cf_ptr, sf_ptr, gx_ptr, p);
      }
    }
    if (need_cf || need_sf) {
      auto* gsf_ptr = need_sf ? grad_sf.mutable_data_ptr<scalar_t>() : nullptr;
      auto* part_ptr = need_cf ? gcf_part.mutable_data_ptr<acc_t>() : nullptr;
      const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
      if (p.mul) {
        backward_filter_kernel<scalar_t, true>(go_ptr, x_ptr, cf_ptr, sf_ptr, gsf_ptr, part_ptr, p);
      } else {
        backward_filter_kernel<scalar_t, false>(go_ptr, x_ptr, cf_ptr, sf_ptr, gsf_ptr, part_ptr, p);
      }
    }
  });
  if (need_cf) {
    grad_cf.copy_(gcf_part.sum(2).view(grad_cf.sizes()));
  }
  return {grad_x, grad_cf, grad_sf};
}

}  // namespace

TORCH_LIBRARY_IMPL(dynconv, CPU, m) {
  m.impl("ddf_forward", &ddf_forward_cpu);
  m.impl("ddf_backward", &ddf_backward_cpu);
}

}  // namespace dynconv
