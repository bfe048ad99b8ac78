"""Padding waste: batches and evaluation cut to bucket lengths give the same results as full padding."""
import dataclasses
import types

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

CFG = dataclasses.replace(M.PRESETS['tiny'], dropout_rate=0.0)
HCFG = HN.HyperConfig(adapter_dim=8, prefix_len=4)
WIDTHS = {'instruction': 96, 'input': 64, 'target': 40}


def ragged(n, widths=WIDTHS, seed=0, short=None):
    """A split-like dict: random ids [n, width] ending in EOS, then padding; lengths below `short` (if
    given) so that batches can be cut."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, w in widths.items():
        x = rng.integers(3, CFG.vocab_size, (n, w)).astype(np.int32)
        for row, length in zip(x, rng.integers(1, (short or w) + 1, n)):
            row[length - 1], row[length:] = M.EOS_ID, M.PAD_ID
        out[k] = x
    return out


def test_row_lengths_and_buckets():
    t5 = np.array([[7, 8, M.EOS_ID, 0, 0], [0, 0, 0, 0, 0], [4, 4, 4, 4, M.EOS_ID]])
    assert data.row_lengths(t5).tolist() == [3, 0, 5]   # EOS (id 1) counts: only the pad id ends a row
    roberta = np.array([[0, 9, 2, 1, 1], [0, 2, 1, 1, 1]])   # <s> 0 ... </s> 2, then RoBERTa's pad 1
    assert data.row_lengths(roberta, pad_id=1).tolist() == [3, 2]
    assert [data.bucket(n, 1024) for n in (0, 1, 16, 17, 100, 513, 1024)] == [16, 16, 16, 32, 128, 1024, 1024]
    assert data.bucket(40, 32) == 32 and data.bucket(0, 1) == 1   # never above the width, never below 1


@pytest.mark.parametrize('hcfg', [HCFG, None], ids=['hint', 'full-input'])
def test_bucketed_batch_gives_the_loss_and_gradients_of_the_padded_one(hcfg):
    """train.make_grad_fn on a batch cut by data.batches vs the same rows padded to the full widths."""
    params = HN.init_params(CFG, hcfg, jax.random.PRNGKey(0))
    cut = next(data.batches(ragged(32, short=20), 8, seed=0))
    assert all(cut[k].shape[1] <= 32 < WIDTHS[k] for k in WIDTHS)   # rows of at most 20 tokens: cut
    padded = {k: np.pad(v, ((0, 0), (0, WIDTHS[k] - v.shape[1]))) for k, v in cut.items()}
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((1, 1), ('data', 'fsdp'), axis_types=auto, devices=jax.devices()[:1])   # as train.main
    fn = jax.jit(T.make_grad_fn(CFG, hcfg, mesh, 1))
    (loss_c, ce_c, g_c), (loss_p, ce_p, g_p) = (fn(params, b, jax.random.PRNGKey(0)) for b in (cut, padded))
    assert abs(float(loss_c) - float(loss_p)) <= 1e-5 and abs(float(ce_c) - float(ce_p)) <= 1e-5
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_p)))
    assert diff <= 1e-5, diff


@pytest.mark.parametrize('hcfg', [HCFG, None], ids=['hint', 'input-only'])
def test_bucketed_predictions_equal_unbucketed(hcfg):
    """eval.task_state + predict_ids (sorted, chunked, cut) give the tokens of one padded t5_generate call."""
    params = HN.init_params(CFG, hcfg, jax.random.PRNGKey(1))
    split = ragged(7, seed=1, short=24)
    instruction, inputs, max_len = split['instruction'][0], split['input'], 10
    mods = None if hcfg is None else E._encode_task(params, jnp.asarray(instruction), CFG, hcfg)
    want = np.asarray(M.t5_generate(params['t5'], CFG, jnp.asarray(inputs), max_len, mods))
    cut = E.task_state(params, CFG, hcfg, instruction)
    assert hcfg is None or cut['memory']['E'].shape[0] <= 32 < len(instruction)   # the instruction was cut
    got = E.predict_ids(params, CFG, cut, inputs, max_len, batch_size=4)   # chunks of 4 and 3
    np.testing.assert_array_equal(got, want)


def take(gen, k):
    return [next(gen) for _ in range(k)]


def indices(batches, d):
    """The rows of d (as indices) that the batches hold, in order: a KeyError if a row lost a token."""
    where = {tuple(d[k][i].tobytes() for k in data.FIELDS): i for i in range(len(d['input']))}
    found = []
    for b in batches:
        full = [np.pad(b[k], ((0, 0), (0, d[k].shape[1] - b[k].shape[1]))) for k in data.FIELDS]   # [B, L]
        found += [where[tuple(x[r].tobytes() for x in full)] for r in range(len(full[0]))]
    return found


def test_group_by_length_is_a_pure_function_of_seed_and_step():
    d = ragged(300, seed=2)
    grouped = take(data.batches(d, 4, seed=5, group_by_length=True), 100)   # 400 rows: an epoch and a third
    resumed = take(data.batches(d, 4, seed=5, start_step=60, group_by_length=True), 40)
    shares = [take(data.batches(d, 4, seed=5, start_step=60, process_index=i, process_count=2,
                                group_by_length=True), 40) for i in range(2)]
    for s, whole in enumerate(resumed):
        for k in data.FIELDS:
            np.testing.assert_array_equal(grouped[60 + s][k], whole[k])   # restarted at step 60: the same
            np.testing.assert_array_equal(np.concatenate([shares[0][s][k], shares[1][s][k]]), whole[k])
    # an epoch is still every row once, in runs of 50 batches (200 rows) that go from long rows to short ones
    order = indices(grouped[:75], d)
    assert sorted(order) == list(range(300))
    total = sum(data.row_lengths(d[k]) for k in data.FIELDS)   # [N]
    runs = [np.diff(total[order[i:i + 200]]) <= 0 for i in (0, 200, 100)]   # the third straddles both runs
    assert runs[0].all() and runs[1].all() and not runs[2].all()
    plain = take(data.batches(d, 4, seed=5), 50)
    assert not (np.diff(total[indices(plain, d)]) <= 0).all()   # off: the plain permutation
    width = sum(b[k].shape[1] for b in grouped[:50] for k in data.FIELDS)
    assert width < sum(b[k].shape[1] for b in plain for k in data.FIELDS)   # less padding in all


def test_batch_shapes_are_few_and_never_cut_a_token():
    widths = {'instruction': 1024, 'input': 1024, 'target': 256}
    d = ragged(500, widths=widths, seed=3)
    batches = take(data.batches(d, 2, seed=0), 300)
    assert len(indices(batches, d)) == 600   # every row found again at full width: only padding was cut
    buckets = {k: {data.bucket(n, w) for n in range(w + 1)} for k, w in widths.items()}
    assert [len(b) for b in buckets.values()] == [7, 7, 5]   # 16, 32, ... 1024 and 16 ... 256
    for b in batches:
        for k, v in b.items():   # the bucket of the longest row
            assert v.shape[1] == data.bucket(int(data.row_lengths(v).max()), widths[k])
            assert v.shape[1] in buckets[k]
    assert len({tuple(v.shape[1] for v in b.values()) for b in batches}) <= 7 * 7 * 5


def test_repeated_instructions_encoded_once_give_the_same_loss_and_gradients():
    """train.task_ids + make_grad_fn(n_tasks): 16 rows of 3 tasks over 2 micro-batches, each distinct
    instruction encoded once per micro-batch, vs one task state per instance."""
    d = ragged(16, seed=4)
    task_of_row = np.array([0, 1, 2, 0, 0, 1, 1, 2, 2, 0, 1, 0, 2, 2, 1, 0])
    batch = dict(d, instruction=ragged(3, seed=5)['instruction'][task_of_row])
    ids, n_tasks = T.task_ids(batch['instruction'], per_micro=8, accum=2)
    assert (ids[task_of_row == 0] == ids[0]).all() and len(set(ids.tolist())) == 3
    assert n_tasks == 4   # 3 distinct instructions in each micro-batch of 8 rows, rounded up to 4
    assert T.task_ids(batch['instruction'][:12], per_micro=8, accum=2)[1] == 8   # no whole shard: off
    params = HN.init_params(CFG, HCFG, jax.random.PRNGKey(0))
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((1, 1), ('data', 'fsdp'), axis_types=auto, devices=jax.devices()[:1])
    per_instance = jax.jit(T.make_grad_fn(CFG, HCFG, mesh, 2))(params, batch, jax.random.PRNGKey(0))
    shared = jax.jit(T.make_grad_fn(CFG, HCFG, mesh, 2, n_tasks))(
        params, dict(batch, task_id=ids), jax.random.PRNGKey(0))
    assert abs(float(per_instance[0]) - float(shared[0])) <= 1e-5
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(per_instance[2]),
                                                            jax.tree.leaves(shared[2])))
    assert diff <= 1e-5, diff
    # the shared path really encodes fewer rows: the jaxpr's instruction encoder sees [n_tasks, Li]
    jaxpr = str(jax.make_jaxpr(lambda p: HN.hint_forward(p, CFG, HCFG, batch['instruction'][:8], batch['input'][:8],
                                                           batch['target'][:8], None, ids[:8], 4))(params))
    assert f'i32[4,{WIDTHS["instruction"]}]' in jaxpr


def test_mfu_peak_table_matches_device_kinds():
    """The progress line's MFU divides by the peak of the device jax reports (first match wins)."""
    kinds = {'TPU v3': 123e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5p': 459e12,
             'TPU v6 lite': 918e12, 'NVIDIA A100-SXM4-80GB': 312e12, 'NVIDIA H100 80GB HBM3': 989e12,
             'NVIDIA H200': 989e12, 'cpu': None}
    for kind, peak in kinds.items():
        assert runs.peak_flops(types.SimpleNamespace(device_kind=kind)) == peak, kind


