""" CUDA C++ on the CPU: builds the CUDA kernels and launchers of ops/csrc unmodified against the host emulation in
this folder (include/cuda_runtime.h, runtime.cpp), so that the tests run them on CPU tensors.

A small source transform, which keeps every line where it was and starts with a `#line` directive, so that compiler
errors and the emulation's messages name the original file and line:
  * `kernel<<<grid, block, shared, stream>>>(args)` becomes `::cuda_emu::launch(kernel, grid, block, shared,
    stream)(args)`;
  * `__shared__ T name[...];` becomes `auto& name = ::cuda_emu::shared<T[...]>(__COUNTER__);` (one block-wide
    variable per declaration);
  * `TORCH_LIBRARY_IMPL(ns, CUDA, m) { m.impl(...) }` becomes `TORCH_LIBRARY_FRAGMENT(ns_emu, m) { m.def(...) }`:
    the launchers are not CUDA kernels of the dispatcher but CPU ops `torch.ops.<ns>_emu.<op>` (schemas inferred).
Constructs the emulation does not implement are refused by name before compiling (UNSUPPORTED); anything else it
lacks fails the compilation. The build (torch.utils.cpp_extension.load, ninja) is cached in `build/cuda_emu`.
"""
import functools
import os
import re
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.utils.cpp_extension

__all__ = ['EmulationError', 'build', 'transform']

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / 'ops' / 'csrc'
BUILD_DIR = ROOT / 'build' / 'cuda_emu'
SELFTEST = HERE / 'selftest.cu'

UNSUPPORTED = [
    (r'\bextern\s+__shared__', 'dynamic shared memory (extern __shared__)'),
    (r'\basm\s*(volatile\s*)?\(', 'inline PTX (asm)'),
    (r'\bcub::|<cub/', 'cub'),
    (r'<cuda_fp16\.h>|<cuda_bf16\.h>|\b__half2?\b|\b__nv_bfloat16\b|\b__h[a-z0-9_]+\s*\(|\b__float2half\w*\s*\(|'
     r'\b__half2float\s*\(', '__half intrinsics (cuda_fp16.h / cuda_bf16.h)'),
    (r'\b__constant__\b', '__constant__ memory'),
    (r'\bcooperative_groups\b', 'cooperative groups'),
    (r'\btex[123]D\w*\s*[<(]|\bcudaTextureObject_t\b', 'textures'),
]
_COMMENTS = re.compile(r'//[^\n]*|/\*.*?\*/', re.S)
_LAUNCH = re.compile(r'(?P<kernel>[A-Za-z_][\w:]*(?:\s*<[^<>;()]*>)?)\s*<<<(?P<config>[^;]*?)>>>\s*\(')
_SHARED = re.compile(r'__shared__\s+(?P<type>[\w:<>, ]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]+\])*)\s*;')
_REGISTRATION = re.compile(r'TORCH_LIBRARY_IMPL\(\s*(?P<ns>\w+)\s*,\s*CUDA\s*,\s*(?P<m>\w+)\s*\)(?P<body>\s*\{.*?^\})',
                           re.S | re.M)


class EmulationError(RuntimeError):
    """A CUDA construct the emulation does not implement."""


def _line(text: str, pos: int) -> int:
    return text.count('\n', 0, pos) + 1


