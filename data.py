"""Data for HINT: tokenizers; synthetic, Super-NaturalInstructions (SNI), C4 and P3 tasks.

Each task gives an `instruction` (hypernetwork), an `input` (encoder) and a `target` (decoder), as
0-padded int32 arrays, each text cut to L-1 tokens + EOS. Getting the data: docs/data.md.
    python data.py --task ni --data-dir natural-instructions --split test --shots 2 --show 3
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import difflib
import functools
import glob
import hashlib
import io
import itertools
import json
import os
import random
import re
import shutil
import string
import subprocess
import sys
from typing import Literal

import numpy as np

import model as M


class DataError(ValueError):
    """Bad data on disk or bad arguments: the message names the file and the field."""


@dataclasses.dataclass
class DataArgs:
    task: Literal['synthetic', 'ni', 'c4', 'p3'] = 'synthetic'   # built-in suite, SNI, C4, T0's P3
    data_dir: str | None = None      # SNI clone, C4 shards or P3 copy; None: fetched (docs/data.md)
    ni_source: str = 'https://github.com/allenai/natural-instructions'   # git URL for --task ni
    shots: int = 0                   # 0|1|2 positive examples in the instruction (p3: 0-5 demos)
    format: Literal['hint', 'split', 'full-input'] = 'hint'
    """hint: HINT's texts; split (ni): Tk-Instruct's text cut in two; full-input: all encoded"""
    max_instances_per_task: int = 100   # train: after a shuffle seeded by --seed; test: the first
    instruction_len: int | None = None   # in tokens; None: task default (see `lengths`)
    input_len: int | None = None         # in tokens; the limit of the whole text in full-input
    target_len: int | None = None        # in tokens
    tokenizer: str = ''              # '' = 'byte' for synthetic, google/t5-base-lm-adapt otherwise
    c4_documents: int = 0            # 0: C4 train streamed, N: its first N documents (test: 1,000)
    seed: int = 0                    # train split only: the test split never depends on it
    cache_dir: str = '.cache/data'   # tokenized splits, reused while arguments and sources match
    group_by_length: bool = False    # train batches of similar lengths (runs of 50 batches sorted)
    p3_datasets: tuple[str, ...] = ()   # only these (P3_TRAIN, P3_HELD_OUT); none in a split: all
    p3_examples_per_dataset: int = 500000   # T0's mixing rates: a larger dataset's cap
    p3_examples: int = 0             # 0: T0's training mixture streamed; N: its first N draws
    p3_templates: str = ''           # the hypernetwork's templates (docs/data.md); '': derived


FIELDS = ('instruction', 'input', 'target')   # the arrays of every split and batch


def tokenizer_name(args: DataArgs) -> str:
    default = 'byte' if args.task == 'synthetic' else 'google/t5-base-lm-adapt'
    return args.tokenizer or default


def lengths(args: DataArgs) -> tuple[int, int, int]:
    """(instruction_len, input_len, target_len): the flags, else the paper's (synthetic: fits)."""
    li, lx, ly = {'synthetic': (64 + 72 * args.shots, 32, 32), 'ni': (1024, 1024, 256),
                  'c4': (512, 512, 512), 'p3': (512, 1024, 256)}[args.task]
    li, ly = args.instruction_len or li, args.target_len or ly
    if args.format != 'full-input':
        return li, args.input_len or lx, ly
    whole = 1024 if args.task in ('ni', 'p3') else li + lx   # ni, p3: the paper's limit
    return 1, args.input_len or whole, ly   # an [N, 1] padding instruction


def check_args(args: DataArgs):
    """The data flags, checked before anything is read or downloaded."""
    least = dict(instruction_len=2, input_len=2, target_len=2, max_instances_per_task=1,
                 c4_documents=0, p3_examples_per_dataset=1, p3_examples=0)   # lengths: token + EOS
    if args.task == 'c4':
        least['target_len'] = 4   # a window cut in three parts
    for name, low in least.items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise DataError(f'--{name.replace("_", "-")} must be at least {low}')
    most = 5 if args.task == 'p3' else 2
    if not 0 <= args.shots <= most:
        raise DataError(f'--shots must be 0 to {most} for --task {args.task}, got {args.shots}')
    if args.format == 'split' and args.task != 'ni':
        raise DataError(f'--format split is for --task ni only, not {args.task}')
    if args.p3_templates and not os.path.isfile(args.p3_templates):
        raise DataError(f'--p3-templates {args.p3_templates}: no such file')
    unknown = set(args.p3_datasets) - set(P3_TRAIN) - set(P3_HELD_OUT)
    if unknown:
        raise DataError(f'--p3-datasets: unknown {sorted(unknown)} (known: P3_* in data.py)')


DATA_PATHS = ('data_dir', 'cache_dir', 'p3_templates')   # DataArgs' local paths (absolute_paths)


def local_path(path):
    return path if not path or '://' in path else os.path.abspath(path)   # URLs stay (gs://...)


def absolute_paths(args, paths=(), maybe_paths=()):
    """Local paths made absolute (orbax needs them); `maybe_paths` that exist nowhere stay."""
    for name in paths + maybe_paths:
        path = getattr(args, name)
        if name in paths or (path and os.path.exists(path)):
            setattr(args, name, local_path(path))


@contextlib.contextmanager
def reading(where: str):
    """Around a reader's plain field access: any error re-raised as a DataError naming `where`."""
    try:
        yield
    except DataError:
        raise
    except KeyError as e:
        raise DataError(f'{where}: missing field {e}') from None
    except AssertionError as e:   # the reader's own checks say what is wrong
        raise DataError(f'{where}: {e}') from None
    except (LookupError, TypeError, AttributeError, ValueError, OSError) as e:
        raise DataError(f'{where}: {type(e).__name__}: {e}') from None


@contextlib.contextmanager
def fetching(what: str, advice: str):
    """No network, no git, hub errors: one line saying what to do instead of a traceback."""
    try:
        yield
    except Exception as e:
        raise DataError(f'could not {what} ({type(e).__name__}: {e}); {advice}') from None


def strings(*values) -> bool:
    return all(isinstance(v, str) for v in values)


def encode(tokenizer, text: str, length: int) -> tuple[list[int], bool]:
    """(ids, was cut): `text` cut to length-1 tokens + EOS ([] if empty), after RoBERTa's BOS."""
    ids = tokenizer.encode(text) if text else []
    if not ids:
        return [], False
    if getattr(tokenizer, 'bos_id', None) is not None:
        ids = [tokenizer.bos_id] + ids
    return ids[:length - 1] + [tokenizer.eos_id], len(ids) > length - 1


# Tokenizers: encode(text) -> ids without EOS, decode(ids) -> text (stops at EOS).


def until_eos(ids, eos_id) -> list[int]:
    ids = [int(i) for i in ids]
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


