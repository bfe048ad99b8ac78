"""Runs: checkpoints, locks, task-state files, processes and a step's cost, the plumbing of train.py
and eval.py. What a run folder (local or gs://) holds: docs/checkpoints.md."""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

import hypernet as HN
import model as M

STEPS = ocp.step.standard_name_format(step_prefix='ckpt', step_format_fixed_length=7)
DELETED = 'deleted'   # checkpoints being deleted: renamed into this folder first (atomic)


class CheckpointError(ValueError):
    """A checkpoint missing, damaged, of another run or of another config: names the file."""


def quiet_libraries():
    """Called by the scripts (never at import): they report in one line what orbax's threads log."""
    for name in ('absl', 'asyncio'):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.excepthook = sys.unraisablehook = functools.partial(quiet_abandoned_io, sys.excepthook)


def quiet_abandoned_io(default, kind, error=None, traceback=None):
    """Hides the reads and writes a failed restore or save abandons: that failure is reported."""
    if not isinstance(kind, type):   # sys.unraisablehook's one argument
        kind, error, traceback = kind.exc_type, kind.exc_value, kind.exc_traceback
    if not (kind is RuntimeError and 'Event loop is closed' in str(error)):
        default(kind, error, traceback)


def check_writable(path: str, flag: str):
    """Creates the folder and writes a file there: a missing bucket or read-only disk shows now."""
    probe = epath.Path(path) / f'.write-test-{socket.gethostname()}-{os.getpid()}'
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text('ok')
        probe.unlink(missing_ok=True)
    except Exception as e:   # OSError locally; gcsfs's and google-api-core's errors on gs://
        reason = getattr(e, 'strerror', None) or e
        raise ValueError(f'{flag} {path}: cannot write there ({reason})') from None


# --- Reading checkpoints, onto any number of devices ----------------------------------------------


def checkpoints(run_dir) -> list[str]:
    """The run's complete checkpoint folders, oldest first (never what a killed save left)."""
    found = sorted(STEPS.find_all(epath.Path(run_dir)), key=lambda step: step.step)
    return [str(step.path) for step in found]


def is_checkpoint(path) -> bool:
    return re.fullmatch(r'ckpt_\d+', epath.Path(path).name) is not None


def step_of(ckpt) -> int:
    return int(epath.Path(ckpt).name.split('_')[1])


def is_run(path) -> bool:
    """A run folder (or one checkpoint) of this repo, as opposed to a transformers checkpoint."""
    return epath.Path(path).is_dir() and (is_checkpoint(path) or bool(checkpoints(path)))


def read_meta(ckpt) -> dict:
    path = epath.Path(ckpt) / 'meta' / 'metadata'
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:   # missing (an incomplete checkpoint), not UTF-8, not JSON
        raise CheckpointError(f'{path}: does not read ({e})') from None
    missing = [k for k in ('step', 't5_config', 'hyper_config', 'tokenizer') if k not in meta]
    if missing:
        raise CheckpointError(f'{path}: missing field {missing[0]!r}')
    return meta


def newest_loadable(path, read, quiet=False):
    """(checkpoint, read(checkpoint)) of a checkpoint, or of a run's newest one that reads."""
    found = [str(path)] if is_checkpoint(path) else checkpoints(path)[::-1]
    if not found or not epath.Path(path).is_dir():
        raise CheckpointError(f'{path}: no checkpoint (a run of train.py holds ckpt_<step>/)')
    for ckpt in found:
        try:
            return ckpt, read(ckpt)
        except (CheckpointError, OSError, TypeError) as e:   # TypeError: a meta of another version
            if is_checkpoint(path):
                raise CheckpointError(str(e) if ckpt in str(e) else f'{ckpt}: {e}') from None
            if not quiet:
                print(f'warning: skipping {ckpt}: {e}', file=sys.stderr)
    raise CheckpointError(f'{path}: none of its {len(found)} checkpoints loads (see the warnings)')


def check_shapes(where, saved, expected):
    """Names the first parameter that is missing, extra or of another shape than the config's."""
    have = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(saved, sep='/').items()}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep='/').items()}
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):   # None: absent
            raise CheckpointError(f'{where}: parameter {name!r} has shape {have.get(name)}, '
                                  f'the config {want.get(name)}')


