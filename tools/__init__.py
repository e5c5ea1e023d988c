"""The library half of the command lines in scripts/: model counting (`info`), the model zoo table (`zoo`) and the
demo dataset (`demo_data`)."""
