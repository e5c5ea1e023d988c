// The dynconv operator library: every schema, plus the autocast wrappers shared by all devices.
// Importing ops._C (an empty Python module) runs these static registrations; no pybind11.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/library.h>

#include <optional>

extern "C" {
// Module with no methods: its import only loads the library so that the registrations below run.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace dynconv {
namespace {

// Autocast runs the op in the autocast dtype (the kernels accumulate half types in fp32), like aten's convolutions.
template <c10::DeviceType kDevice>
at::Tensor ddf_forward_autocast(
    const at::Tensor& features, const std::optional<at::Tensor>& channel_filter,
    const std::optional<at::Tensor>& spatial_filter, int64_t kernel_size, int64_t dilation, int64_t stride,
    int64_t head, c10::string_view kernel_combine) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(kDevice);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dynconv::ddf_forward", "")
                       .typed<decltype(ddf_forward_autocast<kDevice>)>();
  return op.call(
      at::autocast::cached_cast(dtype, features, kDevice), at::autocast::cached_cast(dtype, channel_filter, kDevice),
      at::autocast::cached_cast(dtype, spatial_filter, kDevice), kernel_size, dilation, stride, head, kernel_combine);
}

}  // namespace

TORCH_LIBRARY(dynconv, m) {
  m.set_python_module("ops.ddf");
  m.def(
      "ddf_forward(Tensor features, Tensor? channel_filter, Tensor? spatial_filter, int kernel_size, int dilation, "
      "int stride, int head, str kernel_combine) -> Tensor");
  // output_mask selects (grad_features, grad_channel_filter, grad_spatial_filter); skipped ones come back empty.
  m.def(
      "ddf_backward(Tensor grad_output, Tensor features, Tensor? channel_filter, Tensor? spatial_filter, "
      "int kernel_size, int dilation, int stride, int head, str kernel_combine, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dynconv, AutocastCPU, m) {
  m.impl("ddf_forward", &ddf_forward_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(dynconv, AutocastCUDA, m) {
  m.impl("ddf_forward", &ddf_forward_autocast<c10::DeviceType::CUDA>);
}

}  // namespace dynconv
