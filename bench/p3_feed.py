"""Does the host keep up with T0's streamed mixture? Tokens/s of the P3 feed alone (data.p3_stream:
parquet row groups read, rows drawn at T0's rates, tokenized with T5's SentencePiece, padded)
against tokens/s of the training step on the same batches, side by side on this machine.

    python bench/p3_feed.py                         # T5 v1.1-small shapes, batch 8 (fits 24 GB)
    python bench/p3_feed.py --size base --batch-size 64   # on an accelerator

The fixture is written to a temporary folder in bigscience/P3's layout: 20 templates of 4 datasets
(one above the 500,000 stand-in cap), prompted inputs of about 150-400 words, as P3's reading tasks.
The ratio feed / step is how many times faster than the device the host makes batches: the feed
runs on one thread behind data.prefetch, so above 1 the step never waits (train.py: `host N%`).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import random
import sys
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tyro

import data
import hypernet as HN
import model as M
import train as T
from speed import jax_step_seconds


@dataclasses.dataclass
class FeedArgs:
    size: str = 'small'        # T5 v1.1 shape of the timed step (model.PRESETS)
    batch_size: int = 8        # batch 32 at small size needs over 40 GB on a CPU
    batches: int = 50          # feed batches timed
    steps: int = 3             # train steps timed
    tokenizer: str = os.path.join(ROOT, '..', 'shared', 'assets', 't5_tokenizer', 'spiece.model')


def write_fixture(root, rows=1000):
    rng = random.Random(0)
    words = [w.strip('.,') for w in open(__file__).read().split() if w.isalpha()]
    for d, dataset in enumerate(('imdb', 'quail', 'xsum', 'cosmos_qa')):
        for t in range(5):
            passages = [' '.join(rng.choices(words, k=rng.randint(150, 400))) for _ in range(rows)]
            table = pa.table({
                'inputs_pretokenized': [f'Template {t} of {dataset}. Passage: {p}\nQuestion {t}?'
                                        for p in passages],
                'targets_pretokenized': [' '.join(rng.choices(words, k=8)) for _ in range(rows)]})
            folder = os.path.join(root, 'data', f'{dataset}_t{t}')
            os.makedirs(folder)
            path = os.path.join(folder, 'train-00000-of-00001.parquet')
            pq.write_table(table, path, row_group_size=500)
    return root


def main(args: FeedArgs):
    tok = data.load_tokenizer(args.tokenizer if os.path.isfile(args.tokenizer) else 'byte')
    with tempfile.TemporaryDirectory() as tmp:
        dargs = data.DataArgs(task='p3', data_dir=write_fixture(tmp), tokenizer=tok.name,
                              p3_datasets=('imdb', 'quail', 'xsum', 'cosmos_qa'),
                              p3_examples_per_dataset=5000, cache_dir=os.path.join(tmp, 'cache'))
        stream = data.p3_stream(dargs, tok, args.batch_size)
        first, _ = next(stream)   # templates derived, files opened
        t0, tokens = time.time(), 0
        for batch, _ in itertools.islice(stream, args.batches):
            tokens += sum(int((batch[k] != 0).sum()) for k in data.FIELDS)
        feed = tokens / (time.time() - t0)
    cfg = M.PRESETS[args.size]
    batch = dict(first)
    batch['task_id'], n_tasks = T.task_ids(first['instruction'], args.batch_size, 1)
    step = jax_step_seconds(cfg, HN.HyperConfig(), batch, args.steps, n_tasks)
    per_step = sum(int((first[k] != 0).sum()) for k in data.FIELDS) / step
    shapes = [v.shape for v in first.values()]
    print(f'P3 feed alone (1 thread, {tok.name}): {feed:,.0f} tok/s; HINT train step ({args.size}, '
          f'batch {args.batch_size}, shapes {shapes}): {per_step:,.0f} tok/s -> feed / step '
          f'{feed / per_step:.1f}x (>= 1: the host keeps up)')


if __name__ == '__main__':
    main(tyro.cli(FeedArgs))
