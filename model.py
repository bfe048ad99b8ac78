"""T5 (v1.0, v1.1 / LM-adapted / Flan) and RoBERTa as plain JAX functions, and their import.

Numerics match transformers (tests/test_parity.py); the T5 math follows t5x. Shapes: B batch,
T/S sequence, H heads, K head size, D width, L layers."""
import collections
import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

PAD_ID, EOS_ID = 0, 1  # shared by T5's SentencePiece vocabulary and the byte tokenizer
HUB_FILES = ['*.json', '*.model', '*.safetensors', '*.msgpack']  # what resolve_dir downloads


def resolve_dir(name_or_dir: str) -> str:
    """A local directory as is; else a hub name, downloaded (offline: huggingface_hub's cache)."""
    if os.path.exists(name_or_dir):
        return name_or_dir
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name_or_dir, allow_patterns=HUB_FILES)
    except Exception as e:  # no such model, or offline and not in the cache
        raise FileNotFoundError(f'{name_or_dir}: no such directory or hub model') from e


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64                 # head size
    d_ff: int = 1024
    num_heads: int = 6
    num_layers: int = 8            # encoder
    num_decoder_layers: int = 8
    num_buckets: int = 32          # relative position buckets
    max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    gated_gelu: bool = True        # v1.1 / LM-adapted / Flan; False = v1.0's ReLU
    tie_word_embeddings: bool = False  # v1.0 ties (and scales the decoder output by d^-0.5)
    dtype: str = 'float32'         # compute dtype (bfloat16 on accelerators); logits stay float32
    param_dtype: str = 'float32'
    remat: bool = False            # recompute each layer in the backward pass (less memory)


PRESETS = {  # T5 v1.1 / LM-adapted shapes (HINT's underlying model; d_kv 64), tiny for tests
    'tiny': T5Config(vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2,
                     num_decoder_layers=2),
    'small': T5Config(d_model=512, d_ff=1024, num_heads=6, num_layers=8, num_decoder_layers=8),
    'base': T5Config(d_model=768, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12),
    'large': T5Config(d_model=1024, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24),
    'xl': T5Config(d_model=2048, d_ff=5120, num_heads=32, num_layers=24, num_decoder_layers=24),
    'xxl': T5Config(d_model=4096, d_ff=10240, num_heads=64, num_layers=24, num_decoder_layers=24),
}


# ----------------------------------------------------------------------------------------------
# Parameters: plain pytrees, laid out as {our path: Param} for init and import. Layers are stacked
# [L, ...] and run by lax.scan (compile time does not grow with depth); kernels are [in, out].
# A Param's init is a normal's std, jnp.ones or jnp.zeros; its name is transformers' ({i}: layer).
Param = collections.namedtuple('Param', ['shape', 'init', 'name'])


def t5_layout(cfg: T5Config) -> dict:
    """Every T5 parameter in init order (transformers' init scheme; lm head scaled by fan-in)."""
    D, HK, F = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    attention = {'q': (D, HK, (D * cfg.d_kv) ** -0.5), 'k': (D, HK, D ** -0.5),
                 'v': (D, HK, D ** -0.5), 'o': (HK, D, HK ** -0.5)}          # [in, out], init std
    wi = ('wi_0', 'wi_1') if cfg.gated_gelu else ('wi',)  # gated GELU: a gate and a linear kernel
    ffn = {**{name: (D, F, D ** -0.5) for name in wi}, 'wo': (F, D, F ** -0.5)}
    layout = {('embed',): Param((cfg.vocab_size, D), 1.0, 'shared.weight')}
    for stack, L in (('encoder', cfg.num_layers), ('decoder', cfg.num_decoder_layers)):
        bias = f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'  # layer 0's
        layout[(stack, 'rel_bias')] = Param((cfg.num_buckets, cfg.num_heads), D ** -0.5, bias)
        layout[(stack, 'final_norm')] = Param((D,), jnp.ones, f'{stack}.final_layer_norm.weight')
        sublayers = [('self_attn', 'SelfAttention', attention)]  # in transformers' numbering
        if stack == 'decoder':
            sublayers.append(('cross_attn', 'EncDecAttention', attention))
        for j, (ours, theirs, kernels) in enumerate(sublayers + [('ffn', 'DenseReluDense', ffn)]):
            block, prefix = (stack, 'layers', ours), f'{stack}.block.{{i}}.layer.{j}.'
            layout[(*block, 'norm')] = Param((L, D), jnp.ones, prefix + 'layer_norm.weight')
            for w, (n_in, n_out, std) in kernels.items():
                layout[(*block, w)] = Param((L, n_in, n_out), std, f'{prefix}{theirs}.{w}.weight')
    if not cfg.tie_word_embeddings:
        layout[('lm_head',)] = Param((D, cfg.vocab_size), D ** -0.5, 'lm_head.weight')
    return layout


