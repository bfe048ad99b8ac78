"""The README's commands as a user types them: in a folder of their own (a copy of the scripts, as a
fresh clone has them), with relative paths only and the default --out-dir. Every test before this
file passed absolute paths, and `python train.py` crashed at its first checkpoint.

The tests share one folder and run in order, as a user would type the commands one after another.
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
SMALL = '--steps 4 --save-every 2 --log-every 2 --eval-instances 4'   # the default run, shorter
TINY = '--init tiny --batch-size 4 --adapter-dim 4 --prefix-len 2 ' + SMALL   # as test_workflow's


@pytest.fixture(scope='module')
def clone(tmp_path_factory):
    folder = tmp_path_factory.mktemp('clone')
    for script in glob.glob(os.path.join(ROOT, '*.py')):
        shutil.copy(script, folder)
    return folder


def typed(folder, command, stdin=''):
    """`command` as typed in `folder` ('python' is this interpreter) -> CompletedProcess."""
    argv = shlex.split(command)
    argv[0] = sys.executable
    r = subprocess.run(argv, cwd=folder, env=ENV, input=stdin, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (command, (r.stdout + r.stderr)[-3000:])
    return r


def test_train_saves_and_resumes_with_the_default_out_dir(clone):
    typed(clone, f'python train.py {SMALL}')
    run = clone / 'runs' / 'synthetic'
    assert (run / 'ckpt_0000004').is_dir() and (run / 'metrics.json').is_file()
    assert json.loads((run / 'args.json').read_text())['out_dir'] == 'runs/synthetic'   # as typed
    r = typed(clone, 'python train.py --steps 6 --save-every 2 --log-every 2 --eval-instances 4 '
                     '--resume')
    assert 'resumed from' in r.stdout and (run / 'ckpt_0000006').is_dir()


def test_init_from_a_relative_run(clone):
    r = typed(clone, 'python train.py --init runs/synthetic --out-dir runs/ft --steps 1 '
                     '--eval-instances 4')
    assert (clone / 'runs' / 'ft' / 'metrics.json').is_file()
    assert 'T5 ' in r.stdout and 'runs/synthetic' in r.stdout   # the run it started from


def test_eval_and_one_off_with_relative_paths(clone):
    run = clone / 'runs' / 'synthetic'
    trained = json.loads((run / 'metrics.json').read_text())
    typed(clone, 'python eval.py --checkpoint runs/synthetic')
    assert json.loads((run / 'metrics.json').read_text()) == trained   # the run's own settings
    one_off = 'python eval.py --checkpoint runs/synthetic --instruction "Reverse the list."'
    first = typed(clone, one_off + ' --save-task-state states/reverse.npz', stdin='a b c\n').stdout
    assert (clone / 'states' / 'reverse.npz').is_file()   # its folder made
    again = typed(clone, 'python eval.py --checkpoint runs/synthetic --task-state states/reverse.npz',
                  stdin='a b c\n').stdout
    assert first == again and first.strip()


def test_merge_into_a_relative_folder(clone):
    typed(clone, f'python train.py --lora-rank 2 --no-adapters --no-prefixes --no-fusion '
                 f'--out-dir runs/lora {TINY}')
    typed(clone, 'python eval.py --checkpoint runs/lora --instruction "Reverse the list." '
                 '--merge-into merged/x')
    assert {'config.json', 'model.safetensors'} <= set(os.listdir(clone / 'merged' / 'x'))


def test_eval_uses_the_run_arguments_and_never_overwrites_its_metrics(clone):
    typed(clone, f'python train.py --shots 1 --out-dir runs/one {TINY}')
    run = clone / 'runs' / 'one'
    trained = (run / 'metrics.json').read_text()
    os.remove(run / 'args.json')   # the checkpoints' meta holds the run's arguments
    r = typed(clone, 'python eval.py --checkpoint runs/one')
    assert '(hint, 1 shots)' in r.stderr and (run / 'metrics.json').read_text() == trained
    r = typed(clone, 'python eval.py --checkpoint runs/one --shots 0')
    other = run / 'eval-shots-0' / 'metrics.json'
    assert '(hint, 0 shots)' in r.stderr and 'eval-shots-0' in r.stderr + r.stdout
    assert other.is_file() and (run / 'metrics.json').read_text() == trained
    r = typed(clone, 'python eval.py --checkpoint runs/one/ckpt_0000002')   # not the run's final one
    assert (run / 'eval-ckpt-2' / 'metrics.json').is_file()
    assert (run / 'metrics.json').read_text() == trained
