""" Builds ops._C, the dynconv C++ (CPU) and CUDA extension.

Install in place with `pip install --no-build-isolation -e .` (build isolation would fetch a second torch).
Environment:
    DYNCONV_CPU_ONLY=1      skip the CUDA kernels even when a CUDA toolkit is found
    CUDA_HOME               CUDA toolkit root (else the `nvcc` on PATH, else the pip package nvidia-cuda-nvcc)
    TORCH_CUDA_ARCH_LIST    CUDA archs; defaults to "8.0;9.0" when no GPU is visible
    MAX_JOBS                parallel compile jobs (default 2)
    DEBUG=1                 -O0 -g
"""
import glob
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join('ops', 'csrc')


def _site_dirs():
    dirs = [sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']]
    dirs += site.getsitepackages() if hasattr(site, 'getsitepackages') else []
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def _toolkit_from_nvcc(nvcc):
    """Toolkit root that `nvcc` really uses: it may be a wrapper script, so ask it (`--dryrun` prints TOP=)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'probe.cu')
        open(src, 'w').close()
        try:
            res = subprocess.run(
                [nvcc, '--dryrun', '-c', src, '-o', os.path.join(tmp, 'probe.o')],
                capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r'^#\$ TOP=(.+)$', res.stderr + res.stdout, re.MULTILINE)
    if match:
        top = os.path.realpath(match.group(1).strip())
        if os.path.isfile(os.path.join(top, 'bin', 'nvcc')):
            return top
    return None


def find_cuda_home():
    """CUDA toolkit root or None. Must run before torch.utils.cpp_extension is imported (it freezes CUDA_HOME)."""
    if os.environ.get('DYNCONV_CPU_ONLY', '0') == '1':
        return None
    home = os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
    if home:
        return home if os.path.isfile(os.path.join(home, 'bin', 'nvcc')) else None
    nvcc = shutil.which('nvcc')
    if nvcc:
        top = _toolkit_from_nvcc(nvcc)
        if top:
            return top
    # the pip package nvidia-cuda-nvcc puts a toolkit under site-packages/nvidia/<name>/
    for sp in _site_dirs():
        for nvcc in sorted(glob.glob(os.path.join(sp, 'nvidia', '*', 'bin', 'nvcc'))):
            return os.path.dirname(os.path.dirname(nvcc))
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ['CUDA_HOME'] = CUDA_HOME
    os.environ['PATH'] = os.path.join(CUDA_HOME, 'bin') + os.pathsep + os.environ.get('PATH', '')
os.environ.setdefault('MAX_JOBS', '2')

import torch  # noqa: E402  (after CUDA_HOME is settled)

if CUDA_HOME and not torch.cuda.is_available():
    os.environ.setdefault('TORCH_CUDA_ARCH_LIST', '8.0;9.0')

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def make_extension():
    debug = os.environ.get('DEBUG', '0') == '1'
    opt = ['-O0', '-g'] if debug else ['-O3']
    sources = sorted(glob.glob(os.path.join(CSRC, '*.cpp')) + glob.glob(os.path.join(CSRC, 'cpu', '*.cpp')))
    # at::parallel_for is inlined into the extension: without -fopenmp it would run on one thread
    # -g0 drops the debug info Python's default flags add (it made the library ~17 MB)
    cxx = opt + ['-fopenmp'] + ([] if debug else ['-g0'])
    kwargs = dict(
        name='ops._C',
        extra_link_args=['-fopenmp'],
        py_limited_api=True,
    )
    if CUDA_HOME:
        sources += sorted(glob.glob(os.path.join(CSRC, 'cuda', '*.cu')))
        # ATen's CUDA headers include cuBLAS/cuSPARSE headers that pip installs under site-packages/nvidia/*/include
        include_dirs = sorted({d for sp in _site_dirs() for d in glob.glob(os.path.join(sp, 'nvidia', '*', 'include'))})
        nvcc = opt + ['-lineinfo'] if not debug else opt
        return CUDAExtension(
            sources=sources, include_dirs=include_dirs, extra_compile_args=dict(cxx=cxx, nvcc=nvcc), **kwargs)
    return CppExtension(sources=sources, extra_compile_args=dict(cxx=cxx), **kwargs)


if CUDA_HOME is None and os.environ.get('DYNCONV_CPU_ONLY', '0') != '1':
    print('dynconv: no CUDA toolkit found, building the CPU kernels only', file=sys.stderr)

setup(
    packages=find_packages(where=ROOT, include=['ops', 'models', 'models.*', 'tools', 'training']),
    include_package_data=False,  # ops/csrc holds extension sources, not package data
    ext_modules=[make_extension()],
    cmdclass={'build_ext': BuildExtension},
    options={'bdist_wheel': {'py_limited_api': 'cp310'}},
)
