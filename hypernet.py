"""HINT's hypernetwork (../shared/HINT.md sections 3-4): instruction -> task state -> T5 run.

Two steps, so that an instruction is read once per task:
    state  = encode_task(params, cfg, hcfg, instruction_ids)        # per task
    logits = model.t5_forward(params['t5'], cfg, input_ids, decoder_ids, mods=state)
The task state holds the generated adapters and prefixes (and, with lora_rank, a LoRA on attention
q and v) in the T5 stacks' layout, a leading layer axis scanned with the layer weights, and the
encoded instruction for fusion. With a batch axis it is one state per instance;
select_task(state, i) drops that axis: the model then shares one state across a batch, uncopied.

Layout note: HINT.md gives every attention slot C = 2r+2 adapter rows + 2p prefix rows. Adapters
sit only on feed-forward blocks (one per layer), so we keep two query tables, adapter rows for the
Le + Ld layers and prefix rows for the S = Le + 2 Ld attention blocks: the cross-attention slots'
adapter rows would otherwise never receive a gradient.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import model as M


@dataclasses.dataclass(frozen=True)
class HyperConfig:
    adapter_dim: int = 64          # r (paper: Base 64, XL/XXL 512)
    prefix_len: int = 30           # p (paper: 30)
    adapters: bool = True
    prefixes: bool = True
    fusion: bool = True            # decoder cross-attention also sees the encoded instruction
    prefix_attention: str = 'joint'   # joint: one softmax with the layer's keys (paper); separate
    instruction_encoder: str = 'shared'   # shared (T5's encoder) | t5 (a copy of it) | roberta
    roberta: M.RobertaConfig | None = None
    lora_rank: int = 0             # R: a generated LoRA on every attention's q and v (not in paper)
    pool_slots: int = 0            # slots pooled at once (pool()); 0 = from POOL_BYTES


def dense_init(rng, n_in, n_out):   # variance scaling (fan-in, normal), zero bias
    w = jax.random.normal(rng, (n_in, n_out), jnp.float32) * n_in ** -0.5
    return {'w': w, 'b': jnp.zeros((n_out,), jnp.float32)}


def init_hyper(cfg: M.T5Config, hcfg: HyperConfig, rng, t5_params=None, encoder_params=None):
    """Hypernetwork parameters (plus the separate instruction encoder, if any)."""
    D, HK, r, p = cfg.d_model, cfg.num_heads * cfg.d_kv, hcfg.adapter_dim, hcfg.prefix_len
    Le, Ld, R = cfg.num_layers, cfg.num_decoder_layers, hcfg.lora_rank
    keys = iter(jax.random.split(rng, 32))

    def queries(slots, rows):   # a learned query table [slots, rows, D]
        return jax.random.normal(next(keys), (slots, rows, D)) * D ** -0.5

    def generator(n_out):       # D -> D, GELU, -> n_out
        return {'fc1': dense_init(next(keys), D, D), 'fc2': dense_init(next(keys), D, n_out)}

    hyper, gen = {'pool': {}}, {}
    for name, (n_in, n_out) in {'q': (D, HK), 'k': (D, HK), 'v': (D, HK), 'o': (HK, D)}.items():
        hyper['pool'][name] = jax.random.normal(next(keys), (n_in, n_out)) * n_in ** -0.5
    if hcfg.adapters:   # rows: r down, r up, 1 down bias, 1 up bias, for every layer
        hyper['adapter_queries'] = queries(Le + Ld, 2 * r + 2)
        gen.update(down=generator(D), up=generator(D), down_bias=generator(r), up_bias=generator(D))
    if hcfg.prefixes:   # rows: p keys, p values, for every attention block
        hyper['prefix_queries'] = queries(Le + 2 * Ld, 2 * p)
        gen.update(prefix_k=generator(HK), prefix_v=generator(HK))
    if hcfg.instruction_encoder == 't5':   # a separate T5 encoder, initialised from the shared one
        hyper['encoder'] = {'embed': t5_params['embed'], 'encoder': t5_params['encoder']}
    elif hcfg.instruction_encoder == 'roberta':
        hyper['encoder'] = encoder_params
        if hcfg.roberta.hidden_size != D:
            hyper['proj'] = dense_init(next(keys), hcfg.roberta.hidden_size, D)
    if hcfg.lora_rank:  # rows: R for each of A_q, B_q, A_v, B_v, for every attention block
        hyper['lora_queries'] = queries(Le + 2 * Ld, 4 * R)
        # B's generator is random like the others, not zero as LoRA's B: Adafactor's steps are
        # relative to a weight's RMS, and would leave a zero weight near zero for thousands of steps
        gen.update(lora_a=generator(D), lora_b=generator(HK))
    if gen:
        hyper['gen'] = gen
    return hyper


def init_params(cfg, hcfg, rng, t5_params=None, encoder_params=None, skeleton=False):
    """{'t5': ..., 'hyper': ...} ('t5' only for a baseline). skeleton: a stored RoBERTa's shapes."""
    r1, r2 = jax.random.split(rng)
    t5 = t5_params if t5_params is not None else M.init_t5(cfg, r1)
    params = {'t5': t5}
    if hcfg is not None:
        if skeleton and hcfg.instruction_encoder == 'roberta':
            encoder_params = M.init_roberta(hcfg.roberta, r2)
        params['hyper'] = init_hyper(cfg, hcfg, r2, t5, encoder_params)
    return params


