"""Two-process training through distributed_train.sh (torchrun, gloo on CPU) on the tiny demo ImageFolder, and the end
of a distributed run."""
import argparse
import csv
import os
import re
import signal
import subprocess
import time
import uuid

import pytest
import torch

import train
from training.distributed import close_process_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, 'distributed_train.sh')
TINY = [
    '--model', 'resnet10t', '--img-size', '32', '-b', '4', '-j', '0', '--warmup-epochs', '0', '--lr', '0.05',
    '--smoothing', '0', '--log-interval', '5', '--device', 'cpu', '--seed', '0', '--epochs', '2',
]

pytestmark = pytest.mark.slow


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT, **extra)
    env.pop('MASTER_PORT', None)  # the launcher then picks a free port
    return env


def _load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def _epochs(run_dir):
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        return [r['epoch'] for r in csv.DictReader(f)]


def test_two_processes_sync_weights_reduce_bn_and_only_rank0_writes(tiny_imagefolder, tmp_path):
    proc = subprocess.run(
        ['bash', LAUNCHER, '2', '--data-dir', tiny_imagefolder, *TINY, '--dist-bn', 'reduce', '--log-tb',
         '--output', 'out', '--experiment', 'ddp'],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert 'Global batch size 8 (4 per process x 2 processes x 1 accumulation steps)' in log

    run = tmp_path / 'out' / 'ddp'
    ckpt = _load(run / 'last.pth.tar')

    # both ranks end with the same parameters and buffers, and that is what rank 0 saved
    final = re.findall(r"Final model state on 2 ranks: (\w+) \(sha1 \['(\w+)', '(\w+)'\]\)", log)
    assert len(final) == 1, log[-4000:]
    verdict, sha0, sha1 = final[0]
    assert verdict == 'identical' and sha0 == sha1 == train.state_fingerprint(ckpt['state_dict'])

    # the ranks' BatchNorm statistics differed (different data) and were averaged
    bn = re.findall(r"running_mean sums per rank before \['([-\d.e+]+)', '([-\d.e+]+)'\], after ([-\d.e+]+)", log)
    assert len(bn) == 2, log[-4000:]
    before0, before1, after = (float(v) for v in bn[-1])
    assert before0 != before1
    assert after == pytest.approx((before0 + before1) / 2, rel=1e-6)
    saved = sum(v.double().sum().item() for k, v in ckpt['state_dict'].items() if k.endswith('running_mean'))
    assert saved == pytest.approx(after, rel=1e-9)

    # only rank 0 wrote: one run folder, one TensorBoard file, one summary row per epoch
    assert os.listdir(tmp_path) == ['out'] and os.listdir(tmp_path / 'out') == ['ddp']
    names = sorted(os.listdir(run))
    tb = [n for n in names if n.startswith('events.out.tfevents')]
    assert len(tb) == 1
    assert sorted(set(names) - set(tb)) == [
        'args.yaml', 'checkpoint-0.pth.tar', 'checkpoint-1.pth.tar', 'curves.png', 'last.pth.tar',
        'model_best.pth.tar', 'summary.csv']
    assert _epochs(run) == ['0', '1']
    assert len(ckpt['rng']) == 2  # every rank's RNG state, for an exact resume


def _worker_pid(tag, rank):
    """Pid of the torchrun worker of `rank` whose environment carries `tag`, or None."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = dict(kv.split(b'=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
        except OSError:
            continue
        if env.get(b'TRAIN_TEST_TAG') == tag.encode() and env.get(b'RANK') == str(rank).encode():
            return int(pid)
    return None


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the worker through /proc')
def test_lost_worker_restarts_and_auto_resumes(tiny_imagefolder, tmp_path):
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        ['bash', LAUNCHER, '2', '--data-dir', tiny_imagefolder, *TINY, '--auto-resume', '--output', 'out',
         '--experiment', 'elastic'],
        cwd=tmp_path, env=_env(MAX_RESTARTS='1', TRAIN_TEST_TAG=tag), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    run = tmp_path / 'out' / 'elastic'
    deadline = time.time() + 600
    while not (run / 'checkpoint-0.pth.tar').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pid = _worker_pid(tag, 1)
    assert pid is not None and proc.poll() is None, 'no rank-1 worker to kill during the second epoch'
    os.kill(pid, signal.SIGKILL)
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]
    assert 'Auto-resume from' in log and 'last.pth.tar' in log
    assert _epochs(run) == ['0', '1']
    assert _load(run / 'last.pth.tar')['epoch'] == 1


def _process_group_threads():
    """Names of this process's threads that belong to a gloo process group or a TCPStore."""
    names = (open(f'/proc/self/task/{tid}/comm').read().strip() for tid in os.listdir('/proc/self/task'))
    return sorted(name for name in names if name.startswith(('pt_gloo', 'gloo', 'pt_tcpstore')))


@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='reads thread names from /proc (Linux)')
def test_close_process_group_stops_the_threads_a_reference_cycle_keeps(tmp_path):
    """train.py's end of run: destroy_process_group alone leaves gloo's threads running while a DDP model in a
    reference cycle holds the group (they would die in interpreter teardown, which can abort: SIGABRT, a finished run
    reported failed); close_process_group stops them."""
    before = _process_group_threads()
    torch.distributed.init_process_group(
        'gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
    model(torch.ones(1, 2)).sum().backward()
    cycle = [model]
    cycle.append(cycle)
    del model, cycle
    running = _process_group_threads()
    assert len(running) > len(before), running
    close_process_group()
    assert not torch.distributed.is_initialized()
    assert _process_group_threads() == before