class ByteTokenizer:
    """ByT5's ids: pad 0, eos 1, unk 2, byte b -> b + 3. Needs no file at all."""
    name = 'byte'
    pad_id, eos_id, vocab_size = M.PAD_ID, M.EOS_ID, 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode('utf-8')]

    def decode(self, ids) -> str:   # ids past the byte range (vocab padding) are dropped
        data = bytes(i - 3 for i in until_eos(ids, self.eos_id) if 3 <= i < 259)
        return data.decode('utf-8', 'ignore')


class SentencePieceTokenizer:
    """T5's tokenizer (spiece.model): pad 0, eos 1, unk 2."""

    def __init__(self, path: str):
        import sentencepiece as spm
        self.name = os.path.abspath(path)
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.pad_id, self.eos_id = self.sp.pad_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        ids = until_eos(ids, self.eos_id)
        return self.sp.decode([i for i in ids if i != self.pad_id and i < self.vocab_size])


class HFTokenizer:
    """A `tokenizers` tokenizer.json (RoBERTa's BPE): encode adds no special tokens."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        self.name = os.path.abspath(path)
        self.tok = Tokenizer.from_file(path)
        get = self.tok.token_to_id
        self.pad_id = get('<pad>') if get('<pad>') is not None else M.PAD_ID
        self.eos_id = get('</s>') if get('</s>') is not None else M.EOS_ID
        self.bos_id = get('<s>')
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(until_eos(ids, self.eos_id), skip_special_tokens=True)


def load_tokenizer(name_or_dir: str):
    """'byte', a spiece.model or tokenizer.json file, or a checkpoint folder or hub name."""
    if name_or_dir == 'byte':
        return ByteTokenizer()
    if os.path.isfile(name_or_dir):
        if name_or_dir.endswith('.model'):
            return SentencePieceTokenizer(name_or_dir)
        return HFTokenizer(name_or_dir)
    d = M.resolve_dir(name_or_dir)
    for fname, cls in (('spiece.model', SentencePieceTokenizer), ('tokenizer.json', HFTokenizer)):
        if os.path.exists(os.path.join(d, fname)):
            return cls(os.path.join(d, fname))
    raise FileNotFoundError(f'{d}: no tokenizer found (expected spiece.model or tokenizer.json)')


# 1. Synthetic suite: list manipulations ("c a 7" -> "7 a c") solved only by reading the
# instruction. A task = (family, parameter, phrasing); test tasks have held-out parameters only.

LETTERS, DIGITS = 'abcdefghij', '0123456789'
PAIRS = [(a, b) for a in LETTERS for b in LETTERS if a != b]
# 10 held-out pairs whose letters both appear in train pairs
HELD_PAIRS = [(a, b) for a, b in PAIRS if (LETTERS.index(a) + LETTERS.index(b)) % 9 == 0]


def _split_params(values, held):
    return [v for v in values if v not in held], list(held)


# family -> (phrasings, train parameters, test parameters). Phrasings use {p} ({a}, {b}: replace).
FAMILIES = {
    'reverse': (['Reverse the list.', 'Write the items in reverse order.',
                 'Output the list backwards.'], [None], []),
    'sort': (['Sort the items in {p} order.', 'Arrange the items in {p} order.',
              'Output the items in {p} order.'], ['ascending', 'descending'], []),
    'first': (['Take the first {p} items.', 'Keep only the first {p} items of the list.',
               'Output the first {p} items.'], *_split_params([1, 2, 3, 4, 5, 6], [3, 5])),
    'last': (['Take the last {p} items.', 'Keep only the last {p} items of the list.',
              'Output the last {p} items.'], *_split_params([1, 2, 3, 4, 5], [2, 4])),
    'item': (['What is item number {p}?', 'Output the item at position {p}, counting from 1.',
              'Give item {p} of the list.'], *_split_params([1, 2, 3, 4, 5, 6, 7], [4, 6])),
    'drop': (['Remove every {p}.', 'Delete all occurrences of {p} from the list.',
              'Output the list without any {p}.'], *_split_params(list(LETTERS), 'ch')),
    'replace': (['Replace every {a} with {b}.', 'Change each {a} into {b}.',
                 'Write {b} instead of every {a}.'], *_split_params(PAIRS, HELD_PAIRS)),
    'double': (['Write every {p} twice.', 'Repeat each {p} once more.',
                'Duplicate every {p} in the list.'], *_split_params(list(LETTERS), 'bg')),
    'count': (['How many times does {p} appear?', 'Count the occurrences of {p}.',
               'Output the number of {p} items in the list.'], *_split_params(list(LETTERS), 'di')),
    'add': (['Add {p} to each number.', 'Increase every number by {p}.',
             'Output each number plus {p}.'], *_split_params(list(range(1, 10)), [4, 7])),
}
SYN_TRAIN_PER_FAMILY = 2000   # train instances per family, spread over its tasks (capped per task)
SYN_TEST_PER_TASK = 20


def synthetic_output(family: str, p, items: list[str]) -> str:
    out = {'reverse': lambda: items[::-1],
           'sort': lambda: sorted(items, reverse=p == 'descending'),
           'first': lambda: items[:p],
           'last': lambda: items[-p:],
           'item': lambda: [items[p - 1]],
           'drop': lambda: [i for i in items if i != p],
           'replace': lambda: [p[1] if i == p[0] else i for i in items],
           'double': lambda: [j for i in items for j in ([i, i] if i == p else [i])],
           'count': lambda: [str(items.count(p))],
           'add': lambda: [str(int(i) + p) for i in items]}[family]()
    return ' '.join(out)


def _synthetic_pair(rng: random.Random, family: str, p) -> tuple[str, str]:
    """One (input, output) pair whose output is non-empty and differs from the input."""
    letter = p if family in ('drop', 'double', 'count') else None   # the letter the task is about
    if family == 'replace':
        letter = p[0]
    shortest = 3
    if family in ('first', 'last', 'item'):   # longer than the items kept; item p exists
        shortest = max(3, p + (family != 'item'))
    while True:
        n = rng.randint(shortest, 8)
        if letter is not None:   # `letter` put 1-4 times (count: 0-4), never everywhere
            items = [rng.choice(LETTERS.replace(letter, '')) for _ in range(n)]
            for pos in rng.sample(range(n), rng.randint(int(family != 'count'), min(4, n - 1))):
                items[pos] = letter
        else:   # positional families see letters or digits, so digit lists are shared with 'add'
            pool = DIGITS if family == 'add' or rng.random() < 0.5 else LETTERS
            items = [rng.choice(pool) for _ in range(n)]
        inp, out = ' '.join(items), synthetic_output(family, p, items)
        if out and out != inp:
            return inp, out


def synthetic_tasks(split: str) -> list[tuple[str, str, object, str]]:
    """[(task name, family, parameter, phrasing)] of a split, in a fixed order."""
    tasks = []
    for family, (phrasings, train, test) in FAMILIES.items():
        for p in (train if split == 'train' else test):
            a, b, label = None, None, '-' if p is None else p
            if family == 'replace':
                (a, b), label = p, '>'.join(p)
            for j, phrasing in enumerate(phrasings):
                tasks.append((f'{family}:{label}:{j}', family, p, phrasing.format(p=p, a=a, b=b)))
    return tasks


def build_synthetic(args: DataArgs, split: str, tokenizer=None):
    """Rows: the phrasing and demos "Example i -\\nInput: ..\\nOutput: ..\\n\\n"; the items."""
    tasks, rows = synthetic_tasks(split), []
    per_family = collections.Counter(family for _, family, _, _ in tasks)
    seed = args.seed if split == 'train' else 0   # the held-out set never depends on --seed
    for name, family, p, phrasing in tasks:
        demo_rng = random.Random(f'demo:{seed}:{name}')   # the same demos for every --shots
        demos = [_synthetic_pair(demo_rng, family, p) for _ in range(args.shots)]
        instruction = instruction_text('synthetic', phrasing, args.format, args.shots) + ''.join(
            f'Example {i} -\nInput: {a}\nOutput: {b}\n\n' for i, (a, b) in enumerate(demos, 1))
        n = max(1, SYN_TRAIN_PER_FAMILY // per_family[family])
        if split == 'test':
            n = SYN_TEST_PER_TASK
        rng = random.Random(f'{split}:{seed}:{name}')
        for i in range(min(n, args.max_instances_per_task)):
            inp, out = _synthetic_pair(rng, family, p)
            texts = arrange(args.format, instruction, instance_text('synthetic', inp, args.format))
            rows.append(dict(task=name, id=f'{name}-{i}', instruction=texts[0], input=texts[1],
                             target=out, references=[out], category=family))
    return rows, {}


# 2. Super-NaturalInstructions: HINT's texts, or Tk-Instruct's split or whole (HINT.md section 6).


def fetch_ni(args: DataArgs) -> str:
    """A shallow clone of --ni-source in the cache folder, made once (renamed when complete)."""
    dest = os.path.join(args.cache_dir, 'natural-instructions')
    if os.path.isdir(os.path.join(dest, 'splits')):
        return dest
    tmp = dest + '.partial'
    print(f'data: no --data-dir; cloning {args.ni_source} into {dest} (once)', file=sys.stderr)
    git = ['git', 'clone', '--depth', '1', '--progress', args.ni_source, tmp]
    env = dict(os.environ, GIT_TERMINAL_PROMPT='0')   # fail, never ask for a password
    advice = f'run `git clone --depth 1 {args.ni_source}` elsewhere and pass --data-dir'
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        with fetching(f'clone {args.ni_source}', advice):
            subprocess.run(git, check=True, stdin=subprocess.DEVNULL, stdout=sys.stderr, env=env)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def dot(s: str) -> str:
    return s if s and s[-1] in string.punctuation else s + '.'


def instruction_text(task: str, definition: str, fmt: str, shots: int) -> str:
    """The instruction for a task definition, before any examples (eval.py's one-off mode too)."""
    if task != 'ni':
        return definition + '\n\n'
    if fmt != 'hint':   # Tk-Instruct's
        return 'Definition: ' + dot(definition.strip()) + '\n\n'
    return 'Definition: ' + definition if shots else definition.strip()   # HINT's


def instance_text(task: str, text: str, fmt: str) -> str:
    """The encoder's text for one instance input (eval.py's one-off mode uses it too)."""
    if task != 'ni':
        return f'Input: {text}\nOutput:'
    if fmt == 'hint':   # HINT's encoder reads the raw input
        return text
    return dot('Now complete the following example -\nInput: ' + text.strip()) + '\nOutput: '


def arrange(fmt: str, instruction: str, text: str) -> tuple[str, str]:
    """(hypernetwork text, encoder text): full-input puts the instruction in the encoder."""
    if fmt == 'full-input':
        return '', instruction + text
    return instruction, text


def ni_task_files(data_dir: str | None, split: str) -> tuple[str, list[tuple[str, str]]]:
    """The split file and [(task, path)] listed in it; every path checked to exist."""
    split_file = os.path.join(data_dir, 'splits', 'default', f'{split}_tasks.txt')
    missing = [p for p in (split_file, os.path.join(data_dir, 'tasks')) if not os.path.exists(p)]
    if missing:
        raise DataError(f'{data_dir}: not a natural-instructions clone (no {", ".join(missing)}; '
                        'see docs/data.md)')
    with reading(split_file), open(split_file, encoding='utf-8') as f:
        names = [(lineno, line.strip()) for lineno, line in enumerate(f, 1) if line.strip()]
        assert names, 'lists no tasks (one task name per line)'
    tasks = []
    for lineno, name in names:
        path = os.path.join(data_dir, 'tasks', name + '.json')
        if not os.path.isfile(path):
            raise DataError(f'{split_file} line {lineno}: task {name!r} has no file {path}')
        tasks.append((name, path))
    return split_file, tasks


def ni_texts(task: dict, path: str, instance_input: str, args: DataArgs, limit: int, tokenizer):
    """(instruction, instance part). hint: each example that fits goes IN FRONT (..._hyper_k)."""
    text = instruction_text('ni', task['Definition'][0], args.format, args.shots)
    instance = instance_text('ni', instance_input, args.format)
    for i, ex in enumerate(task['Positive Examples'][:args.shots], 1):
        with reading(f'{path}: Positive Examples[{i - 1}]'):
            example = dot(f' Positive Example {i} -\nInput: ' + ex['input'].strip()) + '\n'
            example = dot(example + ' Output: ' + ex['output'].strip()) + '\n'
        if args.format == 'hint':
            if len(tokenizer.encode(text + example)) <= limit - 1:
                text = example + text
        elif len(tokenizer.encode(text + example + '\n' + instance)) <= limit - 1:
            text += example + '\n'
        else:
            break
    return text, instance


def build_ni(args: DataArgs, split: str, tokenizer):
    """Rows as Tk-Instruct picks them (train: shuffled, a seeded random output as target)."""
    _, task_files = ni_task_files(args.data_dir, split)
    li, lx, _ = lengths(args)
    limit = lx if args.format == 'full-input' else li
    rows, skipped = [], {}
    for name, path in task_files:
        with reading(path), open(path, encoding='utf-8') as f:
            task = json.load(f)   # Python's json reads the NaN some task files hold ("URL": [NaN])
            for key in ('Definition', 'Positive Examples', 'Instances', 'Categories'):
                assert isinstance(task[key], list), f'field {key!r} must be a list'
            for key in ('Definition', 'Categories'):
                problem = f'field {key!r} must be a non-empty list of strings'
                assert task[key] and strings(task[key][0]), problem
        if not task['Instances']:   # listed in the split file, but nothing to learn or score
            skipped.setdefault('tasks_without_instances', []).append(name)
        order = list(range(len(task['Instances'])))
        if split == 'train':   # the same permutation as shuffling the instances themselves
            random.Random(args.seed).shuffle(order)
        for k in order[:args.max_instances_per_task]:
            with reading(f'{path}: Instances[{k}]'):
                inst = task['Instances'][k]
                iid, inp, outputs = inst['id'], inst['input'], inst['output']
                assert strings(iid, inp), "fields 'id' and 'input' must be strings"
                assert isinstance(outputs, list) and outputs and strings(*outputs), \
                    "field 'output' must be a non-empty list of strings"
                texts = ni_texts(task, path, inp, args, limit, tokenizer)
            instruction, inp = arrange(args.format, *texts)
            target = outputs[0]
            if split == 'train':
                target = random.Random(f'{args.seed}:{iid}').choice(outputs)
            rows.append(dict(task=name, id=iid, instruction=instruction, input=inp, target=target,
                             references=list(outputs), category=task['Categories'][0]))
    return rows, skipped


# 3. C4 as the original's c4_pretrain: t5's prefix-LM windows, each cut in three (docs/data.md).


def c4_files(args: DataArgs, split: str) -> list[str]:
    if args.data_dir is None:
        return []
    name = 'train' if split == 'train' else 'validation'
    pattern = os.path.join(args.data_dir, f'c4-{name}*.json.gz')
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f'--task c4: no shards match {pattern} (see docs/data.md)')
    return files