def transform(text: str, filename: str) -> str:
    """Rewrites one CUDA source for the host emulation; its lines keep their numbers under `#line 1 "filename"`.

    Raises:
        EmulationError: the source uses a construct listed in UNSUPPORTED, or a launch or __shared__ declaration of a
            form the rewrite does not understand.
    """
    code = _COMMENTS.sub(lambda m: re.sub(r'[^\n]', ' ', m.group()), text)  # same offsets, comments blanked
    for pattern, what in UNSUPPORTED:
        found = re.search(pattern, code)
        if found:
            raise EmulationError(
                f'{filename}:{_line(code, found.start())}: {what} is not emulated; add it to tests/cuda_emu first')

    def registration(m):
        body = re.sub(rf'\b{m["m"]}\.impl\(', f'{m["m"]}.def(', m['body'])
        return f'TORCH_LIBRARY_FRAGMENT({m["ns"]}_emu, {m["m"]}){body}'

    out = _LAUNCH.sub(lambda m: f'::cuda_emu::launch({m["kernel"]}, {m["config"]})(', text)
    out = _SHARED.sub(lambda m: f'auto& {m["name"]} = ::cuda_emu::shared<{m["type"]}{m["dims"]}>(__COUNTER__);', out)
    out = _REGISTRATION.sub(registration, out)
    left = _COMMENTS.sub(lambda m: re.sub(r'[^\n]', ' ', m.group()), out)
    for token, what in (('<<<', 'kernel launch'), ('__shared__', '__shared__ declaration')):
        if token in left:
            raise EmulationError(
                f'{filename}:{_line(left, left.index(token))}: {what} of a form the emulation does not rewrite')
    return f'#line 1 "{filename}"\n{out}'


def _write_if_changed(path: Path, text: str):
    """Keeps the file (and its mtime) when the text is the same, so that ninja does not rebuild."""
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _prepare_sources(csrc: Path, extra: Iterable[Path], out: Path) -> list:
    """Copies csrc's headers, rewrites csrc/cuda/* and the extra .cu files; returns the translation units."""
    units = []
    for src in sorted(csrc.rglob('*')):
        rel = src.relative_to(csrc)
        if src.suffix in ('.h', '.hpp'):
            _write_if_changed(out / rel, src.read_text())
        elif src.suffix in ('.cu', '.cuh'):
            dst = out / rel.with_name(rel.name + '.cpp' if src.suffix == '.cu' else rel.name)
            _write_if_changed(dst, transform(src.read_text(), f'ops/csrc/{rel}'))
            if src.suffix == '.cu':
                units.append(dst)
    for src in extra:
        dst = out / (src.name + '.cpp')
        _write_if_changed(dst, transform(src.read_text(), f'tests/cuda_emu/{src.name}'))
        units.append(dst)
    return units


@functools.lru_cache(maxsize=None)
def build(csrc: Optional[str] = None, build_dir: Optional[str] = None, verbose: bool = False):
    """Builds (or reuses) the emulated CUDA kernels of csrc (default ops/csrc) with the self-test kernels.

    Args:
        csrc: Root of the C++ sources; its cuda/*.cu are the translation units.
        build_dir: Cache folder (default build/cuda_emu in the repository, git-ignored).
        verbose: Show the compiler's commands and output.

    Returns:
        `torch.ops.dynconv_emu`: the CUDA launchers of csrc (ddf_forward, ddf_backward) as CPU ops. The self-test
        kernels are `torch.ops.cuda_emu_selftest`.
    """
    csrc = Path(csrc or os.environ.get('CUDA_EMU_CSRC') or CSRC).resolve()
    sanitizer = os.environ.get('CUDA_EMU_SANITIZE', '')
    default_dir = BUILD_DIR.with_name(f'cuda_emu_{sanitizer}') if sanitizer else BUILD_DIR
    build_dir = Path(build_dir or os.environ.get('CUDA_EMU_BUILD_DIR') or default_dir).resolve()
    sanitize = [f'-fsanitize={sanitizer}', '-fno-omit-frame-pointer'] if sanitizer else []
    units = _prepare_sources(csrc, [SELFTEST], build_dir / 'src')
    obj_dir = build_dir / 'obj'
    obj_dir.mkdir(parents=True, exist_ok=True)
    torch.utils.cpp_extension.load(
        name='dynconv_cuda_emu',
        sources=[str(HERE / 'runtime.cpp')] + [str(u) for u in units],
        extra_include_paths=[str(HERE / 'include')],
        # -O1: the kernels run about as fast as at -O2 and build sooner
        extra_cflags=['-O1', '-Wno-unknown-pragmas'] + sanitize,
        extra_ldflags=sanitize,
        build_directory=str(obj_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return torch.ops.dynconv_emu

