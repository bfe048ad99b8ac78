"""Speed, side by side in one run: padding waste, HINT vs full input, and the training step.

    python bench/speed.py                                    # everything (long on a 2-core CPU)
    python bench/speed.py --limit 64 --sizes small --no-train --no-old    # a quick look

(i)   `--eval`: evaluation of the SNI sample's test split (Def+2Pos, T5 v1.1-small shapes, random
      weights, the task's configured lengths 1024 / 1024 / 256) by today's code vs the code at commit
      f03969c (before length bucketing), each in a fresh subprocess on this machine, the old one from
      a `git worktree` in /tmp. Both use separate prefix softmaxes (the only math f03969c has), so
      their predictions can be compared too.
(ii)  `--hint`: HINT vs full input (instruction + input in the encoder, Tk-Instruct), time per
      instance for Def, Def+1Pos, Def+2Pos at T5 v1.1-small and -base shapes: (a) teacher-forced
      scoring of the reference targets, (b) greedy decoding of at most 8 tokens. HINT's time includes
      encoding each task's instruction once, shared by the task's instances. Compilation excluded.
(iii) `--train`: training tokens/s of this project's T5 step vs transformers' PyTorch
      T5ForConditionalGeneration with transformers' Adafactor (v1.1-small, batch 8, 128 input / 32
      target tokens), and HINT's step vs the plain T5 step with a 128-token instruction.
(iv)  `--plot`: bench/speed.png, time per instance vs instruction tokens (from ii).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import data
import eval as E
import hypernet as HN
import model as M
import train as T

SHARED = os.path.join(ROOT, '..', 'shared')


@dataclasses.dataclass
class BenchArgs:
    eval: bool = True               # (i) evaluation: today's code vs f03969c
    old: bool = True                # (i) also run f03969c (--no-old: today's code only)
    hint: bool = True               # (ii) HINT vs full input per instance
    train: bool = True              # (iii) training step: JAX vs PyTorch, HINT vs plain
    plot: bool = True               # (iv) bench/speed.png (needs --hint)
    limit: int = 0                  # (i) the first N test instances (0: all 248)
    hint_limit: int = 0             # (ii) the first N test instances (0: all 248)
    breakdown: bool = True          # (iii) where HINT's training step spends its time (forward + backward)
    sizes: tuple[str, ...] = ('small', 'base')   # (ii) T5 v1.1 shapes
    batch_size: int = 32            # (ii) instances per call
    repeats: int = 2                # (ii) timed runs of each measurement: the fastest counts
    train_steps: int = 5            # (iii) timed steps (after 2 to compile and warm up)
    dropout: float = 0.1            # (iii) as the SNI recipe
    data_dir: str = os.path.join(SHARED, 'data', 'sni_sample')
    tokenizer: str = os.path.join(SHARED, 'assets', 't5_tokenizer')
    old_commit: str = 'f03969c'
    cache_dir: str = os.path.join(tempfile.gettempdir(), 'hint-speed-cache')
    png: str = os.path.join(ROOT, 'bench', 'speed.png')


# ---------------------------------------------------------------------------------------------- (i)

# Runs in a subprocess with argv [root, options]: evaluation with the code in `root` (today's or an
# old commit's worktree), timed as eval.py runs it (compilation included). Only APIs both have.
EVAL_WORKER = r'''
import dataclasses, hashlib, json, sys, time
root, opts = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
import jax
import data, eval as E, hypernet as HN, model as M
tok = data.load_tokenizer(opts['tokenizer'])
args = data.DataArgs(task='ni', data_dir=opts['data_dir'], tokenizer=opts['tokenizer'], shots=2,
                     cache_dir=opts['cache_dir'])
split = E.first(data.load_split(args, 'test', tok), opts['limit'])
cfg = dataclasses.replace(M.PRESETS['small'], dropout_rate=0.0)
fields = HN.HyperConfig.__dataclass_fields__
hcfg = HN.HyperConfig(**({'prefix_attention': 'separate'} if 'prefix_attention' in fields else {}))
r1, r2 = jax.random.split(jax.random.PRNGKey(0))
t5 = M.init_t5(cfg, r1)
params = {'t5': t5, 'hyper': HN.init_hyper(cfg, hcfg, r2, t5)}
t0 = time.time()
preds = E.predict(params, cfg, hcfg, split, tok, 64)
seconds = time.time() - t0
inputs = hashlib.sha256(b''.join(split[k].tobytes() for k in ('instruction', 'input', 'target'))).hexdigest()
print('RESULT ' + json.dumps({'seconds': seconds, 'predictions': preds, 'inputs': inputs}))
'''


def run_eval_worker(root, args):
    """{'seconds', 'predictions', 'inputs'} of one evaluation with the code in root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}   # no shared compilation cache
    opts = {k: getattr(args, k) for k in ('tokenizer', 'data_dir', 'cache_dir', 'limit')}
    r = subprocess.run(['nice', sys.executable, '-c', EVAL_WORKER, root, json.dumps(opts)], cwd=root, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f'evaluation in {root} failed:\n{r.stderr[-3000:]}')
    return json.loads(r.stdout.split('RESULT ', 1)[1])


