"""Super-NaturalInstructions end to end on the real sample: train, evaluate, metrics, eval.py, C4 -> SNI."""
import gzip
import io
import json
import os
import sys

import jax
import numpy as np
import pytest

import data
import eval as E
import train as T
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, '..', 'shared')
SNI = os.path.join(SHARED, 'data', 'sni_sample')
TOK = os.path.join(SHARED, 'assets', 't5_tokenizer')
needs_shared = pytest.mark.skipif(not (os.path.isdir(SNI) and os.path.isdir(TOK)),
                                  reason='../shared/data/sni_sample or ../shared/assets/t5_tokenizer not found')


def ni_args(tmp_path, out, **kw):
    base = dict(task='ni', data_dir=SNI, tokenizer=TOK, init='tiny', instruction_len=384, input_len=128, target_len=12,
                batch_size=4, steps=2, log_every=1, adapter_dim=8, prefix_len=4, eval_batch_size=32,
                out_dir=str(tmp_path / out), cache_dir=str(tmp_path / 'cache'))
    return T.Args(**{**base, **kw})


def official_metrics(rows, without_task1415=False):
    """An independent re-computation with rouge_score, as Tk-Instruct's released compute_metrics.py does:
    references are the whole output list ('' included), max over them, x100 / N, rounded to 4 decimals;
    its reported numbers leave task1415's rows out."""
    import string
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)
    norm = lambda s: ' '.join(''.join(c for c in s.lower() if c not in string.punctuation).split())
    if without_task1415:
        rows = [r for r in rows if not r['task'].startswith('task1415_')]
    em = [max(norm(r['prediction']) == norm(g) for g in r['references']) for r in rows]
    rl = [max(scorer.score(target=g, prediction=r['prediction'])['rougeL'].fmeasure for g in r['references'])
          for r in rows]
    return round(100.0 * sum(em) / len(rows), 4), round(100.0 * sum(rl) / len(rows), 4)


T1415 = 'task1415_youtube_caption_corrections_grammar_correction'


def test_metrics_match_rouge_score_on_fixed_predictions():
    row = lambda task, category, prediction, references: dict(task=task, category=category,
                                                              prediction=prediction, references=references)
    rows = [row('t1', 'A', 'The cat sat.', ['the  cat sat', 'a dog']),       # EM 1, RL 1
            row('t1', 'A', 'running dogs', ['the dog runs', 'dogs ran']),    # EM 0, RL 1/2 (stems: dog)
            row('t2', 'B', '', ['yes']),                                      # EM 0, RL 0
            row('t2', 'B', 'Yes!', ['no', 'YES']),                            # EM 1, RL 1
            row('t3', 'C', '', ['', 'maybe']),                                # '' matches '': EM 1, RL 0
            row('t3', 'C', '...', ['', '']),                                  # all-empty references: EM 1, RL 0
            row('t3', 'C', 'nothing', ['']),                                  # EM 0, RL 0
            row('te', 'Textual Entailment', 'yes', ['yes']),                  # EM 1, RL 1
            row('te', 'Textual Entailment', 'no answer', ['no']),             # EM 0, RL 2/3
            row('tg', 'Title Generation', 'the cat', ['the cat sat']),        # EM 0, RL 0.8
            row('gec', 'Grammar Error Correction', 'She runs', ['She runs.']),  # EM 1, RL 1
            row(T1415, 'Grammar Error Correction', 'the cat', ['the cat sat'])]  # EM 0, RL 0.8
    m = E.compute_metrics(rows)
    assert m['count'] == 12
    assert m['overall'] == {'exact_match': 50.0, 'rougeL': 56.3889}             # 6/12; 6.7667/12
    assert m['overall_without_task1415'] == {'exact_match': 54.5455, 'rougeL': 54.2424}   # 6/11; 5.9667/11
    assert (m['overall']['exact_match'], m['overall']['rougeL']) == official_metrics(rows)
    assert tuple(m['overall_without_task1415'].values()) == official_metrics(rows, without_task1415=True)
    assert m['per_task']['t1'] == {'exact_match': 50.0, 'rougeL': 75.0}
    assert m['per_task']['t3'] == {'exact_match': 66.6667, 'rougeL': 0.0}
    assert m['per_task'][T1415] == {'exact_match': 0.0, 'rougeL': 80.0}
    assert m['per_category']['B']['exact_match'] == 50.0 and m['per_category']['A']['exact_match'] == 50.0
    assert m['per_category']['Grammar Error Correction'] == {'exact_match': 50.0, 'rougeL': 90.0}  # all rows
    assert m['per_category']['Textual Entailment'] == {'exact_match': 50.0, 'rougeL': 83.3333}
    # each test category's headline metric, without task1415 as in the released script; A, B, C have none
    assert m['headline_per_category'] == {
        'Grammar Error Correction': {'metric': 'rougeL', 'value': 100.0},
        'Textual Entailment': {'metric': 'exact_match', 'value': 50.0},
        'Title Generation': {'metric': 'rougeL', 'value': 80.0}}
    only_1415 = E.compute_metrics(rows[-1:])
    assert only_1415['overall_without_task1415'] == {} and only_1415['headline_per_category'] == {}
    with pytest.raises(ValueError, match='no references'):
        E.compute_metrics([row('t', 'A', 'x', [])])


