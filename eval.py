"""Evaluate HINT or a baseline: greedy decoding with the KV cache, each task's instruction encoded once.

    python eval.py --checkpoint runs/synthetic                 # the run's own test split
    python eval.py --checkpoint runs/ni --data-dir natural-instructions --shots 2
    printf 'a b c\\nd e\\n' | python eval.py --checkpoint runs/synthetic --instruction "Reverse the list."

Metrics are computed as Tk-Instruct's released src/compute_metrics.py computes them: exact match
(lower-cased, punctuation removed, whitespace collapsed) and ROUGE-L F (rouge_score, default English
tokenizer, Porter stemmer), each the max over the instance's whole output list (empty strings included),
micro-averaged, x100, rounded to 4 decimals; overall, overall without task1415 (as the released script
reports), per task, per category, and each test category's headline metric (without task1415).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import string
import sys
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

import data
import hypernet as HN
import model as M
import runs


# ----------------------------------------------------------------------------------------------
# Metrics: the facts of Tk-Instruct's released src/compute_metrics.py (the same as natural-instructions'
# eval/automatic/evaluation.py for the English track), so the numbers compare with published ones.
# References are an instance's whole 'output' list, empty strings included; each metric is the max
# over them, summed over instances, x100 / N, rounded to 4 decimals.


# The released script drops this task's rows before computing anything (natural-instructions'
# src/split_tasks.py: "this task data is not good, need to fix"); it matches the name by this prefix.
EXCLUDED_TASK_PREFIX = 'task1415_'   # task1415_youtube_caption_corrections_grammar_correction

# The metric the released script reports for each test category.
HEADLINE_METRIC = {
    'Textual Entailment': 'exact_match', 'Cause Effect Classification': 'exact_match',
    'Coreference Resolution': 'exact_match', 'Dialogue Act Recognition': 'exact_match',
    'Answerability Classification': 'exact_match', 'Word Analogy': 'exact_match',
    'Overlap Extraction': 'rougeL', 'Keyword Tagging': 'rougeL', 'Question Rewriting': 'rougeL',
    'Title Generation': 'rougeL', 'Data to Text': 'rougeL', 'Grammar Error Correction': 'rougeL',
}


def category_key(name: str) -> str:
    """'Data to Text' -> 'data_to_text': how the released script names (and so matches) categories."""
    return '_'.join(name.lower().split())


_HEADLINE_BY_KEY = {category_key(c): m for c, m in HEADLINE_METRIC.items()}


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation without removing articles: lower-case, drop punctuation, collapse spaces."""
    s = ''.join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return ' '.join(s.split())


_scorer = None


def rouge_l(prediction: str, reference: str) -> float:
    """rouge_score's ROUGE-L F with its default (English) tokenizer and the Porter stemmer. A text with no
    tokens ('' or only punctuation) scores 0, even against another empty one."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer
        _scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)
    return _scorer.score(target=reference, prediction=prediction)['rougeL'].fmeasure


def score(prediction: str, references: list[str]) -> dict:
    """Per instance, the best over references. An empty reference matches exactly a prediction that
    normalises to '' (exact match 1) but gives ROUGE-L 0."""
    if not references:
        raise ValueError(f'no references for prediction {prediction!r}')
    pred = normalize_answer(prediction)
    return {'exact_match': max(float(pred == normalize_answer(r)) for r in references),
            'rougeL': max(rouge_l(prediction, r) for r in references)}


def mean(scores: list[dict]) -> dict:
    """{exact_match, rougeL} x100 over instances, rounded to 4 decimals ({} for none)."""
    if not scores:
        return {}
    return {k: round(100.0 * sum(s[k] for s in scores) / len(scores), 4) for k in ('exact_match', 'rougeL')}


def headline_per_category(rows: list[dict], scores: list[dict]) -> dict:
    """{category: {metric, value}} for the test categories present, each with its headline metric. As in
    the released script, computed without task1415's rows."""
    groups = collections.defaultdict(list)
    for r, s in zip(rows, scores):
        category = r.get('category') or ''
        if category_key(category) in _HEADLINE_BY_KEY and not r['task'].startswith(EXCLUDED_TASK_PREFIX):
            groups[category].append(s)
    out = {}
    for category, group in sorted(groups.items()):
        metric = _HEADLINE_BY_KEY[category_key(category)]
        out[category] = {'metric': metric, 'value': mean(group)[metric]}
    return out