def c4_documents(args: DataArgs, split: str, process_index: int = 0, process_count: int = 1):
    """(documents, where): this host's share of the local shards or of allenai/c4 on the hub."""
    import datasets
    from datasets.distributed import split_dataset_by_node
    files = c4_files(args, split)
    name = 'train' if split == 'train' else 'validation'
    where, source = 'allenai/c4 (en) on the hub', dict(path='allenai/c4', name='en', split=name)
    if files:   # the json loader's only split is 'train'
        where, source = files[0] + ', ...', dict(path='json', data_files=files, split='train')
    with fetching(f'stream {where}', 'pass --data-dir with c4-*.json.gz shards'):
        ds = datasets.load_dataset(**source, streaming=True)
    return split_dataset_by_node(ds, rank=process_index, world_size=process_count), where


def c4_texts(documents, where: str):
    """The text of each document; a damaged shard or a row without a "text" string: a DataError."""
    with reading(where):
        for doc in documents:
            assert strings(doc.get('text')), f'a row without a "text" string ({str(doc)[:60]})'
            yield doc['text']


def c4_segments(args: DataArgs, window: list[int], seed: int, index: int, eos_id: int):
    """({field: ids}, {field: was cut}) of window `index`: w[:a], w[a:b] (maybe empty), w[b:]."""
    rng = np.random.default_rng([seed, index])
    a = int(rng.integers(1, len(window) - 2))   # high is exclusive: [1, L-2)
    b = int(rng.integers(a, len(window) - 2))
    parts = [window[:a], window[a:b], window[b:]]
    if args.format == 'full-input':
        parts = [None, window[:b], window[b:]]   # no instruction
    seqs, flags = {}, {}
    for key, part, width in zip(FIELDS, parts, lengths(args)):
        seqs[key] = [] if part is None else part[:width - 1] + [eos_id]
        flags[key] = part is not None and len(part) > width - 1
    return seqs, flags