def instruction_pad_id(hcfg):
    """The padding id of the instruction encoder's vocabulary (RoBERTa's is 1, T5's 0)."""
    if hcfg is not None and hcfg.instruction_encoder == 'roberta':
        return hcfg.roberta.pad_token_id
    return M.PAD_ID


def encode_instruction(hyper, t5_params, cfg, hcfg, ids, rng=None):
    """E [B, n, D] with padding rows zeroed, and the mask [B, n]."""
    mask = ids != instruction_pad_id(hcfg)
    if hcfg.instruction_encoder == 'roberta':
        E = M.roberta_forward(hyper['encoder'], hcfg.roberta, ids).astype(jnp.float32)
        if 'proj' in hyper:
            E = E @ hyper['proj']['w'] + hyper['proj']['b']
    else:
        encoder = hyper['encoder'] if hcfg.instruction_encoder == 't5' else t5_params
        E = M.t5_encode(encoder, cfg, ids, rng=rng).astype(jnp.float32)
    return E * mask[..., None], mask


def generate(p, rows):
    """A generator MLP on pooled rows [..., D], its output / sqrt(D) (small initial modules)."""
    hidden = jax.nn.gelu(rows @ p['fc1']['w'] + p['fc1']['b'], approximate=False)
    return (hidden @ p['fc2']['w'] + p['fc2']['b']) / np.sqrt(rows.shape[-1])


def by_attention_block(state, name, modules, Le):
    """Slot-major modules [S, B, ...] of the S = Le + 2 Ld attention blocks into the stacks: slot
    l < Le is encoder layer l; decoder layer j's self-attention is Le + 2j, cross-attention +1."""
    def take(index):
        return jax.tree.map(lambda x: x[index], modules)
    state['encoder'][name] = take(slice(None, Le))
    state['decoder']['self_' + name] = take(slice(Le, None, 2))
    state['decoder']['cross_' + name] = take(slice(Le + 1, None, 2))


def encode_task(params, cfg: M.T5Config, hcfg: HyperConfig, instruction_ids, rng=None) -> dict:
    """instruction_ids [B, n] -> task state, one per row (layout: the module docstring)."""
    hyper, gen = params['hyper'], params['hyper'].get('gen')
    H, K, r, p, R = cfg.num_heads, cfg.d_kv, hcfg.adapter_dim, hcfg.prefix_len, hcfg.lora_rank
    Le, B = cfg.num_layers, instruction_ids.shape[0]
    E, mask = encode_instruction(hyper, params['t5'], cfg, hcfg, instruction_ids, rng)
    memory = {'E': E, 'mask': mask} if hcfg.fusion else None
    state = {'encoder': {}, 'decoder': {}, 'memory': memory}

    # Pooling: one multi-head attention, queries = the learned slot rows, keys/values = E; then the
    # generators, one MLP per component kind. pool() runs both a few slots at a time.
    k = (E @ hyper['pool']['k']).reshape(B, -1, H, K)                              # [B, n, H, K]
    v = (E @ hyper['pool']['v']).reshape(B, -1, H, K)
    bias = M.mask_bias(mask)[:, None, None, :]                                     # [B, 1, 1, n]
    pooled = functools.partial(pool, hyper['pool'], k, v, bias, hcfg.pool_slots)

    def adapter(G):   # pooled rows G [B, s, 2r+2, D] of s slots
        down = generate(gen['down'], G[..., :r, :])                                 # [B, s, r, D]
        return {'down': jnp.swapaxes(down, -1, -2),                                 # [B, s, D, r]
                'up': generate(gen['up'], G[..., r:2 * r, :]),                      # [B, s, r, D]
                'down_bias': generate(gen['down_bias'], G[..., 2 * r, :]),          # [B, s, r]
                'up_bias': generate(gen['up_bias'], G[..., 2 * r + 1, :])}          # [B, s, D]

    def prefix(G):    # G [B, s, 2p, D]
        return {'k': generate(gen['prefix_k'], G[..., :p, :]).reshape(*G.shape[:2], p, H, K),
                'v': generate(gen['prefix_v'], G[..., p:, :]).reshape(*G.shape[:2], p, H, K)}

    def lora(G):      # G [B, s, 4R, D]; (h A) B is added to h W (not in the paper)
        q_a = generate(gen['lora_a'], G[..., :R, :])                                # [B, s, R, D]
        v_a = generate(gen['lora_a'], G[..., 2 * R:3 * R, :])
        return {'q_a': jnp.swapaxes(q_a, -1, -2),                                   # [B, s, D, R]
                'q_b': generate(gen['lora_b'], G[..., R:2 * R, :]),                 # [B, s, R, HK]
                'v_a': jnp.swapaxes(v_a, -1, -2),
                'v_b': generate(gen['lora_b'], G[..., 3 * R:, :])}

    if 'adapter_queries' in hyper:
        adapters = pooled(hyper['adapter_queries'], adapter)                  # [Le + Ld, B, ...]
        state['encoder']['adapter'] = jax.tree.map(lambda x: x[:Le], adapters)
        state['decoder']['adapter'] = jax.tree.map(lambda x: x[Le:], adapters)
    if 'prefix_queries' in hyper:   # the entry's name tells the stacks how to attend it
        how = '' if hcfg.prefix_attention == 'joint' else '_separate'
        by_attention_block(state, 'prefix' + how, pooled(hyper['prefix_queries'], prefix), Le)
    if 'lora_queries' in hyper:
        by_attention_block(state, 'lora', pooled(hyper['lora_queries'], lora), Le)
    return state


