"""Train HINT (or a plain-T5 baseline) with a data-parallel `jax.shard_map` step over all devices.

    python train.py                                  # synthetic suite, tiny model, ~5 min on a laptop CPU
    python train.py --task ni --shots 2 --data-dir natural-instructions --init google/t5-base-lm-adapt
    python train.py --baseline full-input            # Tk-Instruct style: instruction + input in the encoder

Checkpoints are written atomically (`ckpt-<step>/`, a temporary folder renamed into place) and
`--resume` continues from the newest one with the same data order and dropout RNG. The run ends
with an evaluation on the test split (metrics.json, predictions.jsonl).
"""
from __future__ import annotations

import atexit
import dataclasses
import fcntl
import functools
import json
import math
import os
import signal
import socket
import sys
import time
import uuid
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

import data
import hypernet as HN
import model as M


@dataclasses.dataclass
class Args(data.DataArgs):
    # Fields left at None take the task's defaults (TASK_DEFAULTS below: the paper's recipe for ni and c4).
    init: str | None = None
    """a preset for random init (tiny, mini, small, base, large, xl, xxl); a transformers checkpoint
    folder or hub name (google/t5-base-lm-adapt); or a run folder of this repo (e.g. C4 pretraining)"""
    baseline: Literal['none', 'full-input', 'input-only'] = 'none'
    """none = HINT; full-input = plain T5 fed instruction + input (Tk-Instruct); input-only = no instruction"""
    adapters: bool = True           # generated parallel adapters on every feed-forward block
    prefixes: bool = True           # generated key/value prefixes in every attention block
    fusion: bool = True             # the decoder also cross-attends to the encoded instruction
    prefix_attention: Literal['joint', 'separate'] = 'joint'
    """joint: generated prefixes share one softmax with the layer's keys (the paper); separate: their own
    softmax, output added (zero prefixes then leave T5 unchanged)"""
    adapter_dim: int | None = None  # r
    prefix_len: int | None = None   # p
    lora_rank: int = 0
    """R > 0: also generate a rank-R LoRA on every attention block's query and value projections
    (beyond the paper); 0 = none: exactly T5's attention. LoRA only: --no-adapters --no-prefixes
    --no-fusion (eval.py --merge-into then folds a task's LoRA into plain T5 weights)"""
    instruction_encoder: Literal['shared', 't5', 'roberta'] = 'shared'
    """shared = the T5 encoder itself; t5 = a separate copy of it; roberta (needs --instruction-encoder-init)"""
    instruction_encoder_init: str = ''    # RoBERTa checkpoint folder or hub name (with its tokenizer.json)
    batch_size: int | None = None   # global, over all devices and accumulation steps
    grad_accum: int = 1             # micro-batches per step (same result, less memory)
    fsdp: int = 1
    """shard every parameter and its optimizer state over N devices (FSDP; the batch still splits over
    all devices): per-device parameter memory / N"""
    remat: bool = False             # recompute each layer's activations in the backward pass (less memory)
    steps: int | None = None        # optimizer steps in all
    lr: float | None = None         # Adafactor learning rate, constant after --warmup
    warmup: int | None = None       # steps of linear warm-up (ni, c4, p3: 0, as the original)
    momentum: float | None = None   # Adafactor first moment (paper: none); 0 = none
    param_scale: bool = True
    """Adafactor's step relative to each parameter's RMS (t5x default); from-scratch runs learn faster
    without"""
    dropout: float | None = None    # T5's dropout rate in training
    dtype: str = 'auto'             # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
    out_dir: str | None = None      # default runs/<task>
    log_every: int = 50             # steps between progress lines and TensorBoard scalars
    save_every: int = 500           # steps between checkpoints (one is also saved at the end)
    eval_every: int = 0             # 0: evaluate only at the end
    eval_batch_size: int = 64       # instances per decoding batch
    eval_instances: int = 0         # evaluate on the first N test instances only (0: all)
    keep_checkpoints: int = 2       # the newest N checkpoints of this run are kept
    resume: bool = False            # continue from the newest checkpoint in --out-dir that loads
    # Several processes (hosts): found by JAX itself on a Cloud TPU pod; elsewhere give all three.
    coordinator_address: str = ''   # HOST:PORT of process 0, e.g. 10.0.0.1:1234
    num_processes: int = 1          # processes (hosts) in the run
    process_id: int = 0             # this process's index, 0..N-1
    overwrite: bool = False         # start over in an --out-dir that holds checkpoints: deletes them