def compute_metrics(rows: list[dict]) -> dict:
    """rows: {prediction, references, task, category} -> {overall, overall_without_task1415, count,
    per_task, per_category, headline_per_category}; overall, per task and per category use every row."""
    scores = [score(r['prediction'], r['references']) for r in rows]
    groups = {'per_task': collections.defaultdict(list), 'per_category': collections.defaultdict(list)}
    for r, s in zip(rows, scores):
        groups['per_task'][r['task']].append(s)
        groups['per_category'][r.get('category') or ''].append(s)
    kept = [s for r, s in zip(rows, scores) if not r['task'].startswith(EXCLUDED_TASK_PREFIX)]
    return {'overall': mean(scores), 'overall_without_task1415': mean(kept), 'count': len(rows),
            **{g: {k: mean(v) for k, v in sorted(d.items())} for g, d in groups.items()},
            'headline_per_category': headline_per_category(rows, scores)}


# ----------------------------------------------------------------------------------------------
# Prediction with instruction caching: one task state per distinct instruction, shared (not copied)
# by every instance of that task.


_encode_task = jax.jit(lambda params, ins, cfg, hcfg: HN.select_task(HN.encode_task(params, cfg, hcfg, ins[None]), 0),
                       static_argnums=(2, 3))


def task_state(params, cfg, hcfg, instruction):
    """The task state of instruction [Li] (None for a baseline), the instruction cut to its length
    (rounded up to a data.bucket): right padding changes no result, it only costs time."""
    if hcfg is None:
        return None
    pad = HN.instruction_pad_id(hcfg)
    width = data.bucket(int(data.row_lengths(instruction[None], pad)[0]), len(instruction))
    return _encode_task(params, jnp.asarray(instruction[:width]), cfg, hcfg)


def predict_ids(params, cfg, mods, inputs, max_len, batch_size):
    """Greedy token ids [N, max_len] for inputs [N, Lx] of ONE task (mods: its task_state), sorted by
    length and run in chunks cut to their longest row (rounded up to a data.bucket: few shapes to compile)."""
    lengths = data.row_lengths(inputs)
    order, out = np.argsort(lengths, kind='stable'), np.zeros((len(inputs), max_len), np.int32)
    for i in range(0, len(inputs), batch_size):
        rows = order[i:i + batch_size]
        width = data.bucket(int(lengths[rows].max()), inputs.shape[1])
        # rows padded to a power of two with copies of its own rows, which stop decoding when those do
        x = inputs[np.resize(rows, min(batch_size, data.next_pow2(len(rows)))), :width]   # [b, width]
        out[rows] = np.asarray(M.t5_generate(params['t5'], cfg, jnp.asarray(x), max_len, mods))[:len(rows)]
    return out


def load_split(args, split, tokenizer, itok=None):
    """data.load_split, with the instructions in the instruction encoder's own vocabulary when it has
    one (a RoBERTa encoder: itok is its folder or hub name)."""
    out = data.load_split(args, split, tokenizer)
    if itok:
        own = dataclasses.replace(args, tokenizer=itok)
        theirs = data.load_split(own, split, data.load_tokenizer(itok))
        out['instruction'], out['lengths'][:, 0] = theirs['instruction'], theirs['lengths'][:, 0]
    return out


def instruction_tokenizer(hcfg, run_args):
    """The instruction encoder's tokenizer (None: the T5 tokenizer) of a run's meta['args']."""
    roberta = hcfg is not None and hcfg.instruction_encoder == 'roberta'
    return run_args['instruction_encoder_init'] if roberta else None


def first(split, n):
    """The first n instances of a load_split() result (all of them for n = 0)."""
    return {k: v[:n] if n and isinstance(v, (list, np.ndarray)) else v for k, v in split.items()}


def predict(params, cfg, hcfg, split, tokenizer, batch_size=64):
    """Predicted texts for every instance of a load_split() result, in order. In a multi-host run
    each process predicts every process_count-th task and the predictions are gathered."""
    groups = collections.defaultdict(list)   # instruction ids -> instance indices
    for i, row in enumerate(split['instruction']):
        groups[row.tobytes()].append(i)
    mine = list(groups.values())[jax.process_index()::jax.process_count()]
    if jax.process_count() > 1:   # this host's own copy of the parameters (gathered, where sharded)
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)
    preds = [None] * len(split['input'])
    max_len, t0 = split['target'].shape[1], time.time()
    for g, idx in enumerate(mine, 1):
        mods = task_state(params, cfg, hcfg, split['instruction'][idx[0]])
        ids = predict_ids(params, cfg, mods, split['input'][idx], max_len, batch_size)
        for i, row in zip(idx, ids):
            preds[i] = tokenizer.decode(row)
        if (g % 20 == 0 or g == len(mine)) and jax.process_index() == 0:
            eta = (time.time() - t0) / g * (len(mine) - g)
            print(f'eval: {g}/{len(mine)} tasks, {time.time() - t0:.0f} s, ETA {eta:.0f} s', flush=True)
    return gather(preds)


