"""Multi-host training for real, on one machine: 2 processes x 4 CPU devices on localhost, joined by
jax.distributed (JAX's CPU collectives), against 1 process x 8 devices. SLOW: several processes, each
compiling the step (about a minute in all).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import hypernet as HN
import runs

pytestmark = pytest.mark.slow   # several processes, each compiling: deselect with -m 'not slow'

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ['--init', 'tiny', '--batch-size', '16', '--adapter-dim', '4', '--prefix-len', '2', '--eval-instances', '24',
        '--log-every', '1', '--save-every', '2', '--keep-checkpoints', '2']


# 8 fake CPU devices once hung with their threads in two different collectives (an all-reduce and
# an all-gather issued in different orders): XLA:CPU's default scheduler, turned off here.
SLOW_COLLECTIVES = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def env(devices):
    return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
                XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {SLOW_COLLECTIVES}')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start(out, cache, steps, process_id=None, port=None, *extra):
    argv = [sys.executable, 'train.py', *ARGS, '--steps', str(steps), '--out-dir', str(out), '--cache-dir', str(cache),
            *extra]
    if process_id is None:
        return subprocess.Popen(argv, cwd=ROOT, env=env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    argv += ['--coordinator-address', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(process_id)]
    return subprocess.Popen(argv, cwd=ROOT, env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(stdout):
    return [float(x) for x in re.findall(r'^step \d+/\d+ loss ([0-9.]+)', stdout, re.M)]


@pytest.fixture(scope='module')
def dp_run(tmp_path_factory):
    """(run folder, stdout) of 4 steps on 1 process x 8 devices, plain data parallelism."""
    out = tmp_path_factory.mktemp('dp') / 'one'
    one = start(out, out.parent / 'cache', 4)
    stdout, err = one.communicate(timeout=600)
    assert one.returncode == 0, err[-3000:]
    return out, stdout


def test_two_processes_match_one_process(tmp_path, dp_run):
    cache = tmp_path / 'cache'
    shutil.copytree(dp_run[0], tmp_path / 'one')
    out1 = dp_run[1]
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
    a, b = runs.load_run(str(tmp_path / 'one'))[2], runs.load_run(str(tmp_path / 'two'))[2]   # onto 1 device
    assert max_diff(a, b) <= 1e-5
    # evaluation split over the processes and gathered: the same predictions and metrics
    rows = [open(tmp_path / d / 'predictions.jsonl').read() for d in ('one', 'two')]
    assert rows[0] == rows[1] and len(rows[0].splitlines()) == 24
    assert json.load(open(tmp_path / 'one' / 'metrics.json')) == json.load(open(tmp_path / 'two' / 'metrics.json'))
    # the two runs' checkpoints: written by 1 process and by 2 (each its own shards), read back onto 4
    # devices in one process, equal to the 1-device reads above
    for run, params in (('one', a), ('two', b)):
        assert max_diff(params, restored_on_4_devices(tmp_path / run, cache)) == 0
    # 2N steps == N steps + kill + --resume + N steps, on 8 devices
    shutil.copytree(tmp_path / 'one', tmp_path / 'cut')
    shutil.rmtree(tmp_path / 'cut' / 'ckpt_0000004')   # killed after step 2's checkpoint
    os.remove(tmp_path / 'cut' / 'metrics.json')
    resumed = start(tmp_path / 'cut', cache, 4, None, None, '--resume')
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and 'resumed from' in out and 'ckpt_0000002' in out, err[-3000:]
    assert losses(out) == single[2:]
    assert max_diff(a, runs.load_run(str(tmp_path / 'cut'))[2]) <= 1e-6
    assert json.load(open(tmp_path / 'cut' / 'metrics.json')) == json.load(open(tmp_path / 'one' / 'metrics.json'))


def max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def restored_on_4_devices(run, cache):
    """The run's newest parameters and optimizer state as train.py --resume restores them on a 4-device
    mesh (sharded as that mesh says), gathered into an .npz."""
    script = f"""
