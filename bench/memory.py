"""Which --grad-accum fits on N devices of M GiB: HINT's training memory per device, by XLA.

    python bench/memory.py                              # SNI lengths 1024/1024/256: base, xl, xxl
    python bench/memory.py --lengths 512 1024 256       # the original's P3 run (C4: 512 512 512)
    python bench/memory.py --models xl --check 8     # + the real FSDP step on 8 CPU devices

Setting: global batch 1024, prefix length 30, dropout 0.1, float32 parameters, bfloat16 compute,
Adafactor (train.make_optimizer), --remat, --fsdp = the number of devices. Nothing is allocated:
every number comes from shapes or from a compiled step's memory_analysis().

Per device = params + Adafactor / N + F / N + gathered layer + b x s, with b = 1024 / (N x accum)
the sequences of one micro-batch on one device:
- params + Adafactor: jax.eval_shape, each array split as runs.fsdp_sharding splits it over N.
- the train step (train.make_train_step) is compiled on ONE CPU device for b = 1 and 2, and its temp
  fitted as temp(b) = F + b s: F (gradients, Adafactor's temporaries: weight-shaped) is split N
  ways as under FSDP; s is one sequence's activations, the hypernetwork's pooling block included.
- gathered layer: one decoder layer's float32 weights and gradient, which FSDP gathers where used.
A cell is the smallest power-of-two --grad-accum whose total fits in 90% of the device's memory
(runs.fits, the rule train.py warns by), or "no". XLA:CPU's buffer assignment and scheduling differ
from a TPU's; --check compiles the real FSDP step over N fake CPU devices to compare.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import types

import tyro


@dataclasses.dataclass
class Args:
    models: tuple[str, ...] = ('base', 'xl', 'xxl')   # model.PRESETS names
    adapter_dims: tuple[int, ...] = ()   # r per model (default: the paper's, base 64, xl/xxl 512)
    devices: tuple[int, ...] = (1, 8, 32, 64, 128, 256)   # rows: device counts (= --fsdp)
    memory: tuple[int, ...] = (16, 32, 80, 95)   # rows: GiB per device
    batch_size: int = 1024          # global
    lengths: tuple[int, int, int] = (1024, 1024, 256)   # instruction, input, target (SNI)
    prefix_len: int = 30
    dropout: float = 0.1
    check: int = 0                  # N > 0: also compile the real FSDP step on N fake CPU devices
    check_layers: int = 4           # ... for the first model at this depth (encoder and decoder)
    flops: bool = True              # the hypernetwork's share of a step's FLOPs (first model)


args = tyro.cli(Args)
# Before JAX starts: fake CPU devices for --check, and a fast unoptimized CPU backend (buffer
# assignment, hence memory_analysis(), comes before code generation and does not depend on it).
flags = ['--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true']
if args.check:
    flags.append(f'--xla_force_host_platform_device_count={args.check}')
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', '')] + flags)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import data
import hypernet as HN
import model as M
import train as T
import runs

GiB = 2 ** 30
PAPER_R = {'base': 64, 'xl': 512, 'xxl': 512}   # adapter dim r (HINT.md section 5)
AUTO = (jax.sharding.AxisType.Auto,) * 2
optimizer, schedule = T.make_optimizer(types.SimpleNamespace(lr=1e-3, warmup=0, momentum=0.0,
                                                             param_scale=True))


def configs(name, r, layers=0):
    cfg = dataclasses.replace(M.PRESETS[name], vocab_size=32128, dtype='bfloat16', remat=True,
                              dropout_rate=args.dropout)
    if layers:
        cfg = dataclasses.replace(cfg, num_layers=layers, num_decoder_layers=layers)
    return cfg, HN.HyperConfig(adapter_dim=r, prefix_len=args.prefix_len)


def abstract_state(cfg, hcfg):
    params = jax.eval_shape(lambda: HN.init_params(cfg, hcfg, jax.random.PRNGKey(0)))
    return {'params': params, 'opt': jax.eval_shape(optimizer.init, params),
            'step': jax.ShapeDtypeStruct((), jnp.int32)}


def nbytes(x):
    return x.size * x.dtype.itemsize


def per_device(tree, n):
    """Bytes on one device of n, each array split as runs.fsdp_sharding splits it."""
    return sum(nbytes(x) // n if n > 1 and any(d % n == 0 for d in x.shape) else nbytes(x)
               for x in jax.tree.leaves(tree))


def batch_of(b, sharding=None):
    return {k: jax.ShapeDtypeStruct((b, L), jnp.int32, sharding=sharding)
            for k, L in zip(data.FIELDS, args.lengths)}


def one_device_temp(cfg, hcfg, b):
    mesh = jax.make_mesh((1, 1), ('data', 'fsdp'), devices=jax.devices()[:1], axis_types=AUTO)
    step = T.make_train_step(cfg, hcfg, optimizer, schedule, mesh, 1, 0)
    compiled = step.lower(abstract_state(cfg, hcfg), batch_of(b)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def measure(name, r, layers=0):
    """The parts of the per-device total: {state, F, s, gathered, pool}, bytes."""
    cfg, hcfg = configs(name, r, layers)
    t0 = time.time()
    t1, t2 = one_device_temp(cfg, hcfg, 1), one_device_temp(cfg, hcfg, 2)
    print(f'compiled {name} r {r}, {cfg.num_layers}+{cfg.num_decoder_layers} layers: temp '
          f'{t1 / GiB:.2f} / {t2 / GiB:.2f} GiB at b = 1 / 2 ({time.time() - t0:.0f} s)',
          file=sys.stderr, flush=True)
    state = abstract_state(cfg, hcfg)
    layer = state['params']['t5']['decoder']['layers']
    C, n, H = 2 * r + 2, args.lengths[0], cfg.num_heads   # the widest query table: the adapters'
    slot = H * C * n * 4   # one slot's float32 pooling scores
    return {'state': state, 'F': max(2 * t1 - t2, 0), 's': t2 - t1,
            'gathered': 2 * per_device(layer, 1) // cfg.num_decoder_layers,
            'pool': slot * HN.block_slots(cfg.num_layers + cfg.num_decoder_layers, C, H, n)}


def total(part, n, b):
    return per_device(part['state'], n) + part['F'] / n + part['gathered'] + b * part['s']


def smallest_accum(part, n, memory_gib):
    per_dev = args.batch_size // n
    for accum in (2 ** i for i in range(per_dev.bit_length())):
        if per_dev % accum == 0 and runs.fits(total(part, n, per_dev // accum), memory_gib * GiB):
            return str(accum)
    return 'no'


t_start = time.time()
rs = args.adapter_dims or [PAPER_R.get(m, 64) for m in args.models]
parts = {(m, r): measure(m, r) for m, r in zip(args.models, rs)}
gib = lambda x: f'{x / GiB:,.2f}'
print(f'\nHINT training memory, lengths {"/".join(map(str, args.lengths))}, global batch '
      f'{args.batch_size}, --remat, bfloat16 compute, Adafactor, --fsdp = devices. GiB.\n')
print('| model, r | params (all) | Adafactor (all) | F: grads, optimizer temps (all) '
      '| gathered layer | per sequence | of it, pooling block |')
print('|---|---|---|---|---|---|---|')
for (m, r), part in parts.items():
    cells = [per_device(part['state']['params'], 1), per_device(part['state']['opt'], 1), part['F'],
             part['gathered'], part['s'], part['pool']]
    print(f'| {m}, {r} | ' + ' | '.join(gib(x) for x in cells) + ' |')
print('\nThe smallest --grad-accum that fits (90% of the memory), or no:\n')
print('| devices x GiB | ' + ' | '.join(f'{m}, r {r}' for m, r in parts) + ' |')
print('|---|' + '---|' * len(parts))
for n in args.devices:
    for mem in args.memory:
        cells = [smallest_accum(part, n, mem) for part in parts.values()]
        print(f'| {n} x {mem} | ' + ' | '.join(cells) + ' |')

if args.check:   # the real program over fake devices, all FSDP, at reduced depth and full width
    n, (m, r) = args.check, next(iter(parts))
    L = args.check_layers
    part = measure(m, r, L)
    cfg, hcfg = configs(m, r, L)
    mesh = jax.make_mesh((1, n), ('data', 'fsdp'), devices=jax.devices()[:n], axis_types=AUTO)
    def place(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=T.runs.fsdp_sharding(mesh, x))
    placed = jax.tree.map(place, part['state'])
    rows = NamedSharding(mesh, P(('data', 'fsdp')))
    step = T.make_train_step(cfg, hcfg, optimizer, schedule, mesh, 1, 0)
    for b in (1, 2):
        t0 = time.time()
        compiled = step.lower(placed, batch_of(b * n, rows)).compile()
        print(f'check: {m} r {r}, {L}+{L} layers, {b} seqs/device, FSDP over {n} CPU devices: '
              f'{gib(runs.step_bytes(compiled))} GiB per device; composed {gib(total(part, n, b))} '
              f'({time.time() - t0:.0f} s)')

if args.flops:   # forward + backward (+ --remat's recomputation) of one sequence
    (m, r), batch = next(iter(parts)), batch_of(1)
    cfg, hcfg = configs(m, r)
    params = jax.eval_shape(lambda: HN.init_params(cfg, hcfg, jax.random.PRNGKey(0)))

    def total_of(tree):
        return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(tree) if x.dtype != bool)

    def encoding_loss(params, batch):   # the instruction encoding alone
        E, _ = HN.encode_instruction(params['hyper'], params['t5'], cfg, hcfg, batch['instruction'])
        return total_of(E)

    def hyper_loss(params, batch):      # + pooling and generators
        return total_of(HN.encode_task(params, cfg, hcfg, batch['instruction']))

    def step_loss(params, batch):
        logits = HN.hint_forward(params, cfg, hcfg, batch['instruction'], batch['input'],
                                 M.shift_right(batch['target']))
        return T.token_losses(logits, batch['target'])[0]

    enc, hyper, step = (runs.matmul_flops(jax.make_jaxpr(jax.grad(f))(params, batch).jaxpr)
                        for f in (encoding_loss, hyper_loss, step_loss))
    print(f"\nTraining FLOPs per sequence (matrix products, with --remat), {m} r {r}: "
          f'step {step:.3g}; hypernetwork {hyper:.3g} = {hyper / step:.1%} (instruction encoding '
          f'{enc / step:.1%}, pooling and generators {(hyper - enc) / step:.1%})')
print(f'\nran {time.time() - t_start:.0f} s')
