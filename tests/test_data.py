"""Tests for data.py: synthetic suite, SNI formatting and errors, C4 cutting, the cache and batches."""
import collections
import dataclasses
import gzip
import itertools
import json
import os
import random
import shutil
import string
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import data  # noqa: E402
from data import load_tokenizer  # noqa: E402

SHARED = os.path.join(os.path.dirname(__file__), '..', '..', 'shared')
SNI = os.path.join(SHARED, 'data', 'sni_sample')
SPIECE = os.path.join(SHARED, 'assets', 't5_tokenizer', 'spiece.model')
BYTE = load_tokenizer('byte')


def need(path):
    if not os.path.exists(path):
        pytest.skip(f'{path} not found (the shared folder next to the repo is absent)')


@pytest.fixture(scope='module')
def spiece():
    need(SPIECE)
    return load_tokenizer(SPIECE)


@pytest.fixture(scope='module', autouse=True)
def module_cache(tmp_path_factory):
    global CACHE   # one cache for the module, so tests share builds (tests of the cache itself use their own)
    CACHE = str(tmp_path_factory.mktemp('cache'))


def load(split='train', tokenizer=BYTE, **kw):
    kw.setdefault('cache_dir', CACHE)
    return data.load_split(data.DataArgs(**kw), split, tokenizer)


def check_arrays(d, args, tokenizer):
    """Shapes = lengths(args); each row is its (possibly truncated) text's ids, then EOS, then padding."""
    for key, width in zip(('instruction', 'input', 'target'), data.lengths(args)):
        assert d[key].shape == (len(d['examples']), width) and d[key].dtype == np.int32
        for row, ex in zip(d[key], d['examples']):
            n = int((row != 0).sum())
            assert (row[n:] == 0).all()
            if ex[key]:   # whole text, or (cut) the example text is the decoded ids of a full row
                assert row[n - 1] == tokenizer.eos_id and n <= width
                assert (row[:n - 1].tolist() == tokenizer.encode(ex[key])
                        or (n == width and tokenizer.decode(row) == ex[key])), (key, ex[key])
            elif key == 'target':   # an empty reference: EOS alone (the model learns to stop at once)
                assert row[:n].tolist() == [tokenizer.eos_id]
            else:
                assert n == 0


# ---------------------------------------------------------------------------------------------- synthetic

def test_synthetic_defaults_fit_and_are_deterministic(tmp_path):
    for shots, fmt in ((0, 'hint'), (1, 'hint'), (2, 'hint'), (2, 'full-input')):
        args = data.DataArgs(shots=shots, format=fmt, cache_dir=CACHE)
        for split in ('train', 'test'):
            d = data.load_split(args, split, BYTE)
            assert d['truncated'] == {'instruction': 0, 'input': 0, 'target': 0}, (shots, fmt, split)
            assert d['skipped'] == {}
            check_arrays({k: d[k][::7] for k in ('instruction', 'input', 'target', 'examples')}, args, BYTE)
    for split in ('train', 'test'):   # rebuilt from scratch in another cache: the same data
        args = data.DataArgs(shots=2, cache_dir=CACHE)
        d = data.load_split(args, split, BYTE)
        again = data.load_split(dataclasses.replace(args, cache_dir=str(tmp_path / 'b')), split, BYTE)
        assert again['examples'] == d['examples']
        for k in ('instruction', 'input', 'target'):
            np.testing.assert_array_equal(again[k], d[k])
    assert data.lengths(data.DataArgs()) == (64, 32, 32)
    for task, fmt, expected in (('ni', 'hint', (1024, 1024, 256)), ('ni', 'full-input', (1, 1024, 256)),
                                ('c4', 'hint', (512, 512, 512)), ('c4', 'full-input', (1, 1024, 512))):
        assert data.lengths(data.DataArgs(task=task, format=fmt)) == expected
    assert data.lengths(data.DataArgs(task='ni', instruction_len=7, input_len=8, target_len=9)) == (7, 8, 9)
    assert data.lengths(data.DataArgs(shots=2, format='full-input')) == (1, 208 + 32, 32)
    train = load()
    assert 300 <= len({e['task'] for e in train['examples']}) and 10000 <= len(train['examples']) <= 20000
    assert len({e['category'] for e in train['examples']}) == 10


def test_synthetic_seed_changes_train_not_test(tmp_path):
    a, b = load(seed=0), load(seed=1)
    assert [e['input'] for e in a['examples']] != [e['input'] for e in b['examples']]
    ta = load('test', seed=0, shots=2)
    tb = load('test', seed=1, shots=2, cache_dir=str(tmp_path / 'other'))
    assert ta['examples'] == tb['examples']


