"""The streamed input pipeline: C4 read as it is used (resumable, one share per host) and the prefetch
thread in front of every training feed. Local shards written by the tests, byte tokenizer, tiny widths."""
from __future__ import annotations

import gzip
import itertools
import json
import re
import signal
import time

import numpy as np
import pytest

import data
import hypernet as HN
from data import load_tokenizer  # noqa: E402
import runs

BYTE = load_tokenizer('byte')
TINY_LENS = dict(instruction_len=16, input_len=16, target_len=16)


def write_shards(root, n_shards, per_shard, short_every=0):
    """c4-train.0000i-of-0000n.json.gz: documents of 12 bytes, every `short_every`-th one of 2; and
    one validation shard."""
    root.mkdir(exist_ok=True)
    for s in range(n_shards):
        with gzip.open(root / f'c4-train.{s:05d}-of-{n_shards:05d}.json.gz', 'wt', encoding='utf-8') as f:
            for i in range(per_shard):
                text = 'ab' if short_every and i % short_every == 1 else f'doc {s} {i:02d} xyz'
                f.write(json.dumps({'text': text, 'url': 'http://x'}) + '\n')
    with gzip.open(root / 'c4-validation.00000-of-00001.json.gz', 'wt', encoding='utf-8') as f:
        for i in range(4):
            f.write(json.dumps({'text': f'validation text {i}', 'url': 'http://x'}) + '\n')
    return str(root)


def stream(root, batch_size=4, **kw):
    args = data.DataArgs(task='c4', data_dir=root, seed=3, **TINY_LENS)
    return data.c4_stream(args, BYTE, batch_size, **kw)


def windows(batch):
    """The window of each row: its three parts joined (EOS and padding dropped)."""
    return [BYTE.decode(np.concatenate([r[r > 2] for r in rows])) for rows in zip(*batch.values())]


def test_stream_resumes_at_the_same_window(tmp_path):
    root = write_shards(tmp_path / 'c4', 2, 7, short_every=3)   # 128 bytes a pass: 8 windows of 16
    whole = list(itertools.islice(stream(root), 6))
    passes = ''.join(w for batch, _ in whole for w in windows(batch))
    for batch, _ in whole:
        assert all(v.shape == (4, 16) and v.dtype == np.int32 for v in batch.values())
    assert passes == 3 * ''.join(f'doc {s} {i:02d} xyz' if i % 3 != 1 else 'ab' for s in (0, 1)
                                 for i in range(7))   # one token stream, windows across documents
    state = json.loads(json.dumps(whole[2][1]))   # as the checkpoint's meta stores it
    resumed = list(itertools.islice(stream(root, state=state), 3))
    # a resumed run that stops and resumes again (datasets' inner state after a resume may be written
    # differently, so compare what it reads, not the state itself)
    twice = list(itertools.islice(stream(root, state=resumed[0][1]), 2))
    for (batch, after), (again, after_again) in zip(whole[3:], resumed):
        for k in data.FIELDS:
            np.testing.assert_array_equal(again[k], batch[k])
        assert (after_again['windows'], after_again['carry']) == (after['windows'], after['carry'])
    for (batch, _), (again, _) in zip(whole[4:], twice):
        for k in data.FIELDS:
            np.testing.assert_array_equal(again[k], batch[k])
    # a later pass over the same documents cuts the same windows anew
    first, second = [windows(whole[i][0]) + windows(whole[i + 1][0]) for i in (0, 2)]
    assert first == second
    assert any((whole[0][0][k] != whole[2][0][k]).any() for k in data.FIELDS)
    with pytest.raises(data.DataError, match='--c4-documents must be at least 0'):
        data.check_args(data.DataArgs(task='c4', c4_documents=-1))