@needs_shared
@pytest.mark.parametrize('shots', [2, 0])
def test_ni_trains_and_evaluates_end_to_end(tmp_path, shots):
    state, metrics = T.main(ni_args(tmp_path, 'run', shots=shots))
    test_tasks = open(os.path.join(SNI, 'splits', 'default', 'test_tasks.txt')).read().split()
    assert int(state['step']) == 2
    assert set(metrics['per_task']) == set(test_tasks)
    saved = json.load(open(tmp_path / 'run' / 'metrics.json'))
    rows = [json.loads(l) for l in open(tmp_path / 'run' / 'predictions.jsonl')]
    assert len(rows) == metrics['count'] == saved['count'] > 200
    assert {'id', 'task', 'prediction', 'references'} <= set(rows[0])
    # the numbers in metrics.json are what rouge_score gives on predictions.jsonl
    assert (saved['overall']['exact_match'], saved['overall']['rougeL']) == official_metrics(rows)
    categories = {json.load(open(os.path.join(SNI, 'tasks', t + '.json')))['Categories'][0] for t in test_tasks}
    assert set(saved['per_category']) == categories
    assert saved['overall_without_task1415'] == saved['overall']   # the sample has no task1415
    assert set(saved['headline_per_category']) == categories        # all six are test categories
    for c, h in saved['headline_per_category'].items():
        assert h == {'metric': E.HEADLINE_METRIC[c], 'value': saved['per_category'][c][E.HEADLINE_METRIC[c]]}

    # eval.py on the run gives the same predictions (data flags default to the run's own)
    out = tmp_path / 'again'
    again = E.cli(['--checkpoint', str(tmp_path / 'run'), '--out-dir', str(out)])
    assert again['overall'] == saved['overall']
    assert [json.loads(l)['prediction'] for l in open(out / 'predictions.jsonl')] == [r['prediction'] for r in rows]


def stdin(text):
    """A stand-in for sys.stdin: eval.py reads its bytes (sys.stdin.buffer)."""
    return io.TextIOWrapper(io.BytesIO(text.encode('utf-8')))


@needs_shared
def test_eval_one_off_mode_reads_stdin(tmp_path, monkeypatch, capsys):
    T.main(ni_args(tmp_path, 'run', shots=0, steps=1, eval_instances=4))
    capsys.readouterr()                                   # drop the training log
    monkeypatch.setattr(sys, 'stdin', stdin('The movie was great.\n\nI hated it.\n'))
    state_file = str(tmp_path / 'task.safetensors')
    E.cli(['--checkpoint', str(tmp_path / 'run'), '--instruction', 'Classify the sentiment',
           '--save-task-state', state_file])
    first = capsys.readouterr().out.splitlines()
    assert len(first) == 2                                # one prediction per non-empty input line
    monkeypatch.setattr(sys, 'stdin', stdin('The movie was great.\nI hated it.\n'))
    E.cli(['--checkpoint', str(tmp_path / 'run'), '--task-state', state_file])
    assert capsys.readouterr().out.splitlines() == first  # the saved task state serves the same predictions


