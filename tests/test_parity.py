"""Parity tests against transformers (PyTorch): same weights, float32, CPU.

Seeded random checkpoints at the real t5-small (v1.0) and t5-v1_1-small (v1.1) shapes and a 2-layer
roberta-base-width RoBERTa are built once per session (tests/conftest.py), saved by transformers and loaded
by model.py. Every measured max |ours - HF| is printed as it is measured (`pytest -s`) and again as one
table at the end of the module.

    pytest -q -s tests/test_parity.py
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from data import load_tokenizer  # noqa: E402
from model import (load_roberta, load_t5, roberta_forward, t5_encode,  # noqa: E402
                   shift_right, t5_forward, t5_generate)

TOL = 1e-4
GEN_LEN = 32
EOS_STEP = 8  # see test_t5_generate_eos_padding
T5_MODELS = ['t5-small', 't5-v1_1-small']
DIFFS: list[tuple[str, str]] = []  # (what, value), printed as a table at module teardown


def record(what: str, value) -> None:
    s = value if isinstance(value, str) else f'{float(value):.3e}'
    DIFFS.append((what, s))
    print(f'\n[parity] {what:<58s} {s}', flush=True)


@pytest.fixture(scope='module', autouse=True)
def _summary():
    yield
    if DIFFS:
        w = max(len(k) for k, _ in DIFFS)
        lines = [f'  {k:<{w}s}  {v}' for k, v in DIFFS]
        print(f'\n\n===== parity vs transformers {__import__("transformers").__version__} '
              f'(float32, CPU; max |ours - HF| unless stated) =====\n' + '\n'.join(lines) + '\n', flush=True)


@contextlib.contextmanager
def one_torch_thread():
    """The HF reference runs at batch 3: torch's intra-op threads only add overhead there, and spin-waiting
    threads get very slow on a busy 2-core CI box (HF greedy generation: 11 s with 2 threads, 1.2 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


# ----------------------------------------------------------------------------------------------
# Inputs: a padded batch of 3 (right padding with 0), labels of different lengths.

ENC_LENS, DEC_LENS = (150, 6, 37), (40, 4, 17)  # 150: relative distances past max_distance 128


def padded_ids(lens, seed, low=2, high=32000, pad=0):
    rs = np.random.RandomState(seed)
    ids = np.full((len(lens), max(lens)), pad, np.int64)
    for i, n in enumerate(lens):
        ids[i, :n] = rs.randint(low, high, size=n)
    return ids


ENC_IDS = padded_ids(ENC_LENS, seed=1)
LABELS = padded_ids(DEC_LENS, seed=2)
DEC_IN = np.concatenate([np.zeros((3, 1), np.int64), LABELS[:, :-1]], axis=1)  # shift right, start id 0


def j(x):
    return jnp.asarray(np.asarray(x), jnp.int32)


@pytest.fixture(scope='module')
def t5(hf_t5):
    """name -> (ckpt, cfg, params, hf outputs), computed once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            ck = hf_t5(name)
            m = ck.model
            ids, mask = torch.tensor(ENC_IDS), torch.tensor(ENC_IDS != 0)
            with torch.no_grad(), one_torch_thread():
                enc = m.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
                logits = m(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor(DEC_IN)).logits.numpy()
                hf_labels = torch.tensor(np.where(LABELS == 0, -100, LABELS))
                loss = float(m(input_ids=ids, attention_mask=mask, labels=hf_labels).loss)
                gen = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GEN_LEN, do_sample=False,
                                 num_beams=1).numpy()
            cfg, params = load_t5(ck.path)
            cache[name] = dict(ck=ck, cfg=cfg, params=params, enc=enc, logits=logits, loss=loss, gen=gen)
        return cache[name]
    return get


# ----------------------------------------------------------------------------------------------
# T5 numerics


@pytest.mark.parametrize('name', T5_MODELS)
def test_t5_encoder(t5, name):
    r = t5(name)
    ours = np.asarray(t5_encode(r['params'], r['cfg'], j(ENC_IDS)))
    assert ours.dtype == np.float32
    valid = ENC_IDS != 0
    d = max_diff(ours[valid], r['enc'][valid])
    record(f'{name}: encoder states (non-pad positions)', d)
    # HF computes pad positions too (their queries see the unmasked keys): compare them as well
    d_all = max_diff(ours, r['enc'])
    record(f'{name}: encoder states (all positions)', d_all)
    assert d <= TOL and d_all <= TOL


@pytest.mark.parametrize('name', T5_MODELS)
def test_t5_logits(t5, name):
    r = t5(name)
    ours = np.asarray(t5_forward(r['params'], r['cfg'], j(ENC_IDS), j(DEC_IN)))
    assert ours.dtype == np.float32 and ours.shape == r['logits'].shape
    d = max_diff(ours, r['logits'])
    record(f'{name}: decoder logits (all positions)', d)
    record(f'{name}:   (HF logits std, for scale)', f'{r["logits"].std():.3f}')
    assert d <= TOL
    assert (ours.argmax(-1) == r['logits'].argmax(-1)).all()


@pytest.mark.parametrize('name', T5_MODELS)
def test_t5_loss(t5, name):
    """The trainer's loss (train.token_losses: cross-entropy summed over non-padding targets), per token."""
    from train import token_losses
    r = t5(name)
    ce, _ = token_losses(t5_forward(r['params'], r['cfg'], j(ENC_IDS), shift_right(j(LABELS))), j(LABELS))
    ours = float(ce / (LABELS != 0).sum())
    d = abs(ours - r['loss'])
    record(f'{name}: loss |ours - HF| (ours {ours:.6f}, HF {r["loss"]:.6f})', d)
    assert d <= TOL


@pytest.mark.parametrize('name', T5_MODELS)
def test_t5_generate(t5, name):
    r = t5(name)
    ours = np.asarray(t5_generate(r['params'], r['cfg'], j(ENC_IDS), max_len=GEN_LEN))
    assert ours.shape == (3, GEN_LEN)
    hf = r['gen']
    assert (hf[:, 0] == 0).all()  # HF returns the start token first
    hf = hf[:, 1:]
    hf = np.pad(hf, ((0, 0), (0, GEN_LEN - hf.shape[1])))  # HF stops early once every row emitted EOS
    n_eos = [int((row == 1).any()) and int(np.argmax(row == 1)) + 1 for row in hf]
    record(f'{name}: greedy tokens equal / total', f'{int((ours == hf).sum())}/{hf.size}  eos step (0 = none)='
           f'{n_eos}  distinct tokens/row={[len(set(row.tolist())) for row in hf]}')
    # Sensitivity: at least one row runs all 32 steps without EOS, so the loop is really exercised.
    assert any(n == 0 for n in n_eos), n_eos
    np.testing.assert_array_equal(ours, hf)


def test_t5_generate_eos_padding(t5, tmp_path):
    """Rows that emit EOS do so at the same step as HF's, and every position after it is 0. Random weights
    rarely pick EOS: in a copy of t5-v1_1-small, make the lm_head's EOS row a copy of the row of the token
    that row 0 generates at step EOS_STEP, scaled by 1.001, so that EOS wins wherever that token would have."""
    import copy
    r = t5('t5-v1_1-small')
    m = copy.deepcopy(r['ck'].model)
    tok = int(r['gen'][0, EOS_STEP])  # r['gen'][:, 0] is the start token
    with torch.no_grad(), one_torch_thread():
        m.lm_head.weight[1] = 1.001 * m.lm_head.weight[tok]
        hf = m.generate(input_ids=torch.tensor(ENC_IDS), attention_mask=torch.tensor(ENC_IDS != 0),
                        max_new_tokens=GEN_LEN, do_sample=False, num_beams=1).numpy()[:, 1:]
    hf = np.pad(hf, ((0, 0), (0, GEN_LEN - hf.shape[1])))
    m.save_pretrained(str(tmp_path))
    shutil.copy(os.path.join(r['ck'].path, 'config.json'), tmp_path)  # hub-style v1.1 config
    cfg, params = load_t5(str(tmp_path))
    ours = np.asarray(t5_generate(params, cfg, j(ENC_IDS), max_len=GEN_LEN))
    eos_at = [int(np.argmax(row == 1)) + 1 if (row == 1).any() else 0 for row in hf]
    record(f't5-v1_1-small, EOS forced at ~step {EOS_STEP}: greedy tokens equal',
           f'{int((ours == hf).sum())}/{hf.size}  eos={eos_at}')
    assert sum(1 < n < GEN_LEN for n in eos_at) >= 1 and 0 in eos_at, eos_at  # early stops, and a full row
    np.testing.assert_array_equal(ours, hf)
    for row, n in zip(ours, eos_at):
        assert (row[n:] == 0).all() if n else (row != 0).all()


def test_t5_v11_config_as_saved_by_transformers5(t5, tmp_path):
    """transformers 5 writes v1.1 configs as tie_word_embeddings=true + scale_decoder_outputs=false (and keeps
    a separate lm_head.weight): load_t5 must then use lm_head and not scale, like HF does."""
    r = t5('t5-v1_1-small')
    with open(os.path.join(r['ck'].path, 'config.json')) as f:
        c = json.load(f)
    c['tie_word_embeddings'], c['scale_decoder_outputs'] = True, False
    (tmp_path / 'config.json').write_text(json.dumps(c))
    os.symlink(os.path.join(r['ck'].path, 'model.safetensors'), tmp_path / 'model.safetensors')
    cfg, params = load_t5(str(tmp_path))
    ours = np.asarray(t5_forward(params, cfg, j(ENC_IDS), j(DEC_IN)))
    d = max_diff(ours, r['logits'])
    record('t5-v1_1-small, transformers-5-style config: logits', d)
    assert d <= TOL


def test_t5_v11_saved_by_transformers5_without_lm_head(tmp_path):
    """A v1.1 T5 made and saved by transformers 5 as it is: the output layer tied to the embedding,
    no lm_head.weight in the file, scale_decoder_outputs false. load_t5 reads it as transformers does."""
    from conftest import T5_SHAPES, _reinit_t5
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**T5_SHAPES['t5-v1_1-small'])).eval()
    _reinit_t5(model, seed=0, tied=False)
    with torch.no_grad():   # the embedding is also the output layer: logits O(1), well-conditioned
        model.shared.weight.mul_(0.05)
    model.save_pretrained(tmp_path)
    with open(tmp_path / 'config.json') as f:
        saved = json.load(f)
    assert saved['tie_word_embeddings'] and saved['scale_decoder_outputs'] is False
    from safetensors import safe_open
    with safe_open(str(tmp_path / 'model.safetensors'), 'np') as f:
        assert 'lm_head.weight' not in f.keys()
    with torch.no_grad(), one_torch_thread():
        theirs = model(input_ids=torch.tensor(ENC_IDS), attention_mask=torch.tensor(ENC_IDS != 0),
                       decoder_input_ids=torch.tensor(DEC_IN)).logits.numpy()
    cfg, params = load_t5(str(tmp_path))
    ours = np.asarray(t5_forward(params, cfg, j(ENC_IDS), j(DEC_IN)))
    d = max_diff(ours, theirs)
    record('t5-v1_1-small saved by transformers 5 (no lm_head.weight): logits', d)
    assert d <= TOL