def test_synthetic_heldout_instructions_are_unseen():
    train, test = load(shots=0), load('test', shots=0)
    train_instr = {e['instruction'] for e in train['examples']}
    test_instr = {e['instruction'] for e in test['examples']}
    assert len(test_instr) == 72 and not train_instr & test_instr
    # unseen PARAMETERS of seen families: the task name is family:parameter:phrasing
    params = lambda d: {tuple(e['task'].split(':')[:2]) for e in d['examples']}
    assert not params(train) & params(test)
    assert {e['category'] for e in test['examples']} < {e['category'] for e in train['examples']}
    assert ('replace', 'a>j') in params(test) and ('replace', 'a>b') in params(train)
    assert all(len(list(g)) == 20 for _, g in itertools.groupby(e['task'] for e in test['examples']))
    # every instance of a task shares one instruction text (eval encodes it once per task)
    per_task = collections.defaultdict(set)
    for e in load('test', shots=2)['examples']:
        per_task[e['task']].add(e['instruction'])
    assert all(len(v) == 1 for v in per_task.values())


def test_synthetic_same_input_different_outputs():
    items = 'a c b a d'.split()
    outs = {f'{f}:{p}': data.synthetic_output(f, p, items) for f, p in [
        ('reverse', None), ('sort', 'ascending'), ('first', 2), ('last', 2), ('item', 3), ('drop', 'a'),
        ('replace', ('a', 'e')), ('double', 'a'), ('count', 'a')]}
    assert outs == {'reverse:None': 'd a b c a', 'sort:ascending': 'a a b c d', 'first:2': 'a c', 'last:2': 'a d',
                    'item:3': 'b', 'drop:a': 'c b d', "replace:('a', 'e')": 'e c b e d',
                    'double:a': 'a a c b a a d', 'count:a': '2'}
    assert data.synthetic_output('add', 7, '3 9'.split()) == '10 16'
    # in the data itself, inputs seen under several tasks mostly get different outputs
    by_input = collections.defaultdict(dict)
    for e in load()['examples']:
        by_input[e['input']][e['task']] = e['target']
    shared = [v for v in by_input.values() if len(v) > 1]
    assert len(shared) > 300
    assert sum(len(set(v.values())) > 1 for v in shared) > 0.9 * len(shared)


def test_synthetic_texts():
    d = load('test', shots=2)
    ex = next(e for e in d['examples'] if e['task'] == 'replace:a>j:0')
    assert ex['instruction'].startswith('Replace every a with j.\n\nExample 1 -\nInput: ')
    assert ex['instruction'].endswith('\n\n') and ex['instruction'].count('Example') == 2
    items = ex['input'].removeprefix('Input: ').removesuffix('\nOutput:').split(' ')
    assert ex['target'] == ' '.join('j' if x == 'a' else x for x in items) and 'a' in items
    one = load('test', shots=1)['examples'][d['examples'].index(ex)]
    assert ex['instruction'].startswith(one['instruction'])   # the demos of 1 shot are those of 2 shots
    for split in ('train', 'test'):   # shots change the instruction only, never the instances
        runs = [load(split, shots=k)['examples'] for k in (0, 2)]
        assert [(e['id'], e['input'], e['target']) for e in runs[0]] == [(e['id'], e['input'], e['target'])
                                                                         for e in runs[1]]
        for e in runs[0]:   # never a no-op: the output always differs from the input list
            assert e['target'] and e['target'] != e['input'].removeprefix('Input: ').removesuffix('\nOutput:')
    full = load('test', shots=2, format='full-input')
    for h, f, ids in zip(d['examples'], full['examples'], full['input']):
        assert f['instruction'] == '' and f['input'] == h['instruction'] + h['input']
        assert BYTE.decode(ids) == f['input']
    assert (full['instruction'] == 0).all() and full['instruction'].shape == (len(d['examples']), 1)


# ---------------------------------------------------------------------------------------------- SNI

T063_DEF = ('Definition: In this task, you are given inputs i and A, where i is an integer and A is a list. You need '
            'to output the first i elements of A, starting with the 1st element in A. i will always have a value '
            'less than the length of A.\n\n')
T063_POS = (" Positive Example 1 -\nInput: 3, ['a', '34', 'f', '931', '7', '3432', '13245', '762']\n"
            " Output: a, 34, f.\n\n"
            " Positive Example 2 -\nInput: 6, ['5191', '9389', '9907', '8877', 'N', '6453', 's', 'k', '6209', 'W', "
            "'4591', 'B', 'p']\n Output: 5191, 9389, 9907, 8877, N, 6453.\n\n")