def c4_rows(args: DataArgs, tokenizer, texts, seed: int, n: int = 0, carry=(), hosts=(0, 1)):
    """Yields (ids, cut, n + 1, carry) for windows n, n+1, ...; carry: the tokens read past it."""
    host, host_count = hosts
    tokens, length = list(carry), lengths(args)[2]
    for text in texts:
        tokens = tokens + tokenizer.encode(text)   # a new list: the carry yielded stays as it is
        while len(tokens) >= length:
            window, tokens = tokens[:length], tokens[length:]
            ids, cut = c4_segments(args, window, seed, n * host_count + host, tokenizer.eos_id)
            n += 1
            yield ids, cut, n, tokens


def build_c4(args: DataArgs, split: str, tokenizer):
    """The windows of the first --c4-documents documents (0: 1,000), cut as c4_stream cuts them."""
    seed = args.seed if split == 'train' else 0
    documents, where = c4_documents(args, split)
    texts = c4_texts(itertools.islice(documents, args.c4_documents or 1000), where)
    rows = []
    for i, (ids, cut, _, _) in enumerate(c4_rows(args, tokenizer, texts, seed)):
        preview = {k: tokenizer.decode(v[:64]) for k, v in ids.items()}
        rows.append((dict(preview, task='c4', id=f'c4-{split}-{i}', references=[preview['target']],
                          category='c4'), ids, cut))
    return rows, {}


# 4. P3 (T0's prompted datasets): a configuration per (dataset, prompt template) (docs/data.md).

# T0's 38 training datasets, named as P3 prefixes its configurations (CommonsenseQA is cos_e v1.11).
P3_TRAIN = tuple("""adversarial_qa_dbert adversarial_qa_dbidaf adversarial_qa_droberta ag_news
    amazon_polarity app_reviews cnn_dailymail_3.0.0 common_gen cos_e_v1.11 cosmos_qa dbpedia_14
    dream duorc_ParaphraseRC duorc_SelfRC gigaword glue_mrpc glue_qqp imdb kilt_tasks_hotpotqa
    multi_news paws_labeled_final qasc quail quarel quartz quoref ropes rotten_tomatoes samsum sciq
    social_i_qa trec wiki_bio wiki_hop_original wiki_qa wiqa xsum yelp_review_full""".split())
# T0's held-out datasets: name -> (prefix, suffix) of their configurations; ANLI has one per round.
P3_HELD_OUT = {f'anli_r{r}': ('anli_', f'_r{r}') for r in (1, 2, 3)}
P3_HELD_OUT.update({d: (d + '_', '') for d in (
    'super_glue_cb', 'super_glue_rte', 'super_glue_copa', 'hellaswag', 'story_cloze_2016',
    'winogrande_winogrande_xl', 'super_glue_wsc.fixed', 'super_glue_wic')})
P3_EVAL_SPLITS = ('validation', 'dev_r1', 'dev_r2', 'dev_r3')   # held-out: the first one present
P3_TRAIN_SPLITS = ('train', 'train_r1', 'train_r2', 'train_r3')   # (ANLI's may be named by round)
# Held-out templates promptsource does not mark original_task: true, which T0 and HINT leave out.
P3_NOT_ORIGINAL = tuple("""hellaswag_Reversed_appropriate_continuation_Yes_or_No hellaswag_how_ends
    hellaswag_Appropriate_continuation_Yes_or_No hellaswag_Open_ended_completion
    winogrande_winogrande_xl_True_or_False story_cloze_2016_Generate_Ending""".split())
