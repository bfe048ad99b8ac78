"""A hypernetwork-generated LoRA on attention q and v (`--lora-rank R`, beyond the paper): exactly T5 when
off, trainable, batched = shared states, and merged into a plain transformers T5 checkpoint
(`eval.py --merge-into`)."""
import dataclasses
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data
import eval as E
import hypernet as HN
import model as M
import train as T
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPIECE = os.path.join(ROOT, '..', 'shared', 'assets', 't5_tokenizer', 'spiece.model')
CFG = dataclasses.replace(M.PRESETS['tiny'], dropout_rate=0.0)
LORA_ONLY = HN.HyperConfig(adapter_dim=8, prefix_len=4, adapters=False, prefixes=False, fusion=False,
                           lora_rank=4)


def ids(seed, shape, lengths, vocab=CFG.vocab_size):
    """Random token ids [B, L] in [3, vocab) with EOS at length-1 and padding after."""
    x = np.array(jax.random.randint(jax.random.PRNGKey(seed), shape, 3, vocab))
    for b, n in enumerate(lengths):
        x[b, n - 1], x[b, n:] = M.EOS_ID, M.PAD_ID
    return jnp.asarray(x)


INS = ids(1, (3, 12), [12, 7, 9])
INP = ids(2, (3, 8), [8, 5, 3])
DEC = M.shift_right(ids(3, (3, 6), [6, 4, 2]))


def perturbed(params, seed=5):
    """The LoRA B generator's last layer redrawn larger (as after training): a clearly nonzero B."""
    w = params['hyper']['gen']['lora_b']['fc2']['w']
    new = jax.random.normal(jax.random.PRNGKey(seed), w.shape) * w.shape[0] ** -0.5
    lora_b = {**params['hyper']['gen']['lora_b'], 'fc2': {'w': new, 'b': jnp.zeros(w.shape[1])}}
    gen = {**params['hyper']['gen'], 'lora_b': lora_b}
    return {**params, 'hyper': {**params['hyper'], 'gen': gen}}


def test_lora_changes_t5_only_when_on():
    params = HN.init_params(CFG, LORA_ONLY, jax.random.PRNGKey(0))
    plain = M.t5_forward(params['t5'], CFG, INP, DEC)
    state = HN.encode_task(params, CFG, LORA_ONLY, INS)
    assert set(state['encoder']) == {'lora'} and set(state['decoder']) == {'self_lora', 'cross_lora'}
    HK = CFG.num_heads * CFG.d_kv
    assert state['encoder']['lora']['q_a'].shape == (CFG.num_layers, 3, CFG.d_model, 4)       # [Le, B, D, R]
    assert state['decoder']['cross_lora']['v_b'].shape == (CFG.num_decoder_layers, 3, 4, HK)  # [Ld, B, R, HK]
    fresh = HN.hint_forward(params, CFG, LORA_ONLY, INS, INP, DEC)
    assert float(jnp.abs(plain - fresh).max()) > 1e-4   # a random generator: B != 0 from the start
    zero_b = jax.tree.map(jnp.zeros_like, params['hyper']['gen']['lora_b'])   # B = 0: T5 exactly
    params_zero = {**params, 'hyper': {**params['hyper'], 'gen': {**params['hyper']['gen'], 'lora_b': zero_b}}}
    assert float(jnp.abs(plain - HN.hint_forward(params_zero, CFG, LORA_ONLY, INS, INP, DEC)).max()) <= 1e-6
    # off (R = 0): no LoRA parameters, no state, T5 exactly
    off_cfg = dataclasses.replace(LORA_ONLY, lora_rank=0)
    off = HN.init_params(CFG, off_cfg, jax.random.PRNGKey(0))
    assert 'lora_queries' not in off['hyper'] and 'lora_a' not in off['hyper'].get('gen', {})
    assert float(jnp.abs(plain - HN.hint_forward(off, CFG, off_cfg, INS, INP, DEC)).max()) <= 1e-6


def test_every_lora_generator_parameter_gets_a_gradient():
    params = perturbed(HN.init_params(CFG, LORA_ONLY, jax.random.PRNGKey(0)))

    def loss(hyper):
        logits = HN.hint_forward({**params, 'hyper': hyper}, CFG, LORA_ONLY, INS, INP, DEC)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7])
    _, grads = jax.value_and_grad(loss)(params['hyper'])
    lora = {'queries': grads['lora_queries'], 'a': grads['gen']['lora_a'], 'b': grads['gen']['lora_b']}
    for path, g in jax.tree_util.tree_leaves_with_path(lora):
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_shared_state_equals_per_instance_with_all_modules_and_generation():
    """select_task's shared state (no batch axis) gives each row's per-instance logits, with adapters,
    prefixes and fusion on too (the fused memory's values take the same LoRA); greedy decoding runs."""
    hcfg = dataclasses.replace(LORA_ONLY, adapters=True, prefixes=True, fusion=True)
    params = perturbed(HN.init_params(CFG, hcfg, jax.random.PRNGKey(1)))
    ins = jnp.broadcast_to(INS[:1], INS.shape)
    batched = HN.hint_forward(params, CFG, hcfg, ins, INP, DEC)
    shared = HN.select_task(HN.encode_task(params, CFG, hcfg, INS[:1]), 0)
    assert float(jnp.abs(batched - M.t5_forward(params['t5'], CFG, INP, DEC, mods=shared)).max()) <= 1e-5
    out = M.t5_generate(params['t5'], CFG, INP, max_len=4, mods=shared)
    assert out.shape == (3, 4)


