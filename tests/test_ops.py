""" Tests of the dynconv:: ops. The compiled dynconv::ddf_* op: kernels vs the pure-PyTorch reference, gradcheck,
opcheck, compile, autocast, FLOP counting, argument errors, and the behaviour without the extension (CUDA cases skip
without a GPU). The dynconv::odconv_* ops: opcheck, gradcheck, values (ODConv2d's paths: tests/test_odconv.py). """
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ops import HAS_EXT, ddf, ddf_reference, odconv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.param('cuda', marks=pytest.mark.skipif(not HAS_CUDA, reason='no CUDA device'))
DEVICES = ['cpu', CUDA]
FILTERS = [(True, True), (True, False), (False, True), (False, False)]  # (has channel filter, has spatial filter)


def make_inputs(
        shape=(2, 4, 7, 9), kernel_size=3, stride=1, head=1, has_cf=True, has_sf=True, dtype=torch.float64,
        device='cpu', requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    k = kernel_size

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_(requires_grad)

    x = rand(b, c, h, w)
    cf = rand(b, c, k, k) if has_cf else None
    sf = rand(b, head * k * k, h // stride, w // stride) if has_sf else None
    return x, cf, sf


def differentiable(x, cf, sf):
    return [t for t in (x, cf, sf) if t is not None and t.requires_grad]


def run_with_grads(fn, inputs, args, grad_out=None):
    out = fn(*inputs, *args)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, differentiable(*inputs), grad_out.to(out.device, out.dtype))
    return out, grads, grad_out


def test_extension_built():
    assert HAS_EXT, 'ops._C is not built: run `pip install --no-build-isolation -e .`'


# 'add' without filters is constant zero: nothing to differentiate
@pytest.mark.parametrize('combine,has_cf,has_sf', [
    (combine, *filters) for combine in ('mul', 'add') for filters in FILTERS if combine == 'mul' or any(filters)])
@pytest.mark.parametrize('kernel_size', [1, 3, 5, 7])
def test_gradcheck_cpu(kernel_size, combine, has_cf, has_sf):
    for dilation, stride, head in itertools.product([1, 2], [1, 2], [1, 2, 4]):
        inputs = make_inputs((1, 4, 7, 9), kernel_size, stride, head, has_cf, has_sf, requires_grad=True)
        args = (kernel_size, dilation, stride, head, combine)

        def fn(*tensors):
            it = iter(tensors)
            x, cf, sf = (next(it) if t is not None else None for t in inputs)
            return ddf(x, cf, sf, *args)

        assert torch.autograd.gradcheck(fn, tuple(t for t in inputs if t is not None), fast_mode=True), args


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('combine', ['mul', 'add'])
@pytest.mark.parametrize('kernel_size,dilation,stride,head', [
    (1, 1, 1, 1), (3, 1, 1, 1), (3, 2, 2, 2), (5, 1, 2, 4), (7, 2, 1, 2), (3, 1, 3, 1)])
def test_matches_reference(device, dtype, combine, kernel_size, dilation, stride, head):
    args = (kernel_size, dilation, stride, head, combine)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for has_cf, has_sf in FILTERS:
        inputs = make_inputs(
            (2, 8, 11, 13), kernel_size, stride, head, has_cf, has_sf, dtype, device, requires_grad=True)
        if combine == 'add' and not has_cf and not has_sf:
            torch.testing.assert_close(ddf(*inputs, *args), ddf_reference(*inputs, *args))
            continue
        out, grads, go = run_with_grads(ddf, inputs, args)
        ref, ref_grads, _ = run_with_grads(ddf_reference, inputs, args, go)
        torch.testing.assert_close(out, ref, **tol)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('combine', ['mul', 'add'])
def test_half_types_fp32_accumulation(device, dtype, combine):
    """Half-type kernels vs the float64 reference on the same (rounded) inputs: only the output rounding remains."""
    args = (3, 1, 1, 2, combine)
    inputs = make_inputs((2, 8, 12, 10), 3, 1, 2, dtype=dtype, device=device, requires_grad=True)
    out, grads, go = run_with_grads(ddf, inputs, args)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ref, ref_grads, _ = run_with_grads(ddf_reference, inputs64, args, go.to(dtype))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    for a, r in zip((out, *grads), (ref, *ref_grads)):
        scale = r.abs().max().item()
        torch.testing.assert_close(a.double(), r, rtol=2e-2, atol=1e-2 * scale)


@pytest.mark.parametrize('device', DEVICES)
def test_channels_last(device):
    args = (3, 2, 2, 2, 'mul')
    inputs = make_inputs((2, 8, 9, 11), 3, 2, 2, dtype=torch.float32, device=device)
    x, cf, sf = inputs
    expected = ddf(x, cf, sf, *args)
    cl = [t.contiguous(memory_format=torch.channels_last).requires_grad_() for t in inputs]
    out = ddf(*cl, *args)
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, ddf_reference(*inputs, *args), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref_inputs = [t.detach().requires_grad_() for t in inputs]
    ddf_reference(*ref_inputs, *args).sum().backward()
    for t, r in zip(cl, ref_inputs):
        torch.testing.assert_close(t.grad, r.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('device', DEVICES)
def test_opcheck(device):
    fwd = torch.ops.dynconv.ddf_forward.default
    bwd = torch.ops.dynconv.ddf_backward.default
    for requires_grad, (has_cf, has_sf), combine in [
            (True, (True, True), 'mul'), (False, (True, True), 'add'), (True, (False, True), 'add'),
            (True, (True, False), 'mul')]:
        x, cf, sf = make_inputs((2, 4, 7, 9), 3, 2, 2, has_cf, has_sf, torch.float64, device, requires_grad)
        torch.library.opcheck(fwd, (x, cf, sf, 3, 1, 2, 2, combine))
    x, cf, sf = make_inputs((2, 4, 7, 9), 3, 2, 2, dtype=torch.float64, device=device)
    go = torch.randn(2, 4, 3, 4, dtype=torch.float64, device=device)
    torch.library.opcheck(bwd, (go, x, cf, sf, 3, 1, 2, 2, 'mul', [True, True, True]))
    torch.library.opcheck(bwd, (go, x, None, sf, 3, 2, 2, 2, 'add', [False, True, True]))


def _odconv_conv_samples(dtype=torch.float64, requires_grad=True):
    """(x, weight, stride, padding, dilation, groups) for `dynconv::odconv_conv_forward`: dense, grouped, depth-wise;
    NCHW and channels_last; stride, padding and dilation."""
    for groups, channels_last in ((1, False), (1, True), (2, False), (4, True)):
        x = torch.randn(3, 4, 9, 8, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(3, 4 if groups == 4 else 6, 4 // groups, 3, 3, dtype=dtype)
        yield x.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), 2, 1, 2, groups


@pytest.mark.parametrize('per_sample', [False, True], ids=['grouped-conv', 'per-sample-conv'])
def test_odconv_conv_op(monkeypatch, per_sample):
    """The per-sample convolution op: the registration (opcheck: schema, autograd, fake tensors, AOT dispatch),
    gradients (gradcheck) and the values of the grouped convolution, for both of its implementations."""
    if per_sample:  # dense convs on CPU loop over samples from this many MACs per sample (normally 16M)
        monkeypatch.setattr(odconv, '_PER_SAMPLE_CONV_MIN_MACS', 0)
    op = torch.ops.dynconv.odconv_conv_forward.default
    for x, weight, stride, padding, dilation, groups in _odconv_conv_samples():
        torch.library.opcheck(op, (x, weight, stride, padding, dilation, groups))
        assert torch.autograd.gradcheck(lambda x, w: op(x, w, stride, padding, dilation, groups), (x, weight))
        batch, out_chs = weight.shape[:2]
        grouped = F.conv2d(x.reshape(1, -1, 9, 8), weight.reshape(-1, *weight.shape[2:]), None, stride, padding,
                           dilation, batch * groups)
        grouped = grouped.view(batch, out_chs, *grouped.shape[2:])
        out = op(x, weight, stride, padding, dilation, groups)
        torch.testing.assert_close(out, grouped)
        assert out.is_contiguous(memory_format=odconv._memory_format(x))
    with torch.no_grad():
        torch.library.opcheck(op, next(_odconv_conv_samples(requires_grad=False)))


def test_per_sample_convs_under_bfloat16_autocast():
    """Both per-sample convolutions compute in autocast's dtype and return float32 gradients for float32 inputs: the
    eager `_PerSampleConv` (casts itself), and the traced op (ODConv2d casts its input to the conv dtype)."""
    x, weight, stride, padding, dilation, _ = next(_odconv_conv_samples(torch.float32))
    for conv in (lambda: odconv._PerSampleConv.apply(x, weight, stride, padding, dilation),
                 lambda: torch.ops.dynconv.odconv_conv_forward(x.to(torch.bfloat16), weight, stride, padding,
                                                               dilation, 1)):
        x.grad = weight.grad = None
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = conv()
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert x.grad.dtype == weight.grad.dtype == torch.float32


def test_odconv_backward_and_per_sample_ops_opcheck():
    """opcheck on the two ODConv ops no layer test reaches directly: the conv op's backward, and the inference op
    of the per-sample path (with and without filter, spatial and kernel attentions) against `odconv`'s 'released'
    path."""
    x, weight, stride, padding, dilation, groups = next(_odconv_conv_samples(requires_grad=False))
    grad_out = torch.randn_like(torch.ops.dynconv.odconv_conv_forward(x, weight, stride, padding, dilation, groups))
    torch.library.opcheck(torch.ops.dynconv.odconv_conv_backward.default,
                          (grad_out, x, weight, stride, padding, dilation, groups))
    op = torch.ops.dynconv.odconv_per_sample_forward.default
    bank = torch.randn(2, 6, 4, 3, 3, dtype=torch.float64)
    channel, filter_, spatial, kernel = (torch.rand(3, n, dtype=torch.float64) for n in (4, 6, 9, 2))
    cases = [(x, bank, filter_, spatial, kernel), (x.contiguous(memory_format=torch.channels_last), bank, filter_,
                                                  spatial, kernel), (x, bank[:1], None, spatial, None)]
    for inputs, bank_used, *optional in cases:
        args = (inputs, bank_used, channel, *optional, stride, padding, dilation)
        torch.library.opcheck(op, args)
        torch.testing.assert_close(op(*args), odconv.odconv(*args, groups=1, impl='released'))


def _decomposition_cases():
    """(op, args) for every forward op: ddf with each filter combination, channels_last features; the ODConv
    convolution's samples plus a strided 1x1; the ODConv inference op with and without its optional attentions."""
    ddf_op = torch.ops.dynconv.ddf_forward.default
    for (has_cf, has_sf), combine in itertools.product(FILTERS, ('mul', 'add')):
        yield ddf_op, (*make_inputs((2, 4, 7, 9), 3, 2, 2, has_cf, has_sf), 3, 2, 2, 2, combine)
    x, cf, sf = make_inputs((2, 4, 7, 9), 5, 1, 4)
    yield ddf_op, (x.contiguous(memory_format=torch.channels_last), cf, sf, 5, 1, 1, 4, 'mul')
    conv_op = torch.ops.dynconv.odconv_conv_forward.default
    yield from ((conv_op, args) for args in _odconv_conv_samples(requires_grad=False))
    yield conv_op, (torch.randn(3, 4, 9, 8, dtype=torch.float64), torch.randn(3, 6, 4, 1, 1, dtype=torch.float64),
                    2, 0, 1, 1)
    x, weight, stride, padding, dilation, _ = next(_odconv_conv_samples(requires_grad=False))
    bank = torch.randn(2, 6, 4, 3, 3, dtype=torch.float64)
    channel, filter_, spatial, kernel = (torch.rand(3, n, dtype=torch.float64) for n in (4, 6, 9, 2))
    per_sample_op = torch.ops.dynconv.odconv_per_sample_forward.default
    yield per_sample_op, (x, bank, channel, filter_, spatial, kernel, stride, padding, dilation)
    yield per_sample_op, (x.contiguous(memory_format=torch.channels_last), bank[:1], channel, None, spatial, None,
                          stride, padding, dilation)


def test_decompositions_match_the_ops():
    """Each forward op's ATen decomposition in torch._decomp's table, what torch.onnx.export(dynamo=True) exports
    (tests/test_onnx.py) and what fake tensors with symbolic sizes run in place of the op's fake kernel, gives the
    op's values, dtype and strides."""
    for op, args in _decomposition_cases():
        out = op(*args)
        decomposed = torch._decomp.decomposition_table[op](*args)
        torch.testing.assert_close(decomposed, out, msg=lambda m: f'{op}: {m}')
        assert decomposed.stride() == out.stride(), op


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, cf, sf = make_inputs((2, 4, 8, 8), 3, 1, 2, dtype=torch.float32, requires_grad=True)

    def fn(x, cf, sf):
        return ddf(x.relu(), cf * 2, sf, 3, 1, 1, 2, 'mul').sum()

    compiled = torch.compile(fn, fullgraph=True, backend='aot_eager')
    grads = torch.autograd.grad(compiled(x, cf, sf), [x, cf, sf])
    ref = torch.autograd.grad(fn(x, cf, sf), [x, cf, sf])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize('device', DEVICES)
def test_autocast(device):
    dtype = torch.bfloat16
    x, cf, sf = make_inputs((2, 4, 8, 8), 3, 1, 1, dtype=torch.float32, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        out = ddf(x, cf.to(dtype), sf, 3, 1, 1, 1, 'mul')
    assert out.dtype == dtype
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and sf.grad.dtype == torch.float32
    ref = ddf_reference(x.detach(), cf.detach(), sf.detach(), 3, 1, 1, 1, 'mul')
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


def test_flop_counter():
    x, cf, sf = make_inputs((2, 4, 8, 10), 3, 2, 2, dtype=torch.float32, requires_grad=True)
    macs = 2 * 4 * 4 * 5 * 9
    with FlopCounterMode(display=False) as counter:
        out = ddf(x, cf, sf, 3, 1, 2, 2, 'mul')
    assert counter.get_total_flops() == 2 * macs
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 3 * 2 * macs  # grads of x and both filters
    x, _, sf = make_inputs((2, 4, 8, 10), 3, 2, 2, has_cf=False, dtype=torch.float32, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        ddf(x.detach(), None, sf, 3, 1, 2, 2, 'add').sum().backward()
    assert counter.get_total_flops() == 2 * macs + 2 * macs  # forward, grad of the spatial filter only


@pytest.mark.parametrize('impl', [ddf, ddf_reference], ids=['ext', 'reference'])
def test_errors_name_argument_and_shapes(impl):
    x, cf, sf = make_inputs((2, 4, 7, 9), 3, 2, 2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r'channel_filter must have shape .* = \[2, 4, 3, 3\], got \[2, 4, 5, 5\]'):
        impl(x, torch.zeros(2, 4, 5, 5), sf, 3, 1, 2, 2, 'mul')
    with pytest.raises(RuntimeError, match=r'spatial_filter must have shape .* = \[2, 18, 3, 4\], got \[2, 18, 7, 9\]'):
        impl(x, cf, torch.zeros(2, 18, 7, 9), 3, 1, 2, 2, 'mul')
    with pytest.raises(RuntimeError, match=r'spatial_filter has dtype .* but features has dtype'):
        impl(x, cf, sf.double(), 3, 1, 2, 2, 'mul')
    with pytest.raises(RuntimeError, match=r'features must have shape \(B, C, H, W\), got \[4, 7, 9\]'):
        impl(x[0], cf, sf, 3, 1, 2, 2, 'mul')
    with pytest.raises(RuntimeError, match='kernel_size must be odd'):
        impl(x, None, None, 2, 1, 1, 1, 'mul')
    with pytest.raises(RuntimeError, match=r'channels \(4\) must be divisible by head \(3\)'):
        impl(x, None, None, 3, 1, 1, 3, 'mul')
    with pytest.raises(RuntimeError, match="kernel_combine must be 'mul' or 'add', got 'sum'"):
        impl(x, cf, sf, 3, 1, 2, 2, 'sum')
    with pytest.raises(RuntimeError, match='features must be float32, float64, float16 or bfloat16'):
        impl(x.long(), None, None, 3, 1, 1, 1, 'mul')


def test_error_names_device():
    x, cf, sf = make_inputs((2, 4, 7, 9), 3, 1, 1, dtype=torch.float32)
    with pytest.raises(RuntimeError, match='channel_filter is on meta but features is on cpu'):
        ddf(x, cf.to('meta'), sf, 3, 1, 1, 1, 'mul')


@pytest.mark.skipif(not HAS_CUDA, reason='no CUDA device')
def test_cuda_matches_cpu_and_gradcheck():
    for kernel_size, dilation, stride, head in [(3, 1, 1, 1), (5, 2, 2, 2), (7, 1, 2, 4), (1, 1, 1, 1)]:
        args = (kernel_size, dilation, stride, head, 'mul')
        cpu = make_inputs((2, 8, 13, 11), kernel_size, stride, head, dtype=torch.float64, requires_grad=True)
        gpu = [t.detach().cuda().requires_grad_() for t in cpu]
        out, grads, go = run_with_grads(ddf, cpu, args)
        out_g, grads_g, _ = run_with_grads(ddf, gpu, args, go)
        for a, b in zip((out, *grads), (out_g, *grads_g)):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-10, atol=1e-10)
        small = make_inputs((1, 4, 7, 9), kernel_size, stride, head, device='cuda', requires_grad=True)
        assert torch.autograd.gradcheck(lambda *t: ddf(*t, *args), tuple(small), fast_mode=True)


def test_missing_extension_is_one_line():
    code = (
        "import sys; sys.modules['ops._C'] = None\n"
        "import ops, torch\n"
        "assert not ops.HAS_EXT\n"
        "ops.ddf_reference(torch.ones(1, 1, 3, 3), None, None)\n"
        "try:\n"
        "    ops.ddf(torch.ones(1, 1, 3, 3), None, None)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n")
    res = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and 'pip install --no-build-isolation -e .' in lines[0], res.stdout


def test_python_m_ops_reports_backends():
    res = subprocess.run([sys.executable, '-m', 'ops'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert 'CPU kernels): yes' in res.stdout
    assert f"GPU present: {'yes' if HAS_CUDA else 'no'}" in res.stdout
    assert 'CUDA kernels compiled: ' in res.stdout
