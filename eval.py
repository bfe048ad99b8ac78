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


def predict(params, cfg, hcfg, split, tokenizer, batch_size=64):
    """Predicted texts for every instance of a load_split() result, in order."""
    groups = collections.defaultdict(list)   # instruction ids -> instance indices
    for i, row in enumerate(split['instruction']):
        groups[row.tobytes()].append(i)
    preds = [None] * len(split['input'])
    max_len = split['target'].shape[1]
    for idx in groups.values():
        ids = predict_ids(params, cfg, hcfg, split['instruction'][idx[0]], split['input'][idx], max_len, batch_size)
        for i, row in zip(idx, ids):
            preds[i] = tokenizer.decode(row)
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
