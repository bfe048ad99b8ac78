"""--task p3: templates for the hypernetwork, T0's training mixture (streamed), rank classification
on the held-out datasets, P3 metrics, bad data.

A small fixture in bigscience/P3's layout (data/<configuration>/<split>-00000-of-00001.parquet, P3's
column names) is written by the test with pyarrow; texts are bytes (the byte tokenizer), the model
is `tiny`.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import random
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
import train as T
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ('imdb', 'wiki_qa', 'wiki_hop_original', 'super_glue_rte', 'anli_r1', 'hellaswag')
CHOICES = ['yes', 'no', 'maybe']
WORDS = [a + b for a in ('ka', 'lo', 'mi', 'nu', 'pe', 'ro', 'su', 'ti') for b in 'xyzw']


def field(rng, most=4):
    """Some seeded made-up words: an instance's field."""
    return ' '.join(rng.choice(WORDS) for _ in range(rng.randint(1, most)))


def prompt(config, i):
    """Row i's prompted input: a template of the configuration around two varying fields."""
    rng = random.Random(f'{config}-{i}')
    return f'{config}: Question: {field(rng)}\nContext: {field(rng, 8)}\nAnswer?'


def write_config(root, config, split, n, choices=True, columns=None, bad=None, row_group=None):
    """n rows of one configuration's split; bad = (row, field, value) puts one wrong value in."""
    rows = {'inputs': [[1, 2]] * n,
            'inputs_pretokenized': [prompt(config, i) for i in range(n)],
            'targets': [[3]] * n,
            'targets_pretokenized': [CHOICES[i % 3] if choices else f'answer {i}'
                                     for i in range(n)]}
    if choices:
        rows['answer_choices'] = [list(CHOICES)] * n
    if bad:
        rows[bad[1]] = list(rows[bad[1]])
        rows[bad[1]][bad[0]] = bad[2]
    for c in columns or ():   # drop these columns
        rows.pop(c)
    folder = os.path.join(root, 'data', config)
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.table(rows), os.path.join(folder, f'{split}-00000-of-00001.parquet'),
                   row_group_size=row_group)


def make_p3(root):
    for config, n in (('imdb_t1', 300), ('imdb_t2', 300), ('wiki_qa_Q', 40),
                      ('wiki_hop_original_choose', 60)):
        write_config(root, config, 'train', n, choices=False, row_group=64)
    write_config(root, 'wiki_qa_Q_score_eval', 'train', 10, choices=False)   # never used
    for config in ('super_glue_rte_a', 'super_glue_rte_b', 'anli_GPT_3_style_r1',
                   'anli_GPT_3_style_r2', 'hellaswag_complete', 'hellaswag_how_ends'):
        write_config(root, config, 'train', 6)
        write_config(root, config, 'validation', 4)
    write_config(root, 'super_glue_rte_generate', 'validation', 4, choices=False)   # no choices
    return str(root)


def p3_args(root, tmp, **kw):
    base = dict(task='p3', data_dir=root, p3_datasets=DATASETS, p3_examples_per_dataset=100,
                tokenizer='byte', instruction_len=256, input_len=128, target_len=16,
                cache_dir=str(tmp / 'cache'))
    return data.DataArgs(**{**base, **kw})


@pytest.fixture(scope='module')
def p3_dir(tmp_path_factory):
    return make_p3(tmp_path_factory.mktemp('p3'))


