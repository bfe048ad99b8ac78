"""HINT vs the full-input and input-only baselines on the synthetic suite, side by side in one run.

    python bench/synthetic.py                  # same settings as `python train.py`, three runs
    python bench/synthetic.py --steps 3000 --shots 1

Prints held-out exact match / ROUGE-L, the evaluation wall-clock time, and inference FLOPs per
instance counted by XLA (cost analysis of the compiled forward pass over padded shapes, target
length included; HINT adds its task encoding divided by the instances that share it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax
import jax.numpy as jnp
import tyro

import data
import eval as E
import hypernet as HN
import model as M
import train as T
import runs


@dataclasses.dataclass
class BenchArgs(T.Args):
    out_dir: str = 'runs/bench-synthetic'


def flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()['flops']


def inference_flops(params, cfg, hcfg, split):
    """FLOPs per instance: one teacher-forced forward over the padded shapes of `split`."""
    Lx, Ly = split['input'].shape[1], split['target'].shape[1]
    x, y = jnp.ones((1, Lx), jnp.int32), jnp.ones((1, Ly), jnp.int32)
    if hcfg is None:
        return flops(lambda p: M.t5_forward(p['t5'], cfg, x, y), params), 0.0
    ins = jnp.ones((1, split['instruction'].shape[1]), jnp.int32)
    per_task = flops(lambda p: HN.select_task(HN.encode_task(p, cfg, hcfg, ins), 0), params)
    state = HN.select_task(HN.encode_task(params, cfg, hcfg, ins), 0)
    per_instance = flops(lambda p, s: M.t5_forward(p['t5'], cfg, x, y, mods=s), params, state)
    tasks = len({r.tobytes() for r in split['instruction']})
    return per_instance, per_task * tasks / len(split['input'])


def main(args: BenchArgs):
    T.fill_defaults(args)
    results = {}
    for name in ('hint', 'full-input', 'input-only'):
        run = dataclasses.replace(args, baseline='none' if name == 'hint' else name, out_dir=os.path.join(args.out_dir, name))
        t0 = time.time()
        state, _ = T.main(run)
        train_s = time.time() - t0
        cfg, hcfg, params, meta = runs.load_run(run.out_dir)
        tokenizer = data.load_tokenizer(meta['tokenizer'])
        split = data.load_split(dataclasses.replace(run, **{k: meta['args'][k] for k in ('format', 'tokenizer')}), 'test', tokenizer)
        t0 = time.time()
        metrics, _ = E.evaluate(params, cfg, hcfg, split, tokenizer, args.eval_batch_size)
        eval_s = time.time() - t0
        per_instance, task_share = inference_flops(params, cfg, hcfg, split)
        results[name] = {**metrics['overall'], 'eval_s': eval_s, 'train_s': train_s,
                         'gflops_per_instance': (per_instance + task_share) / 1e9}
    full = results['full-input']['gflops_per_instance']
    print(f'\nsynthetic suite, held-out instructions, {args.steps} steps, batch {args.batch_size}, shots {args.shots}, '
          f'T5 {args.init}, {jax.device_count()} {jax.default_backend()} device(s)')
    print('| model | exact match | ROUGE-L | inference GFLOPs / instance | vs full input | eval time (s) |')
    print('|---|---|---|---|---|---|')
    for name, r in results.items():
        print(f'| {name} | {r["exact_match"]:.1f} | {r["rougeL"]:.1f} | {r["gflops_per_instance"]:.4f} | '
              f'{r["gflops_per_instance"] / full:.2f}x | {r["eval_s"]:.1f} |')
    with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)


if __name__ == '__main__':
    main(tyro.cli(BenchArgs))
