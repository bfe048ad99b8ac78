"""HINT's hypernetwork (../shared/HINT.md sections 3-4): instruction -> task state -> T5 run.

Two steps, so that an instruction is read once per task:
    state  = encode_task(params, hcfg, instruction_ids)          # per task (or per instance in training)
    logits = model.t5_forward(params['t5'], cfg, input_ids, dec_ids, mods=state)
The task state holds the generated adapters and prefixes (and, with lora_rank, a LoRA on attention q
and v) in the T5 stacks' layout (a leading layer axis, scanned with the layer weights) and the
encoded instruction for fusion. With a batch axis
it is one state per instance; `select_task(state, i)` drops that axis, and the model then shares
one state across a whole batch without copying it.

Layout note: HINT.md gives every attention slot C = 2r+2 adapter rows + 2p prefix rows. Adapters
sit only on feed-forward blocks (one per layer), so we keep two query tables, adapter rows for the
Le + Ld layers and prefix rows for the S = Le + 2 Ld attention blocks: the cross-attention slots'
adapter rows would otherwise never receive a gradient.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

import model as M


@dataclasses.dataclass(frozen=True)
class HyperConfig:
    adapter_dim: int = 64          # r (paper: Base 64, XL/XXL 512)
    prefix_len: int = 30           # p (paper: 30)
    adapters: bool = True
    prefixes: bool = True
    fusion: bool = True            # decoder cross-attention also sees the encoded instruction
    prefix_attention: str = 'joint'   # joint: one softmax with the layer's keys (paper); separate
    instruction_encoder: str = 'shared'   # shared (the T5 encoder itself) | t5 (a separate copy) | roberta
    roberta: M.RobertaConfig | None = None
    lora_rank: int = 0             # R: a generated LoRA on every attention's q and v (beyond the paper)
    pool_slots: int = 0            # slots pooled at once (hypernet.pool); 0 = from a memory budget


def dense_init(rng, n_in, n_out):
    w = jax.random.normal(rng, (n_in, n_out), jnp.float32) * n_in ** -0.5  # variance scaling, fan-in
    return {'w': w, 'b': jnp.zeros((n_out,), jnp.float32)}


def init_hyper(cfg: M.T5Config, hcfg: HyperConfig, rng, t5_params=None, encoder_params=None) -> dict:
    """Hypernetwork parameters (plus the separate instruction encoder, if any)."""
    D, HK, r, p = cfg.d_model, cfg.num_heads * cfg.d_kv, hcfg.adapter_dim, hcfg.prefix_len
    Le, Ld = cfg.num_layers, cfg.num_decoder_layers
    keys = iter(jax.random.split(rng, 32))
    mlp = lambda n_out: {'fc1': dense_init(next(keys), D, D), 'fc2': dense_init(next(keys), D, n_out)}
    h = {'pool': {n: jax.random.normal(next(keys), (D, HK) if n != 'o' else (HK, D)) * (D if n != 'o' else HK) ** -0.5
                  for n in 'qkvo'}}
    if hcfg.adapters:  # rows: r down, r up, 1 down bias, 1 up bias
        h['adapter_queries'] = jax.random.normal(next(keys), (Le + Ld, 2 * r + 2, D)) * D ** -0.5
        h['gen'] = {'down': mlp(D), 'up': mlp(D), 'down_bias': mlp(r), 'up_bias': mlp(D)}
    if hcfg.prefixes:  # rows: p keys, p values, for every attention block
        h['prefix_queries'] = jax.random.normal(next(keys), (Le + 2 * Ld, 2 * p, D)) * D ** -0.5
        h.setdefault('gen', {}).update({'prefix_k': mlp(HK), 'prefix_v': mlp(HK)})
    if hcfg.instruction_encoder == 't5':  # a separate T5 encoder, initialised from the underlying one
        h['encoder'] = {'embed': t5_params['embed'], 'encoder': t5_params['encoder']}
    elif hcfg.instruction_encoder == 'roberta':
        h['encoder'] = encoder_params
        if hcfg.roberta.hidden_size != D:
            h['proj'] = dense_init(next(keys), hcfg.roberta.hidden_size, D)
    if hcfg.lora_rank:  # rows: R for A_q, R for B_q, R for A_v, R for B_v, for every attention block
        h['lora_queries'] = jax.random.normal(next(keys), (Le + 2 * Ld, 4 * hcfg.lora_rank, D)) * D ** -0.5
        # B's generator is random like the others, not zero as LoRA's B: Adafactor's steps are relative
        # to a weight's RMS, and would leave a zero weight near zero for thousands of steps
        h.setdefault('gen', {}).update({'lora_a': mlp(D), 'lora_b': mlp(HK)})
    return h


def instruction_pad_id(hcfg):
    """The padding id of the instruction encoder's vocabulary (RoBERTa's is 1, T5's 0)."""
    if hcfg is not None and hcfg.instruction_encoder == 'roberta':
        return hcfg.roberta.pad_token_id
    return M.PAD_ID


