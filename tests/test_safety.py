"""What a kill, a restart, a divergence or bad input must never do: end in a traceback, lose work, or
succeed silently. Each script runs as a subprocess, as the user runs it (helpers: test_workflow.py).
Read-only and full disks are real: a tmpfs mounted in a private mount namespace (`unshare -m`, root);
those tests skip, saying why, where that is not allowed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import hypernet as HN
from test_workflow import (CACHE, ENV, ROOT, SNI, SPIECE, TINY, fails_cleanly, max_diff, ok, params_of,
                           run)
import runs


# The tiny synthetic run of the tests below: checkpoints at steps 3, 6, 9 and 12.
TRAINED = [*TINY, '--steps', '12', '--log-every', '1', '--save-every', '3', '--keep-checkpoints', '4']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A finished TRAINED run (copy it before changing it)."""
    out = tmp_path_factory.mktemp('trained') / 'run'
    ok(run('train.py', *TRAINED, '--out-dir', out))
    return out


# ----------------------------------------------------------------------------------------------
# Kills, restarts, divergence.


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path, trained):
    argv = [sys.executable, 'train.py', *TRAINED, '--out-dir', str(tmp_path / 'cut'), '--cache-dir', CACHE]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stdout:   # SIGTERM once training is under way
        if line.startswith('step 2/'):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert 'SIGTERM: saved' in out and 'continue with --resume' in out
    step = runs.read_meta(runs.checkpoints(str(tmp_path / 'cut'))[-1])['step']
    assert 2 <= step < 12 and not os.path.exists(tmp_path / 'cut' / 'metrics.json')
    ok(run('train.py', *TRAINED, '--out-dir', tmp_path / 'cut', '--resume'))
    assert max_diff(params_of(trained), params_of(tmp_path / 'cut')) <= 1e-6


def test_divergence_stops_and_saves_nothing_non_finite(tmp_path):
    r = run('train.py', *TINY, '--steps', '8', '--log-every', '1', '--save-every', '1', '--lr', '1e30',
            '--out-dir', tmp_path / 'run')
    fails_cleanly(r, 'the loss is nan', 'last good checkpoint is', 'ckpt_0000001')
    step = int(r.stderr.split('error: step ')[1].split(':')[0])
    saved = runs.checkpoints(str(tmp_path / 'run'))
    assert step >= 2 and all(runs.read_meta(c)['step'] < step for c in saved)
    for ckpt in saved:
        params = runs.load_run(ckpt)[2]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_flat_loss_with_zero_gradient_warns(tmp_path, monkeypatch, capsys):
    import train as T
    build = T.build_model

    def zero_model(args, tokenizer, place=None):   # all-zero weights: a constant loss and an exactly zero gradient
        cfg, hcfg, params = build(args, tokenizer, place)
        return cfg, hcfg, jax.tree.map(np.zeros_like, params)
    monkeypatch.setattr(T, 'build_model', zero_model)
    monkeypatch.setattr(T, 'FLAT_STEPS', 3)
    T.main(T.Args(init='tiny', batch_size=4, adapter_dim=4, prefix_len=2, eval_instances=2, steps=5, log_every=1,
                  out_dir=str(tmp_path / 'run'), cache_dir=CACHE))
    assert 'zero gradient norm for 3 steps' in capsys.readouterr().err


def test_another_runs_checkpoints_are_never_mixed_or_deleted(tmp_path, trained):
    out = tmp_path / 'run'
    shutil.copytree(trained, out)
    before = {c: runs.read_meta(c) for c in runs.checkpoints(str(out))}
    fails_cleanly(run('train.py', *TINY, '--steps', '2', '--out-dir', out), '--resume', '--overwrite')
    assert {c: runs.read_meta(c) for c in runs.checkpoints(str(out))} == before
    fails_cleanly(run('train.py', *TINY, '--resume', '--overwrite', '--out-dir', out), 'pick one')
    # a second run writing into the same folder (as if started by hand) keeps the other run's checkpoints
    meta = runs.read_meta(runs.checkpoints(str(out))[-1])
    state = {'params': params_of(out), 'opt': {'count': np.zeros((), np.int32)}, 'step': 0}
    manager = runs.checkpoint_manager(str(out))
    for step in (5, 7, 8):
        runs.save(manager, step, state, {**meta, 'run': 'other'}, keep=1)
    with pytest.raises(runs.CheckpointError, match='belongs to another run'):
        runs.save(manager, 6, state, {**meta, 'run': 'other'}, keep=1)
    names = [os.path.basename(c) for c in runs.checkpoints(str(out))]
    assert names == ['ckpt_0000003', 'ckpt_0000006', 'ckpt_0000008', 'ckpt_0000009', 'ckpt_0000012']
    assert runs.read_meta(out / 'ckpt_0000006') == before[str(out / 'ckpt_0000006')]
    # --overwrite starts over; here with the README's Tk-Instruct baseline (plain T5, full input)
    ok(run('train.py', *TINY, '--steps', '1', '--overwrite', '--baseline', 'full-input', '--out-dir', out))
    assert [os.path.basename(c) for c in runs.checkpoints(str(out))] == ['ckpt_0000001']
    meta = runs.read_meta(runs.checkpoints(str(out))[0])
    assert meta['hyper_config'] is None and meta['args']['format'] == 'full-input'
    assert json.load(open(out / 'metrics.json'))['count'] == 2