def gather(preds):
    """Every process's predictions (None where another process made them), merged on all processes."""
    if jax.process_count() == 1:
        return preds
    from jax.experimental import multihost_utils
    mine = np.frombuffer(json.dumps(preds).encode('utf-8'), np.uint8)
    sizes = multihost_utils.process_allgather(np.int32(len(mine)))   # [P]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(mine)] = mine
    merged = list(preds)
    for row, n in zip(multihost_utils.process_allgather(padded), sizes):   # [P, max size]
        for i, p in enumerate(json.loads(bytes(row[:n]).decode('utf-8'))):
            if p is not None:
                merged[i] = p
    return merged


# ----------------------------------------------------------------------------------------------
# Rank classification (P3 / T0's held-out evaluation): every answer choice is scored by the summed
# log-likelihood of its tokens (EOS included); the prediction is the best one (ties: the first).


@functools.partial(jax.jit, static_argnums=(1, 2))
def choice_scores(params, cfg, hcfg, instruction, inputs, choices):
    """[B, C] summed log-probabilities of choices [B, C, Lc] (0-padded; an all-padding choice is
    absent: -inf) of B instances of ONE template. Its task state (instruction [Li]) is computed once
    and shared by every row; each instance's encoder output (inputs [B, Lx]) by its C choices."""
    B, C, Lc = choices.shape
    mods = None
    if hcfg is not None:
        mods = HN.select_task(HN.encode_task(params, cfg, hcfg, instruction[None]), 0)
    enc = M.t5_encode(params['t5'], cfg, inputs, mods)
    kv = M.cross_kv(params['t5'], cfg, enc, inputs != M.PAD_ID, mods)
    # each input's keys/values [Ld, B, S, H, K] and bias [B, ...] C times in a row; memory is shared
    kv.update({n: jnp.repeat(kv[n], C, axis=0 if n == 'bias' else 1) for n in ('k', 'v', 'bias')})
    flat = choices.reshape(B * C, Lc)
    logits = M.t5_decode(params['t5'], cfg, M.shift_right(flat), kv, mods)   # [B*C, Lc, V]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), flat[..., None], -1)[..., 0]
    total = jnp.sum(logp * (flat != M.PAD_ID), -1).reshape(B, C)
    return jnp.where(jnp.any(choices != M.PAD_ID, -1), total, -jnp.inf)


def rank_classify(params, cfg, hcfg, split, batch_size=64):
    """Choice scores [N, C] (float32) for a load_split() result with 'choices', per template (one
    task state each) in chunks of about batch_size decoder rows sorted by input length, each cut to
    its used widths (rounded up to a data.bucket). In a multi-host run each process scores every
    process_count-th chunk and the scores are gathered."""
    choices, n, width, lens = split['choices'], len(split['input']), data.bucket, split['lengths']   # [N, 3]
    clen = data.row_lengths(choices.reshape(-1, choices.shape[2])).reshape(n, -1).max(1)       # [N]
    per = max(1, batch_size // choices.shape[1])   # instances per chunk
    groups = collections.defaultdict(list)   # instruction ids -> instance indices, by input length
    for i in np.argsort(lens[:, 1], kind='stable'):
        groups[split['instruction'][i].tobytes()].append(i)
    chunks = [np.array(g[i:i + per]) for g in groups.values() for i in range(0, len(g), per)]
    chunks = chunks[jax.process_index()::jax.process_count()]
    if jax.process_count() > 1:   # this host's own copy of the parameters (gathered, where sharded)
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)
    scores = [None] * n
    for idx in chunks:
        # rows padded to a power of two with copies of its own rows: few shapes to compile
        take = np.resize(idx, data.next_pow2(len(idx)))
        wi = width(int(lens[idx, 0].max()), split['instruction'].shape[1])
        wx = width(int(lens[idx, 1].max()), split['input'].shape[1])
        wc = width(int(clen[idx].max()), choices.shape[2])
        out = choice_scores(params, cfg, hcfg, jnp.asarray(split['instruction'][idx[0], :wi]),
                            jnp.asarray(split['input'][take, :wx]), jnp.asarray(choices[take, :, :wc]))
        for i, row in zip(idx, np.asarray(out)[:len(idx)].tolist()):
            scores[i] = row
    return np.array(gather(scores), np.float32)


