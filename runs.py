"""Runs: checkpoints, locks, task-state files, processes and what a step costs (the plumbing of
train.py and eval.py, so that those show the method).

A run folder (local or gs://, through etils.epath) holds ckpt_<step>/ checkpoints with the items
params/, opt/ (orbax pytrees) and meta/ (JSON: step, configs, tokenizer, arguments, run id), written
by orbax's CheckpointManager: every process its own shards, into a temporary folder that becomes the
step folder when complete. Beside them: args.json, metrics.json, predictions.jsonl, tb/, run.lock.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
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

import hypernet as HN
import model as M

STEPS = ocp.step.standard_name_format(step_prefix='ckpt', step_format_fixed_length=7)
DELETED = 'deleted'   # checkpoints being deleted: renamed into this folder first (atomic)


class CheckpointError(ValueError):
    """A checkpoint missing, damaged, of another run or of another config: names the file."""


def quiet_libraries():
    """orbax and asyncio log each failure with a traceback from their threads, then raise it: the
    scripts turn what is raised into one line. Called by the scripts, never at import."""
    for name in ('absl', 'asyncio'):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    sys.excepthook = sys.unraisablehook = functools.partial(quiet_abandoned_io, sys.excepthook)


def quiet_abandoned_io(default, kind, error=None, traceback=None):
    """The other reads or writes of a failed restore or save end after orbax closed their event
    loop, and tensorstore reports each: the failure itself is already reported."""
    if not isinstance(kind, type):   # sys.unraisablehook's one argument
        kind, error, traceback = kind.exc_type, kind.exc_value, kind.exc_traceback
    if not (kind is RuntimeError and 'Event loop is closed' in str(error)):
        default(kind, error, traceback)


def check_writable(path: str, flag: str):
    """Create the folder (local or gs://) and write a file there: a missing bucket or a read-only
    disk shows now, not at the first checkpoint."""
    folder = epath.Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f'{flag} {path}: exists and is not a folder')
    probe = folder / f'.write-test-{socket.gethostname()}-{os.getpid()}'
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text('ok')
        probe.unlink(missing_ok=True)
    except Exception as e:   # OSError locally; gcsfs's and google-api-core's errors on gs://
        reason = getattr(e, 'strerror', None) or e
        raise ValueError(f'{flag} {path}: cannot write there ({reason})') from None


# ----------------------------------------------------------------------------------------------
# Reading checkpoints, onto any number of devices.


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
    except FileNotFoundError:
        raise CheckpointError(f'{path}: missing (an incomplete checkpoint)') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{path}: not valid JSON ({e})') from None
    missing = [k for k in ('step', 't5_config', 'hyper_config', 'tokenizer') if k not in meta]
    if missing:
        raise CheckpointError(f'{path}: missing field {missing[0]!r}')
    return meta


def run_of(ckpt):
    """The id of the run that wrote a checkpoint (None when its meta does not read)."""
    try:
        return read_meta(ckpt).get('run')
    except CheckpointError:
        return None


def newest_loadable(path, read, quiet=False):
    """(checkpoint, read(checkpoint)) of one checkpoint folder, or of the newest checkpoint of a run
    folder that reads; each one that does not is skipped with a warning."""
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


def configs(meta, dtype='float32'):
    """(T5Config, HyperConfig or None) of a checkpoint's meta."""
    cfg = M.T5Config(**{**meta['t5_config'], 'dtype': dtype})
    if meta['hyper_config'] is None:
        return cfg, None
    hyper = dict(meta['hyper_config'])
    if hyper.get('roberta'):
        hyper['roberta'] = M.RobertaConfig(**hyper['roberta'])
    return cfg, HN.HyperConfig(**hyper)


def check_shapes(where, saved, expected):
    """Name the first parameter that is missing, extra or of another shape than the config's."""
    have = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(saved, sep='/').items()}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep='/').items()}
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):   # None: absent
            raise CheckpointError(f'{where}: parameter {name!r} has shape {have.get(name)}, the '
                                  f'config {want.get(name)} (not the config of this checkpoint)')