def init_params(layout: dict, rng, n_keys: int, dtype='float32') -> dict:  # in layout order
    keys, params = iter(jax.random.split(rng, n_keys)), {}
    for path, (shape, init, _) in layout.items():
        if callable(init):  # jnp.ones, jnp.zeros
            params[path] = init(shape, dtype)
        else:
            params[path] = (jax.random.normal(next(keys), shape, jnp.float32) * init).astype(dtype)
    return traverse_util.unflatten_dict(params)


def init_t5(cfg: T5Config, rng) -> dict:
    return init_params(t5_layout(cfg), rng, 64, cfg.param_dtype)


# ----------------------------------------------------------------------------------------------
# T5 building blocks


def rms_norm(x, scale, eps):
    """T5's layer norm: no mean subtraction, no bias; statistics in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def dropout(x, rate, rng):
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def rngs(rng, n):  # per-layer dropout keys (None when deterministic)
    return None if rng is None else jax.random.split(rng, n)


def sub(rng, i):
    return None if rng is None else jax.random.fold_in(rng, i)


def relative_bucket(rel, bidirectional, num_buckets, max_distance):
    """rel = key position - query position -> bucket id (as transformers' T5)."""
    bucket = 0
    if bidirectional:  # half the buckets for keys after the query
        num_buckets //= 2
        bucket = (rel > 0).astype(jnp.int32) * num_buckets
    rel = jnp.abs(rel) if bidirectional else -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2  # beyond it, buckets grow logarithmically up to max_distance
    log_ratio = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
    scaled = log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return bucket + jnp.where(rel < max_exact, rel, large)


def position_bias(table, q_pos, k_pos, bidirectional, cfg):  # [1, H, T, S], once per stack
    rel = k_pos[None, :] - q_pos[:, None]                                            # [T, S]
    buckets = relative_bucket(rel, bidirectional, cfg.num_buckets, cfg.max_distance)
    return jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))[None]


def mask_bias(mask):  # [..., S] bool (True = attend) -> additive float32 bias
    return jnp.where(mask, 0.0, -1e9).astype(jnp.float32)


def heads(x, cfg):  # [..., T, H*K] -> [..., T, H, K]
    return x.reshape(*x.shape[:-1], cfg.num_heads, cfg.d_kv)


def scores(q, k):  # q [B,T,H,K], k [B,M,H,K] or [M,H,K] shared by the batch -> [B,H,T,M]
    spec = 'bthk,mhk->bhtm' if k.ndim == 3 else 'bthk,bmhk->bhtm'
    return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)


def weighted_sum(probs, v):  # probs [B,H,T,M], v [B,M,H,K] or [M,H,K] -> [B,T,H,K]
    spec = 'bhtm,mhk->bthk' if v.ndim == 3 else 'bhtm,bmhk->bthk'
    return jnp.einsum(spec, probs, v.astype(probs.dtype))  # generated values are float32