def p3_metrics(rows: list[dict]) -> dict:
    """rows: {task (template), category (dataset), correct} -> accuracy x100 per template; per
    dataset the mean and the median over its templates; overall their averages over datasets (the
    mean first: the headline)."""
    per_template = collections.defaultdict(list)
    dataset_of = {}
    for r in rows:
        per_template[r['task']].append(float(r['correct']))
        dataset_of[r['task']] = r['category']
    accuracy = {t: 100.0 * float(np.mean(v)) for t, v in sorted(per_template.items())}
    per_dataset = {}
    for d in sorted(set(dataset_of.values())):
        accs = [a for t, a in accuracy.items() if dataset_of[t] == d]
        per_dataset[d] = {'mean': np.mean(accs), 'median': np.median(accs), 'templates': len(accs)}
    overall = {f'accuracy_{k}': round(float(np.mean([v[k] for v in per_dataset.values()])), 4)
               for k in ('mean', 'median')}
    for v in per_dataset.values():   # rounded for the report only, after averaging
        v['median'], v['mean'] = round(float(v['median']), 4), round(float(v['mean']), 4)
    return {'overall': overall, 'count': len(rows), 'per_dataset': per_dataset,
            'per_template': {t: round(a, 4) for t, a in accuracy.items()}}


def evaluate(params, cfg, hcfg, split, tokenizer, batch_size=64):
    """(metrics, prediction rows) for a load_split() result: rank classification where it has 'choices'
    (p3), else greedy decoding."""
    if 'choices' in split:
        scores = rank_classify(params, cfg, hcfg, split, batch_size)
        best = np.argmax(scores, 1)   # the first of equal maxima
        rows = [{'id': ex['id'], 'task': ex['task'], 'category': ex['category'], 'prediction': ex['choices'][b],
                 'references': ex['references'], 'correct': bool(b == a),
                 'scores': s[:len(ex['choices'])].tolist()}
                for ex, b, a, s in zip(split['examples'], best, split['answer'], scores)]
        metrics = {**p3_metrics(rows), 'left_out': split.get('skipped', {})}
    else:
        preds = predict(params, cfg, hcfg, split, tokenizer, batch_size)
        rows = [{'id': ex['id'], 'task': ex['task'], 'category': ex.get('category', ''),
                 'prediction': p, 'references': ex['references']}
                for ex, p in zip(split['examples'], preds)]
        metrics = compute_metrics(rows)
    # what the data build dropped (tasks without instances, ...): numbers on fewer tasks say so
    return {**metrics, 'skipped': data.count_skipped(split.get('skipped', {}))}, rows


def write_results(out_dir, metrics, rows):
    """metrics.json and predictions.jsonl in out_dir (a folder or gs://...)."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'metrics.json').write_text(json.dumps(metrics, indent=1))
    (out / 'predictions.jsonl').write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows))


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalArgs(data.DataArgs):
    checkpoint: str = ''            # a run folder (its newest ckpt-* that loads) or one ckpt-* folder
    split: Literal['train', 'test'] = 'test'   # which split of the data flags to evaluate
    out_dir: str = ''               # for metrics.json / predictions.jsonl; default: the run folder
    batch_size: int = 64            # instances per decoding batch (p3: decoder rows, choices included)
    eval_instances: int = 0         # only the first N instances (0: all)
    dtype: str = 'float32'          # compute dtype (bfloat16 on GPU/TPU halves memory)
    instruction: str | None = None
    """one-off mode: this task definition (formatted as in training, without examples); instance
    inputs from stdin, one per line"""
    task_state: str = ''            # one-off mode: a saved task state (.safetensors) instead of --instruction
    save_task_state: str = ''       # one-off mode: also save the instruction's task state here
    merge_into: str = ''
    """with --instruction, for a LoRA-only run (--lora-rank R, no adapters, prefixes or fusion): write
    that task's LoRA merged into plain T5 weights here, as a transformers folder, and exit"""