T063_INST = ("Now complete the following example -\nInput: 7, ['q', 'q', '6047', 'e', '4093', 'w', 'D', '2021', 'R', "
             "'j', '1003', 'Y', 'L', 'Q', 'I', 'F', 'B', '8745', 'H', 'Z', 'O', 'g']\nOutput: ")
T1564_DEF = 'Definition: In this task you are given a question. You need to generate an answer to the question.\n\n'
T1564_POS = (' Positive Example 1 -\nInput: Question:Who was the man behind The Chipmunks?\n Output: David Seville.\n\n'
             ' Positive Example 2 -\nInput: Question:What star sign is Jamie Lee Curtis?\n Output: Scorpio.\n\n')
T1564_INST = ('Now complete the following example -\nInput: Question:Who was married to Whitney Houston from 1992 to '
              '2007?\nOutput: ')


def first(d, task):
    """The row of the task's first instance in its file (train rows come in a seeded shuffle)."""
    iid = read_task(task)['Instances'][0]['id']
    return next(e for e in d['examples'] if e['id'] == iid)


@pytest.mark.parametrize('task,definition,positives,instance,target', [
    ('task063_first_i_elements', T063_DEF, T063_POS, T063_INST, 'q, q, 6047, e, 4093, w, D'),
    ('task1564_triviaqa_answer_generation', T1564_DEF, T1564_POS, T1564_INST, 'bobby brown')])
def test_tk_instruct_texts_written_by_hand(spiece, task, definition, positives, instance, target):
    need(SNI)
    for shots in (0, 2):
        kw = dict(tokenizer=spiece, task='ni', data_dir=SNI, shots=shots)
        split = first(load(format='split', **kw), task)
        full = first(load(format='full-input', **kw), task)
        instruction = definition + (positives if shots else '')
        assert (split['instruction'], split['input']) == (instruction, instance)
        assert (full['instruction'], full['input']) == ('', instruction + instance)
        assert split['target'] == full['target'] == target
        assert split['id'] == full['id'] and split['references'] == [target]
    category = {'task063_first_i_elements': 'Program Execution'}.get(task, 'Question Answering')
    assert split['category'] == category


def hint_instruction(task: dict, shots: int, limit: int, tokenizer) -> str:
    """HINT.md section 6, written out from its words (not from data.py)."""
    def dot(s):
        return s if s[-1] in string.punctuation else s + '.'
    if shots == 0:
        return task['Definition'][0].strip()
    text = 'Definition: ' + task['Definition'][0]
    for i, ex in enumerate(task['Positive Examples'][:shots], 1):
        e = dot(f' Positive Example {i} -\nInput: ' + ex['input'].strip()) + '\n'
        e = dot(e + ' Output: ' + ex['output'].strip()) + '\n'
        if len(tokenizer.encode(text + e)) + 1 <= limit:   # + EOS
            text = e + text
    return text


def read_task(name: str) -> dict:
    with open(os.path.join(SNI, 'tasks', name + '.json')) as f:
        return json.load(f)


def test_hint_texts_are_the_originals(spiece):
    """--format hint, every row of both splits: the hypernetwork reads Def / Def+1Pos / Def+2Pos as
    the original's natural_instructions(_positive_example_hyper_k), the encoder the raw input."""
    need(SNI)
    loaded = {}
    for split, shots in itertools.product(('train', 'test'), (0, 1, 2)):
        d = load(split, tokenizer=spiece, task='ni', data_dir=SNI, shots=shots)
        check_arrays(d, data.DataArgs(task='ni'), spiece)
        for ex in d['examples']:
            task = read_task(ex['task'])
            inst = next(i for i in task['Instances'] if i['id'] == ex['id'])
            assert ex['input'] == inst['input']
            assert ex['instruction'] == hint_instruction(task, shots, 1024, spiece)
            assert ex['instruction'].count('Positive Example') == shots   # the sample's fit 1024
        loaded[split, shots] = d
    t1564 = [first(loaded['train', k], 'task1564_triviaqa_answer_generation') for k in (0, 1, 2)]
    definition = ('In this task you are given a question. You need to generate an answer to the '
                  'question.')
    pos1 = (' Positive Example 1 -\nInput: Question:Who was the man behind The Chipmunks?\n'
            ' Output: David Seville.\n')
    pos2 = (' Positive Example 2 -\nInput: Question:What star sign is Jamie Lee Curtis?\n'
            ' Output: Scorpio.\n')
    assert [e['instruction'] for e in t1564] == [definition, pos1 + 'Definition: ' + definition,
                                                 pos2 + pos1 + 'Definition: ' + definition]
    assert t1564[0]['input'] == 'Question:Who was married to Whitney Houston from 1992 to 2007?'