def read_items(ckpt, targets: dict) -> dict:
    """{name: pytree} of the items in targets ({'params': ..., 'opt': ...}), placed as the target's
    arrays say (shape structs or arrays with a sharding): any devices, any mesh."""
    out = {}
    for name, target in targets.items():
        where = epath.Path(ckpt) / name
        if not (where / '_METADATA').exists():
            raise CheckpointError(f'{where}: missing (an incomplete checkpoint)')
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        reader = ocp.StandardCheckpointHandler()
        try:
            if name == 'params':
                check_shapes(where, reader.metadata(where).tree, abstract)
            out[name] = reader.restore(where, args=ocp.args.StandardRestore(abstract))
        except CheckpointError:
            raise
        except Exception as e:   # tensorstore's and orbax's errors for a damaged or foreign item
            reason = f'{type(e).__name__}: {str(e)[:200]}'
            raise CheckpointError(f'{where}: cannot be read, damaged or of another config '
                                  f'({reason})') from None
    return out


def load_run(path, dtype='float32'):
    """(cfg, hcfg, params, meta) of a checkpoint, or of a run's newest checkpoint that loads, on the
    first device. meta['path'] is the checkpoint read."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def read(ckpt):
        meta = read_meta(ckpt)
        cfg, hcfg = configs(meta, dtype)
        init = functools.partial(HN.init_params, cfg, hcfg, skeleton=True)
        shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              shapes)
        return cfg, hcfg, read_items(ckpt, {'params': target})['params'], meta

    ckpt, (cfg, hcfg, params, meta) = newest_loadable(path, read)
    return cfg, hcfg, params, {**meta, 'path': ckpt}


def restore(out_dir, template):
    """(checkpoint, meta, state) of the newest checkpoint in out_dir that loads, placed like the
    template's arrays; (None, None, None) when the folder has none."""
    if not checkpoints(out_dir):
        return None, None, None

    def read(ckpt):
        state = read_items(ckpt, {'params': template['params'], 'opt': template['opt']})
        meta = read_meta(ckpt)
        return meta, {**state, 'step': jnp.int32(meta['step'])}

    ckpt, (meta, state) = newest_loadable(out_dir, read)
    return ckpt, meta, state


# ----------------------------------------------------------------------------------------------
# Writing checkpoints.


