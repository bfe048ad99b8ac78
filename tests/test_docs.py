"""The README and docs/: every shell command in their code blocks names the test that runs it, the
paper's SNI and P3 recipes run as typed (tiny model, local data), links resolve, the README stays
short.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from test_multihost import env
from test_p3 import DATASETS, make_p3
from test_workflow import SNI, hf_checkpoint, needs_shared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))

# Each command in a ```bash block of README.md or docs/*.md -> the test that runs it.
COVERED = {
    'pip install -r requirements.txt && python train.py': '.ci/run',
    'pip install -r requirements-dev.txt && python -m pytest -q -n 2 --dist loadfile tests':
        '.ci/run',
    'python train.py --task ni --shots 2':
        'test_workflow.py::test_init_from_transformers_checkpoints_and_runs',
    'python data.py --task ni --split test --shots 2 --show 3':
        'test_docs.py::test_sni_recipe_as_typed',
    'python train.py --task c4 --init google/t5-base-lm-adapt --out-dir runs/c4-base':
        'test_docs.py::test_sni_recipe_as_typed',
    'python train.py --task ni --shots 2 --init runs/c4-base --out-dir runs/ni-base-2pos':
        'test_docs.py::test_sni_recipe_as_typed',
    'python eval.py --checkpoint runs/ni-base-2pos': 'test_docs.py::test_sni_recipe_as_typed',
    'python train.py --task ni --shots 2 --init google/t5-base-lm-adapt --baseline full-input '
    '--out-dir runs/tk-base-2pos': 'test_docs.py::test_sni_recipe_as_typed',
    'python train.py --task p3 --shots 0 --fsdp 8 --out-dir runs/p3-xl':
        'test_docs.py::test_p3_recipe_as_typed',
    'python eval.py --checkpoint runs/p3-xl': 'test_docs.py::test_p3_recipe_as_typed',
    'python train.py --task p3 --shots 2 --baseline full-input --fsdp 8 --out-dir runs/p3-xl-full':
        'test_docs.py::test_p3_recipe_as_typed',
    'export TPU_NAME=hint-v4-64 ZONE=us-central2-b PROJECT=my-project ACCELERATOR=v4-64 '
    'RUNTIME_VERSION=tpu-ubuntu2204-base': 'test_tpu.py::test_dry_run_prints_what_would_run',
    'export TPU_NAME=hint ZONE=us-central2-b PROJECT=my-project ACCELERATOR=v4-8 '
    'RUNTIME_VERSION=tpu-ubuntu2204-base': 'test_tpu.py::test_create_and_delete',
    'bash tpu.sh create && bash tpu.sh setup': 'test_tpu.py::test_setup_is_sync_then_pip',
    'bash tpu.sh create': 'test_tpu.py::test_create_and_delete',
    'bash tpu.sh setup': 'test_tpu.py::test_setup_is_sync_then_pip',
    'bash tpu.sh run -- python3 train.py --task c4 --out-dir gs://my-bucket/c4-base':
        'test_tpu.py::test_run_arguments_arrive_unchanged',
    'bash tpu.sh run -- python3 train.py --task ni --shots 2 --init gs://my-bucket/c4-base '
    '--out-dir gs://my-bucket/ni-base-2pos': 'test_tpu.py::test_run_arguments_arrive_unchanged',
    'bash tpu.sh run -- python3 eval.py --checkpoint gs://my-bucket/ni-base-2pos':
        'test_tpu.py::test_run_arguments_arrive_unchanged',
    'bash tpu.sh run -- python3 train.py --task ni --shots 2 --out-dir runs/ni-base-2pos':
        'test_tpu.py::test_run_arguments_arrive_unchanged',
    'bash tpu.sh logs': 'test_tpu.py::test_logs',
    'bash tpu.sh stop': 'test_tpu.py::test_run_refuses_while_alive_then_stop_frees_it',
    'bash tpu.sh delete': 'test_tpu.py::test_create_and_delete',
    'python train.py --lora-rank 8 --no-adapters --no-prefixes --no-fusion --out-dir runs/lora':
        'test_as_typed.py::test_merge_into_a_relative_folder',
    'python eval.py --checkpoint runs/lora --instruction "Reverse the list." '
    '--merge-into merged/reverse': 'test_as_typed.py::test_merge_into_a_relative_folder',
}


def blocks(path, language):
    """The code blocks of one language in a markdown file, each a string."""
    return re.findall(rf'```{language}\n(.*?)```', open(path).read(), re.S)


def commands(path):
    """A markdown file's ```bash commands: comments dropped, `\\` lines joined."""
    found = []
    for block in blocks(path, 'bash'):
        for line in block.replace('\\\n', ' ').splitlines():
            command = ' '.join(re.sub(r'(^|\s)#.*$', '', line).split())
            if command:
                found.append(command)
    return found