def test_hint_examples_go_in_front_while_they_fit(spiece):
    """Each example goes in front when text + example fits the instruction length; one that does
    not fit is left out and the next one is still tried."""
    need(SNI)
    name = 'task1564_triviaqa_answer_generation'
    task = read_task(name)
    two = len(spiece.encode(hint_instruction(task, 2, 1024, spiece))) + 1
    one = len(spiece.encode(hint_instruction(task, 1, 1024, spiece))) + 1
    # (examples kept): at one - 1, example 1 does not fit, and the shorter example 2 still does
    for limit, kept in ((two, [2, 1]), (two - 1, [1]), (one, [1]), (one - 1, [2])):
        kw = dict(tokenizer=spiece, task='ni', data_dir=SNI, shots=2, instruction_len=limit)
        ex = first(load(**kw), name)
        assert ex['instruction'] == hint_instruction(task, 2, limit, spiece)
        assert [k for k in (2, 1) if f'Positive Example {k} -' in ex['instruction']] == kept


def test_ni_train_instances_are_a_seeded_shuffle():
    need(SNI)
    def ids(split, seed, name):
        d = load(split, task='ni', data_dir=SNI, seed=seed, max_instances_per_task=5)
        return [e['id'] for e in d['examples'] if e['task'] == name]
    name = 'task082_babi_t1_single_supporting_fact_question_generation'   # train, 27 instances
    in_file = [i['id'] for i in read_task(name)['Instances']]
    train = ids('train', 0, name)
    assert len(train) == 5 and train == ids('train', 0, name) and set(train) <= set(in_file)
    assert train != ids('train', 1, name) and train != in_file[:5]
    order = list(range(len(in_file)))
    random.Random(0).shuffle(order)   # Tk-Instruct's loader: random.Random(seed).shuffle, then [:N]
    assert train == [in_file[k] for k in order[:5]]
    name = 'task1409_dart_text_generation'   # the test split: the first ones, whatever the seed
    in_file = [i['id'] for i in read_task(name)['Instances']]
    assert ids('test', 1, name) == ids('test', 0, name) == in_file[:5]


def test_ni_split_and_full_input_agree_and_arrays(spiece):
    need(SNI)
    for split, n in (('train', 413), ('test', 248)):
        for limit in (1024, 200):   # at 200 some examples are dropped (and some texts truncated)
            kw = dict(task='ni', data_dir=SNI, shots=2, instruction_len=limit, input_len=limit, split=split)
            hint = load(tokenizer=spiece, format='split', **kw)
            full = load(tokenizer=spiece, format='full-input', **kw)
            assert len(hint['examples']) == n and hint['skipped'] == {}
            check_arrays(hint, data.DataArgs(task='ni', instruction_len=limit, input_len=limit), spiece)
            same = 0
            for h, f, row in zip(hint['examples'], full['examples'], full['input']):
                if (row != 0).sum() < limit:   # full text not cut: the two formats hold the same text
                    assert f['input'] == h['instruction'] + h['input']
                    same += 1
            assert same > n // 2
            if limit == 1024:
                assert same == n and full['truncated']['input'] == 0
    one = [e['instruction'].count('Positive Example') for e in hint['examples']]
    assert 0 in one or 1 in one   # at 200 tokens some instructions could not take both examples


def test_ni_examples_added_only_while_they_fit(spiece):
    need(SNI)
    task = 'task1564_triviaqa_answer_generation'
    pos1 = T1564_POS[:T1564_POS.index(' Positive Example 2')]
    fits1 = len(spiece.encode(T1564_DEF + pos1 + T1564_INST)) + 1   # + EOS
    assert len(spiece.encode(T1564_DEF + T1564_POS + T1564_INST)) + 1 > fits1
    for limit, expected in ((fits1, pos1), (fits1 - 1, '')):
        hint = first(load(tokenizer=spiece, task='ni', data_dir=SNI, shots=2, instruction_len=limit,
                          format='split'), task)
        full = first(load(tokenizer=spiece, task='ni', data_dir=SNI, shots=2, input_len=limit,
                          format='full-input'), task)
        assert hint['instruction'] == T1564_DEF + expected and hint['input'] == T1564_INST
        assert full['input'] == T1564_DEF + expected + T1564_INST