P3_DEMO_TOKENS = 960   # the original keeps the demonstrations that fit this many (FLAN's 1024 - 64)
P3_COLUMNS = ['inputs_pretokenized', 'targets_pretokenized']
P3_BLOCK = 4096   # draws of the mixture whose templates one generator call picks


def p3_table(args: DataArgs, split: str) -> dict:
    """{dataset: (prefix, suffix)} of T0's train or held-out datasets (--p3-datasets' if any)."""
    table = {d: (d + '_', '') for d in P3_TRAIN} if split == 'train' else P3_HELD_OUT
    named = {d: v for d, v in table.items() if d in args.p3_datasets}
    return named or table


def p3_split_files(folder: str, names) -> list[str]:
    """The parquet files of the first split in `names` that a configuration's folder has."""
    for name in names:
        files = sorted(glob.glob(os.path.join(folder, f'{name}-*.parquet')))
        if files:
            return files
    return []


def p3_configs(args: DataArgs, split: str) -> list[tuple[str, str, list[str], list[str]]]:
    """[(dataset, configuration, files of the split, train files)], sorted by configuration."""
    root = os.path.join(args.data_dir, 'data')   # the configurations, under data/ or at the top
    if not os.path.isdir(root):
        root = args.data_dir
    if not os.path.isdir(root):
        raise DataError(f'--data-dir {args.data_dir}: not a folder (P3: see docs/data.md)')
    table, found = p3_table(args, split), []
    names = P3_TRAIN_SPLITS if split == 'train' else P3_EVAL_SPLITS
    for config in sorted(os.listdir(root)):
        matches = [(len(p), d) for d, (p, s) in table.items()
                   if config.startswith(p) and config.endswith(s)]
        if not matches or config.endswith('_score_eval'):
            continue
        folder = os.path.join(root, config)
        files = p3_split_files(folder, names)
        if not files:
            raise DataError(f'{folder}: no {" or ".join(names)}-*.parquet files')
        found.append((max(matches)[1], config, files, p3_split_files(folder, P3_TRAIN_SPLITS)))
    missing = [d for d in table if d not in {f[0] for f in found}]
    if 'story_cloze_2016' in missing:   # not public: the message says how to do without it
        others = ' '.join(d for d in table if d != 'story_cloze_2016')
        raise DataError(f'{root}: no story_cloze_2016 (docs/data.md); or --p3-datasets {others}')
    if missing:
        raise DataError(f'{root}: no {"*".join(table[missing[0]])} folder (see docs/data.md)')
    return found


def fetch_p3(args: DataArgs) -> str:
    """Only the files the selected datasets need, downloaded once into the Hugging Face cache."""
    needed = {'train': P3_TRAIN_SPLITS, 'test': P3_EVAL_SPLITS}
    if args.shots:
        needed['test'] += P3_TRAIN_SPLITS
    patterns = [f'{top}{prefix}*{suffix}/{name}-*.parquet' for split, names in needed.items()
                for prefix, suffix in p3_table(args, split).values()
                for name in names for top in ('data/', '')]
    print('data: no --data-dir; fetching the files needed from bigscience/P3', file=sys.stderr)
    from huggingface_hub import snapshot_download
    with fetching('download bigscience/P3', 'see docs/data.md'):
        return snapshot_download('bigscience/P3', repo_type='dataset', allow_patterns=patterns)


def read_p3(files: list[str], columns: list[str], limit: int | None = None) -> dict:
    """{column: values} of the first `limit` rows (None: all) of a configuration's parquet files."""
    import pyarrow.parquet as pq
    out = {c: [] for c in columns}
    for path in files:
        with reading(path):
            parquet = pq.ParquetFile(path)
            for c in columns:
                assert c in parquet.schema_arrow.names, f'missing field {c!r}'
            for batch in parquet.iter_batches(batch_size=4096, columns=columns):
                for c in columns:
                    out[c] += batch.column(c).to_pylist()
                if limit is not None and len(out[columns[0]]) >= limit:
                    return {c: v[:limit] for c, v in out.items()}
    return out


def p3_words(text: str) -> list[str]:
    """Words, punctuation marks and whitespace runs: joined, they give the text back."""
    return re.findall(r'\w+|\s+|[^\w\s]', text)


def p3_template(prompts: list[str]) -> str:
    """The text the prompts of one template share, each span that varies one [X] (docs/data.md)."""
    words = p3_words(prompts[0])
    for prompt in prompts[1:]:
        other, out, i, j = p3_words(prompt), [], 0, 0
        matcher = difflib.SequenceMatcher(None, words, other, autojunk=False)
        for a, b, size in matcher.get_matching_blocks():
            if a > i or b > j:
                out.append(None)   # a gap: unmatched words on either side
            out, i, j = out + words[a:a + size], a + size, b + size
        words = out
    parts = []   # literals and gaps (None), alternating
    for is_gap, run in itertools.groupby(words, key=lambda word: word is None):
        parts.append(None if is_gap else ''.join(run))
    k = 1
    while k < len(parts) - 1:
        if parts[k - 1] is None and parts[k + 1] is None and p3_chance_match(parts, k, prompts):
            parts[k - 1:k + 2], k = [None], 1
        else:
            k += 1
    return ''.join('[X]' if p is None else p for p in parts)


def p3_chance_match(parts: list, k: int, prompts: list[str]) -> bool:
    """Whether literal parts[k], between two gaps, is blank or repeats in what the three cover."""
    if not parts[k].strip():
        return True
    pattern = re.compile(''.join('(.*?)' if p is None else re.escape(p) for p in parts), re.S)
    gap = parts[:k].count(None)   # the regex group of the gap before parts[k]
    for prompt in prompts:
        m = pattern.fullmatch(prompt)
        if m and prompt[m.start(gap):m.end(gap + 1)].count(parts[k]) > 1:
            return True
    return False


def p3_template_file(path: str) -> dict:
    """{lower-cased '<dataset>_<template name>': text} of a file in the original's format."""
    with reading(f'--p3-templates {path}'), open(path, encoding='utf-8') as f:
        blocks = [b.strip() for b in re.split(r'^\*+$', f.read(), flags=re.M) if b.strip()]
    out = {}
    for n, block in enumerate(blocks, 1):
        with reading(f'--p3-templates {path}: block {n}'):
            dataset, name, text = block.split('\t||||\t')
        out[f'{dataset}_{name}'.lower()] = text
    return out