POOL_BYTES = 2 ** 25   # float32 pooling scores per instruction in one block of slots: 32 MiB


def block_slots(S, C, H, n, slots=0):
    """Slots per pooling block, a divisor of S: `slots`, or as many as keep the scores [H, s C, n]
    of one instruction within POOL_BYTES."""
    s = min(slots or max(1, POOL_BYTES // (H * C * n * 4)), S)
    return max(d for d in range(1, s + 1) if S % d == 0)


def pool(w, k, v, bias, slots, table, make_modules):
    """The pooling attention of a query table [S, C, D] over the instruction (k, v [B, n, H, K]),
    then make_modules(G [B, s, C, D]), one block of s slots at a time: only one block's scores are
    alive, forward or backward (jax.checkpoint recomputes them). Returns modules [S, B, ...]."""
    B, n, H, K = k.shape
    S, C, D = table.shape
    s = block_slots(S, C, H, n, slots)

    @jax.checkpoint
    def block(rows):                                                               # [s, C, D]
        q = (rows.reshape(s * C, D) @ w['q']).reshape(s * C, H, K) * K ** -0.5
        scores = jnp.einsum('qhk,bnhk->bhqn', q, k) + bias                         # [B, H, sC, n]
        G = jnp.einsum('bhqn,bnhk->bqhk', jax.nn.softmax(scores, axis=-1), v)
        G = G.reshape(B, s, C, H * K) @ w['o']                                     # [B, s, C, D]
        return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), make_modules(G))     # [s, B, ...]

    out = jax.lax.map(block, table.reshape(S // s, s, C, D))                     # [S/s, s, B, ...]
    return jax.tree.map(lambda x: x.reshape(S, *x.shape[2:]), out)


def select_task(state, i):
    """Row i of a batched task state, without the batch axis (one state shared by a whole batch);
    rows i [B] give a state batched over them."""
    return {'encoder': jax.tree.map(lambda x: x[:, i], state['encoder']),
            'decoder': jax.tree.map(lambda x: x[:, i], state['decoder']),
            'memory': jax.tree.map(lambda x: x[i], state['memory'])}


def hint_forward(params, cfg, hcfg, instruction_ids, input_ids, decoder_input_ids, rng=None,
                 task_ids=None, n_tasks=None):
    """Training's forward, one task state per instance -> logits [B, T, V]. hcfg None: plain T5 on
    the input alone (the baselines). task_ids [B] (equal for equal instructions) and a static
    n_tasks >= their distinct count: each distinct instruction is encoded once, its state shared
    by its rows (the same logits; with dropout, a task's rows share the instruction's mask)."""
    if hcfg is None:
        return M.t5_forward(params['t5'], cfg, input_ids, decoder_input_ids, rng=rng)
    r1, r2 = (None, None) if rng is None else jax.random.split(rng)
    if task_ids is None or n_tasks >= len(task_ids):
        state = encode_task(params, cfg, hcfg, instruction_ids, r1)
    else:   # unused slots repeat the largest id: a bounded waste, never a wrong row
        distinct = jnp.unique(task_ids, size=n_tasks, fill_value=task_ids.max())      # [U]
        first_row = jnp.argmax(task_ids[None, :] == distinct[:, None], axis=1)          # [U]
        task_of_row = jnp.argmax(distinct[None, :] == task_ids[:, None], axis=1)        # [B]
        instructions = jnp.take(instruction_ids, first_row, axis=0)
        state = select_task(encode_task(params, cfg, hcfg, instructions, r1), task_of_row)
    return M.t5_forward(params['t5'], cfg, input_ids, decoder_input_ids, mods=state, rng=r2)