def configs(meta, dtype):
    """(T5Config, HyperConfig or None: a baseline) of a checkpoint's meta."""
    cfg, hyper = M.T5Config(**{**meta['t5_config'], 'dtype': dtype}), meta['hyper_config']
    if hyper is None:
        return cfg, None
    roberta = hyper.get('roberta') and M.RobertaConfig(**hyper['roberta'])
    return cfg, HN.HyperConfig(**{**hyper, 'roberta': roberta})


def read_items(ckpt, targets: dict) -> dict:
    """{name: pytree} of the items in targets, placed on the devices their arrays' shardings say."""
    out = {}
    for name, target in targets.items():
        where = epath.Path(ckpt) / name
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        reader = ocp.StandardCheckpointHandler()
        try:
            if name == 'params':   # orbax itself restores the saved shapes without a word
                check_shapes(where, reader.metadata(where).tree, abstract)
            out[name] = reader.restore(where, args=ocp.args.StandardRestore(abstract))
        except CheckpointError:
            raise
        except Exception as e:   # orbax's and tensorstore's errors: missing, damaged, foreign
            reason = f'{type(e).__name__}: {str(e)[:200]}'
            raise CheckpointError(f'{where}: damaged or of another config ({reason})') from None
    return out


def load_run(path, dtype='float32'):
    """(cfg, hcfg, params, meta) of a run's newest checkpoint that loads, on the first device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def read(ckpt):
        meta = read_meta(ckpt)
        cfg, hcfg = configs(meta, dtype)
        init = functools.partial(HN.init_params, cfg, hcfg, skeleton=True)
        target = jax.jit(init, out_shardings=device).eval_shape(jax.random.PRNGKey(0))
        return cfg, hcfg, read_items(ckpt, {'params': target})['params'], {**meta, 'path': ckpt}

    return newest_loadable(path, read)[1]


def restore(out_dir, template):
    """(checkpoint, meta, state) of out_dir's newest checkpoint that loads, placed like template."""
    if not checkpoints(out_dir):
        return None, None, None

    def read(ckpt):
        meta = read_meta(ckpt)
        state = read_items(ckpt, {'params': template['params'], 'opt': template['opt']})
        return ckpt, meta, {**state, 'step': jnp.int32(meta['step'])}

    return newest_loadable(out_dir, read)[1]


# --- Writing checkpoints --------------------------------------------------------------------------


def checkpoint_manager(out_dir):
    """orbax's manager of the run folder: step folders, temporary folders, atomic saves."""
    options = ocp.CheckpointManagerOptions(
        step_name_format=STEPS, todelete_subdir=DELETED, cleanup_tmp_directories=True,
        enable_async_checkpointing=False)   # a failed save raises in save()
    return ocp.CheckpointManager(epath.Path(out_dir), options=options)


@jax.jit
def all_finite(tree):
    return jax.tree.map(lambda x: jnp.isfinite(x).all(), tree)


def save(manager, step, state, meta, keep):
    """Writes ckpt_<step>/ (every process its shards) and keeps this run's newest `keep`."""
    finite = traverse_util.flatten_dict(jax.device_get(all_finite(state['params'])), sep='/')
    bad = [name for name, ok in finite.items() if not ok]
    if bad:
        raise CheckpointError(f'step {step}: parameter {bad[0]} is not finite, so it was not saved')
    folder = manager.directory / STEPS.build_name(step)
    manager.reload()
    owner = dict.fromkeys(manager.all_steps())   # {step: run id}, None where meta does not read
    for s in owner:
        with contextlib.suppress(CheckpointError):
            owner[s] = read_meta(manager.directory / STEPS.build_name(s)).get('run')
    if owner.get(step) not in (meta['run'], None):
        raise CheckpointError(f'{folder} belongs to another run: not replaced')
    if step in owner:   # an older attempt of this run at this step, before a resume
        delete(manager, [step])
    before = set(temporary_folders(manager.directory))
    arrays = {name: ocp.args.StandardSave(state[name]) for name in ('params', 'opt')}
    items = ocp.args.Composite(**arrays, meta=ocp.args.JsonSave({**meta, 'step': step}))
    try:
        manager.save(step, args=items, force=True)
    except Exception:   # this save's own temporary folder goes; a full disk keeps the others
        if jax.process_index() == 0:
            for partial in set(temporary_folders(manager.directory)) - before:
                with contextlib.suppress(OSError):   # orbax's threads still write it: next start
                    partial.rmtree(missing_ok=True)
        raise
    # newer ones of this run are the leftovers of an attempt that resumed from an older one
    ours = [s for s, run in owner.items() if run == meta['run'] and s < step]
    delete(manager, sorted(ours + [step])[:-keep])
    return str(folder)


