"""Train HINT (or a plain-T5 baseline) with a data-parallel `jax.shard_map` step over all devices.

    python train.py                          # the synthetic suite, a small T5, ~5 min on a CPU
    python train.py --task ni --shots 2      # SNI from T5-base LM-adapted, as the paper
    python train.py --baseline full-input    # Tk-Instruct: instruction + input, no hypernetwork

`--resume` continues from the newest checkpoint (runs.py) with the same data order and dropout.
The run ends with an evaluation on the test split (metrics.json, predictions.jsonl).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
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
import eval as E
import hypernet as HN
import model as M
import runs


@dataclasses.dataclass
class Args(data.DataArgs):
    # Fields left at None take the task's defaults (TASK_DEFAULTS: the paper's recipe for ni, p3)
    init: str | None = None   # a preset (tiny .. xxl), transformers folder or hub name, or a run
    baseline: Literal['none', 'full-input', 'input-only'] = 'none'   # none: HINT; else plain T5
    adapters: bool = True           # generated parallel adapters on every feed-forward block
    prefixes: bool = True           # generated key/value prefixes in every attention block
    fusion: bool = True             # the decoder also cross-attends to the encoded instruction
    prefix_attention: Literal['joint', 'separate'] = 'joint'   # one softmax with T5's keys (paper)
    adapter_dim: int | None = None  # r
    prefix_len: int | None = None   # p
    lora_rank: int = 0              # R > 0: a generated LoRA on attention q and v (not in paper)
    instruction_encoder: Literal['shared', 't5', 'roberta'] = 'shared'   # shared: T5's encoder
    instruction_encoder_init: str = ''    # RoBERTa checkpoint folder or hub name
    batch_size: int | None = None   # global, over all devices and accumulation steps
    grad_accum: int = 1             # micro-batches per step (same result, less memory)
    fsdp: int = 1                   # shard parameters and optimizer state over N devices (FSDP)
    remat: bool = False             # recompute each layer's activations in the backward pass
    steps: int | None = None        # optimizer steps in all
    lr: float | None = None         # Adafactor learning rate, constant after --warmup
    warmup: int | None = None       # steps of linear warm-up (ni, c4, p3: 0, as the original)
    momentum: float | None = None   # Adafactor first moment (paper: none); 0 = none
    param_scale: bool = True        # Adafactor's step relative to each parameter's RMS (t5x)
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
    overwrite: bool = False         # delete the checkpoints in --out-dir and start over
    # Several processes (hosts): found by JAX itself on a Cloud TPU pod; elsewhere give all three.
    coordinator_address: str = ''   # HOST:PORT of process 0, e.g. 10.0.0.1:1234
    num_processes: int = 1          # processes (hosts) in the run
    process_id: int = 0             # this process's index, 0..N-1


# The paper's recipe (HINT.md section 5) for ni, c4 and p3 (P3's steps and dropout: our guesses);
# the synthetic suite's defaults train a small model from scratch on a laptop CPU in ~5 minutes.
PAPER = dict(batch_size=1024, lr=1e-3, warmup=0, momentum=0.0, prefix_len=30)
TASK_DEFAULTS = {
    'synthetic': dict(init='mini', batch_size=16, steps=1500, lr=5e-3, warmup=100, momentum=0.9,
                      adapter_dim=8, prefix_len=4, dropout=0.0),
    'ni': dict(PAPER, init='google/t5-base-lm-adapt', steps=1000, adapter_dim=64, dropout=0.1),
    'c4': dict(PAPER, init='google/t5-base-lm-adapt', steps=10000, adapter_dim=64, dropout=0.0),
    'p3': dict(PAPER, init='google/t5-xl-lm-adapt', steps=10000, adapter_dim=512, dropout=0.1),
}
# 'mini' (the synthetic run's): 64 position buckets, exact up to 16 bytes each way, as lists need
PRESETS = {**M.PRESETS, 'mini': M.T5Config(d_model=128, d_kv=32, d_ff=256, num_heads=4,
                                           num_layers=2, num_decoder_layers=2, num_buckets=64)}


def fill_defaults(args):
    for name, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out_dir is None:
        args.out_dir = f'runs/{args.task}'
        if args.baseline != 'none':
            args.out_dir += f'-{args.baseline}'
    return args


def streamed(args) -> bool:
    """C4's train split and T0's mixture are read as they are used, unless asked for in memory."""
    return {'c4': not args.c4_documents, 'p3': not args.p3_examples}.get(args.task, False)


def check_args(args):
    """Arguments a run cannot work with, reported in a second: before data, models or compiling."""
    data.check_args(args)
    for name in ('batch_size', 'grad_accum', 'steps', 'log_every', 'save_every', 'adapter_dim',
                 'keep_checkpoints', 'eval_batch_size', 'prefix_len', 'fsdp'):
        if getattr(args, name) < 1:
            raise data.DataError(f'--{name.replace("_", "-")} must be at least 1')
    roberta = args.instruction_encoder == 'roberta' and args.baseline == 'none'
    per_step = jax.device_count() * args.grad_accum
    problems = {
        '--lora-rank must be 0 (none) or more': args.lora_rank < 0,
        '--lr must be > 0': not (args.lr > 0 and math.isfinite(args.lr)),
        '--dropout must be in [0, 1)': not 0 <= args.dropout < 1,
        '--eval-every must be 0 or more': args.eval_every < 0,
        f'--fsdp {args.fsdp} must divide the {jax.device_count()} devices':
            jax.device_count() % args.fsdp,
        f'--batch-size {args.batch_size} must divide by devices x --grad-accum ({per_step})':
            args.batch_size % per_step,
        '--resume continues the run in --out-dir and --overwrite deletes it: pick one':
            args.resume and args.overwrite,
        '--instruction-encoder roberta needs --instruction-encoder-init (e.g. roberta-base)':
            roberta and not args.instruction_encoder_init,
        f'--instruction-encoder roberta with --task {args.task} needs --c4-documents N or '
        '--p3-examples N (in memory)': roberta and streamed(args),
        f'--task {args.task} with a preset --init needs --tokenizer (e.g. a spiece.model)':
            args.init in PRESETS and args.task != 'synthetic' and not args.tokenizer,
        f'--init {args.init}: is a file; expected a preset, a checkpoint folder or a hub name':
            args.init not in PRESETS and os.path.isfile(args.init),
        f'--init {args.init}: neither a run (no complete ckpt_*/ in it) nor a transformers '
        'checkpoint (no config.json)': os.path.isdir(args.init) and not runs.is_run(args.init)
            and not os.path.isfile(os.path.join(args.init, 'config.json')),
    }
    for message, bad in problems.items():
        if bad:
            raise data.DataError(message)


def say(*args, **kw):   # print() on process 0 only: one copy of each line in a multi-host run
    if jax.process_index() == 0:
        print(*args, **kw)


# ----------------------------------------------------------------------------------------------
# The model: a preset, a transformers checkpoint or a run of this repo.


def hyper_config(args) -> HN.HyperConfig | None:
    if args.baseline != 'none':
        return None
    return HN.HyperConfig(
        adapter_dim=args.adapter_dim, prefix_len=args.prefix_len, adapters=args.adapters,
        prefixes=args.prefixes, fusion=args.fusion, prefix_attention=args.prefix_attention,
        instruction_encoder=args.instruction_encoder, lora_rank=args.lora_rank)


def tokenizer_for(args) -> str:
    """--tokenizer, else bytes for the synthetic suite, else the --init checkpoint's or run's."""
    if args.tokenizer or args.task == 'synthetic':
        return args.tokenizer or 'byte'
    if not runs.is_run(args.init):
        return args.init
    return runs.newest_loadable(args.init, runs.read_meta)[1]['tokenizer']


def build_model(args, tokenizer, place=None):
    """(cfg, hcfg, params) from --init; imported weights go straight to place(array)'s devices."""
    hcfg = hyper_config(args)
    overrides = {'dropout_rate': args.dropout, 'dtype': args.dtype, 'remat': args.remat}
    t5, encoder = None, None
    if args.init in PRESETS:
        vocab = -(-tokenizer.vocab_size // 128) * 128   # padded like T5's 32128
        cfg = dataclasses.replace(PRESETS[args.init], vocab_size=vocab, **overrides)
    elif runs.is_run(args.init):   # continue from a run of this repo (e.g. HINT pretrained on C4)
        cfg, old_hcfg, old, _ = runs.load_run(args.init, args.dtype)
        cfg = dataclasses.replace(cfg, **overrides)
        if hcfg is None:
            return cfg, None, {'t5': old['t5']}
        if old_hcfg is None or dataclasses.replace(old_hcfg, roberta=None) != hcfg:
            raise data.DataError(f'--init {args.init}: its hypernetwork config {old_hcfg} differs '
                                 f'from the one asked for {hcfg}')
        return cfg, old_hcfg, old
    else:
        cfg, t5 = M.load_t5(args.init, place, **overrides)
    if hcfg is not None and hcfg.instruction_encoder == 'roberta':
        rcfg, encoder = M.load_roberta(args.instruction_encoder_init, dtype=args.dtype)
        hcfg = dataclasses.replace(hcfg, roberta=rcfg)
    return cfg, hcfg, HN.init_params(cfg, hcfg, jax.random.PRNGKey(args.seed), t5, encoder)


# ----------------------------------------------------------------------------------------------
# The training step: token cross-entropy + z-loss over the non-padding targets of the GLOBAL batch.


def token_losses(logits, targets, z_loss=1e-4):
    """Summed cross-entropy and z-loss over the non-padding targets of logits [B, T, V]."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    ce = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = targets != M.PAD_ID
    return jnp.sum(ce * mask), jnp.sum(z_loss * lse ** 2 * mask)


def make_optimizer(args):
    def schedule(step):   # linear warm-up, then constant
        return args.lr * jnp.minimum(1.0, (step + 1) / max(args.warmup, 1))
    adafactor = optax.adafactor(learning_rate=schedule, decay_rate=0.8, factored=True,
                                momentum=args.momentum or None,
                                multiply_by_parameter_scale=args.param_scale)
    return adafactor, schedule


def make_grad_fn(cfg, hcfg, mesh, accum, n_tasks=None):
    """(params, batch, rng) -> (loss, ce, grads). shard_map splits the batch over 'data'; inside,
    XLA shards it and the parameters over 'fsdp' (weights gathered where used, as FSDP)."""
    split = mesh.shape['data'] > 1   # XLA cannot partition a psum over a 'data' axis of size 1

    def data_sum(x):
        return jax.lax.psum(x, 'data') if split else x

    def loss_fn(params, micro, rng, total_tokens):
        dropout_rng = rng if cfg.dropout_rate > 0 else None
        logits = HN.hint_forward(params, cfg, hcfg, micro['instruction'], micro['input'],
                                 M.shift_right(micro['target']), dropout_rng,
                                 micro.get('task_id'), n_tasks)
        ce, z = token_losses(logits, micro['target'])
        # psum makes the loss the same on every device; its gradient w.r.t. replicated (P()) params
        # then comes out already summed over devices (shard_map's check_vma): no extra pmean.
        ce = data_sum(ce) / total_tokens
        return ce + data_sum(z) / total_tokens, ce

    def per_device(params, batch, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index('data'))  # other dropout on each device
        total = jnp.maximum(data_sum(jnp.sum(batch['target'] != M.PAD_ID)), 1).astype(jnp.float32)

        def micro_batches(x):   # micro-batch i = rows i, i + A, ...: each over all 'fsdp' devices
            return x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1)              # [A, b, ...]
        micro = jax.tree.map(micro_batches, batch)
        micro = jax.lax.with_sharding_constraint(micro, P(None, 'fsdp'))

        def add(acc, i_and_micro):
            i, mb = i_and_micro
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, ce), g = grad_fn(params, mb, jax.random.fold_in(rng, i), total)
            return jax.tree.map(jnp.add, acc, (loss, ce, g)), None

        zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        return jax.lax.scan(add, zero, (jnp.arange(accum), micro))[0]

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('data'), P()),
                         out_specs=(P(), P(), P()), axis_names={'data'}, check_vma=split)


def make_train_step(cfg, hcfg, optimizer, schedule, mesh, accum, seed):
    def step(state, batch, n_tasks=None):
        # a pure function of the step: a resumed run draws the same dropout
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), state['step'])
        grad_fn = make_grad_fn(cfg, hcfg, mesh, accum, n_tasks)
        loss, ce, grads = grad_fn(state['params'], batch, rng)
        updates, opt_state = optimizer.update(grads, state['opt'], state['params'])
        params = optax.apply_updates(state['params'], updates)
        metrics = {'loss': loss, 'ce': ce, 'grad_norm': optax.tree.norm(grads),
                   'lr': schedule(state['step'])}
        return {'params': params, 'opt': opt_state, 'step': state['step'] + 1}, metrics

    # the old state's buffers are reused: nothing reads it after; each n_tasks compiles once
    return jax.jit(step, donate_argnums=0, static_argnames='n_tasks')


def task_ids(instruction, per_micro, accum):
    """(task id [rows], n_tasks): equal ids for equal instructions, and a power of two >= the
    distinct instructions of any micro-batch (n_tasks = per_micro: no sharing)."""
    ids = np.unique(instruction, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int32)
    if len(ids) % (per_micro * accum):
        return ids, per_micro
    chunks = ids.reshape(-1, per_micro, accum).transpose(0, 2, 1).reshape(-1, per_micro)
    most = max(len(np.unique(chunk)) for chunk in chunks)
    return ids, min(per_micro, data.next_pow2(most))


# ----------------------------------------------------------------------------------------------
# The loop's duties: feed, log, save, evaluate.


class TrainingError(RuntimeError):
    """A run that has to stop (divergence, a checkpoint not written): says what to do next."""


FLAT_STEPS = 100   # warn after this many steps of an unchanged loss with zero gradient


@dataclasses.dataclass
class Progress:
    """What the progress line reports since the last one, and what the checks remember."""
    since: float = dataclasses.field(default_factory=time.time)
    steps: int = 0
    tokens: int = 0
    host: float = 0.0     # seconds spent on data: waiting for the feed, converting batches
    flops: float = 0.0
    loss: float | None = None
    flat: int = 0         # steps of an unchanged loss with a zero gradient
    last_good: str = 'none (none saved yet)'   # the newest checkpoint saved
    peak: float | None = None   # the device's FLOP/s: an MFU where known

    def restart(self):    # the next progress line's rates count from now
        self.since, self.steps, self.tokens, self.host, self.flops = time.time(), 0, 0, 0.0, 0.0


def make_feed(args, train_data, tokenizer, start, old_meta, progress):
    """Yields (host batch, stream position after it), made by a thread while the device runs."""
    if streamed(args):   # each process resumes at its own saved position
        stream = data.c4_stream if args.task == 'c4' else data.p3_stream
        positions = (old_meta or {}).get('stream') or [None] * jax.process_count()
        if len(positions) != jax.process_count():
            print(f'warning: {progress.last_good} holds {len(positions)} stream positions, not '
                  f'{jax.process_count()}: the stream starts again', file=sys.stderr)
            positions = [None] * jax.process_count()
        feed = stream(args, tokenizer, args.batch_size, jax.process_index(), jax.process_count(),
                      positions[jax.process_index()])
    else:
        batches = data.batches(train_data, args.batch_size, args.seed, start, jax.process_index(),
                               jax.process_count(), args.group_by_length)
        feed = ((batch, None) for batch in batches)
    return data.prefetch(feed)


def to_device(batch, hcfg, args, mesh, progress):
    """(global batch, n_tasks): this host's rows as one array over all devices, with task ids."""
    started = time.time()
    pads = {'instruction': HN.instruction_pad_id(hcfg), 'input': M.PAD_ID, 'target': M.PAD_ID}
    tokens = sum(int((batch[k] != pads[k]).sum()) for k in data.FIELDS)
    progress.tokens += tokens * jax.process_count()
    n_tasks = None
    if hcfg is not None:   # a task's instruction is encoded once per micro-batch
        per_micro = args.batch_size // mesh.shape['data'] // args.grad_accum
        batch['task_id'], n_tasks = task_ids(batch['instruction'], per_micro, args.grad_accum)
        n_tasks = runs.agreed_max(n_tasks)
    rows = NamedSharding(mesh, P(('data', 'fsdp')))
    batch = {k: jax.make_array_from_process_local_data(rows, v) for k, v in batch.items()}
    progress.host += time.time() - started
    return batch, n_tasks


def log(args, step, metrics, progress, writer):
    """The progress line and TensorBoard scalars; stops on a loss that is not finite."""
    metrics = {k: float(v) for k, v in metrics.items()}
    loss, gnorm = metrics['loss'], metrics['grad_norm']
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        raise TrainingError(f'step {step}: the loss is {loss} (gradient norm {gnorm}); stopped '
                            f'without saving. The last good checkpoint is {progress.last_good}: '
                            'lower --lr, then continue from it with --resume')
    flat = gnorm == 0 and progress.loss is not None
    flat = flat and math.isclose(loss, progress.loss, rel_tol=1e-5)
    flat_before, progress.loss = progress.flat, loss
    progress.flat = flat_before + progress.steps if flat else 0
    if flat_before < FLAT_STEPS <= progress.flat:
        print(f'warning: the loss has stayed at {loss:.6g} with zero gradient norm for '
              f'{FLAT_STEPS} steps (step {step}): nothing is learned; check --lr, --init, the data',
              file=sys.stderr)
    seconds = time.time() - progress.since
    rates = {'steps_per_s': progress.steps / seconds, 'tokens_per_s': progress.tokens / seconds,
             'host_share': progress.host / seconds}
    if progress.peak:
        rates['mfu'] = progress.flops / seconds / progress.peak
    if writer:
        for name, value in {**metrics, **rates}.items():
            writer.add_scalar(f'train/{name}', value, step)
    eta = (args.steps - step) / max(rates['steps_per_s'], 1e-9) / 60
    mfu = f'MFU {100 * rates["mfu"]:.1f}% ' if progress.peak else ''
    say(f'step {step}/{args.steps} loss {loss:.6f} lr {metrics["lr"]:.2e} gnorm {gnorm:.3f} '
        f'{rates["steps_per_s"]:.2f} steps/s {rates["tokens_per_s"]:,.0f} tok/s {mfu}'
        f'host {100 * rates["host_share"]:.0f}% ETA {eta:.1f} min', flush=True)
    progress.restart()


def save(args, step, state, meta, position, manager, lock, progress):
    """A checkpoint of every process's shards and stream position, unless another run took it."""
    taken = runs.lock_lost(lock, args.out_dir)
    if runs.agreed_max(bool(taken)):   # every process stops; the lead knows who took it
        raise TrainingError(f'step {step}: another run took {args.out_dir} ({taken}); stopped '
                            f'without saving (last good: {progress.last_good})')
    if streamed(args):   # every process's position, in process order
        mine = [None] * jax.process_count()
        mine[jax.process_index()] = position
        meta['stream'] = E.gather(mine)
    try:
        progress.last_good = runs.save(manager, step, state, meta, args.keep_checkpoints)
    except (OSError, ValueError) as e:   # tensorstore reports a full disk as a ValueError
        reason = getattr(e, 'strerror', None) or e
        raise TrainingError(f'step {step}: could not write a checkpoint to {args.out_dir} '
                            f'({reason}); the last good checkpoint is {progress.last_good}')


def evaluate(args, step, state, cfg, hcfg, test_data, tokenizer, writer):
    metrics, rows = E.evaluate(state['params'], cfg, hcfg, test_data, tokenizer,
                               args.eval_batch_size)
    if writer:
        for name, value in metrics['overall'].items():
            writer.add_scalar(f'eval/{name}', value, step)
    return metrics, rows


def prepare_args(args) -> dict:
    """Defaults, absolute paths, the other processes, the checks; returns the arguments as typed."""
    fill_defaults(args)
    typed = dataclasses.asdict(args)   # args.json keeps what was typed; meta['args'] the paths used
    maybe_paths = ('tokenizer', 'instruction_encoder_init') + ('init',) * (args.init not in PRESETS)
    data.absolute_paths(args, ('out_dir',) + data.DATA_PATHS, maybe_paths)
    runs.init_distributed(args)
    check_args(args)
    if args.dtype == 'auto':
        args.dtype = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
    if args.baseline == 'full-input':
        args.format = 'full-input'
    return typed


def load_data(args):
    """(tokenizer, train split or None when streamed, test split)."""
    args.tokenizer = tokenizer_for(args)
    tokenizer = data.load_tokenizer(args.tokenizer)
    itok = E.instruction_tokenizer(hyper_config(args), dataclasses.asdict(args))   # RoBERTa's
    train_data = None if streamed(args) else E.load_split(args, 'train', tokenizer, itok)
    test_data = E.first(E.load_split(args, 'test', tokenizer, itok), args.eval_instances)
    return tokenizer, train_data, test_data


def resume(args, state, meta, place, progress):
    """(state, its checkpoint's meta or None): --out-dir's newest checkpoint, under --resume."""
    ckpt, old_meta, restored = runs.restore(args.out_dir, state) if args.resume else (None,) * 3
    if restored is None:
        if args.resume:
            say(f'--resume: no checkpoint in {args.out_dir}, starting from scratch')
        return state, None
    meta['run'], progress.last_good = old_meta['run'], ckpt   # its checkpoints replace each other
    say(f'resumed from {ckpt}')
    return jax.device_put(restored, jax.tree.map(place, state)), old_meta


def main(args: Args):
    typed = prepare_args(args)
    lead = jax.process_index() == 0   # the one process that writes files
    manager, lock = runs.prepare_out_dir(args.out_dir, args.resume, args.overwrite, lead)
    runs.check_writable(args.cache_dir, '--cache-dir')

    # Data, model, optimizer, resume
    tokenizer, train_data, test_data = load_data(args)
    mesh = jax.make_mesh((jax.device_count() // args.fsdp, args.fsdp), ('data', 'fsdp'),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    place = functools.partial(runs.fsdp_sharding, mesh)
    cfg, hcfg, params = build_model(args, tokenizer, place)
    optimizer, schedule = make_optimizer(args)
    state = {'params': params, 'opt': optimizer.init(params), 'step': jnp.int32(0)}
    state = jax.device_put(state, jax.tree.map(place, state))   # what a checkpoint is read onto
    meta = {'t5_config': dataclasses.asdict(cfg), 'tokenizer': args.tokenizer,
            'hyper_config': hcfg and dataclasses.asdict(hcfg), 'args': dataclasses.asdict(args),
            'run': uuid.uuid4().hex}
    progress = Progress(peak=runs.peak_flops(jax.devices()[0]))
    state, old_meta = resume(args, state, meta, place, progress)
    if lead:
        (epath.Path(args.out_dir) / 'args.json').write_text(json.dumps(typed, indent=1))
    step_fn = make_train_step(cfg, hcfg, optimizer, schedule, mesh, args.grad_accum, args.seed)
    start = int(state['step'])
    feed = make_feed(args, train_data, tokenizer, start, old_meta, progress)
    n_train = 'streamed' if streamed(args) else len(train_data['input'])
    n_params = sum(x.size for x in jax.tree.leaves(params)) / 1e6
    kind = 'HINT' if hcfg else args.baseline
    say(f'{args.task}: {n_train} train / {len(test_data["input"])} test instances; {kind} T5 '
        f'{args.init} ({n_params:.2f}M params) on {jax.device_count()} {jax.default_backend()} '
        f'device(s), {jax.process_count()} process(es)')

    # Train loop
    flops_by_shape = {}
    with runs.stop_signals_and_writer(args.out_dir, lead) as writer:
        for step in range(start + 1, args.steps + 1):
            batch, position = next(feed)
            batch, n_tasks = to_device(batch, hcfg, args, mesh, progress)
            if step == start + 1:
                runs.warn_if_too_big(step_fn, state, batch, n_tasks)
            progress.flops += runs.step_flops(flops_by_shape, step_fn, state, batch, n_tasks,
                                              args.fsdp, progress.peak)
            state, metrics = step_fn(state, batch, n_tasks)
            progress.steps += 1
            if step % args.log_every == 0 or step == args.steps:
                log(args, step, metrics, progress, writer)
            stopping = bool(runs.agreed_max(bool(runs.STOP)))   # the same answer on every process
            if step % args.save_every == 0 or step == args.steps or stopping:
                save(args, step, state, meta, position, manager, lock, progress)
            if stopping:
                say(f'{runs.STOP[0]}: saved {progress.last_good}; continue with --resume')
                return state, None
            if args.eval_every and step % args.eval_every == 0 and step != args.steps:
                evaluate(args, step, state, cfg, hcfg, test_data, tokenizer, writer)
    metrics, rows = evaluate(args, args.steps, state, cfg, hcfg, test_data, tokenizer, None)
    if lead:
        E.write_results(args.out_dir, metrics, rows)
    say('held-out: ' + ' '.join(f'{k} {v:.2f}' for k, v in metrics['overall'].items()))
    return state, metrics


if __name__ == '__main__':
    import tyro
    args = tyro.cli(Args)
    runs.quiet_libraries()
    try:
        main(args)
    except (ValueError, OSError, TrainingError) as e:   # bad arguments, data, checkpoints, disk
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:   # Ctrl-C before training (data, model) or in the final evaluation
        found = runs.checkpoints(args.out_dir) if args.out_dir else []
        kept = f'the newest checkpoint is {found[-1]}' if found else 'nothing was saved'
        data.interrupted(kept)
