"""tpu.sh against a fake `gcloud` (and a fake `sudo`) first on PATH: no network, no TPU.

The fake gcloud appends its argv (one JSON list per line) to $FAKE_GCLOUD_LOG, fails the first
$FAKE_GCLOUD_FAIL calls (or all, with FAKE_GCLOUD_FAIL_ALWAYS=1) with exit 255 as ssh does, and
with FAKE_GCLOUD_EXEC=1 plays every worker at once: `ssh --command CMD` runs `bash -c CMD` in the
sandbox home $FAKE_HOME (and still exits 255 for the first $FAKE_GCLOUD_FAIL_AFTER calls), and
`scp SRC NAME:DEST` copies SRC to $FAKE_HOME/DEST.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'tpu.sh')
PREFIX = ['compute', 'tpus', 'tpu-vm']
LOC = ['--zone', 'us-central2-b', '--project', 'my-project']
SETTINGS = dict(TPU_NAME='hint-test', ZONE='us-central2-b', PROJECT='my-project',
                ACCELERATOR='v4-64', RUNTIME_VERSION='tpu-ubuntu2204-base')

FAKE_GCLOUD = r'''#!PYTHON
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
log = os.environ['FAKE_GCLOUD_LOG']
calls = sum(1 for _ in open(log)) if os.path.exists(log) else 0
with open(log, 'a') as f:
    f.write(json.dumps(args) + '\n')
if os.environ.get('FAKE_GCLOUD_FAIL_ALWAYS') == '1' or calls < int(os.environ.get('FAKE_GCLOUD_FAIL', '0')):
    print('ssh: connect to host 10.130.0.7 port 22: Connection timed out', file=sys.stderr)
    sys.exit(255)
if os.environ.get('FAKE_GCLOUD_EXEC') == '1':
    home = os.environ['FAKE_HOME']
    if args[3] == 'ssh':
        cmd = args[args.index('--command') + 1]
        rc = subprocess.run(['bash', '-c', cmd], cwd=home, env=dict(os.environ, HOME=home)).returncode
        if calls < int(os.environ.get('FAKE_GCLOUD_FAIL_AFTER', '0')):  # ran, then ssh broke
            sys.exit(255)
        sys.exit(rc)
    if args[3] == 'scp':
        dest = [a for a in args[5:] if not a.startswith('-') and ':' in a][0]
        shutil.copy(args[4], os.path.join(home, dest.split(':', 1)[1]))
'''
FAKE_SUDO = '#!/bin/sh\necho "$*" >> "$FAKE_SUDO_LOG"\n'


@pytest.fixture
def fake(tmp_path):
    """Fake bin dir + sandbox home; returns a runner `tpu(*args, script=..., **env) -> result`."""
    bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
    bin_dir.mkdir()
    (home / 'hint').mkdir(parents=True)
    (bin_dir / 'gcloud').write_text(FAKE_GCLOUD.replace('PYTHON', sys.executable))
    (bin_dir / 'sudo').write_text(FAKE_SUDO)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log = tmp_path / 'gcloud.jsonl'
    base = {k: v for k, v in os.environ.items()
            if k not in SETTINGS and k not in ('DRY_RUN', 'REPO_DIR', 'RETRIES', 'STOP_GRACE')}
    base.update(SETTINGS, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', RETRY_SLEEP='0',
                FAKE_GCLOUD_LOG=str(log), FAKE_HOME=str(home), FAKE_SUDO_LOG=str(tmp_path / 'sudo.log'))

    def tpu(*args, script=SCRIPT, unset=(), **env):
        e = dict(base, **env)
        for k in unset:
            e.pop(k)
        r = subprocess.run(['bash', script, *args], cwd=os.path.dirname(script), env=e,
                           capture_output=True, text=True, timeout=60)
        r.calls = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return r

    tpu.home, tpu.tmp = home, tmp_path
    yield tpu
    pid_file = home / 'hint-logs' / 'run.pid'   # never leave a background process behind
    if pid_file.exists():
        subprocess.run(['kill', '-KILL', '--', '-' + pid_file.read_text().strip()], capture_output=True)


def ssh_command(call):
    """The --command of an `ssh` call, after checking the call's shape."""
    assert call[:5] == PREFIX + ['ssh', 'hint-test'] and call[5:9] == LOC
    return call[call.index('--command') + 1]