# ----------------------------------------------------------------------------------------------
# Checkpoint formats: the same weights from every format load to exactly the same params


def _flat(params):
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys(), set(fa) ^ set(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        assert np.array_equal(fa[k], fb[k]), k


def flax_t5_params(state_dict: dict, tied: bool) -> dict:
    """The nested dict of transformers' (removed) Flax T5, as its flax_model.msgpack stored it:
    Linear `.weight` [out, in] -> `kernel` [in, out]; Embedding `.weight` -> `embedding`; T5LayerNorm keeps
    `weight`; no encoder/decoder.embed_tokens (Flax uses `shared`); no lm_head when embeddings are tied."""
    out: dict = {}
    for name, w in state_dict.items():
        w = np.ascontiguousarray(w.detach().numpy())
        parts = name.split('.')
        if parts[-2] == 'embed_tokens' or (tied and parts[0] == 'lm_head'):
            continue
        leaf = parts[-1]
        if parts[0] == 'shared' or parts[-2] == 'relative_attention_bias':
            leaf = 'embedding'
        elif 'layer_norm' not in parts[-2]:
            leaf, w = 'kernel', np.ascontiguousarray(w.T)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[leaf] = w
    return out


@pytest.mark.parametrize('name', T5_MODELS)
def test_t5_checkpoint_formats(t5, name, tmp_path):
    from flax.serialization import msgpack_serialize
    r = t5(name)
    ck, ref = r['ck'], r['params']
    fmt = {}
    # (a) sharded safetensors (model.safetensors.index.json)
    d = tmp_path / 'sharded'
    ck.model.save_pretrained(str(d), max_shard_size='20MB')
    shutil.copy(os.path.join(ck.path, 'config.json'), d)  # keep the hub-style config of the fixture
    assert (d / 'model.safetensors.index.json').exists() and not (d / 'model.safetensors').exists()
    fmt['sharded safetensors'] = d
    # (b) pytorch_model.bin (transformers 5 no longer writes it: torch.save the state dict, tied copies incl.)
    d = tmp_path / 'bin'
    d.mkdir()
    torch.save(ck.model.state_dict(), d / 'pytorch_model.bin')
    shutil.copy(os.path.join(ck.path, 'config.json'), d)
    fmt['pytorch_model.bin'] = d
    # (c) flax_model.msgpack, laid out as transformers' Flax T5 saved it
    d = tmp_path / 'flax'
    d.mkdir()
    tied = name == 't5-small'
    (d / 'flax_model.msgpack').write_bytes(msgpack_serialize(flax_t5_params(ck.model.state_dict(), tied)))
    shutil.copy(os.path.join(ck.path, 'config.json'), d)
    fmt['flax_model.msgpack'] = d
    for what, d in fmt.items():
        _, params = load_t5(str(d))
        assert_same_params(params, ref)
        record(f'{name}: {what} == safetensors params', 'exact')
    # as train.py --fsdp loads it: each weight read from its shard file when needed, put onto its devices
    from model import LazyWeights, read_hf_weights
    assert isinstance(read_hf_weights(str(tmp_path / 'sharded')), LazyWeights)
    placed = []

    def place(shape):
        placed.append(shape.shape)
        return jax.sharding.SingleDeviceSharding(jax.devices()[-1])
    _, params = load_t5(str(tmp_path / 'sharded'), place)
    assert_same_params(params, ref)
    assert len(placed) == len(jax.tree.leaves(params))
    assert all(x.sharding.device_set == {jax.devices()[-1]} for x in jax.tree.leaves(params))


# d_ff 2048 -> 1536 hits the FFN's wi; num_heads 8 -> 4 hits q/k/v/o (512 vs 256 wide) or the relative
# attention bias table ((32, 8) vs (32, 4)), whichever the loader checks first.
@pytest.mark.parametrize('field,value,expect', [('d_ff', 1536, r'DenseReluDense\.wi'),
                                                ('num_heads', 4, r'(SelfAttention|EncDecAttention)\.(q|k|v|o|relative_attention_bias)')])
def test_t5_shape_mismatch_raises(hf_t5, tmp_path, field, value, expect):
    import re
    ck = hf_t5('t5-small')
    with open(os.path.join(ck.path, 'config.json')) as f:
        c = json.load(f)
    old = c[field]
    c[field] = value
    (tmp_path / 'config.json').write_text(json.dumps(c))
    os.symlink(os.path.join(ck.path, 'model.safetensors'), tmp_path / 'model.safetensors')
    with pytest.raises(Exception, match=expect) as e:
        load_t5(str(tmp_path))
    msg = str(e.value)
    shapes = {tuple(int(x) for x in re.findall(r'\d+', m)) for m in re.findall(r'[(\[]\d+(?:,\s*\d+)*,?[)\]]', msg)}
    assert len(shapes) >= 2, f'both shapes should be named: {msg}'  # the checkpoint's and the config's
    record(f'mismatch {field} {old}->{value}: error', msg.replace(str(tmp_path), '<dir>')[:150])


def test_t5_unknown_hub_name_raises():
    name = 'google/t5-small-lm-adapt-does-not-exist'
    with pytest.raises(Exception, match='t5-small-lm-adapt-does-not-exist'):
        load_t5(name)


# ----------------------------------------------------------------------------------------------
# RoBERTa


def _roberta_ids():
    ids = padded_ids((11, 5, 8), seed=3, low=3, high=50000, pad=1)
    ids[:, 0] = 0  # <s>
    for i, n in enumerate((11, 5, 8)):
        ids[i, n - 1] = 2  # </s>
    return ids


@pytest.mark.parametrize('layout', ['RobertaModel', 'roberta.-prefixed (hub roberta-base)'])
def test_roberta_last_hidden_state(hf_roberta, tmp_path, layout):
    ids = _roberta_ids()
    mask = ids != 1
    with torch.no_grad(), one_torch_thread():
        ref = hf_roberta.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    path = hf_roberta.path
    if layout != 'RobertaModel':  # the hub's roberta-base is a RobertaForMaskedLM: keys start with 'roberta.'
        from safetensors.numpy import load_file, save_file
        sd = load_file(os.path.join(path, 'model.safetensors'))
        save_file({'roberta.' + k: v for k, v in sd.items()}, str(tmp_path / 'model.safetensors'))
        shutil.copy(os.path.join(path, 'config.json'), tmp_path)
        path = str(tmp_path)
    cfg, params = load_roberta(path)
    ours = np.asarray(roberta_forward(params, cfg, j(ids)))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    # HF gives pad positions position id 1 (= padding_idx) and still computes them: compare the valid
    # positions (what anything downstream reads), and report the pad positions separately.
    d = max_diff(ours[mask], ref[mask])
    record(f'roberta ({layout}): last_hidden_state (non-pad)', d)
    record(f'roberta ({layout}):   pad positions (info only)', max_diff(ours[~mask], ref[~mask]))
    assert d <= TOL


# ----------------------------------------------------------------------------------------------
# Tokenizers

SHARED = os.path.join(os.path.dirname(__file__), '..', '..', 'shared')
T5_TOK = os.path.join(SHARED, 'assets', 't5_tokenizer')


@pytest.fixture(scope='module')
def t5_tok():
    if not os.path.exists(os.path.join(T5_TOK, 'spiece.model')):
        pytest.skip(f'{T5_TOK}/spiece.model not found')
    return load_tokenizer(T5_TOK)


def test_t5_tokenizer_known_ids(t5_tok):
    s = 'translate English to German: The house is wonderful.'
    assert t5_tok.encode(s) == [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5]
    assert t5_tok.encode('Hello world') == [8774, 296]
    assert (t5_tok.pad_id, t5_tok.eos_id) == (0, 1)
    assert t5_tok.decode(t5_tok.encode(s)) == s
    assert t5_tok.decode(t5_tok.encode(s) + [1, 37, 629]) == s  # stops at EOS
    assert t5_tok.decode([8774, 296, 0, 0]) == 'Hello world'  # ignores padding


def test_t5_tokenizer_matches_tokenizers_json(t5_tok):
    path = os.path.join(T5_TOK, 'tokenizer.json')
    if not os.path.exists(path):
        pytest.skip(f'{path} not found')
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(path)
    # No '<extra_id_N>' in the text: tokenizer.json matches it as an added token (id 32099 - N), while
    # spiece.model (32,000 pieces) splits it into ordinary pieces.
    for s in ['Hello world', 'summarize: studies have shown that owning a dog is good for you',
              'Definition: Given a question, answer it.  Input: 2 + 2 = ?', 'naïve café — 東京',
              '  leading and trailing spaces  ', 'Numbers 1234567 and punctuation!?']:
        want = ref.encode(s, add_special_tokens=False).ids
        assert t5_tok.encode(s) == want, s


def test_byte_tokenizer():
    tok = load_tokenizer('byte')
    assert tok.encode('hi') == [ord('h') + 3, ord('i') + 3]
    s = 'naïve café ✓'
    ids = tok.encode(s)
    assert ids == [b + 3 for b in s.encode('utf-8')]
    assert tok.decode(ids) == s
    assert tok.decode(ids + [1] + tok.encode('junk')) == s  # stops at EOS
    assert tok.decode(ids[:2] + [0, 0]) == s[:2]  # ignores padding
    assert (tok.pad_id, tok.eos_id) == (0, 1)
