""" `python -m ops`: print which backends of the dynconv extension are built and the registered dynconv:: ops. Exits 1
when ops._C is missing. """
import sys

from . import backend_info


def main() -> int:
    info = backend_info()
    yes_no = {True: 'yes', False: 'no'}
    print(f"ops._C built (CPU kernels): {yes_no[info['cpu']]}")
    print(f"CUDA kernels compiled: {yes_no[info['cuda_kernels']]}")
    print(f"GPU present: {yes_no[info['gpu']]}")
    print(f"ops: {', '.join(info['ops'])}")
    if not info['cpu']:
        print('build with: pip install --no-build-isolation -e .', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