def p3_texts(args: DataArgs, split: str, configs, tokenizer) -> dict:
    """{configuration: (hypernetwork text, encoder text before the prompt)}, cached."""
    path = cache_path(args, split, tokenizer, sources(args, split))[:-4] + '-texts.json'
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    given = p3_template_file(args.p3_templates) if args.p3_templates else None
    seed, out = args.seed if split == 'train' else 0, {}
    for _, config, files, train_files in configs:
        rows = read_p3(files, P3_COLUMNS, 1000)
        if given is None:
            prompts = [p for p in rows['inputs_pretokenized'] if isinstance(p, str)] or ['']
            template = p3_template(random.Random(config).sample(prompts, min(16, len(prompts))))
        else:
            with reading(f'--p3-templates {args.p3_templates}'):
                assert config.lower() in given, f'no template for configuration {config}'
            template = given[config.lower()]
        if args.shots and train_files and split != 'train':   # held-out demos: from train rows
            rows = read_p3(train_files, P3_COLUMNS, 1000)
        inputs, targets = rows['inputs_pretokenized'], rows['targets_pretokenized']
        demos, room = '', P3_DEMO_TOKENS   # the demonstrations that fit (the original's pruning)
        draw = random.Random(f'{seed}:{config}')
        for j in draw.sample(range(len(inputs)), min(args.shots, len(inputs))):
            demo = f'{inputs[j]} Output: {targets[j]}\n\n'
            room -= len(tokenizer.encode(demo))
            if room < 0:
                break
            demos += demo
        if args.shots:
            template = demos + ' Definition: ' + template
        out[config] = ('', demos) if args.format == 'full-input' else (template, '')
    write_atomic(path, json.dumps(out, ensure_ascii=False).encode('utf-8'))
    return out


def p3_groups(files: list[str]) -> list[tuple[str, int, int]]:
    """[(file, row group, rows)] of a configuration's parquet files: the units the mixture reads."""
    import pyarrow.parquet as pq
    out = []
    for path in files:
        meta = pq.ParquetFile(path).metadata
        out += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    return out


@functools.lru_cache(maxsize=512)   # more than T0's ~300 templates: each keeps its current group
def p3_row_group(path: str, g: int) -> tuple[list, list]:
    import pyarrow.parquet as pq
    table = pq.ParquetFile(path).read_row_group(g, columns=P3_COLUMNS)
    return table.column(0).to_pylist(), table.column(1).to_pylist()