def test_template_derivation():
    rng = random.Random(0)
    shapes = {   # a field at the start, in the middle, at the end; two fields next to each other
        'start': ('{} is what the reviewer wrote. Good?', '[X] is what the reviewer wrote. Good?'),
        'middle': ('Question: {}\nContext: {}\nAnswer:', 'Question: [X]\nContext: [X]\nAnswer:'),
        'end': ('Extract the answer from this text: {}', 'Extract the answer from this text: [X]'),
        'adjacent': ('Name: {} {}. Who is it?', 'Name: [X]. Who is it?'),
    }
    for text, expected in shapes.values():
        prompts = [text.format(*(field(rng) for _ in range(text.count('{}')))) for _ in range(16)]
        template = data.p3_template(prompts)
        assert template == expected
        instance_words = set(' '.join(prompts).split()) - set(text.split())
        assert not set(data.p3_words(template)) & instance_words   # no word of any instance is left
    # a common word inside a varying passage ("the") is a chance match, not the template's
    passages = ['The cat sat on the mat.', 'In the end the hero won.', 'A storm hit the coast.']
    prompts = [f'Passage: {p}\nWhat happened?' for p in passages]
    assert data.p3_template(prompts) == 'Passage: [X].\nWhat happened?'
    rte = [('The Treaty of Paris ended the war in 1783.', 'The war ended in 1783'),
           ('Canberra was chosen as the capital in 1908.', 'Sydney is the capital'),
           ('Honey bees turn nectar into honey in the hive.', 'Bees make honey'),
           ('Jupiter is the largest planet of the Solar System.', 'Mars is the largest planet')]
    prompts = [f'{premise} Question: {hypothesis} True or False?' for premise, hypothesis in rte]
    assert data.p3_template(prompts) == '[X]. Question: [X] True or False?'


def test_templates_and_demonstrations(p3_dir, tmp_path):
    tok = data.load_tokenizer('byte')
    rows, _ = data.build_p3(p3_args(p3_dir, tmp_path, p3_examples=200), 'train', tok)
    for r in rows:   # the hypernetwork reads the template (one for all rows), the encoder the input
        assert r['instruction'] == f'{r["task"]}: Question: [X]\nContext: [X]\nAnswer?'
        group, row = r['id'].split('-')[-2:]
        assert r['input'] == prompt(r['task'], 64 * int(group) + int(row))
    test = data.load_split(p3_args(p3_dir, tmp_path, shots=1), 'test', tok)
    by_template = collections.defaultdict(set)
    for ex, ids in zip(test['examples'], test['instruction']):
        by_template[ex['task']].add(ids.tobytes())
        demo, definition = ex['instruction'].split('\n\n')   # one demonstration, from train
        assert definition == f' Definition: {ex["task"]}: Question: [X]\nContext: [X]\nAnswer?'
        assert any(demo == f'{prompt(ex["task"], i)} Output: {CHOICES[i % 3]}' for i in range(6))
    assert all(len(v) == 1 for v in by_template.values())   # one hypernetwork text per template
    full = data.load_split(p3_args(p3_dir, tmp_path, shots=1, format='full-input', input_len=256),
                           'test', tok)
    for ex, hint in zip(full['examples'], test['examples']):   # full-input: demos in the encoder
        demo = hint['instruction'].split('\n\n')[0]
        assert ex['instruction'] == '' and ex['input'] == demo + '\n\n' + hint['input']


def test_template_file(p3_dir, tmp_path):
    tok = data.load_tokenizer('byte')
    path = tmp_path / 'prompts.txt'   # the original's format; keys are lower-cased
    blocks = ['Super_Glue_RTE\t||||\tA\t||||\tDoes [PREMISE]\n\nimply [HYPOTHESIS]?',
              'super_glue_rte\t||||\tb\t||||\tIs [HYPOTHESIS] true?',
              'anli\t||||\tGPT_3_style_r1\t||||\t[PREMISE] Question: [HYPOTHESIS] True or False?']
    stars = '\n****************************\n'
    path.write_text(stars.join(blocks) + stars)
    args = p3_args(p3_dir, tmp_path, p3_templates=str(path),
                   p3_datasets=('super_glue_rte', 'anli_r1'))
    split = data.load_split(args, 'test', tok)
    texts = {ex['task']: ex['instruction'] for ex in split['examples']}
    assert texts == {'super_glue_rte_a': 'Does [PREMISE]\n\nimply [HYPOTHESIS]?',
                     'super_glue_rte_b': 'Is [HYPOTHESIS] true?',
                     'anli_GPT_3_style_r1': '[PREMISE] Question: [HYPOTHESIS] True or False?'}
    path.write_text(blocks[0])
    with pytest.raises(data.DataError, match='no template for configuration anli_GPT_3_style_r1'):
        data.load_split(args, 'test', tok)