def encode_instruction(hyper, t5_params, cfg, hcfg, ids, rng=None):
    """E [B, n, D] with padding rows zeroed, and the mask [B, n]."""
    if hcfg.instruction_encoder == 'roberta':
        E = M.roberta_forward(hyper['encoder'], hcfg.roberta, ids).astype(jnp.float32)
        mask = ids != instruction_pad_id(hcfg)
        if 'proj' in hyper:
            E = E @ hyper['proj']['w'] + hyper['proj']['b']
    else:
        enc = hyper['encoder'] if hcfg.instruction_encoder == 't5' else t5_params
        E = M.t5_encode(enc, cfg, ids, rng=rng).astype(jnp.float32)
        mask = ids != M.PAD_ID
    return E * mask[..., None], mask


def mlp(p, x):  # the generators: d -> d, GELU, -> out
    return jax.nn.gelu(x @ p['fc1']['w'] + p['fc1']['b'], approximate=False) @ p['fc2']['w'] + p['fc2']['b']


def encode_task(params, cfg: M.T5Config, hcfg: HyperConfig, instruction_ids, rng=None) -> dict:
    """instruction_ids [B, n] -> task state (one per row; see the module docstring for its layout)."""
    hyper = params['hyper']
    D, H, K, r, p = cfg.d_model, cfg.num_heads, cfg.d_kv, hcfg.adapter_dim, hcfg.prefix_len
    Le, Ld, B = cfg.num_layers, cfg.num_decoder_layers, instruction_ids.shape[0]
    E, mask = encode_instruction(hyper, params['t5'], cfg, hcfg, instruction_ids, rng)
    state = {'encoder': {}, 'decoder': {}, 'memory': {'E': E, 'mask': mask} if hcfg.fusion else None}

    # Pooling: one multi-head attention, queries = the learned slot rows, keys/values = E; then the
    # generators, one MLP per component kind. pool() runs both a few slots at a time.
    w = hyper['pool']
    k, v = ((E @ w[n]).reshape(B, -1, H, K) for n in 'kv')                         # [B, n, H, K]
    bias = M.mask_bias(mask)[:, None, None, :]
    gen = lambda name, rows: mlp(hyper['gen'][name], rows) / np.sqrt(D)            # every output / sqrt(d)
    pooled = functools.partial(pool, w, k, v, bias, hcfg.pool_slots)

    if 'adapter_queries' in hyper:
        def adapter(G):   # pooled rows G [B, s, 2r+2, D] of s slots
            return {'down': jnp.swapaxes(gen('down', G[..., :r, :]), -1, -2),        # [B, s, D, r]
                    'up': gen('up', G[..., r:2 * r, :]),                              # [B, s, r, D]
                    'down_bias': gen('down_bias', G[..., 2 * r, :]),                  # [B, s, r]
                    'up_bias': gen('up_bias', G[..., 2 * r + 1, :])}                  # [B, s, D]
        ad = pooled(hyper['adapter_queries'], adapter)                      # [Le + Ld, B, ...]
        state['encoder']['adapter'] = jax.tree.map(lambda x: x[:Le], ad)
        state['decoder']['adapter'] = jax.tree.map(lambda x: x[Le:], ad)
    if 'prefix_queries' in hyper:
        def prefix(G):    # G [B, s, 2p, D]
            B_s = G.shape[:2]   # [B, s]
            return {'k': gen('prefix_k', G[..., :p, :]).reshape(*B_s, p, H, K),  # [B, s, p, H, K]
                    'v': gen('prefix_v', G[..., p:, :]).reshape(*B_s, p, H, K)}
        pre = pooled(hyper['prefix_queries'], prefix)                             # [S, B, p, H, K]
        # the key names tell the T5 stacks how to attend them (model.attend)
        how = '' if hcfg.prefix_attention == 'joint' else '_separate'
        state['encoder']['prefix' + how] = jax.tree.map(lambda x: x[:Le], pre)
        state['decoder']['self_prefix' + how] = jax.tree.map(lambda x: x[Le::2], pre)   # slot Le + 2j
        state['decoder']['cross_prefix' + how] = jax.tree.map(lambda x: x[Le + 1::2], pre)  # slot Le + 2j + 1
    if 'lora_queries' in hyper:  # a generated LoRA on q and v, (h A) B added to h W (beyond the paper)
        R = hcfg.lora_rank
        def lora(G):      # G [B, s, 4R, D]
            return {'q_a': jnp.swapaxes(gen('lora_a', G[..., :R, :]), -1, -2),        # [B, s, D, R]
                    'q_b': gen('lora_b', G[..., R:2 * R, :]),                        # [B, s, R, HK]
                    'v_a': jnp.swapaxes(gen('lora_a', G[..., 2 * R:3 * R, :]), -1, -2),
                    'v_b': gen('lora_b', G[..., 3 * R:, :])}
        lo = pooled(hyper['lora_queries'], lora)                                      # [S, B, ...]
        state['encoder']['lora'] = jax.tree.map(lambda x: x[:Le], lo)
        state['decoder']['self_lora'] = jax.tree.map(lambda x: x[Le::2], lo)
        state['decoder']['cross_lora'] = jax.tree.map(lambda x: x[Le + 1::2], lo)
    return state


