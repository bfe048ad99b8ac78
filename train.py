"""Train HINT (or a plain-T5 baseline) with a data-parallel `jax.shard_map` step over all devices.

    python train.py                                  # synthetic suite, tiny model, ~5 min on a laptop CPU
    python train.py --task ni --shots 2 --data-dir natural-instructions --init google/t5-base-lm-adapt
    python train.py --baseline full-input            # Tk-Instruct style: instruction + input in the encoder

Checkpoints are written atomically (`ckpt-<step>/`, a temporary folder renamed into place) and
`--resume` continues from the newest one with the same data order and dropout RNG. The run ends
with an evaluation on the test split (metrics.json, predictions.jsonl).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import data
import hypernet as HN
import model as M


@dataclasses.dataclass
class Args(data.DataArgs):
    # Fields left at None take the task's defaults (TASK_DEFAULTS below: the paper's recipe for ni and c4).
    init: str | None = None         # a preset (random init): tiny, mini, small, base, ...; a transformers
                                    # checkpoint dir or hub name; or a HINT run dir (e.g. after C4 pretraining)
    baseline: str = 'none'          # none (HINT) | full-input (plain T5, instruction + input) | input-only
    adapters: bool = True
    prefixes: bool = True
    fusion: bool = True
    adapter_dim: int | None = None  # r
    prefix_len: int | None = None   # p
    instruction_encoder: str = 'shared'   # shared | t5 (a separate copy) | roberta (needs --instruction-encoder-init)
    instruction_encoder_init: str = ''    # RoBERTa checkpoint dir or hub name
    batch_size: int | None = None   # global, over all devices and accumulation steps
    grad_accum: int = 1
    steps: int | None = None
    lr: float | None = None
    warmup: int = 100
    momentum: float | None = None   # Adafactor first moment (paper: none); 0 = none
    param_scale: bool = True        # Adafactor's step relative to each parameter's RMS (t5x default); from-scratch runs learn faster without
    dropout: float | None = None
    dtype: str = 'auto'             # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
    out_dir: str | None = None      # default runs/<task>
    log_every: int = 50
    save_every: int = 500
    eval_every: int = 0             # 0: evaluate only at the end
    eval_batch_size: int = 64
    eval_instances: int = 0         # evaluate on the first N test instances only (0: all)
    keep_checkpoints: int = 2
    resume: bool = False


# Paper recipe (HINT.md section 5) for ni and c4; the synthetic suite's defaults train a small model from
# scratch on a laptop CPU in about five minutes (its larger step size suits random init).
TASK_DEFAULTS = {
    'synthetic': dict(init='mini', batch_size=16, steps=1500, lr=5e-3, momentum=0.9, adapter_dim=8, prefix_len=4, dropout=0.0),
    'ni': dict(init='google/t5-base-lm-adapt', batch_size=1024, steps=1000, lr=1e-3, momentum=0.0, adapter_dim=64, prefix_len=30, dropout=0.1),
    'c4': dict(init='google/t5-base-lm-adapt', batch_size=1024, steps=10000, lr=1e-3, momentum=0.0, adapter_dim=64, prefix_len=30, dropout=0.0),
}


def fill_defaults(args):
    for k, v in TASK_DEFAULTS[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out_dir is None:
        args.out_dir = f'runs/{args.task}' + ('' if args.baseline == 'none' else f'-{args.baseline}')
    return args


# Sizes beyond model.PRESETS used by the default synthetic run.
# 64 position buckets: exact relative positions up to 16 bytes each way, which list tasks need.
PRESETS = {**M.PRESETS, 'mini': M.T5Config(d_model=128, d_kv=32, d_ff=256, num_heads=4, num_layers=2, num_decoder_layers=2,
                                           num_buckets=64)}


def hyper_config(args) -> HN.HyperConfig | None:
    if args.baseline != 'none':
        return None
    return HN.HyperConfig(adapter_dim=args.adapter_dim, prefix_len=args.prefix_len, adapters=args.adapters,
                          prefixes=args.prefixes, fusion=args.fusion, instruction_encoder=args.instruction_encoder)


# ----------------------------------------------------------------------------------------------
# Checkpoints: ckpt-<step>/{params.safetensors, opt_state.msgpack, meta.json}, written to a temporary
# folder first and renamed into place, so a kill never leaves a half-written checkpoint behind.


def flatten(tree):
    from flax import traverse_util
    return traverse_util.flatten_dict(tree, sep='/')


def save_checkpoint(out_dir, step, params, opt_state, meta, keep):
    from flax import serialization
    from safetensors.numpy import save_file
    final = os.path.join(out_dir, f'ckpt-{step:07d}')
    tmp = final + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: np.asarray(v) for k, v in flatten(jax.device_get(params)).items()}, os.path.join(tmp, 'params.safetensors'))
    if opt_state is not None:
        with open(os.path.join(tmp, 'opt_state.msgpack'), 'wb') as f:
            f.write(serialization.to_bytes(jax.device_get(opt_state)))
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
        json.dump({**meta, 'step': step}, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(out_dir):
    return sorted(p for p in glob.glob(os.path.join(out_dir, 'ckpt-*')) if not p.endswith('.tmp'))


def latest_checkpoint(path):
    """A checkpoint folder itself, or the newest one in a run folder (None if there is none)."""
    if os.path.exists(os.path.join(path, 'meta.json')):
        return path
    found = checkpoints(path)
    return found[-1] if found else None


def load_params(ckpt, expected):
    """Params of a checkpoint, checked against the shapes the config expects."""
    from flax import traverse_util
    from safetensors.numpy import load_file
    path = os.path.join(ckpt, 'params.safetensors')
    flat, want = load_file(path), flatten(expected)
    for k, v in want.items():
        if k not in flat:
            raise ValueError(f'{path}: parameter {k!r} is missing (checkpoint does not match the config)')
        if flat[k].shape != tuple(v.shape):
            raise ValueError(f'{path}: parameter {k!r} has shape {flat[k].shape}, the config expects {tuple(v.shape)}')
    extra = sorted(set(flat) - set(want))
    if extra:
        raise ValueError(f'{path}: unexpected parameter {extra[0]!r} (checkpoint does not match the config)')
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep='/')


def load_run(path, dtype='float32'):
    """(cfg, hcfg, params, meta) of a HINT/baseline run folder or checkpoint folder."""
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f'{path}: no checkpoint (expected ckpt-*/meta.json)')
    meta = json.load(open(os.path.join(ckpt, 'meta.json')))
    cfg = M.T5Config(**{**meta['t5_config'], 'dtype': dtype})
    hcfg = None
    if meta['hyper_config'] is not None:
        h = dict(meta['hyper_config'])
        h['roberta'] = M.RobertaConfig(**h['roberta']) if h.get('roberta') else None
        hcfg = HN.HyperConfig(**h)
    expected = jax.eval_shape(lambda: init_params(cfg, hcfg, jax.random.PRNGKey(0), skeleton=True))
    return cfg, hcfg, load_params(ckpt, expected), meta


def init_params(cfg, hcfg, rng, t5_params=None, encoder_params=None, skeleton=False):
    r1, r2 = jax.random.split(rng)
    t5 = t5_params if t5_params is not None else M.init_t5(cfg, r1)
    params = {'t5': t5}
    if hcfg is not None:
        if skeleton and hcfg.instruction_encoder == 'roberta':  # shapes only: a random RoBERTa of the stored config
            encoder_params = M.init_roberta(hcfg.roberta, r2)
        params['hyper'] = HN.init_hyper(cfg, hcfg, r2, t5, encoder_params)
    return params


def tokenizer_for(args) -> str:
    """--tokenizer, else bytes for the synthetic suite, else the one of the --init checkpoint or run."""
    if args.tokenizer or args.task == 'synthetic':
        return args.tokenizer or 'byte'
    if args.init in PRESETS:
        raise ValueError(f'--task {args.task} with a preset --init needs --tokenizer (e.g. a dir with spiece.model)')
    run = latest_checkpoint(args.init) if os.path.isdir(args.init) else None
    return json.load(open(os.path.join(run, 'meta.json')))['tokenizer'] if run else args.init


def build_model(args, tokenizer):
    """(cfg, hcfg, params) from --init: a preset, a transformers checkpoint, or a HINT run folder."""
    rng = jax.random.PRNGKey(args.seed)
    hcfg = hyper_config(args)
    overrides = {'dropout_rate': args.dropout, 'dtype': args.dtype}
    if args.init in PRESETS:
        vocab = -(-tokenizer.vocab_size // 128) * 128   # padded like T5's 32128
        cfg = dataclasses.replace(PRESETS[args.init], vocab_size=vocab, **overrides)
        t5 = None
    elif os.path.isdir(args.init) and latest_checkpoint(args.init) is not None:  # continue from a HINT run
        cfg, old_hcfg, old, _ = load_run(args.init, args.dtype)
        cfg = dataclasses.replace(cfg, **overrides)
        if hcfg is not None and old_hcfg is not None and old_hcfg != hcfg:
            raise ValueError(f'--init {args.init}: its hypernetwork config {old_hcfg} differs from the one asked for {hcfg}')
        if hcfg is not None and old_hcfg is None:
            raise ValueError(f'--init {args.init}: a baseline run has no hypernetwork to continue from')
        return cfg, hcfg, old if hcfg is not None else {'t5': old['t5']}
    else:
        cfg, t5 = M.load_t5(args.init, **overrides)
    enc = None
    if hcfg is not None and hcfg.instruction_encoder == 'roberta':
        if not args.instruction_encoder_init:
            raise ValueError('--instruction-encoder roberta needs --instruction-encoder-init (e.g. roberta-base)')
        rcfg, enc = M.load_roberta(args.instruction_encoder_init, dtype=args.dtype)
        hcfg = dataclasses.replace(hcfg, roberta=rcfg)
    return cfg, hcfg, init_params(cfg, hcfg, rng, t5, enc)


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


def make_grad_fn(cfg, hcfg, mesh, accum):
    """(params, batch, rng) -> (loss, ce, grads) on a batch sharded over the mesh's 'data' axis."""

    def loss_fn(params, micro, rng, total_tokens):
        logits = HN.hint_forward(params, cfg, hcfg, micro['instruction'], micro['input'],
                                 M.shift_right(micro['target']), rng if cfg.dropout_rate > 0 else None)
        ce, z = token_losses(logits, micro['target'])
        # psum makes the loss the same on every device; its gradient w.r.t. replicated (P()) params then
        # comes out already summed over devices (shard_map's check_vma), so there is no extra pmean.
        ce = jax.lax.psum(ce, 'data') / total_tokens
        return ce + jax.lax.psum(z, 'data') / total_tokens, ce

    def per_device(params, batch, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index('data'))  # different dropout on each device
        total = jnp.maximum(jax.lax.psum(jnp.sum(batch['target'] != M.PAD_ID), 'data'), 1).astype(jnp.float32)
        micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)  # [A, b, ...]

        def add(acc, i_mb):
            i, mb = i_mb
            (loss, ce), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, jax.random.fold_in(rng, i), total)
            return jax.tree.map(jnp.add, acc, (loss, ce, g)), None

        zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        return jax.lax.scan(add, zero, (jnp.arange(accum), micro))[0]

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P('data'), P()), out_specs=(P(), P(), P()))