def readme_command(start):
    """The README's command that starts with `start`, joined into one line."""
    return next(c for c in commands(PAGES[0]) if c.startswith(start))


def test_every_command_in_the_docs_names_a_test_that_runs_it():
    typed = {c for page in PAGES for c in commands(page)}
    assert typed - set(COVERED) == set(), 'a command in the docs without a test (add it to COVERED)'
    assert set(COVERED) - typed == set(), 'COVERED names a command the docs no longer have'
    for test in set(COVERED.values()) - {'.ci/run'}:
        file, name = test.split('::')
        assert f'def {name}(' in open(os.path.join(ROOT, 'tests', file)).read(), test
    ci = open(os.path.join(ROOT, '.ci', 'run')).read()
    for command, test in COVERED.items():
        if test == '.ci/run':   # as typed, with pip's -q
            assert command.replace('pip install', 'pip install -q') in ci, command


def test_readme_is_short_and_every_link_resolves():
    assert len(open(PAGES[0]).read().splitlines()) <= 250
    for page in PAGES:
        for target in re.findall(r'\]\(([^)#]+)\)', open(page).read()):
            if not target.startswith('http'):
                assert os.path.exists(os.path.join(os.path.dirname(page), target)), (page, target)


def test_python_blocks_import_what_they_name():
    for page in PAGES:
        for block in blocks(page, 'python'):
            imports = [line for line in block.splitlines() if line.startswith(('from ', 'import '))]
            exec('\n'.join(imports), {})


def write_c4(folder, texts, split):
    """C4 as its json.gz shards hold it."""
    os.makedirs(folder, exist_ok=True)
    with gzip.open(os.path.join(folder, f'c4-{split}.00000-of-00001.json.gz'), 'wt') as f:
        for text in texts:
            f.write(json.dumps({'text': text, 'url': 'x'}) + '\n')