def test_ni_truncates_by_tokens(spiece):
    need(SNI)
    d = load(tokenizer=spiece, task='ni', data_dir=SNI, format='split', instruction_len=16,
             input_len=12, target_len=4)
    n = d['examples'].index(first(d, 'task063_first_i_elements'))
    for key, text, width in (('instruction', T063_DEF, 16), ('input', T063_INST, 12)):
        ids = spiece.encode(text)
        assert len(ids) > width   # the text is long: it is cut to width-1 TOKENS, then EOS
        assert d[key][n].tolist() == ids[:width - 1] + [1]
        assert d['examples'][n][key] == spiece.decode(ids[:width - 1])   # the example text is the decoded cut ids
    assert d['target'][n].tolist() == spiece.encode('q, q, 6047, e, 4093, w, D')[:3] + [1]
    assert d['examples'][n]['references'] == ['q, q, 6047, e, 4093, w, D']   # references stay whole
    assert d['truncated']['instruction'] == len(d['examples'])


def test_ni_targets_and_references(tmp_path):
    need(SNI)
    task = 'task082_babi_t1_single_supporting_fact_question_generation'
    picks = {}
    for seed in (0, 1, 2):
        d = load(task='ni', data_dir=SNI, seed=seed)
        ex = [e for e in d['examples'] if e['task'] == task]
        assert all(e['target'] in e['references'] for e in ex)
        picks[seed] = [e['target'] for e in ex]
        assert picks[seed] == [e['target'] for e in load(task='ni', data_dir=SNI, seed=seed,
                                                          cache_dir=str(tmp_path / f's{seed}'))['examples']
                               if e['task'] == task]
    assert picks[0] != picks[1] != picks[2]
    test = load('test', task='ni', data_dir=SNI)
    ex = first(test, 'task1409_dart_text_generation')
    assert ex['target'] == ex['references'][0] and len(ex['references']) == 2
    assert ex['references'][0].startswith('For cheap French food') and ex['category'] == 'Data to Text'
    assert len(load('test', task='ni', data_dir=SNI, max_instances_per_task=5)['examples']) == 30


# SNI bad input: copy the sample, corrupt it, expect a DataError naming the file and the field.

@pytest.fixture
def clone(tmp_path):
    need(SNI)
    root = tmp_path / 'ni'
    shutil.copytree(SNI, root)
    return root


def edit(clone, name, fn):
    path = clone / 'tasks' / f'{name}.json'
    task = json.loads(path.read_text())
    fn(task)
    path.write_text(json.dumps(task))
    return str(path)


def expect_error(clone, *needles, split='train', **kw):
    with pytest.raises(data.DataError) as e:
        load(split, task='ni', data_dir=str(clone) if clone else None, **kw)
    for s in needles:
        assert s in str(e.value), (s, str(e.value))


def test_ni_bad_data_dir(tmp_path):
    # no --data-dir: a clone of --ni-source is tried; one that cannot be cloned says what to do instead
    expect_error(None, 'could not clone', 'git clone --depth 1', 'pass --data-dir',
                 ni_source=str(tmp_path / 'no-such-repo'), cache_dir=str(tmp_path / 'cache'))
    assert not os.path.exists(tmp_path / 'cache' / 'natural-instructions.partial')
    (tmp_path / 'empty').mkdir()
    expect_error(tmp_path / 'empty', 'not a natural-instructions clone', 'train_tasks.txt',
                 str(tmp_path / 'empty' / 'tasks'), 'docs/data.md')
    with pytest.raises(data.DataError, match='train or test'):
        load('dev')


def test_ni_missing_task_file(clone):
    os.remove(clone / 'tasks' / 'task828_copa_commonsense_cause_effect.json')
    load('train', task='ni', data_dir=str(clone))   # the train split does not need it
    expect_error(clone, 'task828_copa_commonsense_cause_effect', 'test_tasks.txt line 4', split='test')


def test_ni_invalid_json(clone):
    path = clone / 'tasks' / 'task379_agnews_topic_classification.json'
    text = path.read_text()
    path.write_text(text[:300] + ',,' + text[300:])
    expect_error(clone, str(path), 'JSONDecodeError', 'line ', 'column ')


@pytest.mark.parametrize('field', ['Definition', 'Instances', 'Positive Examples', 'Categories'])
def test_ni_missing_task_field(clone, field):
    path = edit(clone, 'task1564_triviaqa_answer_generation', lambda t: t.pop(field))
    expect_error(clone, path, f"missing field '{field}'")


@pytest.mark.parametrize('field', ['input', 'output', 'id'])
def test_ni_missing_instance_field(clone, field):
    path = edit(clone, 'task1564_triviaqa_answer_generation', lambda t: t['Instances'][2].pop(field))
    expect_error(clone, path, 'Instances[2]', f"missing field '{field}'")


