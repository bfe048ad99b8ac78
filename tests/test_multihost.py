"""Multi-host training for real, on one machine: 2 processes x 4 CPU devices on localhost, joined by
jax.distributed (JAX's CPU collectives), against 1 process x 8 devices. SLOW: several processes, each
compiling the step (about a minute in all).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import hypernet as HN

pytestmark = pytest.mark.slow   # several processes, each compiling: deselect with -m 'not slow'

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ['--init', 'tiny', '--batch-size', '16', '--adapter-dim', '4', '--prefix-len', '2', '--eval-instances', '24',
        '--log-every', '1', '--save-every', '100']


def env(devices):
    return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
                XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start(out, cache, steps, process_id=None, port=None):
    argv = [sys.executable, 'train.py', *ARGS, '--steps', str(steps), '--out-dir', str(out), '--cache-dir', str(cache)]
    if process_id is None:
        return subprocess.Popen(argv, cwd=ROOT, env=env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    argv += ['--coordinator-address', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(process_id)]
    return subprocess.Popen(argv, cwd=ROOT, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(stdout):
    return [float(x) for x in re.findall(r'^step \d+/\d+ loss ([0-9.]+)', stdout, re.M)]


def test_two_processes_match_one_process(tmp_path):
    cache = tmp_path / 'cache'
    one = start(tmp_path / 'one', cache, 4)
    out1, err1 = one.communicate(timeout=600)
    assert one.returncode == 0, err1[-3000:]
    port = free_port()
    procs = [start(tmp_path / 'two', cache, 4, i, port) for i in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert '8 cpu device(s), 2 process(es)' in outs[0][0]
    assert not losses(outs[1][0]) and 'held-out' not in outs[1][0]   # only process 0 prints progress
    single, multi = losses(out1), losses(outs[0][0])
    print('1 process x 8 devices:', single, '\n2 processes x 4 devices:', multi)
    assert len(single) == len(multi) == 4
    assert max(abs(a - b) for a, b in zip(single, multi)) <= 1e-5
    a, b = HN.load_run(str(tmp_path / 'one'))[2], HN.load_run(str(tmp_path / 'two'))[2]
    assert max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))) <= 1e-5
    # evaluation split over the processes and gathered: the same predictions and metrics
    rows = [open(tmp_path / d / 'predictions.jsonl').read() for d in ('one', 'two')]
    assert rows[0] == rows[1] and len(rows[0].splitlines()) == 24
    assert json.load(open(tmp_path / 'one' / 'metrics.json')) == json.load(open(tmp_path / 'two' / 'metrics.json'))


def test_a_dead_process_ends_the_other(tmp_path):
    port = free_port()
    procs = [start(tmp_path / 'run', tmp_path / 'cache', 100000, i, port) for i in (0, 1)]
    for line in procs[0].stdout:   # training is under way on both
        if line.startswith('step 2/'):
            break
    procs[1].kill()
    t0 = time.time()
    try:
        procs[0].wait(timeout=150)
    finally:
        procs[0].kill()
    waited = time.time() - t0
    err = procs[0].stderr.read()
    print(f'process 0 exited {waited:.0f} s after process 1 was killed: {err.strip().splitlines()[-1:]}')
    assert procs[0].returncode not in (0, None) and waited < 120, (waited, err[-2000:])