def attend(q, k, v, bias, extra=(), prefix=None, rate=0.0, rng=None):
    """q [B,T,H,K] over k, v [B,S,H,K] (+ bias [B|1,H|1,T,S]) and, in one softmax, `extra` (HINT's
    memory, prefixes: k, v [(B,)M,H,K] shared if unbatched, bias [(B,)M] | None) -> [B,T,H*K]."""
    logits = [scores(q, k) + bias]
    for extra_k, _, extra_bias in extra:
        s = scores(q, extra_k)                                                       # [B, H, T, M]
        if extra_bias is not None:  # [M] or [B, M] -> [1|B, 1, 1, M]
            s = s + extra_bias.reshape(-1, 1, 1, extra_bias.shape[-1])
        logits.append(s)
    probs = dropout(jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1), rate, rng)
    ends = np.cumsum([s.shape[-1] for s in logits])[:-1]
    probs = jnp.split(probs.astype(q.dtype), ends, axis=-1)
    out = weighted_sum(probs[0], v)                                                 # [B, T, H, K]
    for p, (_, extra_v, _) in zip(probs[1:], extra):
        out = out + weighted_sum(p, extra_v)
    if prefix is not None:  # --prefix-attention separate: zero prefixes leave T5 as it was
        p = jax.nn.softmax(scores(q, prefix['k']), axis=-1)
        out = out + weighted_sum(dropout(p, rate, sub(rng, 1)).astype(q.dtype), prefix['v'])
    return out.reshape(*out.shape[:2], -1)


def joined(m, name):  # a generated prefix that shares the layer's softmax, as an extra set
    return [] if m.get(name) is None else [(m[name]['k'], m[name]['v'], None)]


def bmm(x, w):  # x [B,T,D] @ w: [D,N] shared by the batch or [B,D,N] per instance
    return jnp.einsum('btd,dn->btn' if w.ndim == 2 else 'btd,bdn->btn', x, w.astype(x.dtype))


def add_bias(x, b):  # x [B,T,N] + b: [N] shared by the batch or [B,N] per instance
    return x + b.reshape(-1, 1, b.shape[-1]).astype(x.dtype)


def lora(x, a, b):  # a generated LoRA's term (x A) B: x [B,T,D], A [(B,)D,R], B [(B,)R,N]
    return bmm(bmm(x, a), b)


def project(h, w, n, m, cfg):  # projection n of h [B,T,D] -> [B,T,H,K], + the LoRA m on q, v
    y = h @ w[n].astype(h.dtype)
    if m is not None and n in 'qv':
        y = y + lora(h, m[n + '_a'], m[n + '_b'])
    return heads(y, cfg)


def adapter(m, h):  # HINT's parallel adapter, generated per task: gelu(h Wd + bd) Wu + bu
    hidden = add_bias(bmm(h, m['down']), m['down_bias'])                            # [B, T, r]
    hidden = jax.nn.gelu(hidden, approximate=False)
    return add_bias(bmm(hidden, m['up']), m['up_bias'])                              # [B, T, D]


def ffn_block(p, m, x, cfg, rate, rng_ffn, rng_out):
    """The pre-norm feed-forward block and its residual, with HINT's adapter (if any) beside it."""
    dt = x.dtype
    h = rms_norm(x, p['norm'], cfg.layer_norm_epsilon)
    if cfg.gated_gelu:  # gelu_new (tanh approximation) gate times linear
        a = jax.nn.gelu(h @ p['wi_0'].astype(dt), approximate=True) * (h @ p['wi_1'].astype(dt))
    else:
        a = jax.nn.relu(h @ p['wi'].astype(dt))
    y = dropout(a, cfg.dropout_rate, rng_ffn) @ p['wo'].astype(dt)                  # [B, T, D]
    if m.get('adapter') is not None:
        y = y + adapter(m['adapter'], h)
    return x + dropout(y, rate, rng_out)


# T5 stacks. `mods` is HINT's task state (hypernet.py), None for plain T5: mods['encoder'/'decoder']
# entries have a layer axis and are scanned with the layer weights (None: that module is off).