def test_mixture_rates_and_whole_splits(p3_dir, tmp_path):
    args = p3_args(p3_dir, tmp_path, p3_datasets=('imdb', 'wiki_qa', 'wiki_hop_original'))
    configs = data.p3_configs(args, 'train')
    groups = [data.p3_groups(files) for _, _, files, _ in configs]
    state = {'draws': 0, 'counts': [0] * len(configs)}
    draws = list(itertools.islice(data.p3_draws(args, configs, groups, state), 20000))
    # T0's rule, cap 100: imdb (300 > 100 examples, 2 templates) 50 each; wiki_qa 40; wiki_hop 60
    expected = {'imdb_t1': 50, 'imdb_t2': 50, 'wiki_qa_Q': 40, 'wiki_hop_original_choose': 60}
    counts = collections.Counter(configs[t][1] for t, _, _ in draws)
    for config, rate in expected.items():
        assert abs(counts[config] / 20000 / (rate / 200) - 1) < 0.03, (config, counts)
    # each template walks its whole split, shuffled: every pass holds each row exactly once
    rows = [64 * g + j for t, g, j in draws if configs[t][1] == 'imdb_t1']
    assert sorted(rows[:300]) == sorted(rows[300:600]) == list(range(300))
    assert rows[:300] != rows[300:600]
    assert rows[:64] != sorted(rows[:64])
    assert state == {'draws': 20000, 'counts': [counts[c[1]] for c in configs]}


def test_stream_resumes(p3_dir, tmp_path):
    tok = data.load_tokenizer('byte')
    args = p3_args(p3_dir, tmp_path, p3_datasets=('imdb', 'wiki_qa', 'wiki_hop_original'))
    stream = data.p3_stream(args, tok, 8)
    first = [next(stream) for _ in range(5)]
    saved = json.loads(json.dumps(first[1][1]))   # as a checkpoint keeps it
    again = data.p3_stream(args, tok, 8, state=saved)
    for (batch, state), (b, s) in zip(first[2:], again):
        assert state == s and all(np.array_equal(batch[k], b[k]) for k in data.FIELDS)
    assert first[-1][1]['draws'] == 40
    # two hosts: each its half of the same global batch, at the fixed widths
    host = [next(data.p3_stream(args, tok, 8, h, 2)) for h in (0, 1)]
    whole = np.concatenate([b['input'] for b, _ in host])
    batch = first[0][0]
    assert whole.shape == (8, 128)
    assert np.array_equal(whole[:, :batch['input'].shape[1]], batch['input'])
    # in a training batch a template's rows share one instruction id: its task state is made once
    ids, n_tasks = T.task_ids(batch['instruction'], 8, 1)
    templates = {r.tobytes() for r in batch['instruction']}
    assert len(set(ids.tolist())) == len(templates) <= 4 and n_tasks <= 4


def test_held_out_split_exclusions_and_cache(p3_dir, tmp_path):
    tok = data.load_tokenizer('byte')
    args = p3_args(p3_dir, tmp_path, shots=1)
    built = data.load_split(args, 'test', tok)
    cached = data.load_split(args, 'test', tok)
    assert built['skipped'] == {'templates_not_original_task': ['hellaswag_how_ends'],
                                'templates_without_answer_choices': ['super_glue_rte_generate']}
    assert sorted({e['task'] for e in built['examples']}) == [
        'anli_GPT_3_style_r1', 'hellaswag_complete', 'super_glue_rte_a', 'super_glue_rte_b']
    for k in ('choices', 'answer', 'target', 'instruction'):
        np.testing.assert_array_equal(built[k], cached[k])
    assert built['choices'].shape[:2] == (16, 3) and built['choices'].dtype == np.int32
    np.testing.assert_array_equal(built['answer'], [0, 1, 2, 0] * 4)
    for n, a in enumerate(built['answer']):   # the target is the correct choice's tokens
        width = built['choices'].shape[2]
        np.testing.assert_array_equal(built['target'][n, :width], built['choices'][n, a])
    assert set(data.P3_NOT_ORIGINAL) == {
        'hellaswag_Open_ended_completion', 'hellaswag_Appropriate_continuation_Yes_or_No',
        'hellaswag_Reversed_appropriate_continuation_Yes_or_No', 'hellaswag_how_ends',
        'winogrande_winogrande_xl_True_or_False', 'story_cloze_2016_Generate_Ending'}
    top = tmp_path / 'top-level'   # the configurations' folders without data/ above: the same split
    shutil.copytree(os.path.join(p3_dir, 'data'), top)
    names = [c[1] for c in data.p3_configs(p3_args(str(top), tmp_path), 'test')]
    assert names == [c[1] for c in data.p3_configs(args, 'test')] and len(names) == 6