POOL_BYTES = 2 ** 25   # float32 pooling scores per instruction in one block of slots: 32 MiB


def block_slots(S, C, H, n, slots=0):
    """Slots per pooling block: `slots`, or as many as keep the scores [H, s C, n] of one
    instruction within POOL_BYTES; a divisor of S."""
    s = min(slots or max(1, POOL_BYTES // (H * C * n * 4)), S)
    return max(d for d in range(1, s + 1) if S % d == 0)


def pool(w, k, v, bias, slots, table, generate):
    """The pooling attention of a query table [S, C, D] over the instruction (k, v [B, n, H, K]),
    then generate(G [B, s, C, D]) -> the modules of s slots, one block of s slots at a time: the
    scores of the other blocks are never alive, forward or backward (jax.checkpoint: the backward
    pass recomputes one block's). s: block_slots(). Returns the modules, layer-major [S, B, ...].
    """
    B, n, H, K = k.shape
    S, C, D = table.shape
    s = block_slots(S, C, H, n, slots)

    @jax.checkpoint
    def block(rows):                                                                # [s, C, D]
        q = (rows.reshape(s * C, D) @ w['q']).reshape(s * C, H, K) * K ** -0.5
        scores = jnp.einsum('qhk,bnhk->bhqn', q, k) + bias                          # [B, H, sC, n]
        G = jnp.einsum('bhqn,bnhk->bqhk', jax.nn.softmax(scores, axis=-1), v)
        G = G.reshape(B, s, C, H * K) @ w['o']                                        # [B, s, C, D]
        return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), generate(G))           # [s, B, ...]

    out = jax.lax.map(block, table.reshape(S // s, s, C, D))                      # [S/s, s, B, ...]
    return jax.tree.map(lambda x: x.reshape(S, *x.shape[2:]), out)


def select_task(state, i):
    """Row i of a batched task state, without the batch axis (shared by a whole batch); rows i [B]
    give a state batched over them."""
    return {'encoder': jax.tree.map(lambda x: x[:, i], state['encoder']),
            'decoder': jax.tree.map(lambda x: x[:, i], state['decoder']),
            'memory': jax.tree.map(lambda x: x[i], state['memory'])}


def hint_forward(params, cfg, hcfg: HyperConfig | None, instruction_ids, input_ids, decoder_input_ids, rng=None,
                 task_ids=None, n_tasks=None):
    """Training-time forward, one task state per instance -> logits [B, T, V]. hcfg None = plain
    T5 on the input alone (the baselines: full input puts the instruction into input_ids).
    task_ids [B] (equal for rows with the same instruction) and a static n_tasks >= the number of
    distinct ids: each distinct instruction is encoded once and its state shared by its rows (the
    same logits as per instance; with dropout, a task's rows share the instruction's mask)."""
    if hcfg is None:
        return M.t5_forward(params['t5'], cfg, input_ids, decoder_input_ids, rng=rng)
    r1, r2 = (None, None) if rng is None else jax.random.split(rng)
    if task_ids is None or n_tasks >= len(task_ids):
        state = encode_task(params, cfg, hcfg, instruction_ids, r1)
    else:   # unused slots repeat the largest id: a bounded waste, never a wrong row
        distinct = jnp.unique(task_ids, size=n_tasks, fill_value=task_ids.max())      # [U]
        first_row = jnp.argmax(task_ids[None, :] == distinct[:, None], axis=1)          # [U]
        task_of_row = jnp.argmax(distinct[None, :] == task_ids[:, None], axis=1)        # [B]
        state = encode_task(params, cfg, hcfg, jnp.take(instruction_ids, first_row, axis=0), r1)
        state = select_task(state, task_of_row)
    return M.t5_forward(params['t5'], cfg, input_ids, decoder_input_ids, mods=state, rng=r2)


def save_task_state(path, state):
    """Write a task state (batched or not) to a safetensors file, so the task's generated modules
    can be served without re-reading its instruction."""
    from flax import traverse_util
    from safetensors.numpy import save_file
    flat = traverse_util.flatten_dict(state, sep='/')
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    save_file({k: np.asarray(v) for k, v in flat.items() if v is not None}, tmp)
    os.replace(tmp, path)


def load_task_state(path):
    from flax import traverse_util
    from safetensors.numpy import load_file
    tree = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in load_file(path).items()}, sep='/')
    return {'encoder': tree.get('encoder', {}), 'decoder': tree.get('decoder', {}), 'memory': tree.get('memory')}


