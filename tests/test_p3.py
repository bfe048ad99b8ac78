"""--task p3: T0's training mixture, rank classification on the held-out datasets, P3 metrics, bad data.

A small fixture in bigscience/P3's layout (data/<configuration>/<split>-00000-of-00001.parquet, P3's column
names) is written by the test with pyarrow; texts are bytes (the byte tokenizer), the model is `tiny`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
import eval as E
import hypernet as HN
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ('imdb', 'wiki_qa', 'wiki_hop_original', 'super_glue_rte', 'anli_r1')
CHOICES = ['yes', 'no', 'maybe']


def write_config(root, config, split, n, choices=True, columns=None, bad=None):
    """n rows of one configuration's split; bad = (row, field, value) puts one wrong value in."""
    rows = {'inputs': [[1, 2]] * n,
            'inputs_pretokenized': [f'{config} question {i}?' for i in range(n)],
            'targets': [[3]] * n,
            'targets_pretokenized': [CHOICES[i % 3] if choices else f'answer {i}' for i in range(n)]}
    if choices:
        rows['answer_choices'] = [list(CHOICES)] * n
    if bad:
        rows[bad[1]] = list(rows[bad[1]])
        rows[bad[1]][bad[0]] = bad[2]
    for c in columns or ():   # drop these columns
        rows.pop(c)
    folder = os.path.join(root, 'data', config)
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table(rows), os.path.join(folder, f'{split}-00000-of-00001.parquet'))


def make_p3(root):
    for config in ('imdb_t1', 'imdb_t2', 'wiki_qa_Q', 'wiki_hop_original_choose'):
        write_config(root, config, 'train', 10, choices=False)
    write_config(root, 'wiki_qa_Q_score_eval', 'train', 10, choices=False)   # never used
    for config in ('super_glue_rte_a', 'super_glue_rte_b', 'anli_GPT_3_style_r1', 'anli_GPT_3_style_r2'):
        write_config(root, config, 'train', 6)
        write_config(root, config, 'validation', 4)
    write_config(root, 'super_glue_rte_generate', 'validation', 4, choices=False)   # no answer_choices
    return str(root)


def p3_args(root, tmp, **kw):
    base = dict(task='p3', data_dir=root, p3_datasets=DATASETS, p3_examples_per_dataset=6, tokenizer='byte',
                instruction_len=256, input_len=128, target_len=16, cache_dir=str(tmp / 'cache'))
    return data.DataArgs(**{**base, **kw})


@pytest.fixture(scope='module')
def p3_dir(tmp_path_factory):
    return make_p3(tmp_path_factory.mktemp('p3'))


def test_training_mixture_caps_and_demonstrations(p3_dir, tmp_path):
    tok = M.load_tokenizer('byte')
    rows, _ = data.build_p3(p3_args(p3_dir, tmp_path), 'train', tok)
    counts = {}
    for r in rows:
        counts[r['task']] = counts.get(r['task'], 0) + 1
        assert r['instruction'] == r['input'] == f'{r["task"]} question {r["id"].split("-")[-1]}?'
    # 6 per dataset, shared by its templates; wiki_qa_ and wiki_hop_original_ kept apart; no _score_eval
    assert counts == {'imdb_t1': 3, 'imdb_t2': 3, 'wiki_hop_original_choose': 6, 'wiki_qa_Q': 6}
    assert {r['task']: r['category'] for r in rows}['wiki_hop_original_choose'] == 'wiki_hop_original'

    shots, _ = data.build_p3(p3_args(p3_dir, tmp_path, shots=2), 'train', tok)
    again, _ = data.build_p3(p3_args(p3_dir, tmp_path, shots=2), 'train', tok)
    full_args = p3_args(p3_dir, tmp_path, shots=2, format='full-input', input_len=256)   # the same limit
    full, _ = data.build_p3(full_args, 'train', tok)
    assert shots == again   # a fixed seed
    for r, f in zip(shots, full):
        demos = r['instruction'][:-len(r['input'])].split('\n\n')[:-1]
        assert len(demos) == 2 and r['instruction'].endswith(r['input'])
        for d in demos:   # other rows of the same template's (kept) train rows, with their targets
            question, target = d.split('\n')
            assert question.startswith(r['task'] + ' question') and question != r['input']
            k = int(question.split()[-1][:-1])
            assert k < counts[r['task']] and target == f'answer {k}'
        assert f['instruction'] == '' and f['input'] == r['instruction']   # full-input: demos in the encoder