def padded(tokenizer, text, n, what):
    """ids [n]: text cut as data.encode cuts it (n-1 tokens and EOS), then the tokenizer's padding.
    A cut is reported, naming `what`."""
    ids, cut = data.encode(tokenizer, text, n)
    if cut:
        print(f'warning: {what} cut to {n} tokens (it has {len(tokenizer.encode(text))})',
              file=sys.stderr)
    return np.array(ids + [tokenizer.pad_id] * n, np.int32)[:n]


def read_lines(stream):
    """One-off mode's instance inputs: the non-blank lines of stdin, read as bytes so that a line
    that is not UTF-8 can be named."""
    lines = []
    for n, line in enumerate(getattr(stream, 'buffer', stream), 1):
        try:
            line = line.decode('utf-8') if isinstance(line, bytes) else line
        except UnicodeDecodeError as e:
            raise data.DataError(f'stdin line {n}: not UTF-8 (byte {line[e.start]:#x} at column '
                                 f'{e.start + 1})') from None
        if line.strip():
            lines.append(line.rstrip('\r\n'))
    return lines


def one_off(args, cfg, hcfg, params, tokenizer, lines, itok=None):
    """Predictions for raw instance inputs under one instruction (or a saved task state). itok: the
    instruction encoder's own tokenizer, if it has one."""
    li, lx, ly = data.lengths(args)
    instruction = ''
    if args.instruction:
        instruction = data.instruction_text(args.task, args.instruction, args.format, args.shots)
    texts = [data.instance_text(args.task, x, args.format) for x in lines]
    texts = [data.arrange(args.format, instruction, x)[1] for x in texts]
    where = ' (with the instruction)' if args.format == 'full-input' else ''
    inputs = np.stack([padded(tokenizer, x, lx, f'stdin line {n}{where}')
                       for n, x in enumerate(texts, 1)])
    mods = None
    if hcfg is not None:
        if args.task_state:
            mods = runs.load_task_state(args.task_state)
        else:
            ids = padded(itok or tokenizer, instruction, li, '--instruction')
            mods = task_state(params, cfg, hcfg, ids)
        if args.save_task_state:
            runs.save_task_state(args.save_task_state, mods)
    return [tokenizer.decode(row) for row in predict_ids(params, cfg, mods, inputs, ly, args.batch_size)]


def merge_into(args):
    """--merge-into DIR: one task's generated LoRA folded into the run's T5 weights, written as a
    transformers checkpoint (with spiece.model when the run has one): plain T5 code then serves the task."""
    import shutil
    if not args.instruction:
        raise data.DataError('--merge-into needs --instruction: the task whose LoRA to merge')
    h = runs.newest_loadable(args.checkpoint, runs.read_meta)[1]['hyper_config'] or {}
    if not h.get('lora_rank') or h['adapters'] or h['prefixes'] or h['fusion']:
        raise data.DataError(f'--merge-into: {args.checkpoint} is not a LoRA-only run: only a run '
                             'trained with --lora-rank R --no-adapters --no-prefixes --no-fusion merges')
    cfg, hcfg, params, meta = runs.load_run(args.checkpoint)
    tokenizer = data.load_tokenizer(meta['tokenizer'])
    itok = instruction_tokenizer(hcfg, meta['args'])
    text = data.instruction_text(args.task, args.instruction, args.format, args.shots)
    instruction = padded(data.load_tokenizer(itok) if itok else tokenizer, text, data.lengths(args)[0],
                         '--instruction')
    state = task_state(params, cfg, hcfg, instruction)   # as one-off mode encodes it
    M.save_t5(HN.merge_lora(params['t5'], state), cfg, args.merge_into)
    if isinstance(tokenizer, data.SentencePieceTokenizer):
        shutil.copy(tokenizer.name, os.path.join(args.merge_into, 'spiece.model'))
    print(f'{args.merge_into}: T5 with the task\'s LoRA merged in (transformers T5ForConditionalGeneration)')