def t5_encode(params, cfg, ids, mods=None, rng=None):
    """ids [B, S] (0 = padding) -> encoder states [B, S, D]."""
    dt, eps = jnp.dtype(cfg.dtype), cfg.layer_norm_epsilon
    rate = cfg.dropout_rate if rng is not None else 0.0
    pos = jnp.arange(ids.shape[1])
    pos_bias = position_bias(params['encoder']['rel_bias'], pos, pos, True, cfg)     # [1, H, S, S]
    pad_bias = mask_bias(ids != PAD_ID)[:, None, None, :]                            # [B, 1, 1, S]
    x = dropout(params['embed'][ids].astype(dt), rate, sub(rng, 0))                  # [B, S, D]

    def layer(x, inputs):
        p, m, r = inputs
        # Self-attention block.
        h = rms_norm(x, p['self_attn']['norm'], eps)
        q, k, v = (project(h, p['self_attn'], n, m.get('lora'), cfg) for n in 'qkv')  # [B,S,H,K]
        bias = pos_bias + pad_bias   # [B, H, S, S], made in the layer: --remat does not keep it
        o = attend(q, k, v, bias, joined(m, 'prefix'), m.get('prefix_separate'), rate, sub(r, 0))
        x = x + dropout(o @ p['self_attn']['o'].astype(dt), rate, sub(r, 1))
        # Feed-forward block.
        return ffn_block(p['ffn'], m, x, cfg, rate, sub(r, 2), sub(r, 3)), None

    layer_mods = (mods or {}).get('encoder') or {}
    xs = (params['encoder']['layers'], layer_mods, rngs(sub(rng, 1), cfg.num_layers))
    x, _ = jax.lax.scan(jax.checkpoint(layer) if cfg.remat else layer, x, xs)
    return dropout(rms_norm(x, params['encoder']['final_norm'], eps), rate, sub(rng, 2))


def cross_kv(params, cfg, enc, enc_mask, mods=None):
    """Cross-attention {'k','v': [L,B,S,H,K], 'bias'} of every layer, and HINT's memory's."""
    dt, mods = jnp.dtype(cfg.dtype), mods or {}
    w = params['decoder']['layers']['cross_attn']
    lo = (mods.get('decoder') or {}).get('cross_lora')

    def keys_values(x):  # x [(B,) S, D] -> k, v [L, (B,) S, H, K]
        k, v = (jnp.einsum('...sd,ldn->l...sn', x.astype(dt), w[n].astype(dt)) for n in 'kv')
        if lo is not None:  # the generated LoRA's value term (x A_v) B_v, for every layer
            x = x.reshape(-1, *x.shape[-2:]).astype(dt)                              # [B|1, S, D]
            v = v + jax.vmap(lora, in_axes=(None, 0, 0))(x, lo['v_a'], lo['v_b']).reshape(v.shape)
        return heads(k, cfg), heads(v, cfg)

    k, v = keys_values(enc)
    kv = {'k': k, 'v': v, 'bias': mask_bias(enc_mask)[:, None, None, :], 'memory': None}
    memory = mods.get('memory')
    if memory is not None:  # HINT's fusion: the encoded instruction E [(B,) n, D] and its mask
        k, v = keys_values(memory['E'])
        kv.update(memory={'k': k, 'v': v}, memory_bias=mask_bias(memory['mask']))
    return kv