def temporary_folders(run_dir):   # of saves under way, or of saves a kill interrupted
    return [p.get() for p in ocp.step.all_temporary_paths(epath.Path(run_dir))]


def delete(manager, steps):
    """Each checkpoint goes into deleted/ first (a rename): a kill never leaves half of one."""
    for step in steps:
        manager.delete(step)
    if steps and jax.process_index() == 0:
        (manager.directory / DELETED).rmtree(missing_ok=True)


def prepare_out_dir(out, resume, overwrite, lead=True):
    """(manager, lock) of --out-dir, locked and cleared of what a killed run left."""
    check_writable(out, '--out-dir')
    lock, holder = lock_out_dir(out) if lead else (None, '')
    if agreed_max(bool(holder)):   # every process stops; the lead knows which run holds it
        raise ValueError(f'--out-dir {out} is in use by another run ({holder})')
    if lead:   # orbax clears the temporary folders
        for leftover in temporary_folders(out) + list(epath.Path(out).glob(DELETED)):
            print(f'removing {leftover}: left incomplete by an interrupted run', file=sys.stderr)
        (epath.Path(out) / DELETED).rmtree(missing_ok=True)
    manager = checkpoint_manager(out)
    manager.wait_until_finished()   # the cleanup runs in a thread of orbax's: a later save waits
    found = manager.all_steps()
    if found and not resume:
        if not overwrite:
            raise ValueError(f'--out-dir {out} holds checkpoints: add --resume or --overwrite')
        print(f'--overwrite: deleting {len(found)} checkpoint(s) in {out}', file=sys.stderr)
        delete(manager, found)
    return manager, lock


def agreed_max(value: int) -> int:
    """The largest value over all processes: one answer on every process (a stop, a shape)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(multihost_utils.process_allgather(np.int32(value)).max())


# --- A run's processes, signals and TensorBoard writer --------------------------------------------


def init_distributed(args):
    """Joins the other processes of a multi-host run. Must come before any other JAX call."""
    if args.num_processes > 1:
        if not args.coordinator_address or not 0 <= args.process_id < args.num_processes:
            raise ValueError('--num-processes N needs --coordinator-address, --process-id 0..N-1')
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif importlib.util.find_spec('libtpu') is not None:   # a Cloud TPU VM: JAX finds the pod
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:   # libtpu installed, but no TPU pod found
            print(f'note: running as a single process ({type(e).__name__}: {e})', file=sys.stderr)


STOP = []   # the signal that asked the run to stop (SIGTERM: a preemption, tpu.sh stop)


def request_stop(signum, frame):
    if STOP and signum == signal.SIGINT:
        raise KeyboardInterrupt   # a second Ctrl-C stops at once
    STOP.append(signal.Signals(signum).name)
    print(f'{STOP[0]}: finishing this step, then saving a checkpoint', file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_signals_and_writer(out_dir, lead):
    """SIGTERM and Ctrl-C ask for a save and a clean stop; the lead's TensorBoard writer."""
    STOP.clear()
    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    from tensorboardX import SummaryWriter   # imported late: it imports torch, where installed
    writer = SummaryWriter(f'{out_dir}/tb') if lead else None
    try:
        yield writer
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        try:
            if writer:
                writer.close()
        except Exception as e:   # OSError locally; google.api_core's errors on gs://
            print(f'warning: TensorBoard events not written ({e})', file=sys.stderr)


def fsdp_sharding(mesh, x):
    """Split over 'fsdp' along the largest dimension that divides evenly, else replicated."""
    n, spec = mesh.shape['fsdp'], [None] * x.ndim
    fits = [d for d in range(x.ndim) if x.shape[d] % n == 0]
    if n > 1 and fits:
        spec[max(fits, key=x.shape.__getitem__)] = 'fsdp'
    return NamedSharding(mesh, P(*spec))


# --- What a step costs: FLOPs for the MFU, memory for a warning before the first step -------------