def main(args: EvalArgs, run=None):
    data.check_args(args)
    if args.merge_into:
        return merge_into(args)
    one_off_mode = args.instruction is not None or args.task_state
    if args.task_state and not os.path.isfile(args.task_state):
        raise FileNotFoundError(f'--task-state {args.task_state}: no such file')
    if one_off_mode:   # read stdin first: an empty one fails before a model is loaded
        lines = read_lines(sys.stdin)
        if not lines:
            raise data.DataError('one-off mode: no instance inputs on stdin (one per line)')
        # HINT knows the task by its instruction only
        empty = not (args.task_state or args.instruction.strip())
        if empty and runs.newest_loadable(args.checkpoint, runs.read_meta)[1]['hyper_config']:
            raise data.DataError('--instruction is empty: a HINT run needs the task\'s instruction')
    cfg, hcfg, params, meta = runs.load_run(args.checkpoint, args.dtype)
    tokenizer = data.load_tokenizer(meta['tokenizer'])
    itok = instruction_tokenizer(hcfg, meta['args'])   # a name (RoBERTa's) or None
    if one_off_mode:
        if hcfg is None and args.format != 'full-input' and args.instruction:
            print('note: an input-only baseline ignores the instruction', file=sys.stderr)
        own = data.load_tokenizer(itok) if itok else None
        for pred in one_off(args, cfg, hcfg, params, tokenizer, lines, own):
            print(pred)
        return None
    split = first(load_split(args, args.split, tokenizer, itok), args.eval_instances)
    metrics, rows = evaluate(params, cfg, hcfg, split, tokenizer, args.batch_size)
    out_dir = results_dir(args, run_args(args.checkpoint) if run is None else run)
    write_results(out_dir, metrics, rows)
    print(json.dumps(metrics['overall']), f'({metrics["count"]} instances; {out_dir}/metrics.json)')
    return metrics


# The settings that decide what an evaluation measures: where one differs from the run's own, the
# results go to a folder of their own, never over the run's metrics.json.
SETTINGS = tuple(f.name for f in dataclasses.fields(data.DataArgs) if f.name != 'cache_dir') + (
    'eval_instances',)


def run_args(checkpoint):
    """The arguments of the run that wrote `checkpoint` (its newest checkpoint's meta that reads;
    JSON lists as tuples), {} when none has them."""
    try:
        saved = runs.newest_loadable(checkpoint, runs.read_meta, quiet=True)[1].get('args') or {}
    except runs.CheckpointError:
        return {}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}


def results_dir(args, run):
    """Where metrics.json goes: --out-dir; else the run folder when this evaluation measures what the
    run's own did; else <run>/eval-<what differs> (e.g. eval-shots-1), said on stderr."""
    if args.out_dir:
        return args.out_dir
    folder = epath.Path(args.checkpoint)
    differs = {k: getattr(args, k) for k in SETTINGS if k in run and run[k] != getattr(args, k)}
    if args.split != 'test':
        differs['split'] = args.split
    if not run:
        differs['settings'] = 'unknown'
    if runs.is_checkpoint(folder):   # one checkpoint, perhaps not the one the run evaluated
        differs['ckpt'], folder = runs.step_of(folder), folder.parent
    if not differs:
        return str(folder)
    parts = []
    for k, v in differs.items():
        v = '+'.join(map(str, v)) if isinstance(v, tuple) else os.path.basename(str(v).rstrip('/'))
        parts.append(f'{k.replace("_", "-")}-{v or "none"}')
    out = str(folder / ('eval-' + '-'.join(parts)))
    print(f'note: evaluating with other settings than the run\'s own ({", ".join(parts)}): results go to '
          f'{out}', file=sys.stderr)
    return out


def cli(argv=None):
    """Data flags default to the evaluated run's own (the arguments in its checkpoint's meta); any
    flag given overrides them. Local paths are made absolute here."""
    import tyro
    argv = sys.argv[1:] if argv is None else argv
    ckpt = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == '--checkpoint'), None)
    if ckpt is None:
        ckpt = next((a.split('=', 1)[1] for a in argv if a.startswith('--checkpoint=')), None)
    run = run_args(data.local_path(ckpt)) if ckpt else {}
    default = EvalArgs(**{k: v for k, v in run.items() if k in SETTINGS})
    args = tyro.cli(EvalArgs, default=default, args=argv)
    if not args.checkpoint:
        raise ValueError('--checkpoint is required (a run folder written by train.py)')
    paths = ('checkpoint', 'out_dir', 'merge_into', 'save_task_state', 'task_state') + data.DATA_PATHS
    data.absolute_paths(args, paths, ('tokenizer',))
    return main(args, run)


if __name__ == '__main__':
    runs.quiet_libraries()
    try:
        cli()
    except (ValueError, OSError) as e:   # bad arguments, data or checkpoints (DataError, CheckpointError)
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:   # metrics.json and predictions.jsonl are written at the end only
        data.interrupted()