def t5_decode(params, cfg, tokens, kv, mods=None, rng=None, cache=None, index=0):
    """tokens [B, T] -> logits float32 [B, T, V], and their k/v with a cache (see t5_generate)."""
    dt, eps = jnp.dtype(cfg.dtype), cfg.layer_norm_epsilon
    rate = cfg.dropout_rate if rng is not None else 0.0
    q_pos = index + jnp.arange(tokens.shape[1])
    k_pos = q_pos if cache is None else jnp.arange(cache['k'].shape[2])
    causal = mask_bias(k_pos[None, :] <= q_pos[:, None])
    self_bias = position_bias(params['decoder']['rel_bias'], q_pos, k_pos, False, cfg) + causal
    x = dropout(params['embed'][tokens].astype(dt), rate, sub(rng, 0))               # [B, T, D]

    def layer(x, inputs):
        p, m, ck, cv, mem, cached, r = inputs
        # Self-attention block (causal).
        h = rms_norm(x, p['self_attn']['norm'], eps)
        q, k, v = (project(h, p['self_attn'], n, m.get('self_lora'), cfg) for n in 'qkv')
        if cached is not None:  # attend over the cache with this step written in; return the
            new = {'k': k, 'v': v}  # step's keys/values only (the caller writes them in once)
            k, v = (jax.lax.dynamic_update_slice(cached[n], new[n], (0, index, 0, 0)) for n in 'kv')
            cached = new
        prefix = m.get('self_prefix_separate')
        o = attend(q, k, v, self_bias, joined(m, 'self_prefix'), prefix, rate, sub(r, 0))
        x = x + dropout(o @ p['self_attn']['o'].astype(dt), rate, sub(r, 1))
        # Cross-attention block, over the encoder states and HINT's instruction memory.
        h = rms_norm(x, p['cross_attn']['norm'], eps)
        q = project(h, p['cross_attn'], 'q', m.get('cross_lora'), cfg)   # (v's LoRA: cross_kv)
        extra = [] if mem is None else [(mem['k'], mem['v'], kv['memory_bias'])]
        extra += joined(m, 'cross_prefix')
        o = attend(q, ck, cv, kv['bias'], extra, m.get('cross_prefix_separate'), rate, sub(r, 2))
        x = x + dropout(o @ p['cross_attn']['o'].astype(dt), rate, sub(r, 3))
        # Feed-forward block.
        return ffn_block(p['ffn'], m, x, cfg, rate, sub(r, 4), sub(r, 5)), cached

    layer_mods = (mods or {}).get('decoder') or {}
    xs = (params['decoder']['layers'], layer_mods, kv['k'], kv['v'], kv['memory'], cache,
          rngs(sub(rng, 1), cfg.num_decoder_layers))
    x, cache = jax.lax.scan(jax.checkpoint(layer) if cfg.remat else layer, x, xs)
    x = dropout(rms_norm(x, params['decoder']['final_norm'], eps), rate, sub(rng, 2))
    if cfg.tie_word_embeddings:  # v1.0: tied embedding, output rescaled by d^-0.5
        logits = (x * cfg.d_model ** -0.5) @ params['embed'].astype(dt).T
    else:
        logits = x @ params['lm_head'].astype(dt)
    logits = logits.astype(jnp.float32)                                              # [B, T, V]
    return logits if cache is None else (logits, cache)


def shift_right(targets):  # teacher forcing: decoder input = targets shifted right, from id 0
    return jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))


def t5_forward(params, cfg, encoder_ids, decoder_input_ids, mods=None, rng=None):
    """Logits float32 [B, T, V]. `rng` turns on dropout (training)."""
    enc = t5_encode(params, cfg, encoder_ids, mods, sub(rng, 0))
    kv = cross_kv(params, cfg, enc, encoder_ids != PAD_ID, mods)
    return t5_decode(params, cfg, decoder_input_ids, kv, mods, sub(rng, 1))