def test_kill_leftovers_are_cleared_and_damaged_checkpoints_skipped(tmp_path, trained):
    out = tmp_path / 'run'
    shutil.copytree(trained, out)
    ckpt = {i: out / f'ckpt_{i:07d}' for i in (3, 6, 9, 12)}
    # what a kill -9 can leave: orbax's temporary folder of a save; a half-deleted old checkpoint
    # (renamed into deleted/ before its files go, so never picked)
    shutil.copytree(ckpt[12], out / 'ckpt_0000015.orbax-checkpoint-tmp-1')
    shutil.copytree(ckpt[3] / 'params', out / 'deleted' / 'ckpt_0000000' / 'params')
    # and the three newest checkpoints damaged: each given directly is named in an error
    damage = {12: 'params/manifest.ocdbt', 9: 'opt/manifest.ocdbt', 6: 'meta/metadata'}
    for i, name in damage.items():
        with open(ckpt[i] / name, 'r+b') as f:
            f.truncate(10)
    item = {i: f'ckpt_{i:07d}/{name.split("/")[0]}' for i, name in damage.items()}   # ckpt_0000012/params
    for i in (12, 6):   # eval.py reads parameters and meta (the optimizer state is train.py's)
        fails_cleanly(run('eval.py', '--checkpoint', ckpt[i]), item[i])
    # a run folder falls back to the newest checkpoint that loads, with a warning for each skipped one
    r = ok(run('eval.py', '--checkpoint', out, '--eval-instances', '2', '--out-dir', tmp_path / 'eval'))
    assert 'skipping' in r.stderr and item[12] in r.stderr
    r = ok(run('train.py', *TRAINED, '--resume', '--out-dir', out))
    assert 'resumed from' in r.stdout and 'ckpt_0000003' in r.stdout
    for i in damage:
        assert item[i] in r.stderr
    for leftover in ('ckpt_0000015.orbax-checkpoint-tmp-1', 'deleted'):
        assert not os.path.exists(out / leftover) and leftover in r.stderr
    assert max_diff(params_of(trained), params_of(out)) <= 1e-6   # the same run, from step 3


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the file or flag, a non-zero exit code, no traceback.


@pytest.fixture
def sni_copy(tmp_path):
    if not os.path.isdir(SNI):
        pytest.skip('../shared/data/sni_sample not found')
    shutil.copytree(SNI, tmp_path / 'ni')
    return tmp_path / 'ni'


def test_empty_and_non_utf8_split_files(sni_copy, tmp_path):
    split = sni_copy / 'splits' / 'default' / 'train_tasks.txt'
    split.write_text('\n')
    ni = ['--task', 'ni', '--data-dir', sni_copy, '--tokenizer', SPIECE]
    fails_cleanly(run('train.py', *ni, '--init', 'tiny', '--out-dir', tmp_path / 'run', cache=tmp_path / 'c'),
                  'train_tasks.txt: lists no tasks')
    fails_cleanly(run('data.py', *ni, cache=tmp_path / 'c'), 'train_tasks.txt: lists no tasks')
    split.write_bytes(b'task063_first_i_elements\n\xff\xfe\n')
    fails_cleanly(run('data.py', *ni, cache=tmp_path / 'c'), 'train_tasks.txt: UnicodeDecodeError')