@pytest.mark.parametrize('n_shards', [2, 3])   # split by shards, or (3 over 2 hosts) by examples
def test_each_host_reads_its_own_share(tmp_path, n_shards):
    root = write_shards(tmp_path / 'c4', n_shards, 24 // n_shards)
    hosts = []   # 6 batches of 2 rows: 192 bytes, a pass over its 12 documents (144 bytes) and more
    for h in range(2):
        share = itertools.islice(stream(root, process_index=h, process_count=2), 6)
        hosts.append([windows(b) for b, _ in share])
    assert all(len(rows) == 2 for share in hosts for rows in share)   # batch_size // process_count rows
    mine = [set(re.findall(r'doc \d \d\d xyz', ''.join(sum(share, [])))) for share in hosts]
    assert len(mine[0]) == len(mine[1]) == 12 and not mine[0] & mine[1]
    every = {f'doc {s} {i:02d} xyz' for s in range(n_shards) for i in range(24 // n_shards)}
    assert mine[0] | mine[1] == every


def test_a_host_without_documents_is_an_error(tmp_path):
    root = write_shards(tmp_path / 'c4', 1, 1)   # one document: host 1 of 2 has none
    with pytest.raises(data.DataError, match='no document for host 1'):
        next(stream(root, process_index=1, process_count=2))


def test_prefetch_keeps_order_and_raises_the_sources_error(tmp_path):
    assert list(data.prefetch(iter(range(50)), size=2)) == list(range(50))

    def failing():
        yield 1
        raise data.DataError('shard 7: bad line')
    feed = data.prefetch(failing())
    assert next(feed) == 1
    with pytest.raises(data.DataError, match='shard 7: bad line'):
        next(feed)

    made = []

    def endless():
        for i in itertools.count():
            made.append(i)
            yield i
    feed = data.prefetch(endless(), size=2)
    assert [next(feed), next(feed)] == [0, 1]
    feed.close()   # the consumer stops: so does the reading ahead, a few items on at most
    time.sleep(0.2)
    stopped_at = len(made)
    time.sleep(0.2)
    assert stopped_at <= 5 and len(made) == stopped_at

    root = write_shards(tmp_path / 'c4', 2, 3)
    (tmp_path / 'c4' / 'c4-train.00001-of-00002.json.gz').write_bytes(b'not gzip')
    with pytest.raises(data.DataError, match='c4-train'):
        list(itertools.islice(data.prefetch(stream(root)), 3))


def test_train_resumes_the_stream_after_a_kill(tmp_path, monkeypatch):
    """train.py, streamed C4: SIGTERM during step 3, --resume to step 6: the same per-step losses as
    a run that never stopped, and the checkpoint holds the stream's position."""
    import train as T
    root = write_shards(tmp_path / 'c4', 2, 10)
    losses, log = {}, T.log

    def record(args, step, metrics, *rest):
        losses[step] = float(metrics['loss'])
        if kill and step == 2:   # SIGTERM as a preemption sends it: the run saves after this step
            signal.raise_signal(signal.SIGTERM)
        return log(args, step, metrics, *rest)
    monkeypatch.setattr(T, 'log', record)

    def train(out, resume=False):
        T.main(T.Args(task='c4', data_dir=root, init='tiny', tokenizer='byte', batch_size=4, adapter_dim=4,
                      prefix_len=2, eval_instances=2, steps=6, log_every=1, save_every=100, resume=resume,
                      out_dir=str(out), cache_dir=str(tmp_path / 'cache'), **TINY_LENS))

    kill = False
    train(tmp_path / 'whole')
    whole, losses = losses, {}
    kill = True
    train(tmp_path / 'cut')
    meta = runs.read_meta(runs.checkpoints(str(tmp_path / 'cut'))[-1])
    assert meta['step'] == 2 and meta['stream'][0]['windows'] == 8   # 4 windows a step
    kill = False
    train(tmp_path / 'cut', resume=True)
    assert sorted(losses) == list(range(1, 7))
    assert max(abs(losses[s] - whole[s]) for s in whole) <= 1e-6


def test_streamed_c4_through_train_py(tmp_path):
    """The README's `python train.py --task c4 ...`, as a script: streamed by default, the position in the
    checkpoint, and `--resume` going on from it."""
    import os
    import subprocess
    import sys
    root = write_shards(tmp_path / 'c4', 2, 10)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / 'run')

    def train(*extra):
        argv = [sys.executable, 'train.py', '--task', 'c4', '--data-dir', root, '--init', 'tiny', '--tokenizer',
                'byte', '--batch-size', '4', '--adapter-dim', '4', '--prefix-len', '2', '--eval-instances', '2',
                '--log-every', '1', '--save-every', '2', '--out-dir', out, '--cache-dir', str(tmp_path / 'cache'),
                '--instruction-len', '16', '--input-len', '16', '--target-len', '16', *extra]
        r = subprocess.run(argv, cwd=repo, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        return r.stdout
    assert 'streamed train' in train('--steps', '2')
    assert runs.read_meta(runs.checkpoints(out)[-1])['stream'][0]['windows'] == 8
    assert 'resumed from' in train('--steps', '4', '--resume')
    assert runs.read_meta(runs.checkpoints(out)[-1])['stream'][0]['windows'] == 16
