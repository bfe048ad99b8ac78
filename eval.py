"""Evaluate HINT or a baseline: greedy decoding with the KV cache, each task's instruction encoded once.

    python eval.py --checkpoint runs/synthetic                 # the run's own test split
    python eval.py --checkpoint runs/ni --data-dir natural-instructions --shots 2
    printf 'a b c\\nd e\\n' | python eval.py --checkpoint runs/synthetic --instruction "Reverse the list."

Metrics are SNI's official ones: exact match (lower-cased, punctuation removed, whitespace collapsed)
and ROUGE-L F (rouge_score, stemmer), each the max over references, micro-averaged, x100; overall,
per task and per category.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import string
import sys
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

import data
import hypernet as HN
import model as M


# ----------------------------------------------------------------------------------------------
# Metrics (as natural-instructions' eval/automatic/compute_metrics.py)


def normalize_answer(s: str) -> str:
    s = ''.join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return ' '.join(s.split())


_scorer = None


def rouge_l(prediction: str, reference: str) -> float:
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer
        _scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)
    return _scorer.score(reference, prediction)['rougeL'].fmeasure


def score(prediction: str, references: list[str]) -> dict:
    return {'exact_match': max(float(normalize_answer(prediction) == normalize_answer(r)) for r in references),
            'rougeL': max(rouge_l(prediction, r) for r in references)}


def compute_metrics(rows: list[dict]) -> dict:
    """rows: {prediction, references, task, category} -> {overall, per_task, per_category} (x100)."""
    def mean(scores):
        return {k: round(100.0 * sum(s[k] for s in scores) / len(scores), 4) for k in ('exact_match', 'rougeL')}
    scores = [score(r['prediction'], r['references']) for r in rows]
    groups = {'per_task': collections.defaultdict(list), 'per_category': collections.defaultdict(list)}
    for r, s in zip(rows, scores):
        groups['per_task'][r['task']].append(s)
        groups['per_category'][r.get('category') or ''].append(s)
    return {'overall': mean(scores) if scores else {}, 'count': len(rows),
            **{g: {k: mean(v) for k, v in sorted(d.items())} for g, d in groups.items()}}


# ----------------------------------------------------------------------------------------------
# Prediction with instruction caching: one task state per distinct instruction, shared (not copied)
# by every instance of that task.


_encode_task = jax.jit(lambda params, ins, cfg, hcfg: HN.select_task(HN.encode_task(params, cfg, hcfg, ins[None]), 0),
                       static_argnums=(2, 3))


def predict_ids(params, cfg, hcfg, instruction, inputs, max_len, batch_size):
    """Greedy token ids [N, max_len] for inputs [N, Lx] of ONE task (instruction [Li])."""
    mods = _encode_task(params, jnp.asarray(instruction), cfg, hcfg) if hcfg is not None else None
    n = len(inputs)
    bs = min(batch_size, 1 << max(n - 1, 0).bit_length())   # few distinct shapes -> few compilations
    out = []
    for i in range(0, n, bs):
        chunk = inputs[i:i + bs]
        padded = np.zeros((bs, inputs.shape[1]), np.int32)
        padded[:len(chunk)] = chunk
        out.append(np.asarray(M.t5_generate(params['t5'], cfg, jnp.asarray(padded), max_len, mods))[:len(chunk)])
    return np.concatenate(out)


def load_split(args, split, tokenizer, itok=None):
    """data.load_split, with the instructions in the instruction encoder's own vocabulary when it has
    one (a RoBERTa encoder: itok is its folder or hub name)."""
    out = data.load_split(args, split, tokenizer)
    if itok:
        own = dataclasses.replace(args, tokenizer=itok)
        out['instruction'] = data.load_split(own, split, M.load_tokenizer(itok))['instruction']
    return out


def instruction_tokenizer(hcfg, run_args):
    """The instruction encoder's tokenizer (None: the T5 tokenizer) of a run's meta['args']."""
    roberta = hcfg is not None and hcfg.instruction_encoder == 'roberta'
    return run_args['instruction_encoder_init'] if roberta else None


def first(split, n):
    """The first n instances of a load_split() result (all of them for n = 0)."""
    return {k: v[:n] if n and isinstance(v, (list, np.ndarray)) else v for k, v in split.items()}


def predict(params, cfg, hcfg, split, tokenizer, batch_size=64):
    """Predicted texts for every instance of a load_split() result, in order."""
    groups = collections.defaultdict(list)   # instruction ids -> instance indices
    for i, row in enumerate(split['instruction']):
        groups[row.tobytes()].append(i)
    preds = [None] * len(split['input'])
    max_len, t0 = split['target'].shape[1], time.time()
    for g, idx in enumerate(groups.values(), 1):
        ids = predict_ids(params, cfg, hcfg, split['instruction'][idx[0]], split['input'][idx], max_len, batch_size)
        for i, row in zip(idx, ids):
            preds[i] = tokenizer.decode(row)
        if g % 20 == 0 or g == len(groups):
            eta = (time.time() - t0) / g * (len(groups) - g)
            print(f'eval: {g}/{len(groups)} tasks, {time.time() - t0:.0f} s, ETA {eta:.0f} s', flush=True)
    return preds


def evaluate(params, cfg, hcfg, split, tokenizer, batch_size=64):
    """(metrics, prediction rows) for a load_split() result."""
    preds = predict(params, cfg, hcfg, split, tokenizer, batch_size)
    rows = [{'id': ex['id'], 'task': ex['task'], 'category': ex.get('category', ''), 'prediction': p,
             'references': ex['references']} for ex, p in zip(split['examples'], preds)]
    return compute_metrics(rows), rows


def write_results(out_dir, metrics, rows):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
        json.dump(metrics, f, indent=1)
    with open(os.path.join(out_dir, 'predictions.jsonl'), 'w') as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + '\n')


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalArgs(data.DataArgs):
    checkpoint: str = ''            # a run folder (its newest ckpt-* that loads) or one ckpt-* folder
    split: Literal['train', 'test'] = 'test'
    out_dir: str = ''               # for metrics.json / predictions.jsonl; default: the run folder
    batch_size: int = 64
    eval_instances: int = 0         # only the first N instances (0: all)
    dtype: str = 'float32'
    instruction: str | None = None  # one-off mode: this task definition (formatted as in training), instance
                                    # inputs from stdin, one per line
    task_state: str = ''            # one-off mode: a saved task state (.safetensors) instead of --instruction
    save_task_state: str = ''       # one-off mode: also save the instruction's task state here


def one_off(args, cfg, hcfg, params, tokenizer, lines, itok=None):
    """Predictions for raw instance inputs under one instruction (or a saved task state). itok: the
    instruction encoder's own tokenizer, if it has one."""
    li, lx, ly = data.lengths(args)
    full_input = args.format == 'full-input'
    instruction = data.instruction_text(args.task, args.instruction) if args.instruction else ''

    def enc(text, n, tok=tokenizer):
        return np.array(data.encode(tok, text, n)[0] + [tok.pad_id] * n, np.int32)[:n]
    inputs = np.stack([enc((instruction if full_input else '') + data.instance_text(args.task, x), lx) for x in lines])
    mods = None
    if hcfg is not None:
        if args.task_state:
            mods = HN.load_task_state(args.task_state)
        else:
            mods = _encode_task(params, jnp.asarray(enc(instruction, li, itok or tokenizer)), cfg, hcfg)
        if args.save_task_state:
            HN.save_task_state(args.save_task_state, mods)
    out = np.asarray(M.t5_generate(params['t5'], cfg, jnp.asarray(inputs), ly, mods))
    return [tokenizer.decode(row) for row in out]


