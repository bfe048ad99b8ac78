"""HINT's hypernetwork and the trainer: exactness properties of the method and of the training loop."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hypernet as HN
import model as M
import train as T
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dataclasses.replace(M.PRESETS['tiny'], dropout_rate=0.0)
HCFG = HN.HyperConfig(adapter_dim=8, prefix_len=4)


def hint_params(cfg=CFG, hcfg=HCFG, seed=0):
    return HN.init_params(cfg, hcfg, jax.random.PRNGKey(seed))


def ids(rng, shape, lengths):
    """Random token ids [B, L] in [3, vocab) with EOS at length-1 and padding after."""
    x = np.array(jax.random.randint(jax.random.PRNGKey(rng), shape, 3, CFG.vocab_size))
    for b, n in enumerate(lengths):
        x[b, n - 1], x[b, n:] = M.EOS_ID, M.PAD_ID
    return jnp.asarray(x)


INS = ids(1, (3, 12), [12, 7, 9])
INP = ids(2, (3, 8), [8, 5, 3])
TGT = ids(3, (3, 6), [6, 4, 2])


def test_zero_modules_without_prefixes_and_fusion_is_plain_t5():
    """HINT.md: with adapters zero, prefixes off and fusion off, the model is exactly the plain T5."""
    hcfg = dataclasses.replace(HCFG, fusion=False, prefixes=False)
    params = hint_params(hcfg=hcfg)
    state = jax.tree.map(jnp.zeros_like, HN.encode_task(params, CFG, hcfg, INS))
    assert state['memory'] is None and state['encoder']['adapter'] is not None and 'prefix' not in state['encoder']
    plain = M.t5_forward(params['t5'], CFG, INP, M.shift_right(TGT))
    hint = M.t5_forward(params['t5'], CFG, INP, M.shift_right(TGT), mods=state)
    assert float(jnp.abs(plain - hint).max()) <= 1e-6
    # and the real (non-zero) modules do change the output
    real = HN.hint_forward(params, CFG, hcfg, INS, INP, M.shift_right(TGT))
    assert float(jnp.abs(plain - real).max()) > 1e-3


@pytest.mark.parametrize('how', ['joint', 'separate'])
def test_zero_prefixes_take_attention_mass_only_in_the_joint_softmax(how):
    """The paper's prefixes share ONE softmax with the layer's keys: even zero ones change the output.
    `--prefix-attention separate` (own softmax, output added) leaves T5 unchanged when they are zero."""
    hcfg = dataclasses.replace(HCFG, fusion=False, prefix_attention=how)
    params = hint_params(hcfg=hcfg)
    state = jax.tree.map(jnp.zeros_like, HN.encode_task(params, CFG, hcfg, INS))
    key = 'cross_prefix' if how == 'joint' else 'cross_prefix_separate'
    assert state['decoder'][key]['k'].shape == (CFG.num_decoder_layers, 3, HCFG.prefix_len, CFG.num_heads, CFG.d_kv)
    plain = M.t5_forward(params['t5'], CFG, INP, M.shift_right(TGT))
    hint = M.t5_forward(params['t5'], CFG, INP, M.shift_right(TGT), mods=state)
    diff = float(jnp.abs(plain - hint).max())
    assert diff > 1e-3 if how == 'joint' else diff <= 1e-6
    # joint by hand, one encoder layer: zero prefix keys get score 0, so softmax weight exp(0) each
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 2, 4))
    k, v = (jax.random.normal(jax.random.PRNGKey(i), (1, 3, 2, 4)) for i in (1, 2))
    prefix = (jnp.zeros((5, 2, 4)), jnp.ones((5, 2, 4)), None)
    got = M.attend(q, k, v, jnp.zeros((1, 1, 1, 3)), [prefix]).reshape(1, 2, 2, 4)
    scores = jnp.einsum('bthk,bshk->bhts', q, k)
    w = jnp.exp(scores) / (jnp.exp(scores).sum(-1, keepdims=True) + 5)   # 5 prefix positions, exp(0) = 1
    want = jnp.einsum('bhts,bshk->bthk', w, v) + 5 / (jnp.exp(scores).sum(-1) + 5).transpose(0, 2, 1)[..., None]
    assert float(jnp.abs(got - want).max()) <= 1e-5


@pytest.mark.parametrize('encoder', ['shared', 't5'])
def test_every_hypernetwork_parameter_gets_a_gradient(encoder):
    """Under the joint prefix softmax (the default), every tensor and every query row."""
    hcfg = dataclasses.replace(HCFG, instruction_encoder=encoder)
    assert hcfg.prefix_attention == 'joint'
    params = hint_params(hcfg=hcfg)

    def loss(p):
        logits = HN.hint_forward(p, CFG, hcfg, INS, INP, M.shift_right(TGT))
        return T.token_losses(logits, TGT)[0]

    grads = jax.grad(loss)(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads['hyper']):
        g = np.asarray(g)
        # every tensor, and every slot row of the query tables, must receive a gradient
        rows = g.reshape(-1, g.shape[-1]) if path[0].key.endswith('_queries') else g.reshape(1, -1)
        assert (np.abs(rows).max(axis=1) > 0).all(), f'zero gradient in hyper{jax.tree_util.keystr(path)}'


def test_switches_remove_modules():
    for field in ('adapters', 'prefixes', 'fusion'):
        hcfg = dataclasses.replace(HCFG, **{field: False})
        state = HN.encode_task(hint_params(hcfg=hcfg), CFG, hcfg, INS)
        present = {'adapters': state['encoder'].get('adapter'), 'prefixes': state['encoder'].get('prefix'),
                   'fusion': state['memory']}
        assert present[field] is None
        assert all(v is not None for k, v in present.items() if k != field)


def relative_difference(a, b):
    return float(jnp.linalg.norm(a - b.astype(a.dtype)) / jnp.maximum(jnp.linalg.norm(a), 1e-30))


def test_pooling_in_blocks_of_slots_equals_all_at_once():
    """hypernet.pool: blocks of 1 or 2-3 slots (divisors of 4 and 6 slots) give the task state and
    the gradients of pooling every slot at once (relative error |a - b| / |a| of each tensor), with
    adapters, prefixes and a LoRA; rows 0 and 2 share an instruction (pooled once)."""
    hcfg = dataclasses.replace(HCFG, lora_rank=3)
    params = hint_params(hcfg=hcfg)
    instruction = INS.at[2].set(INS[0])

    def run(slots):
        h = dataclasses.replace(hcfg, pool_slots=slots)
        state = HN.encode_task(params, CFG, h, instruction)

        def loss(p):
            logits = HN.hint_forward(p, CFG, h, instruction, INP, M.shift_right(TGT),
                                     task_ids=jnp.array([0, 1, 0]), n_tasks=2)
            return T.token_losses(logits, TGT)[0]
        return state, jax.grad(loss)(params)

    whole = run(100)
    whole[0]['memory']['mask'] = whole[0]['memory']['mask'].astype(jnp.float32)   # to subtract
    for slots in (1, 3):
        diff = jax.tree.map(relative_difference, whole, run(slots))
        assert max(jax.tree.leaves(diff)) <= 1e-6, slots
    assert float(jnp.abs(whole[1]['hyper']['lora_queries']).min(axis=-1).max()) > 0   # not zero


def test_shared_task_state_equals_one_by_one():
    params = hint_params()
    state = HN.encode_task(params, CFG, HCFG, INS[:1])
    shared = HN.select_task(state, 0)                      # no batch axis: broadcast, never copied
    batched_inputs = ids(4, (5, 8), [8, 2, 5, 7, 3])
    dec = M.shift_right(ids(5, (5, 6), [6, 6, 3, 4, 5]))
    together = M.t5_forward(params['t5'], CFG, batched_inputs, dec, mods=shared)
    for b in range(5):
        alone = HN.hint_forward(params, CFG, HCFG, INS[:1], batched_inputs[b:b + 1], dec[b:b + 1])
        assert float(jnp.abs(together[b] - alone[0]).max()) <= 1e-5
    gen_together = M.t5_generate(params['t5'], CFG, batched_inputs, 10, shared)
    for b in range(5):
        gen_alone = M.t5_generate(params['t5'], CFG, batched_inputs[b:b + 1], 10, state)
        np.testing.assert_array_equal(gen_together[b], gen_alone[0])


def test_generation_matches_teacher_forcing_with_modules():
    params = hint_params()
    state = HN.encode_task(params, CFG, HCFG, INS)
    gen = M.t5_generate(params['t5'], CFG, INP, 8, state)
    logits = M.t5_forward(params['t5'], CFG, INP, M.shift_right(gen), mods=state)
    greedy = np.asarray(jnp.argmax(logits, -1))
    for b in range(3):  # identical up to and including the first EOS
        n = int(np.argmax(np.asarray(gen[b]) == M.EOS_ID)) + 1 if M.EOS_ID in np.asarray(gen[b]) else 8
        np.testing.assert_array_equal(greedy[b, :n], np.asarray(gen[b, :n]))


def test_task_state_save_and_load(tmp_path):
    params = hint_params()
    state = HN.select_task(HN.encode_task(params, CFG, HCFG, INS[:1]), 0)
    runs.save_task_state(str(tmp_path / 'task.safetensors'), state)
    loaded = runs.load_task_state(str(tmp_path / 'task.safetensors'))
    a = M.t5_generate(params['t5'], CFG, INP, 8, state)
    b = M.t5_generate(params['t5'], CFG, INP, 8, loaded)
    np.testing.assert_array_equal(a, b)


def test_roberta_instruction_encoder_with_projection():
    rcfg = M.RobertaConfig(vocab_size=100, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=40)
    hcfg = dataclasses.replace(HCFG, instruction_encoder='roberta', roberta=rcfg)
    params = HN.init_params(CFG, hcfg, jax.random.PRNGKey(0), encoder_params=M.init_roberta(rcfg, jax.random.PRNGKey(1)))
    ins = jnp.array([[0, 5, 6, 7, 2, 1, 1], [0, 8, 9, 2, 1, 1, 1]])     # RoBERTa ids, padding 1
    grads = jax.grad(lambda p: T.token_losses(HN.hint_forward(p, CFG, hcfg, ins, INP[:2], M.shift_right(TGT[:2])), TGT[:2])[0])(params)
    assert params['hyper']['proj']['w'].shape == (48, CFG.d_model)
    assert float(jnp.abs(grads['hyper']['encoder']['word']).max()) > 0


def test_eight_devices_match_one():
    """The shard_map step on 8 fake CPU devices gives the loss and gradients of 1 device (<= 1e-5)."""
    script = r'''
import dataclasses, jax, jax.numpy as jnp, numpy as np
import model as M, hypernet as HN, train as T
assert jax.device_count() == 8
cfg = dataclasses.replace(M.PRESETS['tiny'], dropout_rate=0.0)
hcfg = HN.HyperConfig(adapter_dim=8, prefix_len=4)
params = HN.init_params(cfg, hcfg, jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
batch = {k: rng.integers(3, 259, (16, n)).astype(np.int32) for k, n in (('instruction', 12), ('input', 8), ('target', 6))}
for k in batch:   # ragged lengths, so the token count differs per device
    for b in range(16):
        batch[k][b, rng.integers(2, batch[k].shape[1]):] = 0
out = []
for n, accum in ((1, 1), (8, 1), (8, 2)):
    mesh = jax.make_mesh((n, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:n])
    fn = jax.jit(T.make_grad_fn(cfg, hcfg, mesh, accum))
    out.append(fn(params, batch, jax.random.PRNGKey(0)))
for loss, ce, grads in out[1:]:
    assert abs(float(loss) - float(out[0][0])) <= 1e-5, (float(loss), float(out[0][0]))
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(out[0][2])))
    assert diff <= 1e-5, diff
    print('max grad diff', diff)
'''
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def run_train(tmp_path, out, **kw):
    args = T.Args(init='tiny', batch_size=8, adapter_dim=8, prefix_len=4, log_every=2, eval_instances=8,
                  out_dir=str(tmp_path / out), cache_dir=str(tmp_path / 'cache'), **kw)
    return T.main(args)


def test_resume_equals_uninterrupted(tmp_path):
    """2N steps == N steps, a kill (the checkpoint at 2N never written), --resume, N more (<= 1e-6)."""
    full, _ = run_train(tmp_path, 'full', steps=6, save_every=3)
    run_train(tmp_path, 'cut', steps=6, save_every=3)
    import shutil
    shutil.rmtree(tmp_path / 'cut' / 'ckpt_0000006')   # killed after step 3's checkpoint
    resumed, metrics = run_train(tmp_path, 'cut', steps=6, save_every=3, resume=True)
    for a, b in zip(jax.tree.leaves(full['params']), jax.tree.leaves(resumed['params'])):
        assert float(jnp.abs(a - b).max()) <= 1e-6
    assert int(resumed['step']) == 6
    assert os.path.exists(tmp_path / 'cut' / 'metrics.json') and os.path.exists(tmp_path / 'cut' / 'predictions.jsonl')
    rows = [json.loads(l) for l in open(tmp_path / 'cut' / 'predictions.jsonl')]
    assert len(rows) == 8 and {'id', 'task', 'prediction', 'references'} <= set(rows[0])


def test_checkpoint_that_does_not_match_the_config(tmp_path):
    run_train(tmp_path, 'run', steps=1, save_every=1)
    ckpt = runs.checkpoints(str(tmp_path / 'run'))[-1]
    other = jax.eval_shape(lambda: HN.init_params(CFG, dataclasses.replace(HCFG, adapter_dim=4), jax.random.PRNGKey(0)))
    with pytest.raises(ValueError, match=r"adapter_queries.*shape"):
        runs.read_items(ckpt, {'params': other})


def test_hint_trains_in_bfloat16():
    """As on accelerators: the generated (float32) prefixes must not turn a bfloat16 layer float32."""
    cfg = dataclasses.replace(CFG, dtype='bfloat16')
    params = HN.init_params(cfg, HCFG, jax.random.PRNGKey(0))
    ids = jnp.ones((2, 5), jnp.int32)

    def loss(p):
        return HN.hint_forward(p, cfg, HCFG, ids, ids, ids).sum()
    grads = jax.eval_shape(jax.grad(loss), params)   # fails to trace if the layer scan's carry changes dtype
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_warning_when_the_step_will_not_fit_the_device(monkeypatch, capsys):
    """runs.warn_if_too_big: measured from the compiled step, against the memory JAX reports; silent
    where it reports none (CPU) or where the step fits."""
    mesh = jax.make_mesh((1, 1), ('data', 'fsdp'), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    optimizer, schedule = T.make_optimizer(T.Args(lr=1e-3, warmup=100))
    params = hint_params()
    state = {'params': params, 'opt': optimizer.init(params), 'step': jnp.int32(0)}
    batch = {'instruction': INS, 'input': INP, 'target': TGT}
    step_fn = T.make_train_step(CFG, HCFG, optimizer, schedule, mesh, 1, 0)
    need = runs.step_bytes(step_fn.lower(state, batch).compile())

    class Device:   # a device that reports its memory, as GPUs and TPUs do
        device_kind = 'test device'

        def __init__(self, limit):
            self.limit = limit

        def memory_stats(self):
            return {'bytes_limit': self.limit}

    for limit, warned in ((None, False), (need, True), (2 * need, False)):
        if limit is not None:
            monkeypatch.setattr(jax, 'local_devices', lambda: [Device(limit)])
        runs.warn_if_too_big(step_fn, state, batch, None)
        assert ('warning: a train step needs' in capsys.readouterr().err) == warned, limit