def test_ni_bad_example_and_types(clone):
    path = edit(clone, 'task063_first_i_elements', lambda t: t['Positive Examples'][1].pop('output'))
    with pytest.raises(data.DataError, match=r"Positive Examples\[1\]: missing field 'output'"):
        load(task='ni', data_dir=str(clone), shots=2)
    load(task='ni', data_dir=str(clone), shots=1)   # the second example is not used with 1 shot
    edit(clone, 'task063_first_i_elements', lambda t: t.update(Definition='not a list'))
    expect_error(clone, path, "field 'Definition' must be a list")
    edit(clone, 'task063_first_i_elements', lambda t: t.update(Definition=[]))
    expect_error(clone, path, "field 'Definition' must be a non-empty list of strings")


def test_ni_instance_without_outputs_is_an_error(clone):
    path = edit(clone, 'task363_sst2_polarity_classification', lambda t: t['Instances'][1].update(output=[]))
    expect_error(clone, path, 'Instances[1]', 'empty list')


def test_ni_empty_outputs_are_kept_as_references(clone, capsys):
    """As Tk-Instruct: references are the whole output list ('' included) and no instance is skipped;
    the train target is a seeded choice among all outputs, the test target the first; '' -> EOS alone."""
    def blank(t):
        t['Instances'][0]['output'] = ['', ' ']
        t['Instances'][1]['output'] = ['', 'yes']
    edit(clone, 'task1564_triviaqa_answer_generation', blank)
    edit(clone, 'task1409_dart_text_generation', lambda t: t['Instances'][0].update(output=['', 'x']))
    picked = set()
    for seed in (0, 1, 2, 3):
        d = load('train', task='ni', data_dir=str(clone), seed=seed)
        assert d['skipped'] == {} and len(d['examples']) == 413
        with open(clone / 'tasks' / 'task1564_triviaqa_answer_generation.json') as f:
            edited = [i['id'] for i in json.load(f)['Instances'][:2]]   # train rows come shuffled
        ex = [next((n, e) for n, e in enumerate(d['examples']) if e['id'] == iid) for iid in edited]
        assert [e['references'] for _, e in ex] == [['', ' '], ['', 'yes']]
        for n, e in ex:
            assert e['target'] == random.Random(f'{seed}:{e["id"]}').choice(e['references'])
            if e['target'] == '':   # '' -> EOS alone, as Tk-Instruct's tokenizer gives
                assert d['target'][n].tolist() == [1] + [0] * (d['target'].shape[1] - 1)
            picked.add(e['target'])
    assert picked == {'', ' ', 'yes'}   # the empty output is a possible train target too
    assert "skipped {}" in capsys.readouterr().err
    test = load('test', task='ni', data_dir=str(clone))
    n, ex = next((n, e) for n, e in enumerate(test['examples']) if e['task'] == 'task1409_dart_text_generation')
    assert len(test['examples']) == 248 and ex['references'] == ['', 'x'] and ex['target'] == ''
    assert test['target'][n].tolist() == [1] + [0] * (test['target'].shape[1] - 1)