def test_held_out_split_choices_and_cache(p3_dir, tmp_path):
    tok = M.load_tokenizer('byte')
    args = p3_args(p3_dir, tmp_path, shots=1)
    built = data.load_split(args, 'test', tok)
    cached = data.load_split(args, 'test', tok)
    assert built['skipped'] == {'templates_without_answer_choices': ['super_glue_rte_generate']}
    assert sorted({e['task'] for e in built['examples']}) == ['anli_GPT_3_style_r1', 'super_glue_rte_a',
                                                              'super_glue_rte_b']   # no r2: not selected
    for k in ('choices', 'answer', 'target'):
        np.testing.assert_array_equal(built[k], cached[k])
    assert built['choices'].shape[:2] == (12, 3) and built['choices'].dtype == np.int32
    np.testing.assert_array_equal(built['answer'], [0, 1, 2, 0] * 3)
    for n, a in enumerate(built['answer']):   # the target is the correct choice's tokens
        width = built['choices'].shape[2]
        np.testing.assert_array_equal(built['target'][n, :width], built['choices'][n, a])
    ex = built['examples'][0]   # a demonstration from the template's train split (6 rows: "question 0-5")
    assert ex['instruction'].endswith('\n\n' + ex['input']) and 'question' in ex['instruction'].split('\n')[0]
    top = tmp_path / 'top-level'   # the configurations' folders without data/ above them: the same split
    shutil.copytree(os.path.join(p3_dir, 'data'), top)
    names = [c[1] for c in data.p3_configs(p3_args(str(top), tmp_path), 'test')]
    assert names == [c[1] for c in data.p3_configs(args, 'test')] and len(names) == 4


def tiny_model(hint=True):
    cfg = M.PRESETS['tiny']
    hcfg = HN.HyperConfig(adapter_dim=4, prefix_len=2) if hint else None
    params = HN.init_params(cfg, hcfg, jax.random.PRNGKey(0))
    noise = jax.random.PRNGKey(1)   # generators start near zero: make the task state matter
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(noise, x.shape, x.dtype), params)
    return cfg, hcfg, params


@pytest.mark.parametrize('hint', [True, False])
def test_rank_classification_matches_hand_computation(hint):
    cfg, hcfg, params = tiny_model(hint)
    rng = np.random.default_rng(0)
    n, c, lc = 3, 3, 5
    instruction = np.zeros([n, 12], np.int32)
    inputs = np.zeros([n, 10], np.int32)
    choices = np.zeros([n, c, lc], np.int32)
    for i in range(n):
        instruction[i, :4 + 3 * i] = rng.integers(3, 250, 4 + 3 * i)
        inputs[i, :3 + 2 * i] = rng.integers(3, 250, 3 + 2 * i)
        for j in range(c - (i == 2)):   # instance 2 has only 2 choices
            length = 1 + (i + j) % 4
            choices[i, j, :length] = np.append(rng.integers(3, 250, length - 1), 1)
    choices[1, 1] = choices[1, 0]   # a tie: the first one wins
    lengths = np.stack([data.row_lengths(x) for x in (instruction, inputs, choices[:, 0])], 1)   # [N, 3]
    split = {'instruction': instruction, 'input': inputs, 'target': choices[:, 0], 'choices': choices,
             'lengths': lengths,
             'answer': np.array([0, 1, 0], np.int32),
             'examples': [{'id': str(i), 'task': 't', 'category': 'd', 'references': ['x'],
                           'choices': ['a', 'b', 'c'][:c - (i == 2)]} for i in range(n)]}
    scores = E.rank_classify(params, cfg, hcfg, split, batch_size=4)   # chunks of 1 instance: 3 calls
    for i in range(n):
        for j in range(c):
            y = choices[i, j][None]
            if not y.any():
                assert scores[i, j] == -np.inf
                continue
            logits = HN.hint_forward(params, cfg, hcfg, jnp.asarray(instruction[i:i + 1]),
                                     jnp.asarray(inputs[i:i + 1]), M.shift_right(jnp.asarray(y)))
            logp = np.asarray(jax.nn.log_softmax(logits, -1))[0, np.arange(lc), y[0]]
            assert abs(scores[i, j] - (logp * (y[0] != 0)).sum()) < 1e-4
    assert scores[1, 0] == scores[1, 1]
    metrics, rows = E.evaluate(params, cfg, hcfg, split, M.load_tokenizer('byte'), batch_size=64)
    assert [r['prediction'] for r in rows][1] == 'a' and rows[1]['correct'] is False
    assert [r['prediction'] for r in rows] == [['a', 'b', 'c'][int(np.argmax(s))] for s in scores]


