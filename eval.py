"""Evaluate HINT or a baseline: greedy decoding with the KV cache, each instruction encoded once.

    python eval.py --checkpoint runs/synthetic                 # the run's own test split
    printf 'a b c\\nd e\\n' | python eval.py --checkpoint runs/synthetic --instruction "Reverse."
"""
import argparse
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
from jax.experimental import multihost_utils

import data
import hypernet as HN
import model as M
import runs


# SNI metrics: Tk-Instruct's src/compute_metrics.py, so numbers compare (docs/formats.md) -----

EXCLUDED_TASK_PREFIX = 'task1415_'   # the released script drops it: "this task data is not good"

HEADLINE_METRIC = dict.fromkeys((   # the metric the released script reports per test category
    'Textual Entailment', 'Cause Effect Classification', 'Coreference Resolution',
    'Dialogue Act Recognition', 'Answerability Classification', 'Word Analogy'), 'exact_match')
HEADLINE_METRIC.update(dict.fromkeys((
    'Overlap Extraction', 'Keyword Tagging', 'Question Rewriting', 'Title Generation',
    'Data to Text', 'Grammar Error Correction'), 'rougeL'))
_NO_PUNCTUATION = str.maketrans('', '', string.punctuation)


def category_key(name: str) -> str:
    """'Data to Text' -> 'data_to_text': how the released script matches categories."""
    return '_'.join(name.lower().split())


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation without removing articles."""
    return ' '.join(s.lower().translate(_NO_PUNCTUATION).split())


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer   # here: it takes a second, and P3 never needs it
    return rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)


def score(prediction: str, references: list[str]) -> dict:
    """The best over references; a text of no tokens ('' or '...') has ROUGE-L 0, even with ''."""
    if not references:
        raise ValueError(f'no references for prediction {prediction!r}')
    exact = [float(normalize_answer(prediction) == normalize_answer(r)) for r in references]
    rouge = [_rouge_scorer().score(r, prediction)['rougeL'].fmeasure for r in references]
    return {'exact_match': max(exact), 'rougeL': max(rouge)}


def mean(scores: list[dict]) -> dict:
    """{exact_match, rougeL} x100 over instances, rounded to 4 decimals ({} for none)."""
    if not scores:
        return {}
    return {k: round(100.0 * sum(s[k] for s in scores) / len(scores), 4) for k in scores[0]}


def grouped(keys, values) -> dict:
    groups = {}
    for key, value in zip(keys, values):
        groups.setdefault(key, []).append(value)
    return groups


def group_means(keys, scores: list[dict]) -> dict:
    return {key: mean(group) for key, group in sorted(grouped(keys, scores).items())}


def compute_metrics(rows: list[dict]) -> dict:
    """rows: {prediction, references, task, category} -> the metrics of docs/formats.md."""
    scores = [score(r['prediction'], r['references']) for r in rows]
    tasks, categories = [r['task'] for r in rows], [r.get('category') or '' for r in rows]
    kept = [i for i, task in enumerate(tasks) if not task.startswith(EXCLUDED_TASK_PREFIX)]
    kept_scores = [scores[i] for i in kept]
    metric_of = {category_key(c): m for c, m in HEADLINE_METRIC.items()}
    headline = {}
    for category, means in group_means([categories[i] for i in kept], kept_scores).items():
        metric = metric_of.get(category_key(category))
        if metric:
            headline[category] = {'metric': metric, 'value': means[metric]}
    return {'overall': mean(scores), 'overall_without_task1415': mean(kept_scores),
            'count': len(rows), 'per_task': group_means(tasks, scores),
            'per_category': group_means(categories, scores), 'headline_per_category': headline}


# Prediction: one task state per distinct instruction, shared (not copied) by its instances ----


@functools.partial(jax.jit, static_argnums=(2, 3))
def _encode_task(params, instruction, cfg, hcfg):
    """The task state of one instruction [Li], without a batch axis: every row shares it."""
    return HN.select_task(HN.encode_task(params, cfg, hcfg, instruction[None]), 0)


def task_state(params, cfg, hcfg, instruction):
    """_encode_task of instruction [Li] (None for a baseline), cut to its bucket: padding costs."""
    if hcfg is None:
        return None
    pad = HN.instruction_pad_id(hcfg)
    width = data.bucket(int(data.row_lengths(instruction[None], pad)[0]), len(instruction))
    return _encode_task(params, jnp.asarray(instruction[:width]), cfg, hcfg)


def chunks(lengths, size):
    """Row indices sorted by length, in chunks of size: each chunk is cut to few padding."""
    order = np.argsort(lengths, kind='stable')
    return [order[i:i + size] for i in range(0, len(order), size)]


def predict_ids(params, cfg, mods, inputs, max_len, batch_size):
    """Greedy ids [N, max_len] for inputs [N, Lx] of ONE task (mods: its task_state)."""
    lengths = data.row_lengths(inputs)   # [N]
    out = np.zeros((len(inputs), max_len), np.int32)
    for rows in chunks(lengths, batch_size):
        width = data.bucket(int(lengths[rows].max()), inputs.shape[1])
        # padded to a power of two with copies of its own rows, which stop decoding when those do
        x = inputs[np.resize(rows, min(batch_size, data.next_pow2(len(rows)))), :width]   # [b, W]
        ids = M.t5_generate(params['t5'], cfg, jnp.asarray(x), max_len, mods)   # [b, max_len]
        out[rows] = np.asarray(ids)[:len(rows)]
    return out


def load_split(args, split, tokenizer, itok=None):
    """data.load_split, the instructions in the vocabulary of itok (RoBERTa's name) if given."""
    out = data.load_split(args, split, tokenizer)
    if itok:
        theirs = data.load_split(dataclasses.replace(args, tokenizer=itok), split,
                                 data.load_tokenizer(itok))
        out['instruction'], out['lengths'][:, 0] = theirs['instruction'], theirs['lengths'][:, 0]
    return out


def instruction_tokenizer(hcfg, run_args):
    """The instruction encoder's own tokenizer (RoBERTa's) in a run's meta['args']; None: T5's."""
    if hcfg is not None and hcfg.instruction_encoder == 'roberta':
        return run_args['instruction_encoder_init']
    return None


def first(split, n):
    """The first n instances of a load_split() result (all of them for n = 0)."""
    cut = {k: v[:n] for k, v in split.items() if n and isinstance(v, (list, np.ndarray))}
    return {**split, **cut}


def on_hosts(params, work, run, what):
    """run(params, rows) on this process's share of work (lists of rows); all results, on all."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    mine = work[jax.process_index()::jax.process_count()]
    results, t0 = [None] * sum(len(rows) for rows in work), time.time()
    for done, rows in enumerate(mine, 1):
        for i, result in zip(rows, run(params, rows)):
            results[i] = result
        if (done % 20 == 0 or done == len(mine)) and jax.process_index() == 0:
            eta = (time.time() - t0) / done * (len(mine) - done)
            print(f'eval: {done}/{len(mine)} {what} done, ETA {eta:.0f} s', flush=True)
    return gather(results)


def gather(results):
    """Every process's results (None where another process made them), merged on all of them."""
    if jax.process_count() == 1:
        return results
    mine = json.dumps(results).encode('utf-8')
    width = runs.agreed_max(len(mine))   # padded with spaces, which json.loads ignores
    rows = multihost_utils.process_allgather(np.frombuffer(mine.ljust(width), np.uint8))   # [P, W]
    merged = list(results)
    for row in rows:
        for i, result in enumerate(json.loads(bytes(row))):
            if result is not None:
                merged[i] = result
    return merged


def predict(params, cfg, hcfg, split, tokenizer, batch_size=64):
    """Predicted texts for a load_split() result, in order (each host predicts its share)."""
    tasks = grouped([row.tobytes() for row in split['instruction']], range(len(split['input'])))
    max_len = split['target'].shape[1]

    def predict_task(params, rows):
        mods = task_state(params, cfg, hcfg, split['instruction'][rows[0]])
        ids = predict_ids(params, cfg, mods, split['input'][rows], max_len, batch_size)
        return [tokenizer.decode(row) for row in ids]
    return on_hosts(params, list(tasks.values()), predict_task, 'tasks')


# Rank classification (P3 / T0's held-out tasks): the best choice by summed log-likelihood ----


@functools.partial(jax.jit, static_argnums=(1, 2))
def choice_scores(params, cfg, hcfg, instruction, inputs, choices):
    """[B, C] log-likelihoods (EOS included) of choices [B, C, Lc] (padding only: -inf)."""
    B, C, Lc = choices.shape
    mods = None
    if hcfg is not None:
        mods = _encode_task(params, instruction, cfg, hcfg)
    enc = M.t5_encode(params['t5'], cfg, inputs, mods)   # [B, Lx, D]
    kv = M.cross_kv(params['t5'], cfg, enc, inputs != M.PAD_ID, mods)
    for name, axis in (('k', 1), ('v', 1), ('bias', 0)):   # each row C times: [Ld, B*C, S, H, K]
        kv[name] = jnp.repeat(kv[name], C, axis=axis)
    flat = choices.reshape(B * C, Lc)
    logits = M.t5_decode(params['t5'], cfg, M.shift_right(flat), kv, mods)   # [B*C, Lc, V]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), flat[..., None], -1)[..., 0]
    total = jnp.sum(logp * (flat != M.PAD_ID), -1).reshape(B, C)
    return jnp.where(jnp.any(choices != M.PAD_ID, -1), total, -jnp.inf)


def rank_classify(params, cfg, hcfg, split, batch_size=64):
    """Choice scores [N, C] (float32) in chunks of one template and about batch_size rows."""
    instructions, inputs, choices = split['instruction'], split['input'], split['choices']
    n, num_choices, choice_len = choices.shape
    # [N, 3]: the lengths of the instruction, the input and the longest choice, and their caps
    lengths = np.stack([*split['lengths'].T[:2], data.row_lengths(choices.any(1))], 1)
    caps = instructions.shape[1], inputs.shape[1], choice_len
    work = []
    for rows in grouped([row.tobytes() for row in instructions], range(n)).values():   # templates
        rows = np.array(rows)
        work += [rows[c] for c in chunks(lengths[rows, 1], max(1, batch_size // num_choices))]

    def score_chunk(params, idx):
        # padded to a power of two with copies of its own rows: few shapes to compile
        take = np.resize(idx, data.next_pow2(len(idx)))
        wi, wx, wc = [data.bucket(int(m), cap) for m, cap in zip(lengths[idx].max(0), caps)]
        out = choice_scores(params, cfg, hcfg, jnp.asarray(instructions[idx[0], :wi]),
                            jnp.asarray(inputs[take, :wx]), jnp.asarray(choices[take, :, :wc]))
        return np.asarray(out)[:len(idx)].tolist()
    return np.array(on_hosts(params, work, score_chunk, 'chunks'), np.float32)


def p3_metrics(rows: list[dict]) -> dict:
    """rows: {task (template), category (dataset), correct} -> the metrics of docs/formats.md."""
    per_template = grouped([r['task'] for r in rows], [float(r['correct']) for r in rows])
    accuracy = {t: 100.0 * float(np.mean(v)) for t, v in sorted(per_template.items())}
    dataset_of = {r['task']: r['category'] for r in rows}
    per_dataset = {}
    for d, accs in sorted(grouped([dataset_of[t] for t in accuracy], accuracy.values()).items()):
        per_dataset[d] = {'mean': np.mean(accs), 'median': np.median(accs), 'templates': len(accs)}
    overall = {f'accuracy_{k}': round(float(np.mean([v[k] for v in per_dataset.values()])), 4)
               for k in ('mean', 'median')}
    for v in per_dataset.values():   # rounded for the report only, after averaging
        v['median'], v['mean'] = round(float(v['median']), 4), round(float(v['mean']), 4)
    return {'overall': overall, 'count': len(rows), 'per_dataset': per_dataset,
            'per_template': {t: round(a, 4) for t, a in accuracy.items()}}


def evaluate(params, cfg, hcfg, split, tokenizer, batch_size=64):
    """(metrics, prediction rows): rank classification for a split with 'choices', else greedy."""
    if 'choices' in split:
        scores = rank_classify(params, cfg, hcfg, split, batch_size)
        best = np.argmax(scores, 1)   # the first of equal maxima
        rows = [{'id': ex['id'], 'task': ex['task'], 'category': ex['category'],
                 'prediction': ex['choices'][b], 'references': ex['references'],
                 'correct': bool(b == a), 'scores': s[:len(ex['choices'])].tolist()}
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
    lines = [json.dumps(r, ensure_ascii=False) + '\n' for r in rows]
    (out / 'predictions.jsonl').write_text(''.join(lines))


# The script: evaluate a run; one-off mode (--instruction, inputs on stdin); --merge-into ------


@dataclasses.dataclass
class EvalArgs(data.DataArgs):
    checkpoint: str = ''   # a run folder (its newest checkpoint that loads) or one ckpt_*/
    split: Literal['train', 'test'] = 'test'   # which split of the data flags to evaluate
    out_dir: str = ''      # for metrics.json / predictions.jsonl; default: the run folder
    batch_size: int = 64   # instances per decoding batch (p3: decoder rows, choices included)
    eval_instances: int = 0   # only the first N instances (0: all)
    dtype: str = 'float32'    # compute dtype (bfloat16 on GPU/TPU halves memory)
    instruction: str | None = None   # one-off mode: this task definition; inputs on stdin
    task_state: str = ''   # one-off mode: a saved task state (.safetensors) for --instruction
    save_task_state: str = ''   # one-off mode: also save the instruction's task state here
    merge_into: str = ''   # with --instruction: save a LoRA-only run's T5 with its LoRA merged


def check_args(args: EvalArgs):
    """eval.py's flags, checked before stdin, data or weights are read (only the run's meta is)."""
    data.check_args(args)
    if not args.checkpoint:
        raise ValueError('--checkpoint is required (a run folder written by train.py)')
    if args.task_state and not os.path.isfile(args.task_state):
        raise FileNotFoundError(f'--task-state {args.task_state}: no such file')
    if args.merge_into and not args.instruction:
        raise data.DataError('--merge-into needs --instruction: the task whose LoRA to merge')
    if args.instruction is None:   # the run's meta is read for one-off mode and --merge-into only
        return
    hyper = runs.newest_loadable(args.checkpoint, runs.read_meta)[1]['hyper_config'] or {}
    more = any(hyper.get(k) for k in ('adapters', 'prefixes', 'fusion'))   # than a LoRA
    if args.merge_into and (more or not hyper.get('lora_rank')):
        raise data.DataError(f'--merge-into: {args.checkpoint} is not a LoRA-only run '
                             '(--lora-rank R --no-adapters --no-prefixes --no-fusion)')
    if hyper and not (args.task_state or args.instruction.strip()):   # HINT reads the instruction
        raise data.DataError('--instruction is empty: a HINT run needs the task\'s instruction')


def padded(tokenizer, text, n, what):
    """ids [n]: text cut as data.encode cuts it, then padded; a cut is reported, naming `what`."""
    ids, cut = data.encode(tokenizer, text, n)
    if cut:
        print(f'warning: {what} cut to {n} tokens (it has {len(tokenizer.encode(text))})',
              file=sys.stderr)
    return np.array(ids + [tokenizer.pad_id] * n, np.int32)[:n]


def read_lines(stdin):
    """stdin's non-blank lines, read as bytes so that a line that is not UTF-8 is named."""
    lines = []
    for n, line in enumerate(stdin.buffer, 1):
        with data.reading(f'stdin line {n}'):   # not UTF-8: an error naming the line
            line = line.decode('utf-8')
        if line.strip():
            lines.append(line.rstrip('\r\n'))
    if not lines:
        raise data.DataError('one-off mode: no instance inputs on stdin (one per line)')
    return lines


def instruction_state(args, params, cfg, hcfg, itok):
    """The task state of --task-state, else of --instruction formatted as in training."""
    if args.task_state:
        state = runs.load_task_state(args.task_state)
    else:
        text = data.instruction_text(args.task, args.instruction, args.format, args.shots)
        ids = padded(itok, text, data.lengths(args)[0], '--instruction')   # [Li]
        state = task_state(params, cfg, hcfg, ids)
    if args.save_task_state:
        runs.save_task_state(args.save_task_state, state)
    return state


def one_off(args, cfg, hcfg, params, tokenizer, itok, lines):
    """Prints predictions for stdin's lines under --instruction or --task-state."""
    mods = None   # a baseline's
    if hcfg is not None:
        mods = instruction_state(args, params, cfg, hcfg, itok)
    elif args.format != 'full-input' and args.instruction:
        print('note: an input-only baseline ignores the instruction', file=sys.stderr)
    instruction = ''
    if args.instruction:
        instruction = data.instruction_text(args.task, args.instruction, args.format, args.shots)
    where = {'full-input': ' (with the instruction)'}.get(args.format, '')   # what a cut cuts
    texts = [data.instance_text(args.task, x, args.format) for x in lines]
    texts = [data.arrange(args.format, instruction, x)[1] for x in texts]
    lx, ly = data.lengths(args)[1:]
    inputs = np.stack([padded(tokenizer, x, lx, f'stdin line {n}{where}')
                       for n, x in enumerate(texts, 1)])   # [N, lx]
    ids = predict_ids(params, cfg, mods, inputs, ly, args.batch_size)   # [N, ly]
    print('\n'.join(tokenizer.decode(row) for row in ids))


def merge_lora(t5_params, state):
    """Plain T5 parameters with one task's LoRA folded in: W + A B for every attention's q and v."""
    blocks = (('encoder', 'self_attn', 'lora'), ('decoder', 'self_attn', 'self_lora'),
              ('decoder', 'cross_attn', 'cross_lora'))
    names = set(state['encoder']) | set(state['decoder'])
    assert names == {name for *_, name in blocks} and state['memory'] is None, 'a LoRA only'
    assert state['encoder']['lora']['q_a'].ndim == 3, 'one task (select_task), not a batch'
    out = jax.tree.map(jnp.asarray, t5_params)   # new dicts, the same arrays
    for stack, block, name in blocks:
        lora, w = state[stack][name], out[stack]['layers'][block]
        for n in 'qv':   # [L, D, R] @ [L, R, HK] -> [L, D, HK], our kernels' [in, out] layout
            w[n] = (w[n] + lora[n + '_a'] @ lora[n + '_b']).astype(w[n].dtype)
    return out


def merge_into(args, cfg, hcfg, params, tokenizer, itok):
    """One task's LoRA merged into the run's T5, a transformers folder: plain T5 code serves it."""
    state = instruction_state(args, params, cfg, hcfg, itok)   # as one-off mode encodes it
    M.save_t5(merge_lora(params['t5'], state), cfg, args.merge_into)
    if isinstance(tokenizer, data.SentencePieceTokenizer):
        epath.Path(tokenizer.name).copy(f'{args.merge_into}/spiece.model', overwrite=True)
    print(f'{args.merge_into}: T5 with the task\'s LoRA merged in (T5ForConditionalGeneration)')


def main(args: EvalArgs, run: dict):   # run: the evaluated run's own settings (run_args)
    check_args(args)
    one_off_mode = args.instruction is not None or args.task_state
    lines = []
    if one_off_mode and not args.merge_into:   # stdin first: an empty one fails before a load
        lines = read_lines(sys.stdin)
    cfg, hcfg, params, meta = runs.load_run(args.checkpoint, args.dtype)
    tokenizer = data.load_tokenizer(meta['tokenizer'])
    itok = instruction_tokenizer(hcfg, meta['args'])   # a name (RoBERTa's) or None
    if one_off_mode:   # --merge-into too
        own = data.load_tokenizer(itok) if itok else tokenizer   # the instruction encoder's
        if args.merge_into:
            return merge_into(args, cfg, hcfg, params, tokenizer, own)
        return one_off(args, cfg, hcfg, params, tokenizer, own, lines)
    split = first(load_split(args, args.split, tokenizer, itok), args.eval_instances)
    metrics, rows = evaluate(params, cfg, hcfg, split, tokenizer, args.batch_size)
    out_dir = results_dir(args, run)
    write_results(out_dir, metrics, rows)
    print(json.dumps(metrics['overall']), f'({metrics["count"]} instances; {out_dir}/metrics.json)')
    return metrics


# What an evaluation measures: one that differs from the run's own writes to a folder of its own.
SETTINGS = tuple(f.name for f in dataclasses.fields(data.DataArgs) if f.name != 'cache_dir') + (
    'eval_instances',)


def run_args(checkpoint):
    """The run's own SETTINGS, in its newest meta that reads (lists as tuples); {} for none."""
    try:
        saved = runs.newest_loadable(checkpoint, runs.read_meta, quiet=True)[1].get('args') or {}
    except runs.CheckpointError:
        return {}
    own = {k: saved[k] for k in SETTINGS if k in saved}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in own.items()}


def results_dir(args, run):
    """--out-dir, the run folder, or when settings differ <run>/eval-<them> (e.g. eval-shots-1)."""
    if args.out_dir:
        return args.out_dir
    folder = epath.Path(args.checkpoint)
    own = {**run, 'split': 'test'}   # the run's own evaluation: its test split
    differs = {k: getattr(args, k) for k, v in own.items() if getattr(args, k) != v}
    if not run:
        differs['settings'] = 'unknown'
    if runs.is_checkpoint(folder):   # one checkpoint, perhaps not the one the run evaluated
        differs['ckpt'], folder = runs.step_of(folder), folder.parent
    if not differs:
        return str(folder)
    values = {k: os.path.basename(str(v).rstrip('/')) for k, v in differs.items()}   # paths: a name
    values.update({k: '+'.join(map(str, v)) for k, v in differs.items() if isinstance(v, tuple)})
    parts = [k.replace('_', '-') + '-' + (v or 'none') for k, v in values.items()]
    out = str(folder / ('eval-' + '-'.join(parts)))
    print(f'note: settings differ from the run\'s own: results go to {out}', file=sys.stderr)
    return out


def cli(argv=None):
    """Data flags default to the evaluated run's own; flags given override them."""
    import tyro
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument('--checkpoint', default='')
    run = run_args(parser.parse_known_args(argv)[0].checkpoint)   # argv None: sys.argv, as tyro
    args = tyro.cli(EvalArgs, default=EvalArgs(**run), args=argv)
    paths = ('checkpoint', 'out_dir', 'merge_into', 'save_task_state', 'task_state')
    data.absolute_paths(args, paths + data.DATA_PATHS, ('tokenizer',))
    return main(args, run)


if __name__ == '__main__':
    runs.quiet_libraries()
    try:
        cli()
    except (ValueError, OSError) as e:   # bad arguments, data or checkpoints (DataError, ...)
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:   # metrics.json and predictions.jsonl are written at the end only
        data.interrupted()