def make_train_step(cfg, hcfg, optimizer, schedule, mesh, accum, seed):
    grad_fn = make_grad_fn(cfg, hcfg, mesh, accum)

    @jax.jit
    def step(state, batch):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), state['step'])  # a pure function of the step: resumable
        loss, ce, grads = grad_fn(state['params'], batch, rng)
        updates, opt_state = optimizer.update(grads, state['opt'], state['params'])
        params = optax.apply_updates(state['params'], updates)
        metrics = {'loss': loss, 'ce': ce, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state['step'])}
        return {'params': params, 'opt': opt_state, 'step': state['step'] + 1}, metrics

    return step


# ----------------------------------------------------------------------------------------------


def main(args: Args):
    import eval as E  # the evaluation harness (also its own script)
    from tensorboardX import SummaryWriter

    if args.task not in TASK_DEFAULTS:
        raise data.DataError(f'unknown --task {args.task!r} (synthetic, ni or c4)')
    fill_defaults(args)
    if args.dtype == 'auto':
        args.dtype = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
    if args.baseline not in ('none', 'full-input', 'input-only'):
        raise ValueError(f'--baseline must be none, full-input or input-only, got {args.baseline!r}')
    if args.baseline == 'full-input':
        args.format = 'full-input'
    args.tokenizer = tokenizer_for(args)
    tokenizer = M.load_tokenizer(args.tokenizer)
    train_data = data.load_split(args, 'train', tokenizer)
    test_data = data.load_split(args, 'test', tokenizer)
    if args.instruction_encoder == 'roberta' and args.baseline == 'none':  # instructions in RoBERTa's vocabulary
        rargs = dataclasses.replace(args, tokenizer=args.instruction_encoder_init)
        rtok = M.load_tokenizer(args.instruction_encoder_init)
        for d, split in ((train_data, 'train'), (test_data, 'test')):
            d['instruction'] = data.load_split(rargs, split, rtok)['instruction']
    test_data = E.first(test_data, args.eval_instances)

    cfg, hcfg, params = build_model(args, tokenizer)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    if args.batch_size % (jax.device_count() * args.grad_accum):
        raise ValueError(f'--batch-size {args.batch_size} must divide by devices ({jax.device_count()}) x --grad-accum ({args.grad_accum})')
    optimizer, schedule = make_optimizer(args)
    state = {'params': params, 'opt': optimizer.init(params), 'step': jnp.int32(0)}
    meta = {'t5_config': dataclasses.asdict(cfg), 'hyper_config': dataclasses.asdict(hcfg) if hcfg else None,
            'tokenizer': args.tokenizer, 'args': dataclasses.asdict(args)}
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt = latest_checkpoint(args.out_dir) if args.resume else None
    if ckpt is not None:
        from flax import serialization
        state['params'] = load_params(ckpt, params)
        with open(os.path.join(ckpt, 'opt_state.msgpack'), 'rb') as f:
            state['opt'] = serialization.from_bytes(state['opt'], f.read())
        state['step'] = jnp.int32(json.load(open(os.path.join(ckpt, 'meta.json')))['step'])
        print(f'resumed from {ckpt}')
    elif args.resume:
        print(f'--resume: no checkpoint in {args.out_dir}, starting from scratch')
    with open(os.path.join(args.out_dir, 'args.json'), 'w') as f:
        json.dump(dataclasses.asdict(args), f, indent=1)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    state = jax.device_put(state, replicated)
    step_fn = make_train_step(cfg, hcfg, optimizer, schedule, mesh, args.grad_accum, args.seed)
    start = int(state['step'])
    feed = data.batches(train_data, args.batch_size, args.seed, start, jax.process_index(), jax.process_count())
    to_global = lambda b: {k: jax.make_array_from_process_local_data(sharded, v) for k, v in b.items()}
    writer = SummaryWriter(os.path.join(args.out_dir, 'tb'))
    print(f'{args.task}: {len(train_data["input"])} train / {len(test_data["input"])} test instances; '
          f'{"HINT" if hcfg else args.baseline} T5 {args.init} ({n_params / 1e6:.2f}M params) on '
          f'{jax.device_count()} {jax.default_backend()} device(s)')

    t0, tokens, last = time.time(), 0, start
    for step in range(start, args.steps):
        batch = next(feed)
        tokens += sum(int((v != M.PAD_ID).sum()) for v in batch.values()) * jax.process_count()
        state, metrics = step_fn(state, to_global(batch))
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            metrics = {k: float(v) for k, v in metrics.items()}
            dt = time.time() - t0
            rate, tok_rate = (done - last) / dt, tokens / dt
            for k, v in {**metrics, 'steps_per_s': rate, 'tokens_per_s': tok_rate}.items():
                writer.add_scalar(f'train/{k}', v, done)
            eta = (args.steps - done) / max(rate, 1e-9)
            print(f'step {done}/{args.steps} loss {metrics["loss"]:.4f} lr {metrics["lr"]:.2e} '
                  f'gnorm {metrics["grad_norm"]:.3f} {rate:.2f} steps/s {tok_rate:,.0f} tok/s ETA {eta / 60:.1f} min', flush=True)
            t0, tokens, last = time.time(), 0, done
        if done % args.save_every == 0 or done == args.steps:
            save_checkpoint(args.out_dir, done, state['params'], state['opt'], meta, args.keep_checkpoints)
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            m, _ = E.evaluate(state['params'], cfg, hcfg, test_data, tokenizer, args.eval_batch_size)
            for k, v in m['overall'].items():
                writer.add_scalar(f'eval/{k}', v, done)
    writer.flush()
    metrics, preds = E.evaluate(state['params'], cfg, hcfg, test_data, tokenizer, args.eval_batch_size)
    E.write_results(args.out_dir, metrics, preds)
    print('held-out: ' + ' '.join(f'{k} {v:.2f}' for k, v in metrics['overall'].items()))
    return state, metrics


if __name__ == '__main__':
    import tyro
    try:
        main(tyro.cli(Args))
    except (data.DataError, FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f'error: {e}')