def hf_logits(folder, inp, dec):
    import torch
    from transformers import T5ForConditionalGeneration
    hf = T5ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        x = torch.tensor(np.asarray(inp))
        y = torch.tensor(np.asarray(dec))
        return hf(input_ids=x, attention_mask=x != 0, decoder_input_ids=y).logits.numpy()


def test_merged_lora_is_a_plain_transformers_t5(hf_t5, tmp_path):
    cfg, t5 = M.load_t5(hf_t5('tiny').path)
    params = perturbed(HN.init_params(cfg, LORA_ONLY, jax.random.PRNGKey(2), t5_params=t5))
    ins, inp = ids(4, (1, 10), [10], cfg.vocab_size), ids(6, (3, 8), [8, 5, 3], cfg.vocab_size)
    dec = M.shift_right(ids(7, (3, 6), [6, 4, 2], cfg.vocab_size))
    ours = HN.hint_forward(params, cfg, LORA_ONLY, jnp.broadcast_to(ins, (3, 10)), inp, dec)
    state = HN.select_task(HN.encode_task(params, cfg, LORA_ONLY, ins), 0)
    merged = E.merge_lora(params['t5'], state)
    M.save_t5(merged, cfg, str(tmp_path / 'merged'))
    theirs = hf_logits(str(tmp_path / 'merged'), inp, dec)
    assert np.abs(theirs - np.asarray(ours)).max() <= 1e-4
    assert float(jnp.abs(ours - M.t5_forward(t5, cfg, inp, dec)).max()) > 1e-3   # the LoRA did something
    back_cfg, back = M.load_t5(str(tmp_path / 'merged'))
    assert back_cfg == cfg
    assert float(jnp.abs(M.t5_forward(back, back_cfg, inp, dec) - ours).max()) <= 1e-4
    # a state with other modules, or a batched one, does not merge
    with pytest.raises(AssertionError, match='a LoRA only'):
        E.merge_lora(params['t5'], {**state, 'memory': {'E': jnp.zeros((3, cfg.d_model))}})
    with pytest.raises(AssertionError, match='not a batch'):
        E.merge_lora(params['t5'], HN.encode_task(params, cfg, LORA_ONLY, ins))


def train_run(tmp_path, name, **kw):
    args = T.Args(init='tiny', batch_size=4, steps=1, log_every=1, save_every=1, eval_instances=2,
                  out_dir=str(tmp_path / name), cache_dir=str(tmp_path / 'cache'), **kw)
    T.main(args)
    return str(tmp_path / name)


def merge_cli(run, out, monkeypatch, instruction='Reverse the list.'):
    monkeypatch.setattr('sys.stdin', io.StringIO(''))   # nothing on stdin: merging reads no instances
    return E.cli(['--checkpoint', run, '--instruction', instruction, '--merge-into', out])


@pytest.mark.skipif(not os.path.isfile(SPIECE), reason='../shared/assets/t5_tokenizer/spiece.model not found')
def test_merge_into_through_eval_cli(tmp_path, monkeypatch):
    # the README's commands: train.py's own entry point (its flags parsed), then eval.py's
    run = str(tmp_path / 'lora')
    argv = [sys.executable, 'train.py', '--lora-rank', '2', '--no-adapters', '--no-prefixes', '--no-fusion',
            '--init', 'tiny', '--tokenizer', SPIECE, '--batch-size', '4', '--steps', '1', '--eval-instances', '2',
            '--out-dir', run, '--cache-dir', str(tmp_path / 'cache')]
    r = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    out = str(tmp_path / 'merged')
    merge_cli(run, out, monkeypatch)
    assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors', 'spiece.model']
    assert isinstance(data.load_tokenizer(out), data.SentencePieceTokenizer)
    # the folder is the run's T5 with this instruction's LoRA: the same logits as the run itself
    cfg, hcfg, params, meta = runs.load_run(run)
    tok, li = data.load_tokenizer(SPIECE), data.lengths(data.DataArgs())[0]
    text = data.instruction_text('synthetic', 'Reverse the list.', 'hint', 0)
    row = data.encode(tok, text, li)[0]
    ins = jnp.asarray([row + [0] * (li - len(row))], jnp.int32)
    inp = ids(8, (2, 8), [8, 5], cfg.vocab_size)
    dec = M.shift_right(ids(9, (2, 5), [5, 3], cfg.vocab_size))
    ours = HN.hint_forward(params, cfg, hcfg, jnp.broadcast_to(ins, (2, li)), inp, dec)
    assert np.abs(hf_logits(out, inp, dec) - np.asarray(ours)).max() <= 1e-4
    assert float(jnp.abs(ours - M.t5_forward(params['t5'], cfg, inp, dec)).max()) > 1e-5   # a LoRA was merged


def test_merge_into_refuses_a_run_that_is_not_lora_only(tmp_path, monkeypatch):
    run = train_run(tmp_path, 'hint', lora_rank=2, adapter_dim=4, prefix_len=2)

    def no_loading(*a, **kw):
        raise AssertionError('loaded the weights before checking the run')
    monkeypatch.setattr(runs, 'load_run', no_loading)
    with pytest.raises(data.DataError, match='not a LoRA-only run'):
        merge_cli(run, str(tmp_path / 'merged'), monkeypatch)
    assert not os.path.exists(tmp_path / 'merged')
    with pytest.raises(data.DataError, match='lora-rank'):
        T.check_args(T.fill_defaults(T.Args(lora_rank=-1)))