@functools.partial(jax.jit, static_argnames=('cfg', 'max_len'))
def t5_generate(params, cfg, encoder_ids, max_len=64, mods=None):
    """Greedy decoding -> int32 [B, max_len]: no start token, 0 after EOS, stops at all EOS."""
    B = encoder_ids.shape[0]
    enc = t5_encode(params, cfg, encoder_ids, mods)
    kv = cross_kv(params, cfg, enc, encoder_ids != PAD_ID, mods)
    shape = (cfg.num_decoder_layers, B, max_len, cfg.num_heads, cfg.d_kv)

    def step(s):
        i, cache = s['i'], s['cache']
        logits, new = t5_decode(params, cfg, s['prev'][:, None], kv, mods, cache=cache, index=i)
        cache = {n: jax.lax.dynamic_update_slice(cache[n], new[n], (0, 0, i, 0, 0)) for n in 'kv'}
        token = jnp.where(s['done'], PAD_ID, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice(s['out'], token[:, None], (0, i))
        return dict(i=i + 1, prev=token, done=s['done'] | (token == EOS_ID), out=out, cache=cache)

    def running(s):
        return (s['i'] < max_len) & ~jnp.all(s['done'])

    start = dict(i=jnp.int32(0), prev=jnp.zeros((B,), jnp.int32), done=jnp.zeros((B,), bool),
                 out=jnp.zeros((B, max_len), jnp.int32),
                 cache={'k': jnp.zeros(shape, cfg.dtype), 'v': jnp.zeros(shape, cfg.dtype)})
    return jax.lax.while_loop(running, step, start)['out']


# ----------------------------------------------------------------------------------------------
# RoBERTa (an optional instruction encoder): post-norm, learned positions from padding id + 1.


@dataclasses.dataclass(frozen=True)
class RobertaConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    dtype: str = 'float32'


def roberta_layout(cfg: RobertaConfig, prefix: str = '') -> dict:
    """As t5_layout; `prefix` is 'roberta.' in a RobertaForMaskedLM (the hub's roberta-base)."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    e, layer = prefix + 'embeddings.', prefix + 'encoder.layer.{i}.'
    layout = {('word',): Param((cfg.vocab_size, D), 0.02, e + 'word_embeddings.weight'),
              ('pos',): Param((cfg.max_position_embeddings, D), 0.02,
                              e + 'position_embeddings.weight'),
              ('type',): Param((cfg.type_vocab_size, D), 0.02, e + 'token_type_embeddings.weight')}
    linears = {'q': ('attention.self.query', D, D), 'k': ('attention.self.key', D, D),
               'v': ('attention.self.value', D, D), 'o': ('attention.output.dense', D, D),
               'fc1': ('intermediate.dense', D, F), 'fc2': ('output.dense', F, D)}
    for ours, (theirs, n_in, n_out) in linears.items():
        layout[('layers', ours, 'w')] = Param((L, n_in, n_out), 0.02, f'{layer}{theirs}.weight')
        layout[('layers', ours, 'b')] = Param((L, n_out), jnp.zeros, f'{layer}{theirs}.bias')
    norms = {('emb_norm',): (e + 'LayerNorm', (D,)),
             ('layers', 'attn_norm'): (layer + 'attention.output.LayerNorm', (L, D)),
             ('layers', 'ffn_norm'): (layer + 'output.LayerNorm', (L, D))}
    for path, (theirs, shape) in norms.items():
        layout[(*path, 'scale')] = Param(shape, jnp.ones, theirs + '.weight')
        layout[(*path, 'bias')] = Param(shape, jnp.zeros, theirs + '.bias')
    return layout


def init_roberta(cfg: RobertaConfig, rng) -> dict:
    return init_params(roberta_layout(cfg), rng, 16)


def layer_norm(x, p, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * p['scale'] + p['bias']).astype(x.dtype)


def linear(h, p):  # h [B, T, in] -> [B, T, out]
    return h @ p['w'].astype(h.dtype) + p['b'].astype(h.dtype)


def roberta_forward(params, cfg, ids):
    """ids [B, T] (cfg.pad_token_id = padding) -> last hidden states [B, T, D]."""
    B, T = ids.shape
    eps, H = cfg.layer_norm_eps, cfg.num_attention_heads
    mask = ids != cfg.pad_token_id
    positions = jnp.cumsum(mask, axis=1) * mask + cfg.pad_token_id  # padding keeps position pad_id
    x = params['word'][ids] + params['pos'][positions] + params['type'][jnp.zeros_like(ids)]
    x = layer_norm(x.astype(cfg.dtype), params['emb_norm'], eps)                     # [B, T, D]
    bias = mask_bias(mask)[:, None, None, :]
    scale = (cfg.hidden_size // H) ** -0.5

    def layer(x, p):
        # Self-attention block (post-norm).
        q, k, v = (linear(x, p[n]).reshape(B, T, H, -1) for n in 'qkv')             # [B, T, H, K]
        o = attend(q * scale, k, v, bias)
        x = layer_norm(x + linear(o, p['o']), p['attn_norm'], eps)
        # Feed-forward block.
        y = linear(jax.nn.gelu(linear(x, p['fc1']), approximate=False), p['fc2'])
        return layer_norm(x + y, p['ffn_norm'], eps), None

    return jax.lax.scan(layer, x, params['layers'])[0]


# ----------------------------------------------------------------------------------------------
# Checkpoint import: the weights as one flat {transformers name: array} dict, then a layout.

KERNELS = {'q', 'k', 'v', 'o', 'wi', 'wi_0', 'wi_1', 'wo', 'lm_head', 'w'}  # transposed on import


class LazyWeights(dict):  # {name: safetensors file}, read on lookup: XXL never fills host memory
    def __getitem__(self, name):
        with safe_open(super().__getitem__(name), 'np') as f:
            return f.get_tensor(name)


def read_hf_weights(d: str) -> dict:
    """model.safetensors (or sharded, with its index), flax_model.msgpack or pytorch_model.bin."""
    path = functools.partial(os.path.join, d)
    if os.path.exists(path('model.safetensors.index.json')):
        with open(path('model.safetensors.index.json')) as f:  # {name: shard file}
            return LazyWeights({k: path(shard) for k, shard in json.load(f)['weight_map'].items()})
    if os.path.exists(path('model.safetensors')):
        with safe_open(path('model.safetensors'), 'np') as f:
            return LazyWeights(dict.fromkeys(f.keys(), path('model.safetensors')))
    if os.path.exists(path('flax_model.msgpack')):  # transformers' Flax T5
        with open(path('flax_model.msgpack'), 'rb') as f:
            tree = serialization.msgpack_restore(f.read())
        torch_leaf = {'kernel': 'weight', 'embedding': 'weight', 'scale': 'weight'}
        flat = {}
        for (*module, leaf), w in traverse_util.flatten_dict(tree).items():
            name = '.'.join([*module, torch_leaf.get(leaf, leaf)])
            flat[name] = np.asarray(w).T if leaf == 'kernel' else np.asarray(w)
        return flat
    if os.path.exists(path('pytorch_model.bin')):
        import torch  # only for this format
        state_dict = torch.load(path('pytorch_model.bin'), map_location='cpu', weights_only=True)
        return {name: w.float().numpy() for name, w in state_dict.items()}
    raise FileNotFoundError(f'{d}: no model.safetensors, flax_model.msgpack or pytorch_model.bin')


def read_hf_checkpoint(name_or_dir: str):
    """(directory, config.json as a dict, flat weights) of a hub name or a local directory."""
    d = resolve_dir(name_or_dir)
    with open(os.path.join(d, 'config.json')) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'{f.name}: not valid JSON ({e})') from None
    return d, config, read_hf_weights(d)


def assign(layout: dict, flat: dict, where: str, dtype='float32', place=None) -> dict:
    """Our pytree from the checkpoint's weights; place(array) -> sharding puts each on devices."""
    out = {}
    for path, p in layout.items():
        stacked = '{i}' in p.name   # one checkpoint weight per layer
        names = [p.name.format(i=i) for i in range(p.shape[0] if stacked else 1)]
        missing = [name for name in names if name not in flat]
        if missing:
            raise ValueError(f'{where}: weight {missing[0]!r} is missing')
        parts = [flat[name].T if path[-1] in KERNELS else flat[name] for name in names]
        shape = p.shape[1:] if stacked else p.shape
        if parts[0].shape != shape:
            raise ValueError(f'{where}: {names[0]!r} is {parts[0].shape}, the config says {shape}')
        arr = np.asarray(np.stack(parts) if stacked else parts[0], dtype)
        out[path] = jax.device_put(arr, place(arr)) if place else jnp.asarray(arr)
    return traverse_util.unflatten_dict(out)


# T5Config field -> transformers' config.json key, read by load_t5 and written by save_t5.
HF_KEYS = {**{name: name for name in ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_heads',
                                      'num_layers', 'num_decoder_layers', 'dropout_rate',
                                      'layer_norm_epsilon')},
           'num_buckets': 'relative_attention_num_buckets',
           'max_distance': 'relative_attention_max_distance'}