def checkpoint_manager(out_dir):
    """orbax's CheckpointManager of the run folder: step folders, their listing, temporary folders
    and atomic saves are orbax's. It deletes the temporary folders that a killed save left."""
    options = ocp.CheckpointManagerOptions(
        step_name_format=STEPS, cleanup_tmp_directories=True, todelete_subdir=DELETED,
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(epath.Path(out_dir), options=options,
                                 item_names=('params', 'opt', 'meta'))


@jax.jit
def all_finite(tree):
    return jax.tree.map(lambda x: jnp.isfinite(x).all(), tree)


def save(manager, step, state, meta, keep):
    """Write ckpt_<step>/ (all processes, each its own shards) and delete this run's checkpoints
    beyond the newest `keep`: another run's are never replaced or deleted, non-finite
    parameters are never written."""
    finite = traverse_util.flatten_dict(jax.device_get(all_finite(state['params'])), sep='/')
    bad = [name for name, ok in finite.items() if not ok]
    if bad:
        raise CheckpointError(f'step {step}: parameter {bad[0]} is not finite, so it was not saved')
    manager.reload()
    if step in manager.all_steps():   # an older attempt of this run at this step, before a resume
        existing = STEPS.find_step(manager.directory, step).path
        if run_of(existing) not in (meta['run'], None):
            raise CheckpointError(f'{existing} belongs to another run: not replaced')
        delete(manager, [step])
    folder = manager.directory / STEPS.build_name(step)
    before = set(temporary_folders(manager.directory))
    items = ocp.args.Composite(params=ocp.args.StandardSave(state['params']),
                               opt=ocp.args.StandardSave(state['opt']),
                               meta=ocp.args.JsonSave({**meta, 'step': step}))
    try:
        manager.save(step, args=items, force=True)
    except Exception:   # this save's own temporary folder goes; a full disk keeps the others
        for partial in set(temporary_folders(manager.directory)) - before:
            try:
                if jax.process_index() == 0:
                    partial.rmtree(missing_ok=True)
            except OSError:   # orbax's threads still write to it: cleared at the next start
                pass
        raise
    # newer ones of this run are the leftovers of an attempt that resumed from an older one
    ours = [s for s in manager.all_steps() if s <= step]
    ours = [s for s in ours if run_of(STEPS.find_step(manager.directory, s).path) == meta['run']]
    delete(manager, sorted(ours)[:-keep])
    return str(folder)


def temporary_folders(run_dir):
    """The folders of saves under way, or of saves a kill interrupted."""
    return [p.get() for p in ocp.step.all_temporary_paths(epath.Path(run_dir))]


def delete(manager, steps):
    """Each checkpoint is renamed into deleted/ first: a kill while its files go never leaves one
    that looks complete with half its files."""
    for step in steps:
        manager.delete(step)
    if steps and jax.process_index() == 0:
        (manager.directory / DELETED).rmtree(missing_ok=True)


def prepare_out_dir(out, resume, overwrite, lead=True):
    """(manager, lock) of --out-dir: created and locked (by the lead), what a killed run left
    named and cleared, checkpoints of an earlier run refused unless --resume or --overwrite."""
    check_writable(out, '--out-dir')
    lock, holder = lock_out_dir(out) if lead else (None, '')
    if agreed_max(bool(holder)):   # every process stops; the lead knows which run holds it
        raise ValueError(f'--out-dir {out} is in use by another run ({holder}): wait for it to '
                         'end, or pick another --out-dir')
    leftovers = temporary_folders(out) + list(epath.Path(out).glob(DELETED))
    for leftover in leftovers if lead else ():   # orbax clears the temporary ones
        print(f'removing {leftover}: left incomplete by an interrupted run', file=sys.stderr)
    if lead:
        (epath.Path(out) / DELETED).rmtree(missing_ok=True)
    manager = checkpoint_manager(out)
    manager.wait_until_finished()   # the cleanup runs in a thread of orbax's: a later save waits
    found = manager.all_steps()
    if found and not resume:
        if not overwrite:
            raise ValueError(f'--out-dir {out} already holds checkpoints (up to step '
                             f'{max(found)}): add --resume to continue, or --overwrite')
        print(f'--overwrite: deleting {len(found)} checkpoint(s) in {out}', file=sys.stderr)
        delete(manager, found)
    return manager, lock


def agreed_max(value: int) -> int:
    """The largest value over all processes: one answer on every process (a stop, a shape)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(multihost_utils.process_allgather(np.int32(value)).max())


# ----------------------------------------------------------------------------------------------
# A run's processes, signals and TensorBoard writer.


def init_distributed(args):
    """Join the other processes of a multi-host run. Must come before any other JAX call."""
    import importlib.util
    if args.num_processes > 1:
        if not args.coordinator_address or not 0 <= args.process_id < args.num_processes:
            raise ValueError('--num-processes N needs --coordinator-address HOST:PORT and '
                             '--process-id in 0..N-1')
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
    """SIGTERM and Ctrl-C ask for a save and a clean stop; TensorBoard's writer (lead only), closed
    at the end: on a full disk its last events are lost, never the checkpoints."""
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
    """Where an array of the train state lives: split over 'fsdp' along its largest dimension that
    divides evenly (FSDP), else replicated (scalars; everything under --fsdp 1)."""
    n, spec = mesh.shape['fsdp'], [None] * x.ndim
    fits = [d for d in range(x.ndim) if x.shape[d] % n == 0]
    if n > 1 and fits:
        spec[max(fits, key=x.shape.__getitem__)] = 'fsdp'
    return NamedSharding(mesh, P(*spec))


# ----------------------------------------------------------------------------------------------
# What a step costs: FLOPs for the MFU, memory for a warning before the first step.


def matmul_flops(jaxpr):
    """2 x the multiply-adds of every matrix product in a jaxpr, a scan's body times its length
    (XLA's cost_analysis() counts a loop body once: the scanned layers would count once)."""
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


# Dense bfloat16 peak FLOP/s of one chip (vendor data sheets) by jax's device_kind, first match
# wins (v5e reports 'TPU v5 lite', v5p 'TPU v5p').
PEAK_FLOPS = [('TPU v3', 123e12), ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5', 459e12),
              ('TPU v6 lite', 918e12), ('A100', 312e12), ('H100', 989e12), ('H200', 989e12)]


def peak_flops(device):
    return next((peak for name, peak in PEAK_FLOPS if name in device.device_kind), None)


def step_flops(cache, step_fn, state, batch, n_tasks, fsdp, peak):
    """Matrix-product FLOPs per device of a train step at this batch's shapes (its jaxpr, --remat's
    recomputation included), once per shape; 0 where the peak is unknown (no MFU shown)."""
    key = (tuple((k, v.shape) for k, v in batch.items()), n_tasks)
    if key not in cache:
        cache[key] = 0.0
        if peak:
            jaxpr = step_fn.trace(state, batch, n_tasks).jaxpr.jaxpr
            cache[key] = matmul_flops(jaxpr) / fsdp
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
    """Warn when the first step will not fit the device's memory, where JAX reports it (not on
    CPU). The compile is the step's own: its first call reuses it."""
    device = jax.local_devices()[0]
    limit = (device.memory_stats() or {}).get('bytes_limit')
    if not limit:
        return
    need = step_bytes(step_fn.lower(state, batch, n_tasks).compile())
    if not fits(need, limit):
        print(f'warning: a train step needs {need / 2 ** 30:.1f} GiB per device, over '
              f'{HEADROOM:.0%} of the {limit / 2 ** 30:.1f} GiB of a {device.device_kind}: raise '
              '--grad-accum (or --fsdp); see docs/memory.md', file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# One run per --out-dir. Locally a flock on run.lock, which the OS lets go however the process
# ends. gs:// has no such lock: run.lock is an object naming the run, checked before every save
# (docs/checkpoints.md says what that leaves open).


def lock_out_dir(out):
    """(lock, '') once this process holds --out-dir, else (None, who holds it). The lock: an open
    file, or on gs:// the text of run.lock (deleted at exit)."""
    path, me = epath.Path(out) / 'run.lock', f'host {socket.gethostname()} pid {os.getpid()}'
    if out.startswith('gs://'):
        return lock_object(path, f'{me} run {uuid.uuid4().hex[:8]}')
    f = open(path, 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        time.sleep(0.2)   # the holder writes its name just after taking the lock
        f.seek(0)
        return None, f.read() or 'another process'
    f.truncate(0)
    f.write(me)
    f.flush()
    return f, ''


def lock_object(path, me):
    """gs://: (me, '') once run.lock names this run (deleted at exit), else (None, who holds it)."""
    if path.exists():
        return None, f'{path.read_text()}; if that run has ended, delete {path}'
    path.write_text(me)
    atexit.register(unlock, path, me)
    return me, ''


def lock_lost(lock, out) -> str:
    """'' while this process holds --out-dir, else who has taken it (gs:// only)."""
    if not isinstance(lock, str):
        return ''
    path = epath.Path(out) / 'run.lock'
    holder = path.read_text() if path.exists() else f'nobody: {path} was deleted'
    return '' if holder == lock else holder


def unlock(path, me):
    if path.exists() and path.read_text() == me:
        path.unlink()


# ----------------------------------------------------------------------------------------------
# Task states: one task's generated modules in a safetensors file, served without its instruction.


def save_task_state(path, state):
    from safetensors.numpy import save_file
    flat = traverse_util.flatten_dict(state, sep='/')
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    save_file({k: np.asarray(v) for k, v in flat.items() if v is not None}, path + '.tmp')
    os.replace(path + '.tmp', path)


def load_task_state(path):
    from safetensors.numpy import load_file
    flat = {k: jnp.asarray(v) for k, v in load_file(path).items()}
    tree = traverse_util.unflatten_dict(flat, sep='/')
    return {'encoder': tree.get('encoder', {}), 'decoder': tree.get('decoder', {}),
            'memory': tree.get('memory')}