# Paper recipe (HINT.md section 5) for ni and c4; the synthetic suite's defaults train a small model from
# scratch on a laptop CPU in about five minutes (its larger step size suits random init).
TASK_DEFAULTS = {
    'synthetic': dict(init='mini', batch_size=16, steps=1500, lr=5e-3, warmup=100, momentum=0.9,
                      adapter_dim=8, prefix_len=4, dropout=0.0),
    'ni': dict(init='google/t5-base-lm-adapt', batch_size=1024, steps=1000, lr=1e-3, warmup=0,
               momentum=0.0, adapter_dim=64, prefix_len=30, dropout=0.1),
    'c4': dict(init='google/t5-base-lm-adapt', batch_size=1024, steps=10000, lr=1e-3, warmup=0,
               momentum=0.0, adapter_dim=64, prefix_len=30, dropout=0.0),
    # the paper's P3 model: T5-XL LM-adapted (3B), r 512. HINT.md gives no step count or dropout for P3:
    # 10,000 steps and SNI's dropout are this repo's assumptions (set --steps, --dropout)
    'p3': dict(init='google/t5-xl-lm-adapt', batch_size=1024, steps=10000, lr=1e-3, warmup=0,
               momentum=0.0, adapter_dim=512, prefix_len=30, dropout=0.1),
}