def matmul_flops(jaxpr):
    """2 x the multiply-adds of a jaxpr's matrix products, a scan's body times its length (XLA's
    cost_analysis() counts a loop body once: the scanned layers would count once)."""
    from jax.extend.core import jaxprs_in_params
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'dot_general':
            (contracted, _), _ = eqn.params['dimension_numbers']
            lhs = eqn.invars[0].aval.shape
            total += 2 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contracted])
        times = eqn.params['length'] if eqn.primitive.name == 'scan' else 1
        total += times * sum(matmul_flops(sub) for sub in jaxprs_in_params(eqn.params))
    return float(total)


# Dense bfloat16 FLOP/s of a chip (data sheets) by device_kind, first match (v5e is 'TPU v5 lite')
PEAK_FLOPS = [('TPU v3', 123e12), ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5', 459e12),
              ('TPU v6 lite', 918e12), ('A100', 312e12), ('H100', 989e12), ('H200', 989e12)]


def peak_flops(device):
    return next((peak for name, peak in PEAK_FLOPS if name in device.device_kind), None)


def step_flops(cache, step_fn, state, batch, n_tasks, fsdp, peak):
    """Matrix-product FLOPs per device of a train step, once per shape; 0 without a known peak."""
    if not peak:
        return 0.0
    key = (tuple((k, v.shape) for k, v in batch.items()), n_tasks)
    if key not in cache:
        cache[key] = matmul_flops(step_fn.trace(state, batch, n_tasks).jaxpr.jaxpr) / fsdp
    return cache[key]


HEADROOM = 0.9   # a run fits a device when it needs at most 90% of its memory (bench/memory.py too)


def fits(need, limit):
    return need <= HEADROOM * limit


def step_bytes(compiled):
    """Bytes per device of a compiled step: arguments, outputs (less donated ones), temporaries."""
    m = compiled.memory_analysis()
    outputs = m.output_size_in_bytes - m.alias_size_in_bytes
    return m.argument_size_in_bytes + outputs + m.temp_size_in_bytes


def warn_if_too_big(step_fn, state, batch, n_tasks):
    """Warns when a step will not fit the device's memory (JAX reports none on CPU)."""
    device = jax.local_devices()[0]
    limit = (device.memory_stats() or {}).get('bytes_limit')
    if not limit:
        return
    need = step_bytes(step_fn.lower(state, batch, n_tasks).compile())   # the first step reuses it
    if not fits(need, limit):
        print(f'warning: a train step needs {need / 2 ** 30:.1f} GiB per device, over '
              f'{HEADROOM:.0%} of the {limit / 2 ** 30:.1f} GiB of a {device.device_kind}: raise '
              '--grad-accum (or --fsdp); see docs/memory.md', file=sys.stderr)


# --- One run per --out-dir: a flock on run.lock locally; on gs:// run.lock names the run ----------


def lock_out_dir(out):
    """(lock, '') once this process holds --out-dir, else (None, who holds it)."""
    path, me = epath.Path(out) / 'run.lock', f'host {socket.gethostname()} pid {os.getpid()}'
    if out.startswith('gs://'):
        return lock_object(path, f'{me} run {uuid.uuid4().hex[:8]}')
    f = open(path, 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        time.sleep(0.2)   # the holder writes its name just after taking the lock
        return None, path.read_text() or 'another process'
    path.write_text(me)
    return f, ''   # an open file: the OS unlocks it when the process ends


def lock_object(path, me):
    """gs://: (me, '') once run.lock names this run (deleted at exit), else (None, who holds it)."""
    if path.exists():
        return None, f'{path.read_text()}; if that run has ended, delete {path}'
    path.write_text(me)
    atexit.register(unlock, path, me)
    return me, ''


def lock_lost(lock, out) -> str:
    """'' while this process holds --out-dir, else who took it (gs:// only; before every save)."""
    if not isinstance(lock, str):
        return ''
    path = epath.Path(out) / 'run.lock'
    holder = path.read_text() if path.exists() else f'nobody: {path} was deleted'
    return '' if holder == lock else holder


def unlock(path, me):
    if path.exists() and path.read_text() == me:
        path.unlink()


# --- Task states: a task's generated modules in a safetensors file, served without its instruction


def save_task_state(path, state):
    flat = traverse_util.flatten_dict(state, sep='/')
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    save_file({k: np.asarray(v) for k, v in flat.items() if v is not None}, path + '.tmp')
    os.replace(path + '.tmp', path)


def load_task_state(path):
    tree = traverse_util.unflatten_dict(load_file(path), sep='/')
    return {'encoder': {}, 'decoder': {}, 'memory': None, **jax.tree.map(jnp.asarray, tree)}