def merge_lora(t5_params, state):
    """Plain T5 parameters with one task's generated LoRA folded in: W_q + A_q B_q and W_v + A_v B_v in
    every attention block. state: one task (select_task), a LoRA and nothing else."""
    blocks = (('encoder', 'self_attn', 'lora'), ('decoder', 'self_attn', 'self_lora'),
              ('decoder', 'cross_attn', 'cross_lora'))
    others = sorted((set(state['encoder']) | set(state['decoder'])) - {name for _, _, name in blocks})
    if others or state['memory'] is not None or 'lora' not in state['encoder']:
        raise ValueError(f'merge_lora: only a LoRA-only task state merges into T5 weights; this one holds '
                         f'{others + ["fusion memory"] * (state["memory"] is not None) or "no LoRA"}')
    out = jax.tree.map(jnp.asarray, t5_params)   # new dicts, the same arrays
    for stack, block, name in blocks:
        m, w = state[stack][name], out[stack]['layers'][block]
        if m['q_a'].ndim != 3:
            raise ValueError('merge_lora: a batched task state; pass one task (select_task)')
        for n in 'qv':   # [L, D, R] @ [L, R, HK] -> [L, D, HK], our kernels' [in, out] layout
            w[n] = (w[n] + m[n + '_a'] @ m[n + '_b']).astype(w[n].dtype)
    return out


# ----------------------------------------------------------------------------------------------
# Runs on disk: <run>/ckpt-<step>/{params/, opt/, meta/metadata}, written by orbax-checkpoint (train.py):
# every process writes its own shards, to a temporary name first (on gs://: commit_success.txt last),
# so a folder with commit_success.txt is complete. A folder or gs://bucket/path (etils.epath).
# train.py --init/--resume and eval.py read them back here, onto any number of devices.


# orbax (and asyncio under it) log each failure with a traceback from their own threads, then raise it;
# the callers here turn what is raised into one error line that names the checkpoint: logs silenced.
for name in ('absl', 'asyncio'):
    logging.getLogger(name).setLevel(logging.CRITICAL)


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or does not fit its config: the message names the file."""


def init_params(cfg, hcfg, rng, t5_params=None, encoder_params=None, skeleton=False):
    """{'t5': ..., 'hyper': ...} (no 'hyper' for a baseline). skeleton: shapes for a stored RoBERTa."""
    r1, r2 = jax.random.split(rng)
    t5 = t5_params if t5_params is not None else M.init_t5(cfg, r1)
    params = {'t5': t5}
    if hcfg is not None:
        if skeleton and hcfg.instruction_encoder == 'roberta':
            encoder_params = M.init_roberta(hcfg.roberta, r2)
        params['hyper'] = init_hyper(cfg, hcfg, r2, t5, encoder_params)
    return params


def checkpoints(run_dir):
    """The run's complete checkpoint folders, oldest first (not what a killed save left behind)."""
    found = epath.Path(run_dir).glob('ckpt-*')
    return sorted(str(p) for p in found if re.fullmatch(r'ckpt-\d+', p.name) and (p / 'commit_success.txt').exists())


def is_checkpoint(path):
    return re.fullmatch(r'ckpt-\d+', epath.Path(path).name) is not None


def newest_first(path):
    """[path] for one checkpoint folder; a run folder's checkpoints, newest first."""
    return [str(path)] if is_checkpoint(path) else checkpoints(path)[::-1]