def test_mfu_flops_count_every_scanned_layer():
    """The MFU's FLOPs come from the step's jaxpr: a scan's body counts once per iteration (XLA's
    cost_analysis() counts it once, which left the T5 layers out of the MFU), and the count of
    the real train step grows with depth as the layers' matrix products do."""
    def layers(x, ws):
        return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]
    x, ws = jnp.ones((4, 8)), jnp.ones((5, 8, 8))
    assert runs.matmul_flops(jax.make_jaxpr(layers)(x, ws).jaxpr) == 5 * 2 * 4 * 8 * 8
    counts = {}
    for depth in (2, 4):
        cfg = dataclasses.replace(M.PRESETS['tiny'], num_layers=depth, num_decoder_layers=depth)
        hcfg = HN.HyperConfig(adapter_dim=4, prefix_len=2)
        params = HN.init_params(cfg, hcfg, jax.random.PRNGKey(0))
        optimizer, schedule = T.make_optimizer(T.Args(lr=1e-3, warmup=0))
        mesh = jax.make_mesh((1, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
        step = T.make_train_step(cfg, hcfg, optimizer, schedule, mesh, 1, 0)
        state = {'params': params, 'opt': optimizer.init(params), 'step': jnp.int32(0)}
        batch = {k: jnp.ones((4, 16), jnp.int32) for k in data.FIELDS}
        counts[depth] = runs.step_flops({}, step, state, batch, None, 1, peak=1.0)
    assert counts[4] > 1.8 * counts[2] > 0
    assert runs.step_flops({}, step, state, batch, None, 1, peak=None) == 0.0   # unknown peak: no count