def load_t5(name_or_dir: str, place=None, **overrides):
    """(T5Config, params) of a hub name or directory; `overrides` (dtype, ...) beat config.json."""
    d, c, flat = read_hf_checkpoint(name_or_dir)
    act = c.get('feed_forward_proj', 'relu')
    if act not in ('relu', 'gated-gelu'):
        raise ValueError(f'{d}/config.json: feed_forward_proj {act!r} is not relu or gated-gelu')
    fields = {ours: c[theirs] for ours, theirs in HF_KEYS.items() if c.get(theirs) is not None}
    fields.setdefault('num_decoder_layers', fields.get('num_layers', T5Config.num_layers))
    # transformers 5 writes tie_word_embeddings=true for every T5, marks v1.1's unscaled output by
    # scale_decoder_outputs=false, and writes no lm_head.weight when the embedding is the output
    tied = c.get('scale_decoder_outputs', c.get('tie_word_embeddings', True))
    cfg = T5Config(**{**fields, 'gated_gelu': act == 'gated-gelu', 'tie_word_embeddings': tied,
                      **overrides})
    layout = t5_layout(cfg)
    if ('lm_head',) in layout and 'lm_head.weight' not in flat and c.get('tie_word_embeddings'):
        layout[('lm_head',)] = layout[('lm_head',)]._replace(name='shared.weight')
    return cfg, assign(layout, flat, d, cfg.param_dtype, place)