def read_meta(ckpt):
    path = epath.Path(ckpt) / 'meta' / 'metadata'
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f'{path}: missing (an incomplete checkpoint)') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{path}: not valid JSON ({e})') from None
    for key in ('step', 't5_config', 'hyper_config', 'tokenizer'):
        if not isinstance(meta, dict) or key not in meta:
            raise CheckpointError(f'{path}: missing field {key!r}')
    return meta


def configs(meta, dtype='float32'):
    """(T5Config, HyperConfig or None) stored in a checkpoint's meta."""
    cfg = M.T5Config(**{**meta['t5_config'], 'dtype': dtype})
    if meta['hyper_config'] is None:
        return cfg, None
    h = dict(meta['hyper_config'])
    h['roberta'] = M.RobertaConfig(**h['roberta']) if h.get('roberta') else None
    return cfg, HyperConfig(**h)


def check_shapes(where, saved, expected):
    """Name the first parameter that is missing, extra or of another shape than the config's."""
    from flax import traverse_util
    have, want = (traverse_util.flatten_dict(tree, sep='/') for tree in (saved, expected))
    for k in sorted(set(have) | set(want)):
        got, need = (tuple(tree[k].shape) if k in tree else None for tree in (have, want))
        if got != need:
            what = 'is missing' if got is None else 'is unexpected' if need is None else \
                f'has shape {got}, the config expects {need}'
            raise CheckpointError(f'{where}: parameter {k!r} {what} (checkpoint does not match the config)')


def read_items(ckpt, targets):
    """{name: pytree} for the checkpoint items named in targets ({'params': ..., 'opt': ...}), placed
    as each target's arrays say (jax.ShapeDtypeStruct or arrays, with a sharding): the devices and
    mesh may differ from the run that saved it (elastic restore)."""
    import orbax.checkpoint as ocp
    ckpt, out = str(ckpt), {}
    for name, target in targets.items():
        where = f'{ckpt}/{name}'
        if not (epath.Path(where) / '_METADATA').exists():
            raise CheckpointError(f'{where}: missing (an incomplete checkpoint)')
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        try:
            reader = ocp.StandardCheckpointHandler()   # each item is a pytree checkpoint of its own
            if name == 'params':
                check_shapes(where, reader.metadata(epath.Path(where)).tree, abstract)
            out[name] = reader.restore(epath.Path(where), args=ocp.args.StandardRestore(abstract))
        except CheckpointError:
            raise
        except Exception as e:   # tensorstore's and orbax's own errors for a damaged or foreign item
            raise CheckpointError(f'{where}: cannot be read, damaged or of another config '
                                  f'({type(e).__name__}: {str(e)[:200]})') from None
    return out


def quiet_abandoned_io(kind, error=None, traceback=None, default=sys.excepthook):
    """The other reads or writes of a failed restore or save end after orbax closed their event loop,
    and tensorstore reports each (sys.excepthook or sys.unraisablehook): the failure itself is already
    reported."""
    if not isinstance(kind, type):   # unraisablehook's argument
        kind, error, traceback = kind.exc_type, kind.exc_value, kind.exc_traceback
    if not (kind is RuntimeError and 'Event loop is closed' in str(error)):
        default(kind, error, traceback)


sys.excepthook = sys.unraisablehook = quiet_abandoned_io


def load_run(path, dtype='float32'):
    """(cfg, hcfg, params, meta) of one checkpoint folder, or of a run folder's newest checkpoint that
    loads (a damaged one is skipped with a warning), on the first device. meta['path'] is the checkpoint
    read."""
    direct, found = is_checkpoint(path), newest_first(path)
    if not epath.Path(path).is_dir() or not found:
        raise CheckpointError(f'{path}: no checkpoint (expected a run folder with ckpt-<step>/ inside, '
                              'as train.py writes it)')
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for ckpt in found:
        try:
            meta = read_meta(ckpt)
            cfg, hcfg = configs(meta, dtype)
            skeleton = functools.partial(init_params, cfg, hcfg, skeleton=True)
            shapes = jax.eval_shape(skeleton, jax.random.PRNGKey(0))
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
            return cfg, hcfg, read_items(ckpt, {'params': target})['params'], {**meta, 'path': ckpt}
        except (CheckpointError, OSError, TypeError) as e:   # TypeError: a meta of another version
            if direct:
                raise CheckpointError(f'{ckpt}: {e}' if ckpt not in str(e) else str(e)) from None
            print(f'warning: skipping {ckpt}: {e}', file=sys.stderr)
    raise CheckpointError(f'{path}: none of its {len(found)} checkpoints loads (see the warnings above)')