@needs_shared
@pytest.mark.parametrize('fmt', ['hint', 'split', 'full-input'])
def test_eval_one_off_mode_formats_as_training(tmp_path, monkeypatch, capsys, fmt):
    """One-off mode builds the run's own texts: a test task's definition and the raw inputs of its
    first instances give the predictions the run's evaluation made on them."""
    baseline = 'full-input' if fmt == 'full-input' else 'none'
    T.main(ni_args(tmp_path, 'run', format=fmt, baseline=baseline, steps=1, eval_instances=4))
    rows = [json.loads(l) for l in open(tmp_path / 'run' / 'predictions.jsonl')]
    with open(os.path.join(SNI, 'tasks', rows[0]['task'] + '.json')) as f:
        task = json.load(f)
    inputs = {i['id']: i['input'] for i in task['Instances']}
    capsys.readouterr()                                   # drop the training log
    monkeypatch.setattr(sys, 'stdin', stdin(''.join(inputs[r['id']] + '\n' for r in rows)))
    E.cli(['--checkpoint', str(tmp_path / 'run'), '--instruction', task['Definition'][0]])
    assert capsys.readouterr().out.splitlines() == [r['prediction'] for r in rows]


def write_c4(folder, texts, split):
    os.makedirs(folder, exist_ok=True)
    with gzip.open(os.path.join(folder, f'c4-{split}.00000-of-00001.json.gz'), 'wt', encoding='utf-8') as f:
        for t in texts:
            f.write(json.dumps({'text': t, 'url': 'x'}) + '\n')


@needs_shared
def test_c4_pretraining_then_sni_finetuning(tmp_path):
    texts = [json.load(open(os.path.join(SNI, 'tasks', f)))['Definition'][0] * 3
             for f in sorted(os.listdir(os.path.join(SNI, 'tasks')))]
    write_c4(str(tmp_path / 'c4'), texts[:12], 'train')
    write_c4(str(tmp_path / 'c4'), texts[12:], 'validation')
    pre, _ = T.main(ni_args(tmp_path, 'pre', task='c4', data_dir=str(tmp_path / 'c4'), instruction_len=64,
                            input_len=64, target_len=16, steps=2, eval_instances=4))
    # fine-tuning starts from the pretrained HINT model (T5 and hypernetwork), tokenizer taken from the run
    args = ni_args(tmp_path, 'ft', init=str(tmp_path / 'pre'), tokenizer='', shots=2, steps=2, eval_instances=8)
    tok = T.data.load_tokenizer(TOK)
    cfg, hcfg, params = T.build_model(args, tok)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(pre['params'])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state, metrics = T.main(args)
    assert int(state['step']) == 2 and metrics['count'] == 8
    tokenizers = [T.runs.read_meta(T.runs.checkpoints(str(tmp_path / run))[-1])['tokenizer'] for run in ('ft', 'pre')]
    assert tokenizers[0] == tokenizers[1] == os.path.abspath(TOK)


@needs_shared
def test_ni_errors_are_clear(tmp_path):
    with pytest.raises(data.DataError, match='natural-instructions'):
        T.main(ni_args(tmp_path, 'x', data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match='--tokenizer'):
        T.main(ni_args(tmp_path, 'y', tokenizer=''))


def test_paper_recipes_have_a_constant_lr_without_warmup():
    """The original's LR is a constant 1e-3 from the first step (ni, c4, p3); synthetic warms up."""
    for task in ('ni', 'c4', 'p3'):
        _, schedule = T.make_optimizer(T.fill_defaults(T.Args(task=task)))
        assert float(schedule(0)) == float(schedule(5000)) == pytest.approx(1e-3)
    _, schedule = T.make_optimizer(T.fill_defaults(T.Args()))
    assert float(schedule(0)) < float(schedule(99)) == pytest.approx(5e-3)