@pytest.mark.parametrize('argv, needles', [
    (['data.py', '--task', 'unknown'], ["invalid choice 'unknown'", '--task']),
    (['train.py', '--baseline', 'full'], ["invalid choice 'full'", '--baseline']),
    (['train.py', '--grad-accum', '0'], ['--grad-accum must be at least 1']),
    (['train.py', '--batch-size', '0'], ['--batch-size must be at least 1']),
    (['train.py', '--batch-size', '6', '--grad-accum', '4'], ['--batch-size 6 must divide']),
    (['train.py', '--shots', '3'], ['--shots must be 0 to 2']),
    (['train.py', '--format', 'split'], ['--format split is for --task ni only']),
    (['data.py', '--task', 'c4', '--target-len', '3'], ['--target-len must be at least 4']),
    (['train.py', '--task', 'ni', '--init', 'tiny'], ['needs --tokenizer']),
    (['train.py', '--task', 'ni', '--data-dir', '/nonexistent', '--tokenizer', 'byte', '--init', 'tiny'],
     ['/nonexistent: not a natural-instructions clone']),
    (['train.py', '--task', 'ni', '--ni-source', '/nonexistent/repo', '--tokenizer', 'byte', '--init', 'tiny'],
     ['could not clone /nonexistent/repo', 'pass --data-dir']),
    (['train.py', '--instruction-encoder', 'roberta'], ['needs --instruction-encoder-init']),
    (['train.py', '--init', '/nonexistent/t5'], ['/nonexistent/t5']),
    (['train.py', '--init', 'tests'], ['/tests: neither a run', 'nor a transformers checkpoint']),
    (['eval.py'], ['--checkpoint is required']),
    (['eval.py', '--checkpoint', '/nonexistent/run'], ['/nonexistent/run: no checkpoint']),
])
def test_bad_arguments(tmp_path, argv, needles):
    if argv[0] == 'train.py':
        argv = argv + ['--out-dir', tmp_path / 'run']
    fails_cleanly(run(*argv, cache=tmp_path / 'cache'), *needles)   # its own cache: nothing is built
    assert not os.path.exists(tmp_path / 'run' / 'tb')   # nothing was started


def test_one_off_mode_with_empty_stdin(trained):
    fails_cleanly(run('eval.py', '--checkpoint', trained, '--instruction', 'Reverse the list.', stdin=''),
                  'no instance inputs on stdin')
    r = ok(run('eval.py', '--checkpoint', trained, '--instruction', 'Reverse the list.', stdin='a b c\n'))
    assert len(r.stdout.splitlines()) == 1


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / 'file').write_text('x')
    fails_cleanly(run('train.py', *TINY, '--out-dir', tmp_path / 'file'),
                  f'--out-dir {tmp_path / "file"}: cannot write there (File exists)')
    fails_cleanly(run('train.py', *TINY, '--out-dir', tmp_path / 'file' / 'sub'),
                  f'--out-dir {tmp_path / "file" / "sub"}: cannot write there')


def mount_prefix(path, options):
    """argv prefix that runs a command with a fresh tmpfs at `path` in a private mount namespace."""
    if shutil.which('unshare') is None:
        pytest.skip('unshare not found: read-only and full-disk tests need a private tmpfs mount')
    os.makedirs(path, exist_ok=True)
    probe = subprocess.run(['unshare', '-m', '--propagation', 'private', 'mount', '-t', 'tmpfs', '-o', options,
                            'none', str(path)], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f'cannot mount a private tmpfs here ({probe.stderr.strip()}): needs root and CAP_SYS_ADMIN')
    script = f'mount -t tmpfs -o {options} none "{path}" && exec "$@"'
    return ['unshare', '-m', '--propagation', 'private', 'sh', '-c', script, 'sh']


def test_read_only_out_dir_and_cache_dir(tmp_path):
    ro = tmp_path / 'ro'
    prefix = mount_prefix(ro, 'ro,size=1m')
    fails_cleanly(run('train.py', *TINY, '--out-dir', ro / 'run', prefix=prefix),
                  f'--out-dir {ro / "run"}: cannot write there (Read-only file system)')
    fails_cleanly(run('train.py', *TINY, '--out-dir', tmp_path / 'run', cache=ro / 'cache', prefix=prefix),
                  f'--cache-dir {ro / "cache"}: cannot write there (Read-only file system)')


def test_full_disk_during_a_checkpoint(tmp_path):
    """A tmpfs with room for one checkpoint (about 3.7 MB) but not two."""
    disk = tmp_path / 'disk'
    prefix = mount_prefix(disk, 'size=5m')
    script = f'mount -t tmpfs -o size=5m none "{disk}" && "$@"; rc=$?; cp -r "{disk}/run" "{tmp_path}/saved"; exit $rc'
    prefix = prefix[:-2] + [script, 'sh']
    r = run('train.py', *TINY, '--steps', '4', '--save-every', '2', '--out-dir', disk / 'run', prefix=prefix)
    fails_cleanly(r, 'step 4: could not write a checkpoint', 'No space left on device',
                  'the last good checkpoint is', 'ckpt_0000002')
    assert r.stderr.count('\n') <= 6, r.stderr   # no traceback from TensorBoard's writer at exit either
    saved = tmp_path / 'saved'
    assert [os.path.basename(c) for c in runs.checkpoints(str(saved))] == ['ckpt_0000002']
    assert sorted(os.listdir(saved)) == ['args.json', 'ckpt_0000002', 'run.lock', 'tb']   # nothing else
    runs.load_run(str(saved / 'ckpt_0000002'))
