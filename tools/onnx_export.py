"""ONNX export with a dynamic batch, checked with onnxruntime against eager PyTorch.

Any model built from the project's layers exports with a plain `torch.onnx.export(model, (x,), dynamo=True)`: every
`dynconv::` op has an ATen decomposition in torch._decomp's table (ops/), which the exporter applies to the ops it
cannot translate. `export_onnx` does that with the batch dimension dynamic; `check_onnx` runs the file with
onnxruntime on the CPU at other batch sizes and compares it with the eager model, output and speed. Command line:
scripts/export_onnx.py.
"""
import statistics
import time
from typing import Dict, List, Sequence

import torch

__all__ = ['export_onnx', 'check_onnx']


def export_onnx(model: torch.nn.Module, path: str, input_size: Sequence[int], batch_size: int = 2) -> None:
    """Export `model` in eval mode to the ONNX file `path`, the batch dimension dynamic.

    Args:
        model: The model (left in eval mode).
        path: Output .onnx file.
        input_size: (C, H, W) of one image.
        batch_size: Batch size of the example input the export traces (the file takes any).
    """
    try:
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) needs it)
    except ImportError:
        raise RuntimeError('ONNX export needs onnx and onnxscript: pip install onnx onnxscript') from None
    x = torch.randn(batch_size, *input_size)
    program = torch.onnx.export(
        model.eval(), (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim('batch')},), verbose=False)
    program.save(path)


def _ms_per_image(run, batch_size: int, repeats: int) -> float:
    """Median time of `repeats` runs after a warm-up run (allocations, kernel selection), per image."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3 / batch_size


def check_onnx(
        model: torch.nn.Module,
        path: str,
        input_size: Sequence[int],
        batch_sizes: Sequence[int] = (1, 3),
        repeats: int = 3,
        seed: int = 0,
) -> List[Dict[str, float]]:
    """Run the ONNX file with onnxruntime (CPU, as many threads as torch uses) and the model eagerly in float32.

    Args:
        model: The exported model (put in eval mode).
        path: Its .onnx file.
        input_size: (C, H, W) of one image.
        batch_sizes: Batch sizes to run (the export's own one proves little).
        repeats: Timed runs per batch size and runtime, after one warm-up run (their median is reported).
        seed: Seed of the random inputs.

    Returns:
        One dict per batch size: 'batch_size', 'max_abs' (max |ort - eager|), 'max_rel' (max_abs / max |eager|),
        'eager_ms' and 'ort_ms' (CPU milliseconds per image).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError('checking the ONNX file needs onnxruntime: pip install onnxruntime') from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for batch_size in batch_sizes:
        x = torch.randn(batch_size, *input_size, generator=gen)
        with torch.no_grad():
            expected = model(x)
        out = torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])
        if out.shape != expected.shape:
            raise RuntimeError(f'onnxruntime output {tuple(out.shape)} differs from eager {tuple(expected.shape)} at '
                               f'batch {batch_size}')
        max_abs = (out - expected).abs().max().item()
        scale = expected.abs().max().item() or 1.  # an all-zero output: the absolute difference
        with torch.no_grad():
            eager_ms = _ms_per_image(lambda: model(x), batch_size, repeats)
        ort_ms = _ms_per_image(lambda: session.run(None, {input_name: x.numpy()}), batch_size, repeats)
        rows.append(dict(batch_size=batch_size, max_abs=max_abs, max_rel=max_abs / scale,
                         eager_ms=eager_ms, ort_ms=ort_ms))
    return rows