def tiny_model(hint=True):
    cfg = M.PRESETS['tiny']
    hcfg = HN.HyperConfig(adapter_dim=4, prefix_len=2) if hint else None
    params = HN.init_params(cfg, hcfg, jax.random.PRNGKey(0))
    noise = jax.random.PRNGKey(1)   # generators start near zero: make the task state matter
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(noise, x.shape, x.dtype), params)
    return cfg, hcfg, params


@pytest.mark.parametrize('hint', [True, False])
def test_rank_classification_matches_hand_computation(hint, monkeypatch):
    cfg, hcfg, params = tiny_model(hint)
    rng = np.random.default_rng(0)
    n, c, lc = 4, 3, 5
    templates = rng.integers(3, 250, [2, 12])   # instances 0, 2 and 1, 3 share a template
    instruction = np.stack([np.where(np.arange(12) < 6 + 3 * (i % 2), templates[i % 2], 0)
                            for i in range(n)])
    inputs = np.zeros([n, 10], np.int32)
    choices = np.zeros([n, c, lc], np.int32)
    for i in range(n):
        inputs[i, :3 + 2 * i] = rng.integers(3, 250, 3 + 2 * i)
        for j in range(c - (i == 2)):   # instance 2 has only 2 choices
            length = 1 + (i + j) % 4
            choices[i, j, :length] = np.append(rng.integers(3, 250, length - 1), 1)
    choices[1, 1] = choices[1, 0]   # a tie: the first one wins
    lengths = np.stack([data.row_lengths(x) for x in (instruction, inputs, choices[:, 0])], 1)
    split = {'instruction': instruction.astype(np.int32), 'input': inputs, 'target': choices[:, 0],
             'choices': choices, 'lengths': lengths, 'answer': np.array([0, 1, 0, 2], np.int32),
             'skipped': {'templates_not_original_task': ['x_how_ends']},
             'examples': [{'id': str(i), 'task': f't{i % 2}', 'category': 'd', 'references': ['x'],
                           'choices': ['a', 'b', 'c'][:c - (i == 2)]} for i in range(n)]}
    calls, real = [], E.choice_scores   # the instructions rank_classify encodes: one per chunk

    def counted(p, cf, h, ins, x, y):
        calls.append(ins)
        return real(p, cf, h, ins, x, y)

    monkeypatch.setattr(E, 'choice_scores', counted)
    scores = E.rank_classify(params, cfg, hcfg, split, batch_size=6)   # chunks of 2, one template
    assert len(calls) == 2 and all(ins.ndim == 1 for ins in calls)
    assert {tuple(np.asarray(ins)[:6]) for ins in calls} == {tuple(t[:6]) for t in templates}
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
    metrics, rows = E.evaluate(params, cfg, hcfg, split, data.load_tokenizer('byte'), batch_size=64)
    assert [r['prediction'] for r in rows][1] == 'a' and rows[1]['correct'] is False
    assert [r['prediction'] for r in rows] == [['a', 'b', 'c'][int(np.argmax(s))] for s in scores]
    assert metrics['left_out'] == split['skipped']