def typed(folder, command, *extra, devices=1):
    """The README's `command` as typed in `folder`, plus small settings -> stdout + stderr."""
    argv = shlex.split(command) + list(extra)
    argv[0] = sys.executable
    r = subprocess.run(argv, cwd=folder, env=env(devices), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (command, (r.stdout + r.stderr)[-3000:])
    return r.stdout + r.stderr


SMALL = ['--batch-size', '4', '--steps', '2', '--adapter-dim', '4', '--prefix-len', '2',
         '--eval-instances', '4']
NI = ['--data-dir', 'sni', '--instruction-len', '128', '--input-len', '64', '--target-len', '8',
      '--max-instances-per-task', '4', *SMALL]


def clone(folder):
    """The scripts in a folder of their own, as a fresh clone has them."""
    for script in glob.glob(os.path.join(ROOT, '*.py')):
        shutil.copy(script, folder)


@needs_shared
def test_sni_recipe_as_typed(tmp_path):
    """C4 pretraining, SNI fine-tuning from it, its evaluation and the Tk-Instruct baseline: the
    README's commands in a fresh folder, `google/t5-base-lm-adapt` a tiny local transformers T5."""
    clone(tmp_path)
    os.symlink(os.path.abspath(SNI), tmp_path / 'sni')
    hf_checkpoint(tmp_path / 'hf-t5', tied=False)
    texts = [json.load(open(path))['Definition'][0] * 3
             for path in sorted(glob.glob(os.path.join(SNI, 'tasks', '*.json')))]
    write_c4(tmp_path / 'c4', texts[:12], 'train')
    write_c4(tmp_path / 'c4', texts[12:], 'validation')

    def hub_name_local(command):
        return command.replace('google/t5-base-lm-adapt', 'hf-t5')

    shown = typed(tmp_path, readme_command('python data.py --task ni'), '--data-dir', 'sni',
                  '--tokenizer', 'hf-t5/spiece.model')
    assert json.loads(shown.splitlines()[0])['task']
    typed(tmp_path, hub_name_local(readme_command('python train.py --task c4')), '--data-dir', 'c4',
          '--instruction-len', '64', '--input-len', '64', '--target-len', '16', *SMALL)
    typed(tmp_path, readme_command('python train.py --task ni --shots 2 --init runs/c4-base'), *NI)
    run = tmp_path / 'runs' / 'ni-base-2pos'
    trained = json.loads((run / 'metrics.json').read_text())
    assert trained['count'] == 4
    typed(tmp_path, readme_command('python eval.py --checkpoint runs/ni-base-2pos'))
    assert json.loads((run / 'metrics.json').read_text()) == trained   # the run's own settings
    baseline = readme_command('python train.py --task ni --shots 2 --init google')
    typed(tmp_path, hub_name_local(baseline), *NI)
    args = json.loads((tmp_path / 'runs' / 'tk-base-2pos' / 'args.json').read_text())
    assert args['baseline'] == 'full-input' and args['init'] == 'hf-t5'


@pytest.mark.slow
def test_p3_recipe_as_typed(tmp_path):
    """HINT on P3 under --fsdp 8, its rank classification and the full-input baseline: the README's
    commands in a fresh folder on 8 CPU devices, with a tiny model and a small P3. About 3 min."""
    clone(tmp_path)
    make_p3(tmp_path / 'p3')
    small = ['--data-dir', 'p3', '--p3-datasets', *DATASETS, '--p3-examples-per-dataset', '100',
             '--init', 'tiny', '--tokenizer', 'byte', '--batch-size', '8', '--steps', '2',
             '--adapter-dim', '4', '--prefix-len', '2', '--instruction-len', '128',
             '--input-len', '64', '--target-len', '16']
    out = typed(tmp_path, readme_command('python train.py --task p3 --shots 0'), *small, devices=8)
    assert 'held-out: accuracy_mean' in out
    run = tmp_path / 'runs' / 'p3-xl'
    trained = json.loads((run / 'metrics.json').read_text())
    typed(tmp_path, readme_command('python eval.py --checkpoint runs/p3-xl'), devices=8)
    assert json.loads((run / 'metrics.json').read_text()) == trained
    typed(tmp_path, readme_command('python train.py --task p3 --shots 2 --baseline'), *small,
          '--p3-examples', '40', devices=8)
    assert (tmp_path / 'runs' / 'p3-xl-full' / 'metrics.json').is_file()


def test_train_help_lists_the_flags():
    """docs/training.md: `python train.py --help` lists the flags, each with its default."""
    r = subprocess.run([sys.executable, 'train.py', '--help'], cwd=ROOT, env=env(1),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '--task' in r.stdout and '--lora-rank' in r.stdout


def clone_with_bench(folder, script):
    """clone(), plus bench/<script> beside the scripts it imports."""
    os.makedirs(folder / 'bench')
    clone(folder)
    shutil.copy(os.path.join(ROOT, 'bench', script), folder / 'bench')


def test_bench_synthetic_as_typed(tmp_path):
    """The README's synthetic table is this script's output: all three models trained and scored."""
    command = 'python bench/synthetic.py --steps 5000'
    assert f'`{command}`' in open(PAGES[0]).read()
    clone_with_bench(tmp_path, 'synthetic.py')
    out = typed(tmp_path, command, '--steps', '2', '--max-instances-per-task', '2',
                '--eval-instances', '4')
    for name in ('hint', 'full-input', 'input-only'):
        assert re.search(rf'^\| {name} \| [\d.]+ \| [\d.]+ \| [\d.]+ \|', out, re.M), out[-2000:]


@needs_shared
def test_bench_speed_as_typed(tmp_path):
    """The README's speed command, on the shared SNI sample beside the clone; tiny shapes, no (iii)
    training step (T5-small shapes: minutes)."""
    command = 'python bench/speed.py --no-eval --no-old --no-plot --hint-limit 32'
    assert ' '.join(command.split()) in ' '.join(open(PAGES[0]).read().split())
    os.symlink(os.path.abspath(os.path.join(SNI, '..', '..')), tmp_path / 'shared')
    clone_with_bench(tmp_path / 'repo', 'speed.py')
    out = typed(tmp_path / 'repo', command, '--hint-limit', '4', '--sizes', 'tiny', '--repeats',
                '1', '--no-train', '--cache-dir', '.cache')
    assert len(re.findall(r'^\| tiny \| Def', out, re.M)) == 3, out[-2000:]


def test_bench_memory_as_typed(tmp_path):
    """The README's memory table comes from this script: a tiny model's rows."""
    command = 'python bench/memory.py'
    assert f'`{command}`' in open(PAGES[0]).read()
    clone_with_bench(tmp_path, 'memory.py')
    out = typed(tmp_path, command, '--models', 'tiny', '--devices', '1', '8', '--memory', '16',
                '--lengths', '64', '64', '16', '--batch-size', '16', '--no-flops')
    assert re.search(r'^\| 8 x 16 \| (\d+|no) \|$', out, re.M), out[-2000:]
