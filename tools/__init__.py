"""The library half of the command lines in scripts/: model counting (`info`), the model zoo table (`zoo`), the
demo dataset (`demo_data`) and the checked ONNX export (`onnx_export`)."""
