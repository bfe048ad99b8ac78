"""Runs that must not lose work or report wrong numbers without saying so (issue 17): two runs in
one folder, a damaged data cache, tasks that vanish, what one-off mode does to the text, Ctrl-C.
Each script runs as a subprocess, as the user runs it (helpers: test_workflow.py).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

import hypernet as HN
from test_workflow import (CACHE, ENV, NI_SMALL, ROOT, SNI, SPIECE, TINY, fails_cleanly,
                           needs_shared, ok, run)
import runs

RUN = [*TINY, '--save-every', '2', '--keep-checkpoints', '4', '--log-every', '1']


def start(script, *args, cache=CACHE, **kw):
    """`python SCRIPT ARGS` started in the repo root: a Popen with text pipes. Ctrl-C reaches it as
    in a terminal: a process that ignores SIGINT passes that on to what it starts, and a pytest-xdist
    worker was seen ignoring it after other tests' libraries ran (/proc/PID/status, SigIgn)."""
    argv = [sys.executable, script, *map(str, args), '--cache-dir', str(cache)]
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kw)
    finally:
        signal.signal(signal.SIGINT, ignored)


def steps_of(out):
    return [runs.read_meta(c)['step'] for c in runs.checkpoints(str(out))]


# ----------------------------------------------------------------------------------------------
# 1. One run per --out-dir.