def p3_draws(args: DataArgs, configs, groups, state: dict):
    """Yields (template, row group, row): a pure function of (seed, `state`), advanced in place."""
    sizes = [sum(n for *_, n in g) for g in groups]
    rates, names = np.array(sizes, np.float64), np.array([d for d, *_ in configs])
    for d in set(names):   # T0's mixing rates: a template's size, capped per dataset
        if rates[names == d].max() > args.p3_examples_per_dataset:
            rates[names == d] = args.p3_examples_per_dataset / np.sum(names == d)

    @functools.lru_cache(maxsize=1024)
    def pass_order(t, e):   # template t's row groups in pass e, and the draw each starts at
        perm = np.random.default_rng([args.seed, t, e]).permutation(len(groups[t]))
        return perm, np.cumsum([0] + [groups[t][g][2] for g in perm])

    @functools.lru_cache(maxsize=1024)
    def group_order(t, e, g):   # the rows of template t's row group g in pass e
        return np.random.default_rng([args.seed, t, e, g]).permutation(groups[t][g][2])

    while True:
        n = state['draws']
        rng = np.random.default_rng([args.seed, n // P3_BLOCK])
        picks = rng.choice(len(rates), P3_BLOCK, p=rates / rates.sum())
        for t in picks[n % P3_BLOCK:].tolist():
            e, k = divmod(state['counts'][t], sizes[t])
            perm, starts = pass_order(t, e)
            i = int(np.searchsorted(starts, k, side='right')) - 1
            state['counts'][t] += 1
            state['draws'] += 1
            yield t, int(perm[i]), int(group_order(t, e, int(perm[i]))[k - starts[i]])


def p3_row(configs, texts: dict, groups, t: int, g: int, j: int) -> dict:
    """The row of draw (template t, row group g, row j); the hypernetwork reads the template."""
    dataset, config = configs[t][:2]
    path, group, _ = groups[t][g]
    prompts, targets = p3_row_group(path, group)
    with reading(f'{path}: configuration {config} row group {group} row {j}'):
        return p3_example(texts, dataset, config, f'{group}-{j}', prompts[j], targets[j])


def p3_example(texts: dict, dataset: str, config: str, row: str, prompt, target, **more) -> dict:
    assert strings(prompt, target), f'{P3_COLUMNS} must be strings: {prompt!r}, {target!r}'
    instruction, prefix = texts[config]
    return dict(task=config, id=f'{config}-{row}', instruction=instruction, input=prefix + prompt,
                target=target, references=[target], category=dataset, **more)


def p3_mixture(args: DataArgs, tokenizer, state: dict | None = None):
    """(configurations, texts, groups, draws, state, skipped) of T0's mixture, from `state`."""
    configs = p3_configs(args, 'train')
    groups = [p3_groups(files) for _, _, files, _ in configs]
    sizes = [sum(n for *_, n in g) for g in groups]
    skipped = {'empty_configurations': [c for (_, c, *_), n in zip(configs, sizes) if not n]}
    configs = [c for c, n in zip(configs, sizes) if n]
    groups = [g for g, n in zip(groups, sizes) if n]
    if not configs:
        raise DataError(f'{args.data_dir}: no training rows in any selected P3 configuration')
    texts = p3_texts(args, 'train', configs, tokenizer)
    state = json.loads(json.dumps(state or {'draws': 0, 'counts': [0] * len(configs)}))
    if len(state['counts']) != len(configs):
        raise DataError(f'the saved P3 position counts {len(state["counts"])} templates, the data '
                        f'{len(configs)}: resume with the same --data-dir and --p3-datasets')
    return configs, texts, groups, p3_draws(args, configs, groups, state), state, skipped


def build_p3(args: DataArgs, split: str, tokenizer):
    """train: the first --p3-examples (0: 1,000) draws; test: held-out rows with answer choices."""
    import pyarrow.parquet as pq
    if split == 'train':
        configs, texts, groups, draws, _, skipped = p3_mixture(args, tokenizer)
        draws = itertools.islice(draws, args.p3_examples or 1000)
        return [p3_row(configs, texts, groups, *d) for d in draws], skipped
    skipped = {'templates_not_original_task': [], 'templates_without_answer_choices': []}
    configs = []
    for c in p3_configs(args, split):
        if c[1] in P3_NOT_ORIGINAL:
            skipped['templates_not_original_task'].append(c[1])
        elif 'answer_choices' not in pq.read_schema(c[2][0]).names:   # generation: not ranked
            skipped['templates_without_answer_choices'].append(c[1])
        else:
            configs.append(c)
    texts, rows = p3_texts(args, split, configs, tokenizer), []
    for dataset, config, files, _ in configs:
        table = read_p3(files, P3_COLUMNS + ['answer_choices'])
        if not table['inputs_pretokenized']:
            skipped.setdefault('empty_configurations', []).append(config)
        for i, (prompt, target, choices) in enumerate(zip(*table.values())):
            with reading(f'{files[0]}: configuration {config} row {i}'):
                stripped = [c.strip() for c in choices]
                assert target.strip() in stripped, \
                    f"'targets_pretokenized' {target!r} is not one of 'answer_choices' {choices}"
                answer = stripped.index(target.strip())
                rows.append(p3_example(texts, dataset, config, str(i), prompt, choices[answer],
                                       choices=list(choices), answer=answer))
    return rows, skipped


def p3_choice_arrays(examples: list[dict], tokenizer, width: int) -> dict:
    """'choices' [N, C, Lc] int32 (absent choices all padding), and 'answer' [N] int32."""
    ids = [[encode(tokenizer, c, width)[0] or [tokenizer.eos_id] for c in ex['choices']]
           for ex in examples]
    longest = max(len(x) for row in ids for x in row)
    out = np.zeros([len(ids), max(len(row) for row in ids), bucket(longest, width)], np.int32)
    for n, row in enumerate(ids):
        for c, x in enumerate(row):
            out[n, c, :len(x)] = x
    return {'choices': out, 'answer': np.array([ex['answer'] for ex in examples], np.int32)}


# Tokenize, cache, report.


def tokenize_rows(rows, args: DataArgs, tokenizer):
    """Texts -> ids; a cut text in the example becomes its decoded ids (SentencePiece's: spaced)."""
    widths = dict(zip(FIELDS, lengths(args)))
    memo = {}   # the instruction text repeats for every instance of a task: encode it once
    for ex in rows:
        seqs, flags = {}, {}
        for key, width in widths.items():
            if (ex[key], width) not in memo:
                memo[ex[key], width] = encode(tokenizer, ex[key], width)
            seqs[key], flags[key] = memo[ex[key], width]
            if key == 'target' and not seqs[key]:   # an empty reference: learn to stop at once
                seqs[key] = [tokenizer.eos_id]
            if flags[key]:
                ex[key] = tokenizer.decode(seqs[key])
        yield ex, seqs, flags


def padded(rows: list[dict], widths, pad_id: int) -> dict:
    """{field: [N, width] int32}: rows of {field: ids}, padded with pad_id (RoBERTa's is 1)."""
    out = {k: np.full([len(rows), w], pad_id, np.int32) for k, w in zip(FIELDS, widths)}
    for n, row in enumerate(rows):
        for k, ids in row.items():
            out[k][n, :len(ids)] = ids
    return out


def sources(args: DataArgs, split: str) -> list[str]:
    """The split's source files (the cache key's), after fetching SNI or P3 if needed."""
    if args.task == 'ni':
        args.data_dir = args.data_dir or fetch_ni(args)
        split_file, tasks = ni_task_files(args.data_dir, split)
        return [split_file] + [p for _, p in tasks]
    if args.task == 'c4':
        return c4_files(args, split)
    if args.task != 'p3':
        return []
    args.data_dir = args.data_dir or fetch_p3(args)
    files = [args.p3_templates] if args.p3_templates else []
    for _, _, split_files, train_files in p3_configs(args, split):
        files += split_files
        if split == 'test':   # held-out demonstrations come from the train files
            files += train_files
    return files


def cache_path(args: DataArgs, split: str, tokenizer, files: list[str]) -> str:
    """Keyed by all the arrays depend on, this file's source too (a code change rebuilds)."""
    def stamp(path):
        return [os.path.abspath(path), os.path.getsize(path), os.stat(path).st_mtime_ns]

    with open(__file__, 'rb') as f:
        code = hashlib.sha256(f.read()).hexdigest()
    flags = {'c4': ['c4_documents', 'data_dir'], 'p3': ['p3_examples_per_dataset', 'p3_examples']}
    flags = ['task', 'shots', 'format'] + flags.get(args.task, ['max_instances_per_task'])
    key = dict(code=code, split=split, lengths=lengths(args), tokenizer=tokenizer.name,
               seed=args.seed if split == 'train' else 0, files=[stamp(p) for p in files],
               **{flag: getattr(args, flag) for flag in flags})
    if os.path.isfile(tokenizer.name):
        key['tokenizer_file'] = stamp(tokenizer.name)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(args.cache_dir, f'{args.task}-{split}-{digest}.npz')


def write_atomic(path: str, content: bytes):
    """Write, then rename: no one sees half a file, and Ctrl-C or a full disk leave none behind."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with open(tmp, 'wb') as f:
            f.write(content)
        os.replace(tmp, path)
    finally:   # gone after the rename; else what was written is not left behind
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def save_cache(path: str, data: dict):
    meta = json.dumps({k: data[k] for k in ('examples', 'skipped', 'truncated')})
    arrays = {k: data[k] for k in FIELDS + ('choices', 'answer') if k in data}
    npz = io.BytesIO()
    np.savez_compressed(npz, **arrays, meta=np.frombuffer(meta.encode(), np.uint8))
    write_atomic(path, npz.getvalue())


def load_cache(path: str) -> dict:
    with np.load(path) as z:
        data = {k: z[k].astype(np.int32) for k in z.files if k != 'meta'}
        data.update(json.loads(z['meta'].tobytes()))
    return data


def count_skipped(skipped: dict) -> dict:
    """{reason: {count, first names}} of a split's 'skipped' {reason: names}."""
    return {reason: {'count': len(names), 'first': list(names)[:3]}
            for reason, names in skipped.items() if names}


def interrupted(kept: str = 'nothing was written'):
    """Ctrl-C: one line saying what was kept, exit code 130 (128 + SIGINT), no traceback."""
    print(f'interrupted; {kept}', file=sys.stderr)
    sys.exit(130)


def load_split(args: DataArgs, split: str, tokenizer) -> dict:
    """{field: [N, L] int32, 'lengths' [N, 3], 'examples', 'skipped', 'truncated'}; cached."""
    if split not in ('train', 'test'):
        raise DataError(f'split must be train or test, got {split!r}')
    check_args(args)
    path, data = cache_path(args, split, tokenizer, sources(args, split)), None
    if os.path.exists(path):
        try:
            data, how = load_cache(path), 'cached'
        except Exception as e:   # cut short by a full disk or a copy: any cache that does not load
            print(f'data: {path} does not load ({e!r}); rebuilding it', file=sys.stderr)
    if data is None:
        build = {'synthetic': build_synthetic, 'ni': build_ni, 'c4': build_c4, 'p3': build_p3}
        rows, skipped = build[args.task](args, split, tokenizer)
        if args.task != 'c4':   # C4's rows are token ids already
            rows = list(tokenize_rows(rows, args, tokenizer))
        if not rows:
            raise DataError(f'{args.data_dir or args.task}: no {split} rows (skipped: {skipped})')
        data, how = padded([ids for _, ids, _ in rows], lengths(args), tokenizer.pad_id), 'built'
        data.update(examples=[r[0] for r in rows], skipped=skipped,
                    truncated={k: sum(cut[k] for *_, cut in rows) for k in FIELDS})
        if args.task == 'p3' and split == 'test':   # rank classification's answer choices
            data.update(p3_choice_arrays(data['examples'], tokenizer, lengths(args)[2]))
        save_cache(path, data)
    data['lengths'] = np.stack([row_lengths(data[k], tokenizer.pad_id) for k in FIELDS], 1)
    tasks = len({e['task'] for e in data['examples']})
    print(f'data: {args.task}/{split} ({args.format}, {args.shots} shots): {len(data["examples"])} '
          f'instances from {tasks} tasks; skipped {count_skipped(data["skipped"])}; truncated '
          f'{data["truncated"]}; {how} {path}', file=sys.stderr)
    return data


# Batches: the global batch of step s is a pure function of (seed, s), so resuming and multi-host
# agree. Each is cut to its longest row's bucket: right padding is masked, so no result changes.


def row_lengths(x, pad_id: int = 0):
    """[N]: the index of each row's last non-padding token + 1 (0 if all padding) of x [N, L]."""
    return np.max((x != pad_id) * np.arange(1, x.shape[1] + 1), axis=1)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): rounding sizes up keeps the shapes few."""
    return 1 << max(n - 1, 0).bit_length()


def bucket(n: int, cap: int) -> int:
    """The width for rows of at most n tokens: a power of two >= 16 (few shapes to compile)."""
    return min(cap, max(16, next_pow2(n)))


def batches(data: dict, batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
            process_count: int = 1, group_by_length: bool = False):
    """This host's share of each global batch, cut to the GLOBAL batch's bucket (same shapes)."""
    n = len(data['input'])
    if n == 0 or batch_size % process_count:
        raise ValueError(f'no rows, or batch_size {batch_size} not divisible by {process_count}')
    share = batch_size // process_count
    lens = data.get('lengths')
    if lens is None:
        lens = np.stack([row_lengths(data[k]) for k in FIELDS], 1)

    @functools.lru_cache(maxsize=4)
    def order(e):
        perm = np.random.default_rng([seed, e]).permutation(n)
        if group_by_length:   # sort by (run, -tokens); lexsort is stable
            perm = perm[np.lexsort((-lens[perm].sum(1), np.arange(n) // (50 * batch_size)))]
        return perm

    for step in itertools.count(start_step):
        pos = step * batch_size + np.arange(batch_size)   # the global batch's places in the stream
        idx = np.concatenate([order(e)[pos[pos // n == e] % n] for e in np.unique(pos // n)])
        widths = [bucket(int(m), data[k].shape[1]) for k, m in zip(FIELDS, lens[idx].max(0))]
        mine = idx[process_index * share:(process_index + 1) * share]
        yield {k: data[k][mine, :w] for k, w in zip(FIELDS, widths)}


def c4_passes(documents, where: str, process_index: int):
    """The texts of this host's documents, pass after pass (datasets' epochs), without end."""
    empty = 0
    while empty < 2:   # one empty pass is a resume at the end of a pass; two: there is nothing
        empty += 1
        for text in c4_texts(documents, where):
            if text:
                empty = 0
            yield text
        documents.set_epoch(documents.epoch + 1)
    raise DataError(f'{where}: no document for host {process_index}')


def c4_stream(args: DataArgs, tokenizer, batch_size: int, process_index: int = 0,
              process_count: int = 1, state: dict | None = None):
    """Yields (batch, state to resume after it), unshuffled: a shuffle buffer would not resume."""
    documents, where = c4_documents(args, 'train', process_index, process_count)
    n, carry = 0, []
    if state:   # the epoch first: load_state_dict only applies to an iteration of the same epoch
        documents.set_epoch(state['dataset']['epoch'])
        documents.load_state_dict(state['dataset'])
        n, carry = state['windows'], state['carry']
    texts = c4_passes(documents, where, process_index)
    rows = c4_rows(args, tokenizer, texts, args.seed, n, carry, (process_index, process_count))
    while True:
        chunk = list(itertools.islice(rows, batch_size // process_count))
        batch = padded([ids for ids, *_ in chunk], lengths(args), tokenizer.pad_id)
        _, _, n, carry = chunk[-1]
        yield batch, {'dataset': documents.state_dict(), 'windows': n, 'carry': carry}


def p3_stream(args: DataArgs, tokenizer, batch_size: int, process_index: int = 0,
              process_count: int = 1, state: dict | None = None):
    """Yields (batch, state); widths: the bucket on one host, `lengths` on several (same shapes)."""
    configs, texts, groups, draws, state, skipped = p3_mixture(args, tokenizer, state)
    print(f'data: p3/train: streamed from {len(configs)} templates; skipped '
          f'{count_skipped(skipped)}', file=sys.stderr)
    (li, lx, ly), share, memo = lengths(args), batch_size // process_count, {}
    while True:
        mine = list(itertools.islice(draws, batch_size))[process_index * share:][:share]
        rows = []
        for row in [p3_row(configs, texts, groups, *d) for d in mine]:
            if row['instruction'] not in memo:   # one text per template: tokenized once
                memo[row['instruction']] = encode(tokenizer, row['instruction'], li)[0]
            rows.append({'instruction': memo[row['instruction']],
                         'input': encode(tokenizer, row['input'], lx)[0],
                         'target': encode(tokenizer, row['target'], ly)[0] or [tokenizer.eos_id]})
        widths = lengths(args)
        if process_count == 1:
            widths = [bucket(max(len(r[k]) for r in rows), w) for k, w in zip(FIELDS, widths)]
        yield padded(rows, widths, tokenizer.pad_id), dict(state, counts=list(state['counts']))


def prefetch(iterator, size: int = 2):
    """`iterator`'s items (or error), made by a thread `size` items ahead while the device runs."""
    pool, end = concurrent.futures.ThreadPoolExecutor(1), object()   # one thread: items in order
    ahead = collections.deque(pool.submit(next, iterator, end) for _ in range(size))
    try:
        while True:
            item = ahead.popleft().result()
            if item is end:
                return
            ahead.append(pool.submit(next, iterator, end))
            yield item
    finally:   # the consumer is done: items asked for and not started are dropped
        pool.shutdown(wait=False, cancel_futures=True)


@dataclasses.dataclass
class ShowArgs(DataArgs):
    split: Literal['train', 'test'] = 'train'   # which split to build and show
    show: int = 5          # print this many examples as JSON lines


def main(args: ShowArgs):
    check_args(args)
    sources(args, args.split)   # a bad --data-dir is reported before a slow tokenizer download
    data = load_split(args, args.split, load_tokenizer(tokenizer_name(args)))
    for ex in data['examples'][:args.show]:
        keys = ('task', 'id', 'instruction', 'input', 'target', 'references')
        print(json.dumps({k: ex[k] for k in keys}, ensure_ascii=False))


if __name__ == '__main__':
    import tyro
    try:
        main(tyro.cli(ShowArgs))
    except (ValueError, OSError) as e:   # DataError is a ValueError
        sys.exit(f'error: {e}')
    except KeyboardInterrupt:   # the cache is written whole or not at all
        interrupted()