def main(args: EvalArgs):
    data.check_args(args)
    one_off_mode = args.instruction is not None or args.task_state
    if args.task_state and not os.path.isfile(args.task_state):
        raise FileNotFoundError(f'--task-state {args.task_state}: no such file')
    if one_off_mode:   # read stdin first: an empty one fails before a model is loaded
        lines = [l.rstrip('\n') for l in sys.stdin if l.strip()]
        if not lines:
            raise data.DataError('one-off mode: no instance inputs on stdin (one per line)')
    cfg, hcfg, params, meta = HN.load_run(args.checkpoint, args.dtype)
    tokenizer = M.load_tokenizer(meta['tokenizer'])
    itok = instruction_tokenizer(hcfg, meta['args'])
    if one_off_mode:
        if hcfg is None and args.format != 'full-input' and args.instruction:
            print('note: an input-only baseline ignores the instruction', file=sys.stderr)
        itok = itok and M.load_tokenizer(itok)
        for pred in one_off(args, cfg, hcfg, params, tokenizer, lines, itok):
            print(pred)
        return None
    split = first(load_split(args, args.split, tokenizer, itok), args.eval_instances)
    metrics, rows = evaluate(params, cfg, hcfg, split, tokenizer, args.batch_size)
    out_dir = args.out_dir or (os.path.dirname(args.checkpoint.rstrip('/')) if HN.is_checkpoint(args.checkpoint)
                               else args.checkpoint)
    write_results(out_dir, metrics, rows)
    print(json.dumps(metrics['overall']), f'({metrics["count"]} instances; {out_dir}/metrics.json)')
    return metrics


def cli(argv=None):
    """Data flags default to the evaluated run's own (its args.json); any flag given overrides them."""
    import tyro
    argv = sys.argv[1:] if argv is None else argv
    ckpt = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == '--checkpoint'), None)
    if ckpt is None:
        ckpt = next((a.split('=', 1)[1] for a in argv if a.startswith('--checkpoint=')), None)
    default = EvalArgs()
    if ckpt:
        run = ckpt if os.path.exists(os.path.join(ckpt, 'args.json')) else os.path.dirname(ckpt.rstrip('/'))
        saved_path = os.path.join(run, 'args.json')
        if os.path.exists(saved_path):
            try:
                with open(saved_path, encoding='utf-8') as f:
                    saved = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise data.DataError(f'{saved_path}: not valid JSON ({e})') from None
            names = {f.name for f in dataclasses.fields(data.DataArgs)} - {'cache_dir'}
            default = EvalArgs(**{k: v for k, v in saved.items() if k in names})
    args = tyro.cli(EvalArgs, default=default, args=argv)
    if not args.checkpoint:
        raise ValueError('--checkpoint is required (a run folder written by train.py)')
    return main(args)


if __name__ == '__main__':
    try:
        cli()
    except (ValueError, OSError) as e:   # bad arguments, data or checkpoints (DataError, CheckpointError)
        sys.exit(f'error: {e}')