def test_p3_metrics_aggregation():
    rows = []
    for template, dataset, right, total in [('a1', 'A', 1, 4), ('a2', 'A', 3, 4), ('a3', 'A', 4, 4),
                                            ('b1', 'B', 1, 2), ('b2', 'B', 0, 2)]:
        rows += [{'task': template, 'category': dataset, 'correct': k < right}
                 for k in range(total)]
    m = E.p3_metrics(rows)
    assert m['per_template'] == {'a1': 25.0, 'a2': 75.0, 'a3': 100.0, 'b1': 50.0, 'b2': 0.0}
    assert m['per_dataset'] == {'A': {'mean': 66.6667, 'median': 75.0, 'templates': 3},
                                'B': {'mean': 25.0, 'median': 25.0, 'templates': 2}}
    assert m['overall'] == {'accuracy_mean': 45.8333, 'accuracy_median': 50.0} and m['count'] == 16
    assert list(m['overall']) == ['accuracy_mean', 'accuracy_median']   # the mean is the headline


def test_bad_data_errors(tmp_path):
    tok = data.load_tokenizer('byte')
    root = make_p3(tmp_path / 'p3')

    def error(split, **kw):
        with pytest.raises(data.DataError) as e:
            data.load_split(p3_args(root, tmp_path, **kw), split, tok)
        return str(e.value)

    msg = error('train', p3_datasets=('imdb', 'xsum'))
    assert 'xsum' in msg and 'xsum_*' in msg
    msg = error('test', p3_datasets=('super_glue_rte', 'story_cloze_2016'))
    assert 'story_cloze_2016' in msg and 'docs/data.md' in msg
    assert '--p3-datasets super_glue_rte' in msg
    assert 'story_cloze_2016' in error('test', p3_datasets=())   # T0's whole held-out set needs it
    write_config(root, 'super_glue_rte_a', 'validation', 4, bad=(2, 'answer_choices', []))
    msg = error('test', p3_datasets=('super_glue_rte',))
    assert 'super_glue_rte_a row 2' in msg and 'answer_choices' in msg
    write_config(root, 'super_glue_rte_a', 'validation', 4,
                 bad=(1, 'targets_pretokenized', 'perhaps'))
    msg = error('test', p3_datasets=('super_glue_rte',))
    assert 'super_glue_rte_a row 1' in msg and "'targets_pretokenized' 'perhaps'" in msg
    write_config(root, 'imdb_t2', 'train', 4, choices=False, columns=['inputs_pretokenized'])
    msg = error('train', p3_datasets=('imdb',))
    assert 'imdb_t2' in msg and "missing field 'inputs_pretokenized'" in msg
    assert '0 to 5' in error('train', shots=6)
    assert 'no such file' in error('test', p3_templates=str(tmp_path / 'absent.txt'))


@pytest.mark.parametrize('baseline', ['none', 'full-input'])   # HINT streamed; demos in the encoder
def test_train_and_eval_entry_points(p3_dir, tmp_path, baseline):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    out, cache = tmp_path / 'run', str(tmp_path / 'cache')
    argv = [sys.executable, 'train.py', '--task', 'p3', '--data-dir', p3_dir, '--p3-datasets',
            *DATASETS, '--p3-examples-per-dataset', '100', '--shots', '1', '--init', 'tiny',
            '--tokenizer', 'byte', '--batch-size', '4', '--steps', '2', '--adapter-dim', '4',
            '--prefix-len', '2', '--instruction-len', '128', '--input-len', '64',
            '--target-len', '16', '--out-dir', str(out), '--cache-dir', cache,
            '--baseline', baseline] + ['--p3-examples', '40'] * (baseline == 'full-input')
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert 'held-out: accuracy_mean' in r.stdout and 'hellaswag_how_ends' in r.stderr
    trained = json.loads((out / 'metrics.json').read_text())
    assert set(trained['per_dataset']) == {'super_glue_rte', 'anli_r1', 'hellaswag'}
    assert trained['count'] == 16
    assert len(trained['per_template']) == 4
    assert trained['left_out']['templates_not_original_task'] == ['hellaswag_how_ends']
    stream = runs.read_meta(runs.checkpoints(str(out))[-1]).get('stream')
    if baseline == 'none':   # the mixture's position after 2 steps of 4 rows, kept for --resume
        assert stream == [{'draws': 8, 'counts': stream[0]['counts']}]
        assert sum(stream[0]['counts']) == 8
    r = subprocess.run([sys.executable, 'eval.py', '--checkpoint', str(out), '--cache-dir', cache],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads((out / 'metrics.json').read_text()) == trained