def fill_defaults(args):
    for k, v in TASK_DEFAULTS[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out_dir is None:
        args.out_dir = f'runs/{args.task}' + ('' if args.baseline == 'none' else f'-{args.baseline}')
    return args


def init_distributed(args):
    """Join the other processes of a multi-host run. Must come before any other JAX call."""
    import importlib.util
    if args.num_processes > 1:
        if not args.coordinator_address or not 0 <= args.process_id < args.num_processes:
            raise data.DataError('--num-processes N needs --coordinator-address HOST:PORT and '
                                 f'--process-id in 0..N-1 (got {args.coordinator_address!r}, {args.process_id})')
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif importlib.util.find_spec('libtpu') is not None:   # a Cloud TPU VM: JAX finds the pod's workers
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:   # libtpu installed, but no TPU pod found
            print(f'note: running as a single process ({type(e).__name__}: {e})', file=sys.stderr)


def say(*args, **kw):
    """print() on process 0 only: one copy of the progress lines in a multi-host run."""
    if jax.process_index() == 0:
        print(*args, **kw)


def check_args(args):
    """Arguments a run cannot work with, reported in a second: before data, models or compilation."""
    data.check_args(args)
    for name in ('batch_size', 'grad_accum', 'steps', 'log_every', 'save_every', 'keep_checkpoints',
                 'eval_batch_size', 'adapter_dim', 'prefix_len', 'fsdp'):
        if getattr(args, name) < 1:
            raise data.DataError(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    if args.lora_rank < 0:
        raise data.DataError(f'--lora-rank must be 0 (none) or more, got {args.lora_rank}')
    if not (args.lr > 0 and math.isfinite(args.lr)) or not 0 <= args.dropout < 1 or args.eval_every < 0:
        raise data.DataError(f'need --lr > 0, 0 <= --dropout < 1 and --eval-every >= 0 (got {args.lr}, '
                             f'{args.dropout}, {args.eval_every})')
    if jax.device_count() % args.fsdp:
        raise data.DataError(f'--fsdp {args.fsdp} must divide the number of devices ({jax.device_count()})')
    per_step = jax.device_count() * args.grad_accum
    if args.batch_size % per_step:
        raise data.DataError(f'--batch-size {args.batch_size} must divide by devices ({jax.device_count()}) '
                             f'x --grad-accum ({args.grad_accum})')
    if args.resume and args.overwrite:
        raise data.DataError('--resume continues the run in --out-dir and --overwrite deletes it: pick one')
    if args.instruction_encoder == 'roberta' and args.baseline == 'none' and not args.instruction_encoder_init:
        raise data.DataError('--instruction-encoder roberta needs --instruction-encoder-init (e.g. roberta-base)')
    if args.init not in PRESETS and os.path.isfile(args.init):
        raise data.DataError(f'--init {args.init}: is a file; expected a preset, a checkpoint folder or a hub name')
    if os.path.isdir(args.init) and not is_run(args.init) and not os.path.isfile(
            os.path.join(args.init, 'config.json')):
        raise data.DataError(f'--init {args.init}: neither a run (no complete ckpt-*/ in it) nor a '
                             'transformers checkpoint (no config.json)')


# Sizes beyond model.PRESETS used by the default synthetic run.
# 64 position buckets: exact relative positions up to 16 bytes each way, which list tasks need.
PRESETS = {**M.PRESETS, 'mini': M.T5Config(d_model=128, d_kv=32, d_ff=256, num_heads=4, num_layers=2, num_decoder_layers=2,
                                           num_buckets=64)}


def hyper_config(args) -> HN.HyperConfig | None:
    if args.baseline != 'none':
        return None
    return HN.HyperConfig(adapter_dim=args.adapter_dim, prefix_len=args.prefix_len, adapters=args.adapters,
                          prefixes=args.prefixes, fusion=args.fusion, prefix_attention=args.prefix_attention,
                          instruction_encoder=args.instruction_encoder, lora_rank=args.lora_rank)


# ----------------------------------------------------------------------------------------------
# Checkpoints: ckpt-<step>/ written by orbax-checkpoint, every process its own shards, to a temporary
# folder first (locally renamed into place; on gs:// commit_success.txt comes last), so a kill never
# leaves a checkpoint that --resume would pick. hypernet.py reads them back (--init, --resume, eval.py).


class TrainingError(RuntimeError):
    """A run that has to stop (divergence, a checkpoint that cannot be written): says what to do next."""


def remove_checkpoint(path):
    """commit_success.txt goes first: a kill midway leaves an incomplete folder (cleared at the next
    start), never one that looks complete with half its files."""
    (epath.Path(path) / 'commit_success.txt').unlink(missing_ok=True)
    epath.Path(path).rmtree()


def run_of(ckpt):
    try:
        return HN.read_meta(ckpt).get('run')
    except HN.CheckpointError:
        return None


def step_of(ckpt):
    return int(epath.Path(ckpt).name.split('-')[1])


@jax.jit
def finite_leaves(tree):
    return jax.tree.map(lambda x: jnp.isfinite(x).all(), tree)


def save_checkpoint(out_dir, step, state, meta, keep, lead=True):
    """Write ckpt-<step>/ (all processes, each its own shards) and drop this run's checkpoints beyond
    the newest `keep` (never another run's). Parameters that are not finite are never written."""
    import orbax.checkpoint as ocp
    from flax import traverse_util
    finite = traverse_util.flatten_dict(jax.device_get(finite_leaves(state['params'])), sep='/')
    bad = [k for k, ok in finite.items() if not ok]
    if bad:
        raise TrainingError(f'step {step}: parameter {bad[0]} is not finite, so it was not saved')
    final = epath.Path(out_dir) / f'ckpt-{step:07d}'
    if final.exists() and run_of(final) not in (meta['run'], None):
        raise TrainingError(f'{final} belongs to another run: not replaced')
    before = set(final.parent.glob(f'{final.name}.*'))   # not this save's temporary folders
    items = ocp.args.Composite(params=ocp.args.StandardSave(state['params']),
                               opt=ocp.args.StandardSave(state['opt']), meta=ocp.args.JsonSave({**meta, 'step': step}))
    try:   # an older attempt of this run at this step (before a resume) is replaced: force
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as writer:
            writer.save(final, args=items, force=True)
    except Exception:
        for partial in set(final.parent.glob(f'{final.name}.*')) - before if lead else ():
            try:
                partial.rmtree()
            except OSError:   # orbax's threads still write to it: cleared at the next start
                pass
        raise
    # newer ones of this run are the leftovers of an attempt that was resumed from an older, good one
    ours = [c for c in HN.checkpoints(out_dir) if run_of(c) == meta['run'] and step_of(c) <= step]
    for old in ours[:-keep] if lead else ():
        remove_checkpoint(old)
    return str(final)


def restore(out_dir, template):
    """(checkpoint, meta, state) of the newest checkpoint in out_dir that loads, placed like the
    template's arrays; damaged ones are skipped with a warning. (None, None, None) when there is none."""
    found = HN.checkpoints(out_dir)
    for ckpt in reversed(found):
        try:
            meta = HN.read_meta(ckpt)
            state = HN.read_items(ckpt, {'params': template['params'], 'opt': template['opt']})
            return ckpt, meta, {**state, 'step': jnp.int32(meta['step'])}
        except HN.CheckpointError as e:
            print(f'warning: --resume skips {ckpt}: {e}', file=sys.stderr)
    if found:
        raise HN.CheckpointError(f'--resume: none of the {len(found)} checkpoints in {out_dir} loads '
                                 '(see the warnings above)')
    return None, None, None


# One run per --out-dir. Locally: a flock on run.lock, which the OS lets go when the process ends,
# however it ends. gs:// has no such lock: run.lock is an object naming the run, checked before
# every save (README, "Checkpoints on a pod", says what that leaves open).


def lock_out_dir(out):
    """(lock, '') once this process holds --out-dir, else (None, who holds it). The lock: an open
    file (held while open), or on gs:// the text of run.lock (deleted at exit)."""
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


def lock_lost(lock, out):
    """'' while this process holds --out-dir, else who has taken it (gs:// only)."""
    if not isinstance(lock, str):
        return ''
    path = epath.Path(out) / 'run.lock'
    holder = path.read_text() if path.exists() else f'nobody: {path} was deleted'
    return '' if holder == lock else holder


def unlock(path, me):
    if path.exists() and path.read_text() == me:
        path.unlink()


def prepare_out_dir(args, lead=True):
    """Create and lock --out-dir (returns the lock), clear what a killed run left (incomplete
    ckpt-* folders) and refuse to mix the checkpoints of two runs. The lead locks and deletes."""
    out = args.out_dir
    data.check_writable(out, '--out-dir')
    lock, holder = lock_out_dir(out) if lead else (None, '')
    if agreed_max(bool(holder)):   # every process stops; the lead knows which run holds it
        raise data.DataError(f'--out-dir {out} is in use by another run ({holder}): wait for it to '
                             'end, or pick another --out-dir')
    found = HN.checkpoints(out)
    for leftover in sorted(epath.Path(out).glob('ckpt-*')):
        if lead and str(leftover) not in found:
            print(f'removing {leftover}: left incomplete by an interrupted run', file=sys.stderr)
            leftover.rmtree()
    if found and not args.resume:
        if not args.overwrite:
            raise data.DataError(f'--out-dir {out} already holds checkpoints ({epath.Path(found[-1]).name}, '
                                 '...): add --resume to continue that run, or --overwrite to delete them '
                                 'and start over')
        print(f'--overwrite: deleting {len(found)} checkpoint(s) in {out}', file=sys.stderr)
        for ckpt in found if lead else ():
            remove_checkpoint(ckpt)
    return lock


def is_run(path):
    """A run folder (or one checkpoint folder) of this repo, as opposed to a transformers checkpoint."""
    return epath.Path(path).is_dir() and (HN.is_checkpoint(path) or bool(HN.checkpoints(path)))


def tokenizer_for(args) -> str:
    """--tokenizer, else bytes for the synthetic suite, else the one of the --init checkpoint or run."""
    if args.tokenizer or args.task == 'synthetic':
        return args.tokenizer or 'byte'
    if args.init in PRESETS:
        raise data.DataError(f'--task {args.task} with a preset --init needs --tokenizer (e.g. a folder with '
                             'spiece.model)')
    if not is_run(args.init):
        return args.init
    for ckpt in HN.newest_first(args.init):
        try:
            return HN.read_meta(ckpt)['tokenizer']
        except HN.CheckpointError as e:
            print(f'warning: skipping {ckpt}: {e}', file=sys.stderr)
    raise HN.CheckpointError(f'--init {args.init}: no checkpoint in it has a readable meta.json')


def build_model(args, tokenizer, place=None):
    """(cfg, hcfg, params) from --init: a preset, a transformers checkpoint (its weights put straight
    onto their devices by place(shape) -> sharding, one at a time), or a HINT run folder."""
    rng = jax.random.PRNGKey(args.seed)
    hcfg = hyper_config(args)
    overrides = {'dropout_rate': args.dropout, 'dtype': args.dtype, 'remat': args.remat}
    if args.init in PRESETS:
        vocab = -(-tokenizer.vocab_size // 128) * 128   # padded like T5's 32128
        cfg = dataclasses.replace(PRESETS[args.init], vocab_size=vocab, **overrides)
        t5 = None
    elif is_run(args.init):  # continue from a run of this repo (e.g. HINT pretrained on C4)
        cfg, old_hcfg, old, _ = HN.load_run(args.init, args.dtype)
        cfg = dataclasses.replace(cfg, **overrides)
        if hcfg is None:
            return cfg, None, {'t5': old['t5']}
        if old_hcfg is None:
            raise data.DataError(f'--init {args.init}: a baseline run has no hypernetwork to continue from')
        if dataclasses.replace(old_hcfg, roberta=None) != hcfg:
            raise data.DataError(f'--init {args.init}: its hypernetwork config {old_hcfg} differs from the '
                                 f'one asked for {hcfg}')
        return cfg, old_hcfg, old
    else:
        cfg, t5 = M.load_t5(args.init, place, **overrides)
    enc = None
    if hcfg is not None and hcfg.instruction_encoder == 'roberta':
        rcfg, enc = M.load_roberta(args.instruction_encoder_init, dtype=args.dtype)
        hcfg = dataclasses.replace(hcfg, roberta=rcfg)
    return cfg, hcfg, HN.init_params(cfg, hcfg, rng, t5, enc)


# ----------------------------------------------------------------------------------------------
# The training step: loss = token cross-entropy + z-loss over non-padding targets of the GLOBAL batch.


def token_losses(logits, targets, z_loss=1e-4):
    """Summed cross-entropy and z-loss over the non-padding targets of logits [B, T, V]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    ce = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = targets != M.PAD_ID
    return jnp.sum(ce * mask), jnp.sum(z_loss * lse ** 2 * mask)


def make_optimizer(args):
    schedule = lambda step: args.lr * jnp.minimum(1.0, (step + 1) / max(args.warmup, 1))  # warm-up, then constant
    return optax.adafactor(learning_rate=schedule, decay_rate=0.8, factored=True, momentum=args.momentum or None,
                           multiply_by_parameter_scale=args.param_scale), schedule


def fsdp_sharding(mesh, x):
    """Where an array of the train state lives: split over 'fsdp' along its largest dimension that
    divides evenly (FSDP), else replicated (scalars; everything under --fsdp 1)."""
    n, spec = mesh.shape['fsdp'], [None] * x.ndim
    fits = [d for d in range(x.ndim) if x.shape[d] % n == 0]
    if n > 1 and fits:
        spec[max(fits, key=x.shape.__getitem__)] = 'fsdp'
    return NamedSharding(mesh, P(*spec))


def make_grad_fn(cfg, hcfg, mesh, accum, n_tasks=None):
    """(params, batch, rng) -> (loss, ce, grads). shard_map splits the batch over the mesh's 'data'
    axis by hand; inside each part XLA shards it, and the parameters, over 'fsdp' (FSDP: a layer's
    weights are gathered where they are used; the gradients come out sharded like the parameters).
    With batch['task_id'] and n_tasks (see task_ids), a micro-batch's distinct instructions are
    encoded once each."""
    split = mesh.shape['data'] > 1   # XLA cannot partition a psum over a 'data' axis of size 1 (all FSDP)

    def data_sum(x):
        return jax.lax.psum(x, 'data') if split else x

    def loss_fn(params, micro, rng, total_tokens):
        logits = HN.hint_forward(params, cfg, hcfg, micro['instruction'], micro['input'],
                                 M.shift_right(micro['target']), rng if cfg.dropout_rate > 0 else None,
                                 micro.get('task_id'), n_tasks)
        ce, z = token_losses(logits, micro['target'])
        # psum makes the loss the same on every device; its gradient w.r.t. replicated (P()) params then
        # comes out already summed over devices (shard_map's check_vma), so there is no extra pmean.
        ce = data_sum(ce) / total_tokens
        return ce + data_sum(z) / total_tokens, ce

    def per_device(params, batch, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index('data'))  # different dropout on each device
        total = jnp.maximum(data_sum(jnp.sum(batch['target'] != M.PAD_ID)), 1).astype(jnp.float32)
        # micro-batch i = rows i, i + A, ...: each one spread over all the 'fsdp' devices
        micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)  # [A, b, ...]
        micro = jax.lax.with_sharding_constraint(micro, P(None, 'fsdp'))

        def add(acc, i_mb):
            i, mb = i_mb
            (loss, ce), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, jax.random.fold_in(rng, i), total)
            return jax.tree.map(jnp.add, acc, (loss, ce, g)), None

        zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        return jax.lax.scan(add, zero, (jnp.arange(accum), micro))[0]

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('data'), P()), out_specs=(P(), P(), P()),
                         axis_names={'data'}, check_vma=split)   # 'fsdp' is left to XLA


def make_train_step(cfg, hcfg, optimizer, schedule, mesh, accum, seed):
    def step(state, batch, n_tasks=None):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), state['step'])  # a pure function of the step: resumable
        grad_fn = make_grad_fn(cfg, hcfg, mesh, accum, n_tasks)
        loss, ce, grads = grad_fn(state['params'], batch, rng)
        updates, opt_state = optimizer.update(grads, state['opt'], state['params'])
        params = optax.apply_updates(state['params'], updates)
        metrics = {'loss': loss, 'ce': ce, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state['step'])}
        return {'params': params, 'opt': opt_state, 'step': state['step'] + 1}, metrics

    # the old state's buffers are reused: nothing reads it after; each n_tasks compiles once
    return jax.jit(step, donate_argnums=0, static_argnames='n_tasks')


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


def step_flops(cache, step_fn, state, batch, n_tasks, fsdp, peak):
    """Matrix-product FLOPs per device of a train step at this batch's shapes, from its jaxpr (one
    data shard's inside the shard_map, split over its fsdp devices; --remat's recomputation
    included); once per shape, and only on a device of known peak, where the MFU is shown."""
    key = (tuple((k, v.shape) for k, v in batch.items()), n_tasks)
    if key not in cache:
        jaxpr = step_fn.trace(state, batch, n_tasks).jaxpr.jaxpr if peak else None
        cache[key] = matmul_flops(jaxpr) / fsdp if peak else 0.0
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
    """Warn when the first step will not fit the device's memory, where JAX reports it (not on CPU).
    The compile is the step's own: its first call reuses it."""
    device = jax.local_devices()[0]
    limit = (device.memory_stats() or {}).get('bytes_limit')
    if not limit:
        return
    need = step_bytes(step_fn.lower(state, batch, n_tasks).compile())
    if not fits(need, limit):
        print(f'warning: a train step needs {need / 2 ** 30:.1f} GiB per device, over {HEADROOM:.0%} '
              f'of the {limit / 2 ** 30:.1f} GiB of a {device.device_kind}: raise --grad-accum (or '
              '--fsdp); see README, Memory', file=sys.stderr)


# Dense bfloat16 peak FLOP/s of one chip (vendor data sheets) by jax's device_kind, first match
# wins (v5e reports 'TPU v5 lite', v5p 'TPU v5p'): the MFU of the progress line.
PEAK_FLOPS = [('TPU v3', 123e12), ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5', 459e12),
              ('TPU v6 lite', 918e12), ('A100', 312e12), ('H100', 989e12), ('H200', 989e12)]


def peak_flops(device):
    return next((peak for name, peak in PEAK_FLOPS if name in device.device_kind), None)


def task_ids(instruction, per_micro, accum):
    """(task id [rows], n_tasks) of this host's rows [rows, Li]: equal ids for equal instructions,
    and a bound on the distinct instructions of any micro-batch (rows i, i + accum, ... of each
    data shard of per_micro * accum contiguous rows), rounded up to a power of two: few shapes to
    compile. n_tasks = per_micro turns the sharing off (e.g. a data shard split over hosts)."""
    ids = np.unique(instruction, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int32)
    if len(ids) % (per_micro * accum):
        return ids, per_micro
    chunks = ids.reshape(-1, per_micro, accum).transpose(0, 2, 1).reshape(-1, per_micro)   # [shards * A, b]
    most = max(len(np.unique(chunk)) for chunk in chunks)
    return ids, min(per_micro, data.next_pow2(most))


# ----------------------------------------------------------------------------------------------


STOP = []          # the signal that asked the run to stop (SIGTERM: preemption, tpu.sh stop; Ctrl-C)
FLAT_STEPS = 100   # warn after this many steps of an unchanged loss with zero gradient


def request_stop(signum, frame):
    if STOP and signum == signal.SIGINT:
        raise KeyboardInterrupt   # a second Ctrl-C stops at once
    STOP.append(signal.Signals(signum).name)
    print(f'{STOP[0]}: finishing this step, then saving a checkpoint', file=sys.stderr, flush=True)


def agreed_max(value: int) -> int:
    """The largest value over all processes: whether any was asked to stop (all then save at the
    same step), a static shape every process must compile alike."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(multihost_utils.process_allgather(np.int32(value)).max())


def watch(step, metrics, seen, last_good):
    """Stop on a loss or gradient that is not finite; warn once on a loss stuck with zero gradient."""
    loss, gnorm = float(metrics['loss']), float(metrics['grad_norm'])
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        raise TrainingError(f'step {step}: the loss is {loss} (gradient norm {gnorm}); stopped without '
                            f'saving. The last good checkpoint is {last_good or "none (none saved yet)"}: '
                            'lower --lr, then continue from it with --resume')
    flat = gnorm == 0 and seen['loss'] is not None and math.isclose(loss, seen['loss'], rel_tol=1e-5)
    seen['flat'] = seen['flat'] + 1 if flat else 0
    seen['loss'] = loss
    if seen['flat'] == FLAT_STEPS:
        print(f'warning: the loss has stayed at {loss:.6g} with zero gradient norm for {FLAT_STEPS} steps '
              f'(step {step}): nothing is being learned; check --lr, --init and the targets', file=sys.stderr)


def main(args: Args):
    import eval as E  # the evaluation harness (also its own script)

    fill_defaults(args)
    typed = dataclasses.asdict(args)   # args.json keeps what the user typed; meta['args'] the paths used
    maybe_paths = ('tokenizer', 'instruction_encoder_init') + ('init',) * (args.init not in PRESETS)
    data.absolute_paths(args, ('out_dir',) + data.DATA_PATHS, maybe_paths)
    init_distributed(args)
    check_args(args)
    lead = jax.process_index() == 0   # the one process that writes files
    if args.dtype == 'auto':
        args.dtype = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
    if args.baseline == 'full-input':
        args.format = 'full-input'
    lock = prepare_out_dir(args, lead)   # held to the end of the run
    data.check_writable(args.cache_dir, '--cache-dir')
    args.tokenizer = tokenizer_for(args)
    tokenizer = data.load_tokenizer(args.tokenizer)
    itok = E.instruction_tokenizer(hyper_config(args), dataclasses.asdict(args))   # RoBERTa's, if so
    # C4's train split and T0's mixture are read as they are used
    stream = {'c4': not args.c4_documents, 'p3': not args.p3_examples}.get(args.task, False)
    if stream and itok:
        raise data.DataError(f'--instruction-encoder roberta with --task {args.task} needs '
                             '--c4-documents N or --p3-examples N (in memory)')
    train_data = None if stream else E.load_split(args, 'train', tokenizer, itok)
    test_data = E.first(E.load_split(args, 'test', tokenizer, itok), args.eval_instances)

    mesh = jax.make_mesh((jax.device_count() // args.fsdp, args.fsdp), ('data', 'fsdp'),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    place = functools.partial(fsdp_sharding, mesh)
    cfg, hcfg, params = build_model(args, tokenizer, place)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    optimizer, schedule = make_optimizer(args)
    state = {'params': params, 'opt': optimizer.init(params), 'step': jnp.int32(0)}
    state = jax.device_put(state, jax.tree.map(place, state))   # the template a checkpoint is read onto
    meta = {'t5_config': dataclasses.asdict(cfg), 'hyper_config': dataclasses.asdict(hcfg) if hcfg else None,
            'tokenizer': args.tokenizer, 'args': dataclasses.asdict(args), 'run': uuid.uuid4().hex}
    last_good, old_meta, restored = restore(args.out_dir, state) if args.resume else (None, None, None)
    if restored is not None:
        state = restored
        meta['run'] = old_meta.get('run', meta['run'])   # checkpoints of the same run replace each other
        say(f'resumed from {last_good}')
    elif args.resume:
        say(f'--resume: no checkpoint in {args.out_dir}, starting from scratch')
    if lead:
        (epath.Path(args.out_dir) / 'args.json').write_text(json.dumps(typed, indent=1))
    state = jax.device_put(state, jax.tree.map(place, state))
    sharded = NamedSharding(mesh, P(('data', 'fsdp')))   # batches: rows over all devices
    step_fn = make_train_step(cfg, hcfg, optimizer, schedule, mesh, args.grad_accum, args.seed)
    per_micro = args.batch_size // mesh.shape['data'] // args.grad_accum   # rows of a device's micro-batch
    pad_ids = {'instruction': HN.instruction_pad_id(hcfg), 'input': M.PAD_ID, 'target': M.PAD_ID}
    start = int(state['step'])
    if stream:   # (batch, stream position after it); each process resumes at its own saved position
        positions = (old_meta or {}).get('stream') or []
        if restored is not None and len(positions) != jax.process_count():
            print(f'warning: {last_good} holds stream positions for {len(positions)} process(es), '
                  f'not {jax.process_count()}: the stream starts again from its beginning',
                  file=sys.stderr)
            positions = []
        make = data.c4_stream if args.task == 'c4' else data.p3_stream
        feed = make(args, tokenizer, args.batch_size, jax.process_index(), jax.process_count(),
                    positions[jax.process_index()] if positions else None)
    else:
        feed = data.batches(train_data, args.batch_size, args.seed, start, jax.process_index(),
                            jax.process_count(), args.group_by_length)
        feed = ((b, None) for b in feed)   # no stream position
    feed = data.prefetch(feed)   # the next batch is made by a thread while the device runs this one
    to_global = lambda b: {k: jax.make_array_from_process_local_data(sharded, v) for k, v in b.items()}
    say(f'{args.task}: {"streamed" if stream else len(train_data["input"])} train / '
        f'{len(test_data["input"])} test instances; '
        f'{"HINT" if hcfg else args.baseline} T5 {args.init} ({n_params / 1e6:.2f}M params) on '
        f'{jax.device_count()} {jax.default_backend()} device(s), {jax.process_count()} process(es)')

    STOP.clear()
    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    from tensorboardX import SummaryWriter   # imported late: it imports torch, where installed (1-2 s)
    writer = SummaryWriter(f'{args.out_dir}/tb') if lead else None
    try:
        t0, tokens, last, seen, pending = time.time(), 0, start, {'loss': None, 'flat': 0}, None
        shapes, flops, peak = {}, 0.0, peak_flops(jax.devices()[0])   # shape -> FLOPs per device
        host = 0.0   # seconds the host spent on data (the wait for the feed, batch conversion) since t0
        for step in range(start, args.steps):
            t_host = time.time()
            batch, position = next(feed)   # cut to a bucket length: each new shape compiles the step once
            tokens += sum(int((batch[k] != pad_ids[k]).sum()) for k in data.FIELDS) * jax.process_count()
            n_tasks = None
            if hcfg is not None:   # a task's instruction is encoded once per micro-batch
                batch['task_id'], n_tasks = task_ids(batch['instruction'], per_micro, args.grad_accum)
                n_tasks = agreed_max(n_tasks)
            batch = to_global(batch)
            host += time.time() - t_host
            if step == start:
                warn_if_too_big(step_fn, state, batch, n_tasks)
            flops += step_flops(shapes, step_fn, state, batch, n_tasks, args.fsdp, peak)
            state, metrics = step_fn(state, batch, n_tasks)
            done = step + 1
            if pending:   # the step before is checked while this one runs: no wait for the device
                watch(*pending, seen, last_good)
            pending = (done, metrics)
            log_now = done % args.log_every == 0 or done == args.steps
            stopping = bool(agreed_max(bool(STOP)))   # one answer per step, the same on every process
            save_now = done % args.save_every == 0 or done == args.steps or stopping
            if log_now or save_now:
                watch(*pending, seen, last_good)
                pending = None
            if log_now:
                metrics = {k: float(v) for k, v in metrics.items()}
                dt = time.time() - t0
                rate, tok_rate = (done - last) / dt, tokens / dt
                mfu = {'mfu': flops / dt / peak} if peak else {}   # on a device of known peak
                if writer:
                    for k, v in {**metrics, 'steps_per_s': rate, 'tokens_per_s': tok_rate,
                                 'host_share': host / dt, **mfu}.items():
                        writer.add_scalar(f'train/{k}', v, done)
                eta = (args.steps - done) / max(rate, 1e-9)
                say(f'step {done}/{args.steps} loss {metrics["loss"]:.6f} lr {metrics["lr"]:.2e} '
                    f'gnorm {metrics["grad_norm"]:.3f} {rate:.2f} steps/s {tok_rate:,.0f} tok/s '
                    + (f'MFU {100 * mfu["mfu"]:.1f}% ' if mfu else '')
                    + f'host {100 * host / dt:.0f}% ETA {eta / 60:.1f} min, {len(shapes)} batch shapes',
                    flush=True)
                t0, tokens, last, host, flops = time.time(), 0, done, 0.0, 0.0
            if save_now:
                taken = lock_lost(lock, args.out_dir)
                if agreed_max(bool(taken)):   # every process stops; the lead knows who took it
                    raise TrainingError(f'step {done}: another run took {args.out_dir} ({taken}); '
                                        f'stopped without saving (last good: {last_good})')
                if stream:   # every process's position, in process order (all processes save here)
                    mine = [None] * jax.process_count()
                    mine[jax.process_index()] = position
                    meta['stream'] = E.gather(mine)
                try:
                    last_good = save_checkpoint(args.out_dir, done, state, meta, args.keep_checkpoints, lead)
                except (OSError, ValueError) as e:   # tensorstore reports a full disk as a ValueError
                    raise TrainingError(f'step {done}: could not write a checkpoint to {args.out_dir} '
                                        f'({getattr(e, "strerror", None) or e}); the last good checkpoint is '
                                        f'{last_good or "none (none saved yet)"}') from None
            if stopping:
                say(f'{STOP[0] if STOP else "stop"}: saved {last_good} (step {done}); continue with --resume')
                return state, None
            if args.eval_every and done % args.eval_every == 0 and done != args.steps:
                m, _ = E.evaluate(state['params'], cfg, hcfg, test_data, tokenizer, args.eval_batch_size)
                if writer:
                    for k, v in m['overall'].items():
                        writer.add_scalar(f'eval/{k}', v, done)
    finally:
        if writer:
            close_quietly(writer)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    metrics, preds = E.evaluate(state['params'], cfg, hcfg, test_data, tokenizer, args.eval_batch_size)
    if lead:
        E.write_results(args.out_dir, metrics, preds)
    say('held-out: ' + ' '.join(f'{k} {v:.2f}' for k, v in metrics['overall'].items()))
    return state, metrics


def close_quietly(writer):
    """Close TensorBoard's writer; on a full disk its last events are lost, not the checkpoints."""
    try:
        writer.close()
    except Exception as e:   # OSError locally; google.api_core's errors on gs://
        print(f'warning: TensorBoard events not written ({e})', file=sys.stderr)


if __name__ == '__main__':
    import tyro
    args = tyro.cli(Args)
    try:
        main(args)
    except (ValueError, OSError, TrainingError) as e:   # bad arguments, data, checkpoints, a full disk
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:   # Ctrl-C before training (data, model) or in the final evaluation
        found = HN.checkpoints(args.out_dir) if args.out_dir else []
        data.interrupted(f'the newest checkpoint is {found[-1]}' if found else 'nothing was saved')