def test_ni_cli(tmp_path, spiece):
    need(SNI)
    cmd = [sys.executable, os.path.join(REPO, 'data.py'), '--task', 'ni', '--data-dir', SNI, '--split', 'test',
           '--shots', '2', '--tokenizer', SPIECE, '--show', '3', '--cache-dir', str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(lines) == 3 and set(lines[0]) == {'task', 'id', 'instruction', 'input', 'target', 'references'}
    assert lines[0]['task'] == 'task880_schema_guided_dstc8_classification'
    assert lines[0]['instruction'].count('Positive Example') == 2
    bad = subprocess.run(cmd[:4] + ['--data-dir', '/nonexistent'], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and 'docs/data.md' in bad.stderr and 'Traceback' not in bad.stderr


# ---------------------------------------------------------------------------------------------- cache

def test_cache_is_reused_and_invalidated(clone, tmp_path, monkeypatch):
    kw = dict(task='ni', data_dir=str(clone), shots=2, cache_dir=str(tmp_path / 'c'))
    tok = load_tokenizer('byte')
    a = data.load_split(data.DataArgs(**kw), 'test', tok)
    monkeypatch.setattr(tok, 'encode', lambda text: pytest.fail('tokenized again instead of reading the cache'))
    b = data.load_split(data.DataArgs(**kw), 'test', tok)
    assert a['examples'] == b['examples'] and a['skipped'] == b['skipped']
    for k in ('instruction', 'input', 'target'):
        np.testing.assert_array_equal(a[k], b[k])
        assert b[k].dtype == np.int32
    for changed in (dict(shots=1), dict(format='full-input'), dict(max_instances_per_task=3), dict(target_len=9)):
        with pytest.raises(pytest.fail.Exception):   # any argument that matters rebuilds
            data.load_split(data.DataArgs(**{**kw, **changed}), 'test', tok)
    path = clone / 'tasks' / 'task1390_wscfixed_coreference.json'
    path.write_text(path.read_text() + ' ')   # a source file changed: rebuild
    with pytest.raises(pytest.fail.Exception):
        data.load_split(data.DataArgs(**kw), 'test', tok)
    assert len(os.listdir(tmp_path / 'c')) == 1   # no temporary files left behind


def test_synthetic_cache_hit(tmp_path, monkeypatch):
    tok = load_tokenizer('byte')
    a = load(tokenizer=tok, cache_dir=str(tmp_path))
    monkeypatch.setattr(tok, 'encode', lambda text: pytest.fail('tokenized again'))
    assert load(tokenizer=tok, cache_dir=str(tmp_path))['examples'] == a['examples']
    with pytest.raises(pytest.fail.Exception):
        load(tokenizer=tok, cache_dir=str(tmp_path), seed=1)


# ---------------------------------------------------------------------------------------------- batches

def toy(n):
    rows = np.arange(n, dtype=np.int32)[:, None]
    return {'instruction': rows, 'input': rows + 100, 'target': rows + 200}


def take(gen, k):
    return [next(gen) for _ in range(k)]


def test_batches_deterministic_epochs_and_resume():
    d = toy(10)
    a = take(data.batches(d, 4, seed=3), 10)
    b = take(data.batches(d, 4, seed=3), 10)
    assert all((x['input'] == y['input']).all() for x, y in zip(a, b))
    assert all((x['input'] == x['instruction'] + 100).all() and (x['target'] == x['instruction'] + 200).all()
               for x in a)   # rows stay aligned across the three arrays
    stream = np.concatenate([x['instruction'][:, 0] for x in a])   # 40 positions = 4 epochs of 10
    for e in range(4):
        assert sorted(stream[10 * e:10 * e + 10]) == list(range(10))
    assert list(stream[:10]) != list(stream[10:20])   # each epoch its own permutation
    c = take(data.batches(d, 4, seed=4), 3)
    assert any((x['input'] != y['input']).any() for x, y in zip(a, c))
    resumed = take(data.batches(d, 4, seed=3, start_step=7), 3)
    assert all((x['input'] == y['input']).all() for x, y in zip(a[7:], resumed))


def test_batches_process_shares():
    d = toy(13)
    glob = take(data.batches(d, 8, seed=1, start_step=5), 4)
    shares = [take(data.batches(d, 8, seed=1, start_step=5, process_index=i, process_count=4), 4) for i in range(4)]
    for s in range(4):
        parts = [shares[i][s]['input'] for i in range(4)]
        assert all(p.shape == (2, 1) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), glob[s]['input'])
    with pytest.raises(ValueError):
        next(data.batches(d, 6, seed=0, process_count=4))
    small = take(data.batches(toy(3), 8, seed=0), 2)   # a batch larger than the data spans several epochs
    assert sorted(small[0]['instruction'][:3, 0]) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- C4

LOREM = 'lorem ipsum dolor sit amet '
DOCS = [f'Document {i}: ' + LOREM[:3 + 7 * i % 25] for i in range(40)] + ['', 'x']   # 1 to 40 bytes
LENS = dict(instruction_len=16, input_len=16, target_len=16)   # windows of 16 tokens (bytes)


def write_shard(path, docs):
    with gzip.open(path, 'wt', encoding='utf-8') as f:
        for doc in docs:
            f.write(json.dumps({'text': doc, 'url': 'http://x'}) + '\n')


@pytest.fixture
def c4dir(tmp_path):
    root = tmp_path / 'c4'
    root.mkdir()
    write_shard(root / 'c4-train.00000-of-00002.json.gz', DOCS[:20])
    write_shard(root / 'c4-train.00001-of-00002.json.gz', DOCS[20:])
    write_shard(root / 'c4-validation.00000-of-00001.json.gz', DOCS[:10])
    return root


def unpadded(row):
    return row[:int((row != 0).sum())].tolist()


def windows_of(d):
    """Each row's three parts without their EOS, one after the other."""
    parts = zip(*(d[k] for k in ('instruction', 'input', 'target')))
    return [sum((unpadded(p)[:-1] for p in row if unpadded(p)), []) for row in parts]


def cut_points(d):
    """[(instruction tokens, input tokens)] of each row, EOS not counted."""
    pairs = zip(d['instruction'], d['input'])
    return [(len(unpadded(a)) - 1, len(unpadded(b)) - 1) for a, b in pairs]


def test_c4_rows_are_windows_of_the_document_stream(c4dir, tmp_path):
    """t5's prefix-LM windows: the documents' tokens one after the other, cut into windows of 16
    that cross document ends; each window cut in three, every part closed by EOS (an empty input
    too)."""
    stream = sum((BYTE.encode(doc) for doc in DOCS), [])
    d = load(task='c4', data_dir=str(c4dir), seed=5, **LENS)
    assert len(d['examples']) == len(stream) // 16
    assert d['truncated'] == dict.fromkeys(data.FIELDS, 0)
    assert windows_of(d) == [stream[i:i + 16] for i in range(0, len(stream) // 16 * 16, 16)]
    cuts = cut_points(d)
    assert all(a >= 1 and a + n <= 16 - 3 for a, n in cuts)   # a in [1, L-2), b = a + n in [a, L-2)
    assert all(unpadded(row)[-1] == 1 for k in data.FIELDS for row in d[k])
    assert len({a for a, _ in cuts}) > 5 and (0 in {n for _, n in cuts})   # the input may be empty
    again = load(task='c4', data_dir=str(c4dir), seed=5, cache_dir=str(tmp_path / 'x'), **LENS)
    assert again['examples'] == d['examples']
    assert cut_points(load(task='c4', data_dir=str(c4dir), seed=6, **LENS)) != cuts
    few = load(task='c4', data_dir=str(c4dir), seed=5, c4_documents=10, **LENS)   # the same windows
    first10 = sum((BYTE.encode(doc) for doc in DOCS[:10]), [])
    assert windows_of(few) == windows_of(d)[:len(first10) // 16]
    assert (few['instruction'] == d['instruction'][:len(first10) // 16]).all()
    test = load('test', task='c4', data_dir=str(c4dir), seed=5, **LENS)
    seed0 = load('test', task='c4', data_dir=str(c4dir), seed=0, **LENS)
    assert cut_points(test) == cut_points(seed0)   # the test split never depends on --seed
    assert windows_of(test) == [first10[i:i + 16] for i in range(0, len(first10) // 16 * 16, 16)]
    full = load(task='c4', data_dir=str(c4dir), seed=5, format='full-input', **LENS)
    assert (full['instruction'] == 0).all() and (full['target'] == d['target']).all()
    assert windows_of(full) == windows_of(d)   # input = window[:b]


def test_c4_in_memory_and_streamed_windows_agree(c4dir):
    args = data.DataArgs(task='c4', data_dir=str(c4dir), seed=5, cache_dir=CACHE, **LENS)
    streamed = [b for b, _ in itertools.islice(data.c4_stream(args, BYTE, 4), 3)]
    d = load(task='c4', data_dir=str(c4dir), seed=5, c4_documents=1000, **LENS)
    for k in data.FIELDS:
        np.testing.assert_array_equal(np.concatenate([b[k] for b in streamed]), d[k][:12])


def test_c4_truncation_and_errors(c4dir, tmp_path):
    d = load(task='c4', data_dir=str(c4dir), instruction_len=4, input_len=4, target_len=16, seed=5)
    whole = load(task='c4', data_dir=str(c4dir), seed=5, **LENS)
    for key in ('instruction', 'input'):   # each part keeps its first 3 tokens, then EOS
        for row, cut in zip(whole[key], d[key]):
            assert unpadded(cut) == unpadded(row)[:-1][:3] + [1]
    assert d['truncated']['instruction'] > 0 and d['truncated']['target'] == 0
    with pytest.raises(data.DataError, match='--target-len must be at least 4'):
        load(task='c4', data_dir=str(c4dir), target_len=3)
    (c4dir / 'c4-train.00000-of-00002.json.gz').write_bytes(gzip.compress(b'{"text": "fine"}\n{"txt": 1}\n'))
    with pytest.raises(data.DataError, match='c4-train.00000-of-00002.json.gz.*without a "text"'):
        load(task='c4', data_dir=str(c4dir), **LENS)
    (c4dir / 'c4-train.00000-of-00002.json.gz').write_bytes(b'not gzip')
    with pytest.raises(data.DataError, match='c4-train.00000-of-00002.json.gz.*Not a gzipped file'):
        load(task='c4', data_dir=str(c4dir), **LENS)
    with pytest.raises(data.DataError, match='no shards match'):
        load(task='c4', data_dir=str(tmp_path))