def test_p3_metrics_aggregation():
    rows = []
    for template, dataset, right, total in [('a1', 'A', 1, 4), ('a2', 'A', 3, 4), ('a3', 'A', 4, 4),
                                            ('b1', 'B', 1, 2), ('b2', 'B', 0, 2)]:
        rows += [{'task': template, 'category': dataset, 'correct': k < right} for k in range(total)]
    m = E.p3_metrics(rows)
    assert m['per_template'] == {'a1': 25.0, 'a2': 75.0, 'a3': 100.0, 'b1': 50.0, 'b2': 0.0}
    assert m['per_dataset'] == {'A': {'median': 75.0, 'mean': 66.6667, 'templates': 3},
                                'B': {'median': 25.0, 'mean': 25.0, 'templates': 2}}
    assert m['overall'] == {'accuracy_median': 50.0, 'accuracy_mean': 45.8333} and m['count'] == 16


def test_bad_data_errors(tmp_path):
    tok = M.load_tokenizer('byte')
    root = make_p3(tmp_path / 'p3')

    def error(split, **kw):
        with pytest.raises(data.DataError) as e:
            data.load_split(p3_args(root, tmp_path, **kw), split, tok)
        return str(e.value)

    msg = error('train', p3_datasets=('imdb', 'xsum'))
    assert 'xsum' in msg and 'xsum_*' in msg
    msg = error('test', p3_datasets=('super_glue_rte', 'story_cloze_2016'))
    assert 'story_cloze_2016' in msg and 'rocstories' in msg and '--p3-datasets super_glue_rte' in msg
    assert 'story_cloze_2016' in error('test', p3_datasets=())   # T0's whole held-out set needs it
    write_config(root, 'super_glue_rte_a', 'validation', 4, bad=(2, 'answer_choices', []))
    msg = error('test', p3_datasets=('super_glue_rte',))
    assert 'super_glue_rte_a row 2' in msg and 'answer_choices' in msg
    write_config(root, 'super_glue_rte_a', 'validation', 4, bad=(1, 'targets_pretokenized', 'perhaps'))
    msg = error('test', p3_datasets=('super_glue_rte',))
    assert 'super_glue_rte_a row 1' in msg and "'targets_pretokenized' 'perhaps'" in msg
    write_config(root, 'imdb_t2', 'train', 4, choices=False, columns=['inputs_pretokenized'])
    msg = error('train', p3_datasets=('imdb',))
    assert 'imdb_t2' in msg and "missing field 'inputs_pretokenized'" in msg
    assert '0 to 5' in error('train', shots=6)


@pytest.mark.parametrize('baseline', ['none', 'full-input'])   # HINT; the demonstrations in the encoder
def test_train_and_eval_entry_points(p3_dir, tmp_path, baseline):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    out, cache = tmp_path / 'run', str(tmp_path / 'cache')
    argv = [sys.executable, 'train.py', '--task', 'p3', '--data-dir', p3_dir, '--p3-datasets', *DATASETS,
            '--p3-examples-per-dataset', '6', '--shots', '1', '--init', 'tiny', '--tokenizer', 'byte',
            '--batch-size', '4', '--steps', '2', '--adapter-dim', '4', '--prefix-len', '2', '--instruction-len', '128',
            '--input-len', '64', '--target-len', '16', '--out-dir', str(out), '--cache-dir', cache,
            '--baseline', baseline]
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert 'held-out: accuracy_median' in r.stdout
    trained = json.loads((out / 'metrics.json').read_text())
    assert set(trained['per_dataset']) == {'super_glue_rte', 'anli_r1'} and trained['count'] == 12
    assert len(trained['per_template']) == 3
    r = subprocess.run([sys.executable, 'eval.py', '--checkpoint', str(out), '--cache-dir', cache], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads((out / 'metrics.json').read_text()) == trained
