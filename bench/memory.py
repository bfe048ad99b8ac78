"""Memory per device for training HINT at the paper's SNI scale with full FSDP, computed by XLA.

    python bench/memory.py                                # base (r 64), xl and xxl (r 512); 8-256 devices
    python bench/memory.py --models base --devices 8      # one model: four compiles, a few minutes
    python bench/memory.py --models base --devices 256 --check 8   # + the real FSDP step on 8 CPU devices

The setting is the paper's SNI fine-tuning (HINT.md section 5): global batch 1024; instruction 1024,
input 1024 and target 256 tokens (data.lengths for --task ni); prefix length 30; dropout 0.1; float32
parameters and bfloat16 compute as on TPU; Adafactor as train.make_optimizer builds it; --fsdp = the
number of devices. Full FSDP gives the least memory per device: the per-device batch (1024 / devices)
is the same whatever --fsdp is, and a smaller --fsdp F multiplies the two weight-shaped columns by N / F.
Nothing is allocated: every number comes from shapes or from a compiled executable's memory_analysis().

- params + Adafactor: jax.eval_shape of hypernet.init_params and optimizer.init, each array split as
  train.fsdp_sharding splits it over N devices (its bytes / N if one of its dims divides by N, else all).
- The train step (train.make_train_step, with and without --remat) is compiled on ONE CPU device for
  each per-device batch b = 1024 / N, from abstract inputs, and its temp_size_in_bytes fitted as
  temp(b) = F + b * s. F, the part that does not grow with the batch (gradients, Adafactor's
  temporaries: weight-shaped), is split N ways as under FSDP; the rest, temp(b) - F, is the activations
  of b sequences and stays whole ('activations').
- FSDP gathers each layer's weights where it is used: one decoder layer's float32 weights plus its
  gradient before the reduce-scatter are added ('gathered layer').
- total = the sum of the columns; fits = the devices whose memory holds the total with 10% headroom
  (total <= 0.9 x memory): TPU v3 16 GiB (one core), v4 32 GiB, v5e 16 GiB, v5p 95 GiB, an 80 GB GPU.

This approximates the real multi-device program: XLA's scheduling of the all-gathers, and XLA:CPU's
buffer assignment, differ from a TPU's. `--check N` compiles the real FSDP train step over N fake CPU
devices, for comparison with the composed number.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import types

ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
ap.add_argument('--models', nargs='+', default=['base', 'xl', 'xxl'], help='model.PRESETS names')
ap.add_argument('--adapter-dims', nargs='+', type=int, help="r for every model (default: the paper's: base 64, "
                'xl and xxl 512)')
ap.add_argument('--devices', nargs='+', type=int, default=[8, 32, 64, 256], help='device counts (= --fsdp)')
ap.add_argument('--batch-size', type=int, default=1024, help='global batch')
ap.add_argument('--prefix-len', type=int, default=30)
ap.add_argument('--dropout', type=float, default=0.1)
ap.add_argument('--check', type=int, default=0, metavar='N', help='also compile the real FSDP step on N fake CPU '
                'devices (first model, per-device batch of the first --devices entry)')
args = ap.parse_args()

# Set before JAX starts: fake CPU devices for --check, and a fast unoptimized CPU backend (buffer
# assignment, hence memory_analysis(), comes before code generation and does not depend on it).
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0',
                                    '--xla_llvm_disable_expensive_passes=true']
                                   + [f'--xla_force_host_platform_device_count={args.check}'] * bool(args.check))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import data
import hypernet as HN
import model as M
import train as T

GiB = 2 ** 30
MEMORY = {'v3': 16, 'v4': 32, 'v5e': 16, 'v5p': 95, 'GPU 80G': 80}   # GiB per device
HEADROOM = 0.9
PAPER_R = {'base': 64, 'xl': 512, 'xxl': 512}   # adapter dim r (HINT.md section 5)
LI, LX, LY = data.lengths(types.SimpleNamespace(task='ni', shots=0, format='hint', instruction_len=None,
                                                input_len=None, target_len=None))
AUTO = (jax.sharding.AxisType.Auto,) * 2
notes = []


def configs(name, r, remat):
    cfg = dataclasses.replace(M.PRESETS[name], vocab_size=32128, dtype='bfloat16', dropout_rate=args.dropout,
                              remat=remat)
    return cfg, HN.HyperConfig(adapter_dim=r, prefix_len=args.prefix_len)


def cast_task_state():
    """Work-around: the generated modules are float32, so the attention output that the prefixes join
    comes out float32 and the bfloat16 layer scan's carry changes dtype. Cast them to the compute dtype."""
    encode_task = HN.encode_task

    def cast_encode_task(params, cfg, hcfg, ids, rng=None):
        st = encode_task(params, cfg, hcfg, ids, rng)
        cast = lambda x: x.astype(cfg.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        return {**st, 'encoder': jax.tree.map(cast, st['encoder']), 'decoder': jax.tree.map(cast, st['decoder'])}

    HN.encode_task = cast_encode_task


# HINT has to trace in bfloat16 as it is; where it does not, measure with the work-around and say so.
try:
    cfg, hcfg = configs('tiny', 4, False)
    ids = jnp.ones((1, 8), jnp.int32)
    jax.eval_shape(lambda: HN.hint_forward(HN.init_params(cfg, hcfg, jax.random.PRNGKey(0)), cfg, hcfg,
                                           ids, ids, ids))
except TypeError as e:
    cast_task_state()
    notes.append(f'HINT does not trace in bfloat16 as it is ({str(e).splitlines()[0][:80]}...): measured '
                 'with the generated modules cast to bfloat16 (cast_task_state in this script)')

optimizer, schedule = T.make_optimizer(types.SimpleNamespace(lr=1e-3, warmup=100, momentum=0.0, param_scale=True))


def abstract_state(cfg, hcfg):
    params = jax.eval_shape(lambda: HN.init_params(cfg, hcfg, jax.random.PRNGKey(0)))
    return {'params': params, 'opt': jax.eval_shape(optimizer.init, params),
            'step': jax.ShapeDtypeStruct((), jnp.int32)}


def per_device(tree, n):
    """Bytes on one device of n, each array split as train.fsdp_sharding splits it."""
    size = lambda x: x.size * x.dtype.itemsize
    return sum(size(x) // n if n > 1 and any(d % n == 0 for d in x.shape) else size(x)
               for x in jax.tree.leaves(tree))


def batch_of(b, sharding=None):
    return {k: jax.ShapeDtypeStruct((b, L), jnp.int32, sharding=sharding)
            for k, L in zip(data.FIELDS, (LI, LX, LY))}


def compile_step(cfg, hcfg, b):
    """memory_analysis() of the train step for b sequences on one device, and the seconds it took."""
    mesh = jax.make_mesh((1, 1), ('data', 'fsdp'), devices=jax.devices()[:1], axis_types=AUTO)
    step = T.make_train_step(cfg, hcfg, optimizer, schedule, mesh, 1, 0)
    t0 = time.time()
    stats = step.lower(abstract_state(cfg, hcfg), batch_of(b)).compile().memory_analysis()
    return stats, time.time() - t0


def gib(x):
    return f'{x / GiB:,.1f}'


def fits(total):
    return ', '.join(k for k, v in MEMORY.items() if total <= HEADROOM * v * GiB) or 'none'


t_start = time.time()
batches = sorted({args.batch_size // n for n in args.devices})
fit_at = batches if len(batches) > 1 else batches + [batches[0] // 2 or 2]   # a line needs two points
rows, fitted, compiles, parts = [], [], [], {}
for name in args.models:
    for r in args.adapter_dims or [PAPER_R.get(name, 64)]:
        state = abstract_state(*configs(name, r, False))
        layers = state['params']['t5']['decoder']['layers']
        gathered = 2 * per_device(layers, 1) // M.PRESETS[name].num_decoder_layers   # weights + gradient
        F, act = {}, {}
        for remat in (False, True):
            temp = {}
            for b in fit_at:
                stats, secs = compile_step(*configs(name, r, remat), b)
                temp[b] = stats.temp_size_in_bytes
                compiles.append(secs)
                print(f'compiled {name} r={r} remat={remat} b={b}: {secs:.0f} s, temp {gib(temp[b])} GiB, '
                      f'arguments {gib(stats.argument_size_in_bytes)} GiB', file=sys.stderr, flush=True)
            s, f = np.polyfit(list(temp), list(temp.values()), 1)
            F[remat] = max(f, 0.0)
            act[remat] = {b: temp[b] - F[remat] for b in batches}
            fitted.append((name, r, remat, F[remat], s, max(abs(f + s * b - t) / t for b, t in temp.items())))
        parts[name, r] = (state, gathered, F, act)
        for n in args.devices:
            b, st = args.batch_size // n, per_device(state, n)
            total = {remat: st + F[remat] / n + gathered + act[remat][b] for remat in (False, True)}
            rows.append((name, r, n, b, st, F[False] / n, F[True] / n, gathered, act[False][b], act[True][b],
                         total[False], total[True]))

print(f'\nHINT training memory per device, GiB: SNI lengths {LI} / {LX} / {LY}, global batch {args.batch_size}, '
      f'p {args.prefix_len}, dropout {args.dropout}, float32 params, bfloat16 compute, Adafactor, '
      '--fsdp = devices\n')
print('| model | r | devices | seqs / device | params + Adafactor | grads, optimizer temps | gathered layer '
      '| activations | activations --remat | total | total --remat | fits (--remat) |')
print('|---|---|---|---|---|---|---|---|---|---|---|---|')
for name, r, n, b, st, f0, f1, g, a0, a1, t0, t1 in rows:
    print(f'| {name} | {r} | {n} | {b} | {gib(st)} | {gib(f0)} / {gib(f1)} | {gib(g)} | {gib(a0)} | {gib(a1)} '
          f'| {gib(t0)} | {gib(t1)} | {fits(t1)} |')
print('\ngrads, optimizer temps: without / with --remat. fits: total --remat <= '
      f'{HEADROOM:.0%} of ' + ', '.join(f'{k} {v} GiB' for k, v in MEMORY.items()) + '.')

print('\nThe one-device compiles: temp(b) = F + b * s, fitted over the per-device batches compiled\n')
print('| model | r | --remat | F: weight-shaped | s: per sequence | fit error | pooling scores per sequence |')
print('|---|---|---|---|---|---|---|')
for name, r, remat, f, s, worst in fitted:
    cfg, hcfg = configs(name, r, remat)
    Le, Ld = cfg.num_layers, cfg.num_decoder_layers
    Q = (Le + Ld) * (2 * r + 2) + (Le + 2 * Ld) * 2 * args.prefix_len   # the pooling's learned query rows
    pool = cfg.num_heads * Q * LI * 4   # one float32 [H, Q, n] buffer of the hypernetwork's pooling attention
    print(f'| {name} | {r} | {"yes" if remat else "no"} | {gib(f)} | {gib(s)} | {worst:.1%} | {gib(pool)} |')
print("\npooling scores: ONE float32 [heads, Q, instruction length] buffer of the hypernetwork's pooling "
      'attention, per sequence (Q = (Le+Ld)(2r+2) + (Le+2Ld)2p query rows); --remat does not cover it.')
print(f'Approximation: each step compiled on one CPU device for its per-device batch, F split N ways as FSDP '
      f'splits it (see the docstring). {len(compiles)} compiles, {min(compiles):.0f}-{max(compiles):.0f} s each.')
for note in notes:
    print(f'note: {note}')

if args.check:   # the real program over fake devices: all FSDP, the first --devices entry's per-device batch
    n, (name, r), b = args.check, next(iter(parts)), args.batch_size // args.devices[0]
    mesh = jax.make_mesh((1, n), ('data', 'fsdp'), devices=jax.devices()[:n], axis_types=AUTO)
    state, gathered, F, act = parts[name, r]
    for remat in (False, True):
        cfg, hcfg = configs(name, r, remat)
        placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=T.fsdp_sharding(mesh, x)),
                              state)
        step = T.make_train_step(cfg, hcfg, optimizer, schedule, mesh, 1, 0)
        t0 = time.time()
        batch = batch_of(b * n, NamedSharding(mesh, P(('data', 'fsdp'))))
        m = step.lower(placed, batch).compile().memory_analysis()
        real = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        composed = per_device(state, n) + F[remat] / n + gathered + act[remat][b]
        print(f'check: {name} r={r} remat={remat}, {b} seqs/device, FSDP over {n} CPU devices: {gib(real)} GiB '
              f'per device (temp {gib(m.temp_size_in_bytes)}), composed {gib(composed)} GiB '
              f'({time.time() - t0:.0f} s)')
print(f'\nran {time.time() - t_start:.0f} s')