def old_worktree(commit):
    path = os.path.join(tempfile.gettempdir(), f'hint-{commit}')
    if not os.path.isdir(path):
        subprocess.run(['git', 'worktree', 'add', '--detach', path, commit], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def bench_eval(args):
    print(f'\n(i) evaluation, SNI sample test split, Def+2Pos, T5 v1.1-small shapes, random weights, '
          f'{args.limit or "all"} instances, batch 64 (compilation included)', flush=True)
    new = run_eval_worker(ROOT, args)
    print(f'today:    {new["seconds"]:.1f} s', flush=True)
    if not args.old:
        return
    old = run_eval_worker(old_worktree(args.old_commit), args)
    same = sum(a == b for a, b in zip(new['predictions'], old['predictions']))
    print(f'{args.old_commit}:  {old["seconds"]:.1f} s\nspeed-up: {old["seconds"] / new["seconds"]:.1f}x '
          f'(target >= 5x); same inputs: {new["inputs"] == old["inputs"]}; identical predictions: '
          f'{same}/{len(new["predictions"])}', flush=True)


# ---------------------------------------------------------------------------------------------- (ii)


@functools.partial(jax.jit, static_argnames='cfg')
def log_likelihood(params, cfg, inputs, targets, mods=None):
    """[B]: each row's summed log-probability of its target, teacher-forced."""
    logits = M.t5_forward(params, cfg, inputs, M.shift_right(targets), mods)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(logp * (targets != M.PAD_ID), axis=1)


def score_task(params, cfg, hcfg, instruction, inputs, targets, batch_size):
    """eval.predict_ids' bucketing, scoring reference targets instead of decoding: [N] log-likelihoods."""
    mods = E.task_state(params, cfg, hcfg, instruction)
    lengths = data.row_lengths(inputs)
    order, out = np.argsort(lengths, kind='stable'), np.zeros(len(inputs), np.float32)
    for i in range(0, len(inputs), batch_size):
        rows = order[i:i + batch_size]
        padded = np.resize(rows, min(batch_size, 1 << (len(rows) - 1).bit_length()))
        x = inputs[padded, :data.bucket(int(lengths[rows].max()), inputs.shape[1])]
        y = targets[padded, :data.bucket(int(data.row_lengths(targets[rows]).max()), targets.shape[1])]
        ll = log_likelihood(params['t5'], cfg, jnp.asarray(x), jnp.asarray(y), mods)   # [b]
        out[rows] = np.asarray(ll)[:len(rows)]
    return out


def per_instance(fn, split, repeats):
    """Seconds per instance of fn(instruction, inputs, targets) over every task of split: run once to
    compile, then the fastest of `repeats` timed runs (the least disturbed by other processes)."""
    groups = {}
    for i, row in enumerate(split['instruction']):
        groups.setdefault(row.tobytes(), []).append(i)

    def run():
        for idx in groups.values():
            fn(split['instruction'][idx[0]], split['input'][idx], split['target'][idx])

    run()
    best = float('inf')
    for _ in range(repeats):
        t0 = time.time()
        run()
        best = min(best, time.time() - t0)
    return best / len(split['input'])


def bench_hint(args, tok):
    print(f'\n(ii) HINT vs full input, ms per instance ({args.hint_limit or "all"} SNI sample test instances, '
          f'batch {args.batch_size}; HINT includes encoding each task once, shared by its instances)',
          flush=True)
    print('| size | setting | instruction tokens | teacher-forced HINT | full | HINT/full '
          '| greedy 8 HINT | full | HINT/full |\n|---|---|---|---|---|---|---|---|---|')
    results = []
    for size in args.sizes:
        cfg = dataclasses.replace(M.PRESETS[size], dropout_rate=0.0)
        hcfg = HN.HyperConfig()   # r 64, p 30, the paper's Base settings
        params = HN.init_params(cfg, hcfg, jax.random.PRNGKey(0))
        for shots, name in enumerate(('Def', 'Def+1Pos', 'Def+2Pos')):
            split = {}
            for fmt in ('hint', 'full-input'):
                dargs = data.DataArgs(task='ni', data_dir=args.data_dir, tokenizer=args.tokenizer,
                                      shots=shots, format=fmt, cache_dir=args.cache_dir)
                split[fmt] = E.first(data.load_split(dargs, 'test', tok), args.hint_limit)
            times = {}
            for fmt, h in (('hint', hcfg), ('full-input', None)):
                def score(instruction, inputs, targets):
                    return score_task(params, cfg, h, instruction, inputs, targets, args.batch_size)

                def decode(instruction, inputs, targets):   # at most 8 tokens; targets unused
                    return E.predict_ids(params, cfg, E.task_state(params, cfg, h, instruction), inputs, 8,
                                         args.batch_size)

                times[fmt] = (per_instance(score, split[fmt], args.repeats),
                              per_instance(decode, split[fmt], args.repeats))
            ins = float(split['hint']['lengths'][:, 0].mean())
            hint, full = times['hint'], times['full-input']
            results.append(dict(size=size, setting=name, instruction_tokens=ins, hint=hint, full=full))
            cells = [f'{1e3 * hint[k]:.1f} | {1e3 * full[k]:.1f} | {hint[k] / full[k]:.2f}x' for k in (0, 1)]
            print(f'| {size} | {name} | {ins:.0f} | {cells[0]} | {cells[1]} |', flush=True)
    print('(target: HINT/full <= 0.3x at Def+2Pos, teacher-forced, base)')
    return results


def plot(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, k, title in zip(axes, (0, 1), ('teacher-forced scoring', 'greedy decoding, 8 tokens')):
        for size in dict.fromkeys(r['size'] for r in results):
            rows = [r for r in results if r['size'] == size]
            x = [r['instruction_tokens'] for r in rows]
            for model, style, label in (('hint', '-o', 'HINT'), ('full', '--s', 'full input')):
                ax.plot(x, [1e3 * r[model][k] for r in rows], style, label=f'{label}, {size}')
        ax.set(title=title, xlabel='instruction tokens (mean: Def, +1Pos, +2Pos)', ylabel='ms per instance')
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f'\n(iv) wrote {path}')


# ---------------------------------------------------------------------------------------------- (iii)


def jax_step_seconds(cfg, hcfg, batch, steps, n_tasks=None):
    opt_args = types.SimpleNamespace(lr=1e-3, warmup=100, momentum=None, param_scale=True)
    optimizer, schedule = T.make_optimizer(opt_args)
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((1, 1), ('data', 'fsdp'), axis_types=auto, devices=jax.devices()[:1])   # as train.main
    step = T.make_train_step(cfg, hcfg, optimizer, schedule, mesh, 1, 0)
    params = HN.init_params(cfg, hcfg, jax.random.PRNGKey(0))
    state = {'params': params, 'opt': optimizer.init(params), 'step': jnp.int32(0)}
    for _ in range(2):   # compile, warm up
        state, metrics = step(state, batch, n_tasks)
    jax.block_until_ready(metrics)
    t0 = time.time()
    for _ in range(steps):
        state, metrics = step(state, batch, n_tasks)
    jax.block_until_ready((state, metrics))
    return (time.time() - t0) / steps


def torch_step_seconds(batch, steps, dropout):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.optimization import Adafactor
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8,
                   feed_forward_proj='gated-gelu', dropout_rate=dropout, decoder_start_token_id=0,
                   tie_word_embeddings=False)
    model = T5ForConditionalGeneration(cfg).train()
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())   # v1.1: untied
    opt = Adafactor(model.parameters(), lr=1e-3, scale_parameter=True, relative_step=False, warmup_init=False)
    x, y = (torch.from_numpy(batch[k]).long() for k in ('input', 'target'))

    def step():
        loss = model(input_ids=x, attention_mask=x != 0, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    t0 = time.time()
    for _ in range(steps):
        step()
    return (time.time() - t0) / steps


def bench_train(args):
    B, Lx, Ly, Li = 8, 128, 32, 128
    rng = np.random.default_rng(0)
    ids = functools.partial(rng.integers, 3, 32000, dtype=np.int32)
    batch = {'instruction': np.zeros((B, 1), np.int32), 'input': ids((B, Lx)), 'target': ids((B, Ly))}
    tokens = B * (Lx + Ly)
    cfg = dataclasses.replace(M.PRESETS['small'], dropout_rate=args.dropout)
    print(f'\n(iii) training step, T5 v1.1-small shapes, batch {B}, {Lx} input / {Ly} target tokens, dropout '
          f'{args.dropout}, {args.train_steps} timed steps', flush=True)
    plain = jax_step_seconds(cfg, None, batch, args.train_steps)
    print(f'this project (JAX), plain T5: {plain:.3f} s/step, {tokens / plain:,.0f} tok/s', flush=True)
    try:
        import torch
        pt = torch_step_seconds(batch, args.train_steps, args.dropout)
        print(f'transformers (PyTorch {torch.__version__}, {torch.get_num_threads()} threads), its Adafactor: '
              f'{pt:.3f} s/step, {tokens / pt:,.0f} tok/s -> JAX {pt / plain:.2f}x PyTorch (target >= 2x)',
              flush=True)
    except ImportError:
        print('transformers / torch not installed: PyTorch comparison skipped')
    hint_batch = dict(batch, instruction=ids((B, Li)))
    hint = jax_step_seconds(cfg, HN.HyperConfig(), hint_batch, args.train_steps)
    print(f'HINT, {Li}-token instruction: {hint:.3f} s/step -> HINT/plain {hint / plain:.2f}x (target <= 1.6x)',
          flush=True)
    two_tasks = dict(hint_batch, instruction=hint_batch['instruction'][np.arange(B) % 2])   # rows alternate
    two_tasks['task_id'], n_tasks = T.task_ids(two_tasks['instruction'], B, 1)
    shared = jax_step_seconds(cfg, HN.HyperConfig(), two_tasks, args.train_steps, n_tasks)
    print(f'HINT, the batch from 2 tasks (each instruction encoded once): {shared:.3f} s/step -> HINT/plain '
          f'{shared / plain:.2f}x', flush=True)
    if args.breakdown:
        hint_breakdown(cfg, hint_batch)


def hint_breakdown(cfg, batch):
    """Forward + backward seconds of HINT's parts, one by one, on a training batch (dropout off)."""
    cfg, hcfg = dataclasses.replace(cfg, dropout_rate=0.0), HN.HyperConfig()
    params = HN.init_params(cfg, hcfg, jax.random.PRNGKey(0))
    ins, x, y = (jnp.asarray(batch[k]) for k in data.FIELDS)

    def squares(tree):   # a scalar loss that depends on every output
        return sum(jnp.sum(leaf.astype(jnp.float32) ** 2) for leaf in jax.tree.leaves(tree))

    def plain(p):
        return T.token_losses(M.t5_forward(p['t5'], cfg, x, M.shift_right(y)), y)[0]

    def hint(p):
        return T.token_losses(HN.hint_forward(p, cfg, hcfg, ins, x, M.shift_right(y)), y)[0]

    def instruction_encoder(p):
        return squares(HN.encode_instruction(p['hyper'], p['t5'], cfg, hcfg, ins)[0])

    def encode_task(p):
        return squares(HN.encode_task(p, cfg, hcfg, ins))

    state = HN.encode_task(params, cfg, hcfg, ins)
    mask = state['memory']['mask']   # bool: not differentiable, so passed apart

    def t5_with_state(p, s):
        mods = {**s, 'memory': {'E': s['memory']['E'], 'mask': mask}}
        return T.token_losses(M.t5_forward(p['t5'], cfg, x, M.shift_right(y), mods=mods), y)[0]

    for name, fn in (('forward', jax.jit(plain)), ('forward + backward', jax.jit(jax.grad(plain)))):
        jax.block_until_ready(fn(params))   # compile
        t0 = time.time()
        jax.block_until_ready(fn(params))
        seconds, flops = time.time() - t0, fn.lower(params).cost_analysis()['flops']
        print(f'plain T5 {name}: {seconds:.2f} s, {flops / seconds / 1e9:.0f} GFLOP/s (XLA\'s FLOP count)',
              flush=True)
    print('HINT training cost, forward + backward, dropout off:')
    for name, fn, fn_args in (('plain T5', plain, (params,)), ('HINT', hint, (params,)),
                              ('  instruction encoder', instruction_encoder, (params,)),
                              ('  encode_task (encoder, pooling, generators)', encode_task, (params,)),
                              ('  T5 with per-instance adapters, prefixes, fusion', t5_with_state,
                               (params, {**state, 'memory': {'E': state['memory']['E']}}))):
        grad = jax.jit(jax.grad(fn, argnums=tuple(range(len(fn_args)))))
        jax.block_until_ready(grad(*fn_args))
        t0 = time.time()
        jax.block_until_ready(grad(*fn_args))
        print(f'{name}: {time.time() - t0:.2f} s', flush=True)


def main(args: BenchArgs):
    print(f'{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} CPU cores')
    if args.eval:
        bench_eval(args)
    if args.hint:
        results = bench_hint(args, data.load_tokenizer(args.tokenizer))
        if args.plot:
            plot(results, args.png)
    if args.train:
        bench_train(args)


if __name__ == '__main__':
    bench_args = tyro.cli(BenchArgs)
    for path in (bench_args.tokenizer, bench_args.data_dir):
        if not os.path.isdir(path):
            sys.exit(f'error: {path}: not found (the T5 tokenizer and the SNI sample of ../shared); '
                     'pass --tokenizer and --data-dir')
    main(bench_args)