def test_a_second_run_into_the_same_out_dir_refuses_at_once(tmp_path):
    out = tmp_path / 'run'
    procs = [start('train.py', *RUN, '--steps', '6', '--out-dir', out) for _ in range(2)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    (first, _, _), = [r for r in results if r[0].returncode == 0]
    (_, _, err), = [r for r in results if r[0].returncode != 0]   # the second: refused
    assert 'Traceback' not in err, err[-3000:]
    holder = f'host {socket.gethostname()} pid {first.pid}'
    refusal = f'error: --out-dir {out} is in use by another run ({holder})'
    assert err.strip().splitlines()[-1].startswith(refusal), err
    # the first run's files only: intact checkpoints of one run, its evaluation, one TensorBoard log
    assert steps_of(out) == [2, 4, 6]
    assert len({runs.read_meta(c)['run'] for c in runs.checkpoints(str(out))}) == 1
    assert sorted(os.listdir(out)) == ['args.json', 'ckpt_0000002', 'ckpt_0000004', 'ckpt_0000006',
                                       'metrics.json', 'predictions.jsonl', 'run.lock', 'tb']
    assert len(os.listdir(out / 'tb')) == 1 and json.load(open(out / 'metrics.json'))['count'] == 2
    # a run killed with kill -9 leaves no lock behind: the next one continues it
    proc = start('train.py', *RUN, '--steps', '10', '--resume', '--out-dir', out)
    for line in proc.stdout:
        if line.startswith('step 7/'):
            proc.kill()
            break
    proc.communicate(timeout=60)
    r = ok(run('train.py', *RUN, '--steps', '10', '--resume', '--out-dir', out))
    assert 'resumed from' in r.stdout and steps_of(out)[-1] == 10


def test_gs_lock_object_is_checked_and_released_by_its_own_run(tmp_path):
    """On gs:// the lock is an object (the same epath calls as here, on a local folder)."""
    from etils import epath
    path, me, other = epath.Path(tmp_path) / 'run.lock', 'host a pid 1 run x', 'host b pid 2 run y'
    assert runs.lock_object(path, me) == (me, '')
    lock, holder = runs.lock_object(path, other)
    assert lock is None and holder.startswith(me) and str(path) in holder
    assert runs.lock_lost(me, str(tmp_path)) == ''
    path.write_text(other)   # taken over by a run started at the same moment: the next save stops
    assert runs.lock_lost(me, str(tmp_path)) == other
    runs.unlock(path, me)
    assert path.read_text() == other   # not ours: kept
    runs.unlock(path, other)
    assert not path.exists()


def test_a_failed_save_leaves_other_temporary_folders_alone(tmp_path):
    manager = runs.checkpoint_manager(str(tmp_path))
    state = {'params': {'w': np.ones(3, np.float32)}, 'opt': {'count': np.int32(0)}}
    runs.save(manager, 4, state, {'run': 'r'}, keep=1)   # the manager's cleanup at start is over
    foreign = tmp_path / 'ckpt_0000005.orbax-checkpoint-tmp-1'   # another process's save
    foreign.mkdir()
    state['opt'] = {'count': object()}   # orbax cannot write that
    with pytest.raises(ValueError):
        runs.save(manager, 5, state, {'run': 'r'}, keep=1)
    assert foreign.is_dir() and (tmp_path / 'ckpt_0000004').is_dir()


# ----------------------------------------------------------------------------------------------
# 2. A damaged data cache is rebuilt.


def test_a_damaged_data_cache_is_rebuilt(tmp_path):
    cache = tmp_path / 'cache'
    argv = ['data.py', '--split', 'test', '--show', '0']
    assert 'built' in ok(run(*argv, cache=cache)).stderr
    path, = cache.glob('*.npz')
    with np.load(path) as z:
        good = {k: z[k] for k in z.files}
    whole = path.read_bytes()
    damaged = {'cut short': whole[:len(whole) // 2], 'not a zip': b'x' * 100}
    for why, content in damaged.items():
        path.write_bytes(content)
        err = ok(run(*argv, cache=cache)).stderr
        assert f'{path} does not load' in err and 'rebuilding it' in err, why
        assert 'Traceback' not in err, err
        with np.load(path) as z:
            assert all(np.array_equal(z[k], good[k]) for k in good), why
    np.savez(path, instruction=good['instruction'])   # a zip that loads, without the rest
    assert 'rebuilding it' in ok(run(*argv, cache=cache)).stderr
    assert f'cached {path}' in ok(run(*argv, cache=cache)).stderr


# ----------------------------------------------------------------------------------------------
# 3. Tasks that vanish are counted, named, and reported with the numbers.


@needs_shared
def test_a_task_without_instances_is_reported(tmp_path):
    ni = tmp_path / 'ni'
    shutil.copytree(SNI, ni)
    emptied = {}
    for split in ('train', 'test'):
        name = (ni / 'splits' / 'default' / f'{split}_tasks.txt').read_text().split()[0]
        task = json.loads((ni / 'tasks' / f'{name}.json').read_text())
        (ni / 'tasks' / f'{name}.json').write_text(json.dumps({**task, 'Instances': []}))
        emptied[split] = {'tasks_without_instances': {'count': 1, 'first': [name]}}
    r = ok(run('train.py', *NI_SMALL, '--init', 'tiny', '--data-dir', ni, '--tokenizer', SPIECE,
               '--out-dir', tmp_path / 'run', cache=tmp_path / 'cache'))
    for split, skipped in emptied.items():
        line, = [l for l in r.stderr.splitlines() if l.startswith(f'data: ni/{split} ')]
        assert f'skipped {skipped};' in line
    assert json.load(open(tmp_path / 'run' / 'metrics.json'))['skipped'] == emptied['test']


def test_an_empty_p3_configuration_is_reported(tmp_path):
    from test_p3 import make_p3, write_config
    root = make_p3(tmp_path / 'p3')
    write_config(root, 'imdb_t3', 'train', 0, choices=False)
    r = ok(run('data.py', '--task', 'p3', '--data-dir', root, '--tokenizer', 'byte', '--p3-datasets',
               'imdb', 'wiki_qa', '--show', '0', cache=tmp_path / 'cache'))
    assert "skipped {'empty_configurations': {'count': 1, 'first': ['imdb_t3']}};" in r.stderr


# ----------------------------------------------------------------------------------------------
# 5. One-off mode says what it does to the text.


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('tiny') / 'run'
    ok(run('train.py', *TINY, '--steps', '1', '--out-dir', out))
    return out


def test_one_off_mode_reports_cuts(tiny_run):
    instruction = 'Reverse the list. ' * 2800   # 50,400 characters: cut to the run's 64 bytes
    r = ok(run('eval.py', '--checkpoint', tiny_run, '--instruction', instruction,
               stdin='a b c\n' + 'a ' * 40 + '\n'))
    assert 'warning: --instruction cut to 64 tokens (it has 50402)' in r.stderr
    assert 'warning: stdin line 2 cut to 32 tokens' in r.stderr and 'stdin line 1 ' not in r.stderr


def test_one_off_mode_refuses_an_empty_instruction_and_names_a_bad_line(tiny_run):
    for empty in ('', '  '):
        r = run('eval.py', '--checkpoint', tiny_run, '--instruction', empty, stdin='a b c\n')
        fails_cleanly(r, '--instruction is empty')
    argv = [sys.executable, 'eval.py', '--checkpoint', str(tiny_run), '--instruction', 'Reverse.']
    r = subprocess.run(argv, cwd=ROOT, env=ENV, input=b'a b c\nd \xff e\n', capture_output=True)
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    fails_cleanly(r, "stdin line 2: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff")


# ----------------------------------------------------------------------------------------------
# 6. Ctrl-C: one line, exit code 130.


@needs_shared
@pytest.mark.parametrize('script', ['data.py', 'train.py', 'eval.py'])
def test_ctrl_c_while_reading_data(tmp_path, script, tiny_run):
    """The split files are named pipes that no one writes to: data that takes a while to arrive."""
    ni = tmp_path / 'ni'
    shutil.copytree(SNI, ni)
    split = ni / 'splits' / 'default' / f'{"test" if script == "eval.py" else "train"}_tasks.txt'
    split.unlink()
    os.mkfifo(split)
    argv = {'data.py': ['--tokenizer', SPIECE], 'eval.py': ['--checkpoint', tiny_run],
            'train.py': ['--init', 'tiny', '--tokenizer', SPIECE, '--out-dir', tmp_path / 'run']}
    argv = argv[script]
    proc = start(script, '--task', 'ni', '--data-dir', ni, *argv, cache=tmp_path / 'cache')
    while True:   # the script opened the split file: it now waits for its lines
        try:
            fd = os.open(split, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    os.close(fd)
    kept = 'nothing was saved' if script == 'train.py' else 'nothing was written'
    assert proc.returncode == 130 and err.splitlines() == [f'interrupted; {kept}'], err[-3000:]
    assert not (tmp_path / 'cache').exists() or not list((tmp_path / 'cache').glob('*.npz'))
