"""The paper's workflow as the user types it, through the scripts' own entry points: --init from
transformers checkpoints and from a run, SNI fetched by itself, a RoBERTa instruction encoder.
(test_safety.py: what a kill, a restart, a divergence or bad input must never do.)

Each script runs as a subprocess (`python train.py ...`), as the user runs it. Tiny models, few steps.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

import hypernet as HN
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, '..', 'shared')
SNI = os.path.join(SHARED, 'data', 'sni_sample')
SPIECE = os.path.join(SHARED, 'assets', 't5_tokenizer', 'spiece.model')
needs_shared = pytest.mark.skipif(not (os.path.isdir(SNI) and os.path.isfile(SPIECE)),
                                  reason='../shared/data/sni_sample or ../shared/assets/t5_tokenizer not found')

# Small runs: a tiny model, a few steps, a few evaluation instances.
TINY = ['--init', 'tiny', '--batch-size', '4', '--adapter-dim', '4', '--prefix-len', '2', '--eval-instances', '2']
NI_SMALL = ['--task', 'ni', '--shots', '2', '--instruction-len', '128', '--input-len', '64', '--target-len', '8',
            '--max-instances-per-task', '4', '--batch-size', '4', '--steps', '2', '--adapter-dim', '4',
            '--prefix-len', '2', '--eval-instances', '4']


# Tokenized data shared by every run here (conftest.py shares XLA's compiled steps: a persistent
# compilation cache turns a tiny run's 20-30 s, mostly compilation, into about 10).
CACHE = os.path.join(tempfile.gettempdir(), 'hint-test-workflow-data')
ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')


def run(script, *args, cache=CACHE, stdin=None, prefix=(), timeout=300):
    """`python SCRIPT ARGS` in the repo root -> CompletedProcess (text)."""
    argv = [*prefix, sys.executable, script, *map(str, args)]
    if cache is not None:
        argv += ['--cache-dir', str(cache)]
    env = ENV
    return subprocess.run(argv, cwd=ROOT, env=env, input=stdin if stdin is not None else '', capture_output=True,
                          text=True, timeout=timeout)


def fails_cleanly(r, *needles):
    """Exit code non-zero, one 'error: ...' line naming what is wrong, no traceback."""
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-2000:]
    assert 'Traceback' not in out, out[-3000:]
    for needle in needles:
        assert needle in out, (needle, out[-2000:])


def ok(r):
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r


def params_of(run_dir):
    return runs.load_run(str(run_dir))[2]


def max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------------------------
# 1. The paper's workflow: --init a transformers checkpoint, then a run; SNI cloned when not given.


def hf_checkpoint(path, tied):
    """A small T5 saved by transformers' save_pretrained, with T5's real vocabulary and spiece.model
    beside it, as on the hub: v1.0 (ReLU, tied) or v1.1 (gated GELU, untied)."""
    from conftest import save_random_t5
    kw = dict(vocab_size=32128, feed_forward_proj='relu', tie_word_embeddings=True) if tied else dict(vocab_size=32128)
    save_random_t5(str(path), 'tiny', **kw)
    shutil.copy(SPIECE, os.path.join(path, 'spiece.model'))
    return str(path)


def sni_git_repo(path):
    """A local git repository standing in for github.com/allenai/natural-instructions."""
    shutil.copytree(SNI, path)
    git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', '-C', str(path)]
    for cmd in (['init', '-q'], ['add', '.'], ['commit', '-qm', 'sample']):
        subprocess.run(git + cmd, check=True, capture_output=True)
    return f'file://{path}'


@needs_shared
def test_init_from_transformers_checkpoints_and_runs(tmp_path):
    # v1.1 (untied), SNI fetched from --ni-source (no --data-dir): the design card's command
    v11 = hf_checkpoint(tmp_path / 'hf-v11', tied=False)
    source = sni_git_repo(tmp_path / 'ni-remote')
    r = ok(run('train.py', *NI_SMALL, '--init', v11, '--ni-source', source, '--out-dir', tmp_path / 'a',
               cache=tmp_path / 'cache'))
    assert 'cloning' in r.stderr and 'Cloning into' in r.stderr   # visible progress
    clone = tmp_path / 'cache' / 'natural-instructions'
    shallow = subprocess.run(['git', '-C', clone, 'rev-parse', '--is-shallow-repository'], capture_output=True, text=True)
    assert shallow.stdout.strip() == 'true'
    metrics = json.load(open(tmp_path / 'a' / 'metrics.json'))
    assert metrics['count'] == 4 and 'rougeL' in metrics['overall']
    # the clone is reused: no second clone, even with the source gone
    shutil.rmtree(tmp_path / 'ni-remote')
    r = ok(run('data.py', '--task', 'ni', '--split', 'test', '--tokenizer', SPIECE, '--ni-source', source,
               '--show', '1', cache=tmp_path / 'cache'))
    assert 'cloning' not in r.stderr and json.loads(r.stdout.splitlines()[0])['task']

    # continuing from that HINT run: --init RUN
    ok(run('train.py', *NI_SMALL, '--init', tmp_path / 'a', '--data-dir', clone, '--out-dir', tmp_path / 'b',
           cache=tmp_path / 'cache'))
    b = params_of(tmp_path / 'b')
    assert set(b) == {'t5', 'hyper'} and 0 < max_diff(params_of(tmp_path / 'a'), b)   # it trained on from a

    # v1.0 (ReLU, tied), as the README writes it: --data-dir a clone
    v10 = hf_checkpoint(tmp_path / 'hf-v10', tied=True)
    ok(run('train.py', *NI_SMALL, '--init', v10, '--data-dir', SNI, '--out-dir', tmp_path / 'c'))
    assert json.load(open(tmp_path / 'c' / 'metrics.json'))['count'] == 4
    cfg = runs.load_run(str(tmp_path / 'c'))[0]
    assert cfg.tie_word_embeddings and not cfg.gated_gelu


def roberta_checkpoint(path):
    """A small random RoBERTa as transformers saves it, with a byte-level BPE tokenizer.json whose
    special tokens have RoBERTa's ids (<s> 0, <pad> 1, </s> 2, <unk> 3)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel
    import torch
    texts = [json.load(open(os.path.join(SNI, 'tasks', f)))['Definition'][0] for f in sorted(os.listdir(os.path.join(SNI, 'tasks')))]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=600, special_tokens=['<s>', '<pad>', '</s>', '<unk>', '<mask>'])
    os.makedirs(path)
    tok.save(os.path.join(path, 'tokenizer.json'))
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=258, type_vocab_size=1, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2)
    RobertaModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return str(path)


@needs_shared
def test_roberta_instruction_encoder_end_to_end(tmp_path):
    v11 = hf_checkpoint(tmp_path / 'hf', tied=False)
    rob = roberta_checkpoint(tmp_path / 'roberta')
    ok(run('train.py', *NI_SMALL, '--init', v11, '--data-dir', SNI, '--instruction-encoder', 'roberta',
           '--instruction-encoder-init', rob, '--out-dir', tmp_path / 'run'))
    cfg, hcfg, params, _ = runs.load_run(str(tmp_path / 'run'))
    assert hcfg.instruction_encoder == 'roberta' and hcfg.roberta.hidden_size == 32 and 'proj' in params['hyper']
    ok(run('eval.py', '--checkpoint', tmp_path / 'run', '--out-dir', tmp_path / 'eval', '--eval-instances', 4))
    rows = [json.loads(line) for line in open(tmp_path / 'eval' / 'predictions.jsonl')]
    assert len(rows) == 4 and rows == [json.loads(line) for line in open(tmp_path / 'run' / 'predictions.jsonl')]