def wait_for(cond, timeout=10.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, 'timed out'
        time.sleep(0.05)


def dead(pid: int) -> bool:  # gone, or a zombie nobody reaped (this sandbox may not reap orphans)
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except FileNotFoundError:
        return True


# ---------------------------------------------------------------- the gcloud commands


def test_create_and_delete(fake):
    r = fake('create')
    assert r.returncode == 0, r.stderr
    assert r.calls == [PREFIX + ['create', 'hint-test'] + LOC +
                       ['--accelerator-type', 'v4-64', '--version', 'tpu-ubuntu2204-base']]
    assert fake('create', '--spot').calls[0][-1] == '--spot'
    r = fake('delete')
    assert r.returncode == 0 and r.calls == [PREFIX + ['delete', 'hint-test'] + LOC + ['--quiet']]


@pytest.mark.parametrize('sub,needle', [('status', 'training (pid'), ('stop', 'libtpu_lockfile'),
                                        ('run', 'nohup setsid')])
def test_commands_go_to_all_workers(fake, sub, needle):
    r = fake(sub, *(['--', 'python3', 'train.py'] if sub == 'run' else []))
    assert r.returncode == 0, r.stderr
    assert len(r.calls) == 1 and '--worker=all' in r.calls[0]
    assert needle in ssh_command(r.calls[0])


def test_logs(fake):
    for args, worker in [((), '0'), (('3',), '3')]:
        r = fake('logs', *args)
        assert r.returncode == 0, r.stderr
        assert r.calls == [PREFIX + ['ssh', 'hint-test'] + LOC +
                           [f'--worker={worker}', '--command', 'tail -n 100 -F ~/hint-logs/run.log']]
    r = fake('logs', 'x')
    assert r.returncode == 2 and r.calls == []


def test_stop_grace_and_cleanup_steps(fake):
    cmd = ssh_command(fake('stop', STOP_GRACE='7').calls[0])
    assert 'GRACE=7;' in cmd and 'kill -TERM' in cmd and 'kill -KILL' in cmd
    assert 'sudo rm -f /tmp/libtpu_lockfile' in cmd and 'sudo fuser -k /dev/accel*' in cmd
    assert fake('stop', STOP_GRACE='soon').returncode == 1


# ---------------------------------------------------------------- run, status, stop for real


TRICKY = ['a b', "it's", '"q"', '$HOME', '`id`', '*', '', 'x\ny', '--out-dir', 'gs://b/r u n', '\\']


def test_run_arguments_arrive_unchanged(fake):
    prog = 'import sys, json; json.dump(sys.argv[1:], open("out.json", "w"))'
    r = fake('run', '--', 'python3', '-c', prog, *TRICKY, FAKE_GCLOUD_EXEC='1')
    assert r.returncode == 0, r.stderr
    assert 'started pid' in r.stdout
    out = fake.home / 'hint' / 'out.json'   # the command runs in REPO_DIR
    wait_for(lambda: out.exists() and out.stat().st_size > 0)
    time.sleep(0.1)
    assert json.loads(out.read_text()) == TRICKY
    assert (fake.home / 'hint-logs' / 'run.pid').read_text().strip().isdigit()
    assert (fake.home / 'hint-logs' / 'run.log').exists()


def test_dry_run_line_is_the_command(fake):
    """The DRY_RUN line, pasted into a shell, is exactly the argv that gcloud gets."""
    args = ['run', '--', 'python3', 'train.py', *TRICKY]
    printed = fake(*args, DRY_RUN='1').stdout
    called = fake(*args).calls[0]
    same_id = lambda s: re.sub(r'ID=[0-9-]+;', 'ID=X;', s)
    assert [same_id(a) for a in shlex.split(printed)] == ['gcloud'] + [same_id(a) for a in called]


def test_run_refuses_while_alive_then_stop_frees_it(fake):
    r = fake('run', '--', 'sleep', '30', FAKE_GCLOUD_EXEC='1')
    assert r.returncode == 0, r.stderr
    pid = int((fake.home / 'hint-logs' / 'run.pid').read_text())
    wait_for(lambda: os.getpgid(pid) == pid)   # setsid: its own process group
    r = fake('status', FAKE_GCLOUD_EXEC='1')
    assert r.returncode == 0 and f'training (pid {pid})' in r.stdout
    r = fake('run', '--', 'sleep', '30', FAKE_GCLOUD_EXEC='1')
    assert r.returncode == 1 and len(r.calls) == 1   # a remote refusal is not retried
    assert 'busy' in r.stderr and 'tpu.sh: worker all: remote command failed (exit 3)' in r.stderr
    r = fake('stop', FAKE_GCLOUD_EXEC='1', STOP_GRACE='5')
    assert r.returncode == 0, r.stderr
    assert 'SIGTERM' in r.stdout and 'SIGKILL' not in r.stdout and dead(pid)
    sudo = (fake.tmp / 'sudo.log').read_text()
    assert 'rm -f /tmp/libtpu_lockfile' in sudo and 'fuser -k' in sudo
    assert 'idle' in fake('status', FAKE_GCLOUD_EXEC='1').stdout
    assert fake('run', '--', 'true', FAKE_GCLOUD_EXEC='1').returncode == 0


def test_run_retried_after_ssh_broke_starts_once(fake):
    r = fake('run', '--', 'sleep', '30', FAKE_GCLOUD_EXEC='1', FAKE_GCLOUD_FAIL_AFTER='1')
    assert r.returncode == 0, r.stderr
    assert len(r.calls) == 2 and r.calls[0] == r.calls[1]   # the same run ID both times
    assert r.stdout.count('started pid') == 1 and r.stdout.endswith(': started\n')


def test_stop_kills_what_ignores_sigterm(fake):
    r = fake('run', '--', 'bash', '-c', 'trap "" TERM; sleep 30', FAKE_GCLOUD_EXEC='1')
    assert r.returncode == 0, r.stderr
    pid = int((fake.home / 'hint-logs' / 'run.pid').read_text())
    wait_for(lambda: os.getpgid(pid) == pid)
    time.sleep(0.2)   # let bash set its trap
    r = fake('stop', FAKE_GCLOUD_EXEC='1', STOP_GRACE='1')
    assert r.returncode == 0 and 'SIGKILL after 1 s' in r.stdout and dead(pid)


# ---------------------------------------------------------------- sync and setup


@pytest.fixture
def repo(tmp_path):
    """A small git checkout holding a copy of tpu.sh, with one commit: (its path, the commit)."""
    d = tmp_path / 'repo'
    d.mkdir()
    shutil.copy(SCRIPT, d / 'tpu.sh')
    (d / 'train.py').write_text('print("v1")\n')
    (d / 'old.py').write_text('x = 1\n')
    (d / 'requirements.txt').write_text('numpy\n')
    (d / '.gitignore').write_text('runs/\n')
    git = ['git', '-C', str(d), '-c', 'user.name=t', '-c', 'user.email=t@t']
    subprocess.run(git + ['init', '-q'], check=True)
    subprocess.run(git + ['add', '.'], check=True)
    subprocess.run(git + ['commit', '-qm', 'one'], check=True)
    head = subprocess.run(git + ['rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    return d, head


def test_sync_ships_the_tree_as_git_sees_it(fake, repo):
    repo, head = repo
    script = str(repo / 'tpu.sh')
    remote = fake.home / 'hint'
    r = fake('sync', script=script, FAKE_GCLOUD_EXEC='1')
    assert r.returncode == 0, r.stderr
    scp, ssh = r.calls
    assert scp[:4] == PREFIX + ['scp'] and scp[5:] == LOC + ['hint-test:hint-code.tar.gz', '--worker=all']
    assert 'REV=' + head in ssh_command(ssh)
    assert (remote / 'REVISION').read_text().strip() == head and head in r.stdout
    assert (remote / 'train.py').read_text() == 'print("v1")\n' and (remote / 'old.py').exists()
    assert not (fake.home / 'hint-code.tar.gz').exists()

    # uncommitted edits, a new untracked file, a deleted file, an ignored file, remote outputs
    (repo / 'train.py').write_text('print("v2")\n')
    (repo / 'new.py').write_text('y = 2\n')
    (repo / 'old.py').unlink()
    (repo / 'runs').mkdir()
    (repo / 'runs' / 'local.txt').write_text('ignored\n')
    (remote / 'runs').mkdir()
    (remote / 'runs' / 'ckpt').write_text('keep me\n')
    r = fake('sync', script=script, FAKE_GCLOUD_EXEC='1')
    assert r.returncode == 0, r.stderr
    assert (remote / 'REVISION').read_text().strip() == head + '-dirty'
    assert (remote / 'train.py').read_text() == 'print("v2")\n' and (remote / 'new.py').exists()
    assert not (remote / 'old.py').exists() and not (remote / 'runs' / 'local.txt').exists()
    assert (remote / 'runs' / 'ckpt').read_text() == 'keep me\n'


def test_setup_is_sync_then_pip(fake, repo):
    repo, _ = repo
    r = fake('setup', script=str(repo / 'tpu.sh'))
    assert r.returncode == 0, r.stderr
    assert [c[3] for c in r.calls] == ['scp', 'ssh', 'ssh']
    pip = ssh_command(r.calls[2])
    assert '--worker=all' in r.calls[2]
    assert pip.index('pip install -U "jax[tpu]"') < pip.index('pip install -r requirements.txt gcsfs')
    assert 'cd "$R"' in pip and 'R=~/hint;' in pip
    assert 'R=/data/my\\ repo;' in ssh_command(fake('setup', script=str(repo / 'tpu.sh'),
                                                    REPO_DIR='/data/my repo').calls[2])


# ---------------------------------------------------------------- retries and errors


def test_retry_then_success(fake):
    r = fake('status', FAKE_GCLOUD_FAIL='2')
    assert r.returncode == 0, r.stderr
    assert len(r.calls) == 3 and r.calls[0] == r.calls[2]
    assert 'worker all: ssh failed (exit 255), try 2/3' in r.stderr


@pytest.mark.parametrize('args,target', [(('status',), 'all'), (('logs', '3'), '3')])
def test_retries_exhausted(fake, args, target):
    r = fake(*args, FAKE_GCLOUD_FAIL_ALWAYS='1')
    assert r.returncode == 1 and len(r.calls) == 3
    assert r.stderr.splitlines()[-1].startswith(f'tpu.sh: worker {target}: ssh failed 3 times')
    assert len(fake(*args, FAKE_GCLOUD_FAIL_ALWAYS='1', RETRIES='5').calls) == 5


def test_create_is_not_retried(fake):
    r = fake('create', FAKE_GCLOUD_FAIL_ALWAYS='1')
    assert r.returncode == 1 and len(r.calls) == 1 and 'tpu.sh: create failed' in r.stderr


NEEDS = [(sub, var) for sub in ['setup', 'sync', 'run', 'logs', 'status', 'stop', 'delete']
         for var in ['TPU_NAME', 'ZONE', 'PROJECT']]
NEEDS += [('create', var) for var in SETTINGS]


@pytest.mark.parametrize('sub,var', NEEDS)
def test_missing_setting(fake, sub, var):
    r = fake(sub, *(['--', 'true'] if sub == 'run' else []), unset=[var])
    assert r.returncode == 2 and r.calls == [] and r.stdout == ''
    assert r.stderr == f'tpu.sh: {var} is not set (export {var}=...)\n'


def test_only_create_needs_accelerator_and_runtime(fake):
    r = fake('status', unset=['ACCELERATOR', 'RUNTIME_VERSION'])
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize('args', [(), ('launch',), ('run',), ('run', '--')])
def test_usage(fake, args):
    r = fake(*args)
    assert r.returncode == 2 and r.calls == [] and 'usage' in r.stderr


# ---------------------------------------------------------------- dry run


@pytest.mark.parametrize('args', [('create',), ('delete',), ('status',), ('stop',), ('logs', '3'),
                                  ('run', '--', 'python3', 'train.py', '--out-dir', 'gs://b/r')])
def test_dry_run_prints_what_would_run(fake, args):
    r = fake(*args, DRY_RUN='1')
    assert r.returncode == 0 and r.calls == [], r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith('gcloud compute tpus tpu-vm ')
    if args[0] != 'run':   # run's line carries a fresh run ID; see test_dry_run_line_is_the_command
        assert shlex.split(lines[0]) == ['gcloud'] + fake(*args).calls[0]


def test_dry_run_setup(fake, repo):
    repo, _ = repo
    r = fake('setup', script=str(repo / 'tpu.sh'), DRY_RUN='1')
    assert r.returncode == 0 and r.calls == [], r.stderr
    gcloud = [l for l in r.stdout.splitlines() if l.startswith('gcloud ')]
    assert [shlex.split(l)[4] for l in gcloud] == ['scp', 'ssh', 'ssh']
    assert not (fake.home / 'hint' / 'REVISION').exists()