import numpy as np, jax, train as T
args = T.fill_defaults(T.Args(init='tiny', adapter_dim=4, prefix_len=2, cache_dir={str(cache)!r}))
cfg, hcfg, params = T.build_model(args, T.data.load_tokenizer('byte'))
optimizer, _ = T.make_optimizer(args)
mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
state = jax.device_put({{'params': params, 'opt': optimizer.init(params)}}, jax.NamedSharding(mesh, jax.P()))
ckpt, meta, state = T.runs.restore({str(run)!r}, state)
assert len(state['params']['t5']['embed'].sharding.device_set) == 4
leaves = jax.tree.leaves(state['params'])
np.savez({str(run / 'p4.npz')!r}, *[np.asarray(x) for x in leaves])
"""
    r = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env(4), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(run / 'p4.npz') as z:
        return [z[f'arr_{i}'] for i in range(len(z.files))]


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


def test_fsdp_matches_data_parallelism_resumes_and_restores_elsewhere(tmp_path, dp_run):
    """--fsdp 8 on 8 devices: every parameter and its Adafactor state split 8 ways, the same losses and
    parameters as plain data parallelism; resumable; its checkpoint read under --fsdp 4 and on 1 device."""
    cache = tmp_path / 'cache'
    run = start(tmp_path / 'fsdp', cache, 4, None, None, '--fsdp', '8')
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    print('data parallel:', losses(dp_run[1]), '\n--fsdp 8:', losses(out))
    assert max(abs(a - b) for a, b in zip(losses(dp_run[1]), losses(out))) <= 1e-5 and len(losses(out)) == 4
    dp, fsdp = runs.load_run(str(dp_run[0]))[2], runs.load_run(str(tmp_path / 'fsdp'))[2]   # onto 1 device
    assert max_diff(dp, fsdp) <= 1e-5
    # the checkpoint under --fsdp 4 (a 2 x 4 mesh) and under --fsdp 8: identical; bytes per device
    shares = {}
    for n in (4, 8):
        params, shares[n] = restored_under_fsdp(tmp_path / 'fsdp', cache, n)
        assert max_diff(fsdp, params) == 0
    print('per-device share of parameter + optimizer bytes:', shares)
    assert shares[8] <= 1 / 8 + 0.02 and shares[4] <= 1 / 4 + 0.02
    # 2N steps == N + kill + --resume + N, under --fsdp 8 (resumed with --remat: the same math)
    shutil.copytree(tmp_path / 'fsdp', tmp_path / 'cut')
    shutil.rmtree(tmp_path / 'cut' / 'ckpt_0000004')
    resumed = start(tmp_path / 'cut', cache, 4, None, None, '--fsdp', '8', '--resume', '--remat')
    out2, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and 'resumed from' in out2, err[-3000:]
    assert losses(out2) == losses(out)[2:]
    assert max_diff(fsdp, runs.load_run(str(tmp_path / 'cut'))[2]) <= 1e-6


def restored_under_fsdp(run, cache, n):
    """(parameters, the largest per-device share of parameter + optimizer bytes) of the run's newest
    checkpoint as train.py --resume --fsdp n reads it on 8 devices."""
    script = f"""
import functools, json, numpy as np, jax, train as T
args = T.fill_defaults(T.Args(init='tiny', adapter_dim=4, prefix_len=2, cache_dir={str(cache)!r}))
cfg, hcfg, params = T.build_model(args, T.data.load_tokenizer('byte'))
optimizer, _ = T.make_optimizer(args)
mesh = jax.make_mesh((8 // {n}, {n}), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
state = {{'params': params, 'opt': optimizer.init(params)}}
state = jax.device_put(state, jax.tree.map(functools.partial(T.runs.fsdp_sharding, mesh), state))
ckpt, meta, state = T.runs.restore({str(run)!r}, state)
leaves = jax.tree.leaves([state['params'], state['opt']])
total = sum(x.nbytes for x in leaves)
per_device = max(sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == d)
                 for d in jax.devices())
np.savez({str(run / f'p{n}.npz')!r}, *[np.asarray(x) for x in jax.tree.leaves(state['params'])])
print(json.dumps(per_device / total))
"""
    r = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env(8), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(run / f'p{n}.npz') as z:
        return [z[f'arr_{i}'] for i in range(len(z.files))], json.loads(r.stdout.strip().splitlines()[-1])


def test_shared_instructions_under_data_and_fsdp_axes():
    """train.task_ids + make_grad_fn(n_tasks) on a (2 data x 4 fsdp) mesh of 8 devices: each micro-batch's
    distinct instructions encoded once give the loss and gradients of one task state per instance."""
    script = """
import jax, jax.numpy as jnp, numpy as np, sys
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, 'tests')
import train as T, hypernet as HN
from test_speed import ragged, CFG, HCFG
batch = ragged(32, seed=4)
batch['instruction'] = ragged(3, seed=5)['instruction'][np.random.default_rng(0).integers(0, 3, 32)]
mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
ids, n_tasks = T.task_ids(batch['instruction'], per_micro=8, accum=2)
assert n_tasks == 4, n_tasks   # 3 tasks in every micro-batch of 8 rows: shared
params = HN.init_params(CFG, HCFG, jax.random.PRNGKey(0))
params = jax.device_put(params, jax.tree.map(lambda x: T.runs.fsdp_sharding(mesh, x), params))
rows = NamedSharding(mesh, P(('data', 'fsdp')))
def run(n, b):
    b = {k: jax.device_put(v, rows) for k, v in b.items()}
    return jax.jit(T.make_grad_fn(CFG, HCFG, mesh, 2, n))(params, b, jax.random.PRNGKey(0))
a, s = run(None, batch), run(n_tasks, dict(batch, task_id=ids))
assert abs(float(a[0]) - float(s[0])) <= 1e-5, (a[0], s[0])
diff = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a[2]), jax.tree.leaves(s[2])))
assert diff <= 1e-5, diff
print('ok', diff)
"""
    r = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env(8), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and 'ok' in r.stdout, r.stderr[-3000:]