def save_t5(params, cfg: T5Config, folder: str):
    """load_t5's inverse: a transformers T5 folder (config.json, model.safetensors, float32)."""
    layout, weights = t5_layout(cfg), {}
    for path, arr in traverse_util.flatten_dict(params).items():
        p, arr = layout[path], np.asarray(arr, np.float32)
        for i, w in enumerate(arr if '{i}' in p.name else [arr]):  # one weight per layer
            weights[p.name.format(i=i)] = np.ascontiguousarray(w.T if path[-1] in KERNELS else w)
    config = {theirs: getattr(cfg, ours) for ours, theirs in HF_KEYS.items()}
    config.update(architectures=['T5ForConditionalGeneration'], model_type='t5',
                  is_encoder_decoder=True, tie_word_embeddings=cfg.tie_word_embeddings,
                  feed_forward_proj='gated-gelu' if cfg.gated_gelu else 'relu',
                  decoder_start_token_id=PAD_ID, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    os.makedirs(folder, exist_ok=True)
    save_file(weights, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)


def load_roberta(name_or_dir: str, **overrides):
    """(RobertaConfig, params) from a hub name or a transformers directory."""
    d, config, flat = read_hf_checkpoint(name_or_dir)
    fields = {f.name for f in dataclasses.fields(RobertaConfig)}
    cfg = RobertaConfig(**{**{k: v for k, v in config.items() if k in fields}, **overrides})
    prefix = 'roberta.' if 'roberta.embeddings.word_embeddings.weight' in flat else ''
    return cfg, assign(roberta_layout(cfg, prefix), flat, d)
