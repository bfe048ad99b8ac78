"""T5 (v1.0, v1.1 / LM-adapted / Flan) and RoBERTa as plain JAX functions, and their import.

Numerics match transformers (tests/test_parity.py); the T5 math follows t5x. Parameters are plain
pytrees that the trainer jits, shards and checkpoints. HINT's task state plugs in as generated
prefixes and instruction memory in attention and an adapter beside each feed-forward block; plain
T5 pays for neither. Shapes: B batch, T/S sequence, H heads, K head size, D width, L layers.
"""
from __future__ import annotations

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


def resolve_dir(name_or_dir: str) -> str:
    """A local directory as is; else a hub name, downloaded (offline, huggingface_hub's cache)."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if os.path.exists(name_or_dir):
        raise ValueError(f'{name_or_dir}: expected a checkpoint directory, found a file')
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name_or_dir, allow_patterns=['*.json', '*.model', '*.safetensors',
                                                              '*.msgpack'])
    except Exception as e:
        raise FileNotFoundError(f'{name_or_dir!r}: no such directory, nor a reachable or cached hub '
                                f'model ({type(e).__name__})') from None


# ----------------------------------------------------------------------------------------------
# T5 configuration and size presets


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
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

    @staticmethod
    def from_hf(c: dict, **overrides) -> T5Config:
        """From transformers' config.json; `overrides` (dropout, dtype) win over it."""
        act = c.get('feed_forward_proj', 'relu')
        if act not in ('relu', 'gated-gelu'):
            raise ValueError(f'config.json: feed_forward_proj {act!r} is not relu or gated-gelu')
        fields = {ours: c[theirs] for ours, theirs in HF_KEYS.items() if c.get(theirs) is not None}
        fields.setdefault('num_decoder_layers', c['num_layers'])
        # transformers 5 writes tie_word_embeddings=true for every T5, and marks v1.1's untied,
        # unscaled output layer by scale_decoder_outputs=false
        tied = c.get('scale_decoder_outputs', c.get('tie_word_embeddings', True))
        fields.update(gated_gelu=act == 'gated-gelu', tie_word_embeddings=tied)
        return T5Config(**{**fields, **overrides})


# T5Config field -> transformers' config.json key: read by from_hf, written by save_t5.
HF_KEYS = {**{name: name for name in ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_heads',
                                      'num_layers', 'num_decoder_layers', 'dropout_rate',
                                      'layer_norm_epsilon')},
           'num_buckets': 'relative_attention_num_buckets',
           'max_distance': 'relative_attention_max_distance'}

# T5 v1.1 / LM-adapted shapes (HINT's underlying model; d_kv 64), and a tiny one for tests.
PRESETS = {
    'tiny': T5Config(vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2,
                     num_decoder_layers=2),
    'small': T5Config(d_model=512, d_ff=1024, num_heads=6, num_layers=8, num_decoder_layers=8),
    'base': T5Config(d_model=768, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12),
    'large': T5Config(d_model=1024, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24),
    'xl': T5Config(d_model=2048, d_ff=5120, num_heads=32, num_layers=24, num_decoder_layers=24),
    'xxl': T5Config(d_model=4096, d_ff=10240, num_heads=64, num_layers=24, num_decoder_layers=24),
}


def stacks(cfg: T5Config):
    """(stack, layers, attention blocks {ours: transformers' name}) of the encoder and decoder."""
    decoder_blocks = {'self_attn': 'SelfAttention', 'cross_attn': 'EncDecAttention'}
    return [('encoder', cfg.num_layers, {'self_attn': 'SelfAttention'}),
            ('decoder', cfg.num_decoder_layers, decoder_blocks)]


def ffn_inputs(cfg: T5Config):  # a gate and a linear kernel (gated GELU), or one (ReLU)
    return ('wi_0', 'wi_1') if cfg.gated_gelu else ('wi',)


# ----------------------------------------------------------------------------------------------
# T5 parameters: a plain pytree. Layers are stacked on a leading axis [L, ...] and run with
# lax.scan, so compile time does not grow with depth. Kernels are [in, out] (x @ w).


def init_t5(cfg: T5Config, rng) -> dict:
    """Seeded random T5 weights (transformers' init scheme; lm head scaled by fan-in)."""
    D, HK, F = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    keys = iter(jax.random.split(rng, 64))
    pdt = jnp.dtype(cfg.param_dtype)

    def normal(shape, std):
        return (jax.random.normal(next(keys), shape, jnp.float32) * std).astype(pdt)

    def attention(L):
        return {'norm': jnp.ones((L, D), pdt), 'q': normal((L, D, HK), (D * cfg.d_kv) ** -0.5),
                'k': normal((L, D, HK), D ** -0.5), 'v': normal((L, D, HK), D ** -0.5),
                'o': normal((L, HK, D), HK ** -0.5)}

    def ffn(L):
        wi = {name: normal((L, D, F), D ** -0.5) for name in ffn_inputs(cfg)}
        return {'norm': jnp.ones((L, D), pdt), **wi, 'wo': normal((L, F, D), F ** -0.5)}

    params = {'embed': normal((cfg.vocab_size, D), 1.0)}
    for stack, L, blocks in stacks(cfg):
        rel_bias = normal((cfg.num_buckets, cfg.num_heads), D ** -0.5)
        layers = {block: attention(L) for block in blocks}
        layers['ffn'] = ffn(L)
        params[stack] = {'rel_bias': rel_bias, 'final_norm': jnp.ones((D,), pdt), 'layers': layers}
    if not cfg.tie_word_embeddings:
        params['lm_head'] = normal((D, cfg.vocab_size), D ** -0.5)
    return params


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
    if bidirectional:
        num_buckets //= 2
        bucket = (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    # past max_exact, buckets grow logarithmically up to max_distance
    log_ratio = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
    scaled = log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return bucket + jnp.where(rel < max_exact, rel, large)


def position_bias(table, q_pos, k_pos, bidirectional, cfg):
    """[1, H, T, S] bias from the learned bucket table [buckets, H]; made once per stack."""
    rel = k_pos[None, :] - q_pos[:, None]                                            # [T, S]
    buckets = relative_bucket(rel, bidirectional, cfg.num_buckets, cfg.max_distance)
    return jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))[None]


def mask_bias(mask):
    """[..., S] bool (True = attend) -> additive float32 bias."""
    return jnp.where(mask, 0.0, -1e9).astype(jnp.float32)


def heads(x, cfg):  # [..., T, H*K] -> [..., T, H, K]
    return x.reshape(*x.shape[:-1], cfg.num_heads, cfg.d_kv)


def scores(q, k):  # q [B,T,H,K], k [B,M,H,K] or [M,H,K] shared by the batch -> [B,H,T,M]
    spec = 'bthk,mhk->bhtm' if k.ndim == 3 else 'bthk,bmhk->bhtm'
    return jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)


def weighted_sum(probs, v):  # probs [B,H,T,M], v [B,M,H,K] or [M,H,K] -> [B,T,H,K]
    spec = 'bhtm,mhk->bthk' if v.ndim == 3 else 'bhtm,bmhk->bthk'
    # generated (float32) values in the compute dtype: a bfloat16 layer's output stays bfloat16
    return jnp.einsum(spec, probs, v.astype(probs.dtype))


def attend(q, k, v, bias, extra=(), prefix=None, rate=0.0, rng=None):
    """Attention of q [B,T,H,K] over k, v [B,S,H,K] (+ bias [B|1,H|1,T,S]) and, in one softmax, the
    extra sets (k, v, bias [M] | [B,M] | None) -> [B,T,H*K]. No 1/sqrt(K): T5's q init has it."""
    # Extra sets are HINT's instruction memory and prefixes (unmasked, no position bias); one
    # without a batch axis ([M,H,K]) is one task state shared by the batch, never copied.
    logits = [scores(q, k) + bias]
    for extra_k, _, extra_bias in extra:
        s = scores(q, extra_k)                                                       # [B, H, T, M]
        if extra_bias is not None:  # [M] or [B, M] -> [1|B, 1, 1, M]
            s = s + extra_bias.reshape(-1, 1, 1, extra_bias.shape[-1])
        logits.append(s)
    sizes = [s.shape[-1] for s in logits]
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    probs = jnp.split(dropout(probs, rate, rng).astype(q.dtype), np.cumsum(sizes)[:-1], axis=-1)
    out = weighted_sum(probs[0], v)                                                 # [B, T, H, K]
    for p, (_, extra_v, _) in zip(probs[1:], extra):
        out = out + weighted_sum(p, extra_v)
    # --prefix-attention separate: the prefix has a softmax of its own and its output is added,
    # so that zero prefix values leave T5 exactly as it was
    if prefix is not None:
        p = jax.nn.softmax(scores(q, prefix['k']), axis=-1)
        out = out + weighted_sum(dropout(p, rate, sub(rng, 1)).astype(q.dtype), prefix['v'])
    return out.reshape(*out.shape[:2], -1)


def joined(m, name):
    """A generated prefix that shares the layer's softmax, as an extra key/value set ([] if absent)."""
    p = m.get(name)
    return [] if p is None else [(p['k'], p['v'], None)]


def bmm(x, w):  # x [B,T,D] @ w: [D,N] shared by the batch or [B,D,N] per instance
    return jnp.einsum('btd,dn->btn' if w.ndim == 2 else 'btd,bdn->btn', x, w.astype(x.dtype))


def add_bias(x, b):  # x [B,T,N] + b: [N] shared by the batch or [B,N] per instance
    return x + b.reshape(-1, 1, b.shape[-1]).astype(x.dtype)


def lora(x, a, b):
    """A generated LoRA's term (x A) B: x [B,T,D], A [(B,)D,R], B [(B,)R,N] -> [B,T,N]."""
    return bmm(bmm(x, a), b)


def project(h, w, n, m, cfg):
    """Attention projection n of h [B,T,D] -> [B,T,H,K], plus the generated LoRA m on q and v."""
    y = h @ w[n].astype(h.dtype)
    if m is not None and n in 'qv':
        y = y + lora(h, m[n + '_a'], m[n + '_b'])
    return heads(y, cfg)


def ffn(p, h, cfg, rng):
    dt = h.dtype
    if cfg.gated_gelu:  # gelu_new (tanh approximation) gate times linear
        a = jax.nn.gelu(h @ p['wi_0'].astype(dt), approximate=True) * (h @ p['wi_1'].astype(dt))
    else:
        a = jax.nn.relu(h @ p['wi'].astype(dt))
    return dropout(a, cfg.dropout_rate, rng) @ p['wo'].astype(dt)


def adapter(m, h):
    """HINT's parallel adapter, generated per task: gelu(h Wd + bd) Wu + bu."""
    hidden = add_bias(bmm(h, m['down']), m['down_bias'])                            # [B, T, r]
    hidden = jax.nn.gelu(hidden, approximate=False)
    return add_bias(bmm(hidden, m['up']), m['up_bias'])                              # [B, T, D]


def ffn_block(p, m, x, cfg, rate, rng_ffn, rng_out):
    """The pre-norm feed-forward block and its residual, with HINT's adapter (if any) beside it."""
    h = rms_norm(x, p['norm'], cfg.layer_norm_epsilon)
    y = ffn(p, h, cfg, rng_ffn)
    if m.get('adapter') is not None:
        y = y + adapter(m['adapter'], h)
    return x + dropout(y, rate, rng_out)


# ----------------------------------------------------------------------------------------------
# T5 stacks. `mods` is HINT's task state in stack layout (see hypernet.py); None = plain T5.
# Every entry of mods['encoder'] / mods['decoder'] has a leading layer axis and is scanned with
# the layer weights; an entry may be None (that module switched off).


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
        a = p['self_attn']
        h = rms_norm(x, a['norm'], eps)
        q, k, v = (project(h, a, n, m.get('lora'), cfg) for n in 'qkv')              # [B, S, H, K]
        bias = pos_bias + pad_bias   # [B, H, S, S], made in the layer: --remat does not keep it
        o = attend(q, k, v, bias, joined(m, 'prefix'), m.get('prefix_separate'), rate, sub(r, 0))
        x = x + dropout(o @ a['o'].astype(dt), rate, sub(r, 1))
        # Feed-forward block.
        return ffn_block(p['ffn'], m, x, cfg, rate, sub(r, 2), sub(r, 3)), None

    layer_mods = (mods or {}).get('encoder') or {}
    xs = (params['encoder']['layers'], layer_mods, rngs(sub(rng, 1), cfg.num_layers))
    x, _ = jax.lax.scan(jax.checkpoint(layer) if cfg.remat else layer, x, xs)
    return dropout(rms_norm(x, params['encoder']['final_norm'], eps), rate, sub(rng, 2))


def cross_kv(params, cfg, enc, enc_mask, mods=None):
    """Cross-attention keys/values of every decoder layer, once per input (and per task for the
    instruction memory): {'k','v': [L,B,S,H,K], 'bias': [B,1,1,S], 'memory': None | the same}."""
    dt, mods = jnp.dtype(cfg.dtype), mods or {}
    w = params['decoder']['layers']['cross_attn']

    def every_layer(x, n):  # x [..., S, D] -> [L, ..., S, H, K]
        return heads(jnp.einsum('...sd,ldn->l...sn', x.astype(dt), w[n].astype(dt)), cfg)

    bias = mask_bias(enc_mask)[:, None, None, :]
    kv = {'k': every_layer(enc, 'k'), 'v': every_layer(enc, 'v'), 'bias': bias, 'memory': None}
    lo = (mods.get('decoder') or {}).get('cross_lora')
    lora_every_layer = jax.vmap(lora, in_axes=(None, 0, 0))   # A, B [L, ...] -> [L, B, S, H*K]
    if lo is not None:  # the generated LoRA's value term, (enc A_v) B_v
        kv['v'] = kv['v'] + heads(lora_every_layer(enc.astype(dt), lo['v_a'], lo['v_b']), cfg)
    memory = mods.get('memory')
    if memory is not None:  # HINT's fusion: the encoded instruction E [(B,) n, D] and its mask
        E = memory['E']
        mem = {'k': every_layer(E, 'k'), 'v': every_layer(E, 'v'), 'bias': mask_bias(memory['mask'])}
        if lo is not None:  # E goes through the same value projection, so through its LoRA too
            E = E.reshape(-1, *E.shape[-2:]).astype(dt)                              # [B|1, n, D]
            term = heads(lora_every_layer(E, lo['v_a'], lo['v_b']), cfg)        # [L, B|1, n, H, K]
            mem['v'] = mem['v'] + term.reshape(mem['v'].shape)
        kv['memory'] = mem
    return kv


def t5_decode(params, cfg, tokens, kv, mods=None, rng=None, cache=None, index=0):
    """Decoder on tokens [B, T] -> logits float32 [B, T, V]. With `cache` ({'k','v': [L,B,Tmax,H,K]})
    the tokens sit at positions index.. and it returns (logits, their keys/values [L,B,T,H,K])."""
    dt, eps = jnp.dtype(cfg.dtype), cfg.layer_norm_epsilon
    rate = cfg.dropout_rate if rng is not None else 0.0
    T = tokens.shape[1]
    q_pos = index + jnp.arange(T)
    k_pos = jnp.arange(cache['k'].shape[2] if cache is not None else T)
    causal = mask_bias(k_pos[None, :] <= q_pos[:, None])
    self_bias = position_bias(params['decoder']['rel_bias'], q_pos, k_pos, False, cfg) + causal
    x = dropout(params['embed'][tokens].astype(dt), rate, sub(rng, 0))               # [B, T, D]

    def layer(x, inputs):
        p, m, ck, cv, mem, cache_l, r = inputs
        # Self-attention block (causal).
        a = p['self_attn']
        h = rms_norm(x, a['norm'], eps)
        q, k, v = (project(h, a, n, m.get('self_lora'), cfg) for n in 'qkv')         # [B, T, H, K]
        if cache_l is not None:  # attend over the cache with this step written in; return the
            new = {'k': k, 'v': v}  # step's keys/values only (the caller writes them in once)
            k, v = (jax.lax.dynamic_update_slice(cache_l[n], new[n].astype(cache_l[n].dtype),
                                                 (0, index, 0, 0)) for n in 'kv')
            cache_l = new
        prefix = m.get('self_prefix_separate')
        o = attend(q, k, v, self_bias, joined(m, 'self_prefix'), prefix, rate, sub(r, 0))
        x = x + dropout(o @ a['o'].astype(dt), rate, sub(r, 1))
        # Cross-attention block, over the encoder states and HINT's instruction memory.
        c = p['cross_attn']
        h = rms_norm(x, c['norm'], eps)
        q = project(h, c, 'q', m.get('cross_lora'), cfg)   # its v-term is in cross_kv, once per input
        extra = [] if mem is None else [(mem['k'], mem['v'], kv['memory']['bias'])]
        extra += joined(m, 'cross_prefix')
        o = attend(q, ck, cv, kv['bias'], extra, m.get('cross_prefix_separate'), rate, sub(r, 2))
        x = x + dropout(o @ c['o'].astype(dt), rate, sub(r, 3))
        # Feed-forward block.
        return ffn_block(p['ffn'], m, x, cfg, rate, sub(r, 4), sub(r, 5)), cache_l

    layer_mods = (mods or {}).get('decoder') or {}
    mem = None if kv['memory'] is None else {'k': kv['memory']['k'], 'v': kv['memory']['v']}
    layer_rngs = rngs(sub(rng, 1), cfg.num_decoder_layers)
    xs = (params['decoder']['layers'], layer_mods, kv['k'], kv['v'], mem, cache, layer_rngs)
    x, cache = jax.lax.scan(jax.checkpoint(layer) if cfg.remat else layer, x, xs)
    x = dropout(rms_norm(x, params['decoder']['final_norm'], eps), rate, sub(rng, 2))
    if cfg.tie_word_embeddings:  # v1.0: tied embedding, output rescaled by d^-0.5
        logits = (x * cfg.d_model ** -0.5) @ params['embed'].astype(dt).T
    else:
        logits = x @ params['lm_head'].astype(dt)
    logits = logits.astype(jnp.float32)                                              # [B, T, V]
    return logits if cache is None else (logits, cache)


def shift_right(targets):
    """Teacher forcing: decoder input = targets shifted right, starting with id 0."""
    return jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))


def t5_forward(params, cfg, encoder_ids, decoder_input_ids, mods=None, rng=None):
    """Logits float32 [B, T, V]. `rng` turns on dropout (training)."""
    enc = t5_encode(params, cfg, encoder_ids, mods, sub(rng, 0))
    kv = cross_kv(params, cfg, enc, encoder_ids != PAD_ID, mods)
    return t5_decode(params, cfg, decoder_input_ids, kv, mods, sub(rng, 1))


@functools.partial(jax.jit, static_argnames=('cfg', 'max_len'))
def t5_generate(params, cfg, encoder_ids, max_len=64, mods=None):
    """Greedy decoding with a key/value cache: int32 [B, max_len] without the start token, 0 after
    EOS; the loop stops as soon as every row has produced EOS."""
    B = encoder_ids.shape[0]
    enc = t5_encode(params, cfg, encoder_ids, mods)
    kv = cross_kv(params, cfg, enc, encoder_ids != PAD_ID, mods)
    shape = (cfg.num_decoder_layers, B, max_len, cfg.num_heads, cfg.d_kv)

    def step(s):
        i = s['i']
        logits, new = t5_decode(params, cfg, s['prev'][:, None], kv, mods, cache=s['cache'], index=i)
        cache = {n: jax.lax.dynamic_update_slice(s['cache'][n], new[n], (0, 0, i, 0, 0)) for n in 'kv'}
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
# RoBERTa encoder (optional separate instruction encoder): post-norm, learned absolute positions
# offset by padding id + 1, token types, exact GELU.


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

    @staticmethod
    def from_hf(c: dict) -> RobertaConfig:
        fields = [f.name for f in dataclasses.fields(RobertaConfig)]
        return RobertaConfig(**{name: c[name] for name in fields if name in c})


def init_roberta(cfg: RobertaConfig, rng) -> dict:
    """Random RoBERTa weights (normal, std 0.02), layers stacked [L, ...] as T5's."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    keys = iter(jax.random.split(rng, 16))

    def normal(*shape):
        return jax.random.normal(next(keys), shape, jnp.float32) * 0.02

    def linears(n_in, n_out):  # one per layer
        return {'w': normal(L, n_in, n_out), 'b': jnp.zeros((L, n_out))}

    def norm(*layers):
        return {'scale': jnp.ones((*layers, D)), 'bias': jnp.zeros((*layers, D))}

    params = {'word': normal(cfg.vocab_size, D), 'pos': normal(cfg.max_position_embeddings, D),
              'type': normal(cfg.type_vocab_size, D), 'emb_norm': norm()}
    layers = {n: linears(D, D) for n in 'qkvo'}
    layers.update(attn_norm=norm(L), fc1=linears(D, F), fc2=linears(F, D), ffn_norm=norm(L))
    return {**params, 'layers': layers}


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
# Checkpoint import: weights are read into one flat {transformers name: array} dict, in PyTorch's
# layout (linears [out, in]), then mapped onto our pytree by a sources table.


class LazyWeights(dict):
    """{name: safetensors file}; a weight is read when looked up, so that an XL or XXL checkpoint
    is never all in host memory at once."""
    def __getitem__(self, name):
        with safe_open(super().__getitem__(name), 'np') as f:
            return f.get_tensor(name)


def read_hf_weights(d: str) -> dict:
    """model.safetensors (or sharded, with its index), flax_model.msgpack or pytorch_model.bin."""
    path = functools.partial(os.path.join, d)
    if os.path.exists(path('model.safetensors.index.json')):
        with open(path('model.safetensors.index.json')) as f:
            shards = json.load(f)['weight_map']
        return LazyWeights({name: path(shard) for name, shard in shards.items()})
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
            flat[name] = np.asarray(w).T if leaf == 'kernel' else np.asarray(w)  # kernels [in, out]
        return flat
    if not os.path.exists(path('pytorch_model.bin')):
        raise FileNotFoundError(f'{d}: no model.safetensors(.index.json), flax_model.msgpack or '
                                'pytorch_model.bin')
    import torch  # only for this format
    state_dict = torch.load(path('pytorch_model.bin'), map_location='cpu', weights_only=True)
    return {name: w.float().numpy() for name, w in state_dict.items()}


def read_hf_checkpoint(name_or_dir: str):
    """(directory, config.json as a dict, flat weights) of a hub name or a local directory."""
    d = resolve_dir(name_or_dir)
    with open(os.path.join(d, 'config.json')) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f'{f.name}: not valid JSON ({e})') from None
    return d, config, read_hf_weights(d)


def assign(expected, sources: dict, flat: dict, where: str, place=None):
    """Our pytree, shaped as `expected`, from sources {our path: [(name, transpose?)], one name per
    layer}. place(shape struct) -> sharding puts each weight straight onto its devices (FSDP)."""
    expected, out = traverse_util.flatten_dict(expected), {}
    for path, names in sources.items():
        want = expected[path]
        stacked = 'layers' in path   # [L, ...], one checkpoint weight per layer
        shape = want.shape[1:] if stacked else want.shape
        parts = [read_weight(flat, name, transpose, shape, where) for name, transpose in names]
        arr = np.asarray(np.stack(parts) if stacked else parts[0], want.dtype)
        out[path] = jax.device_put(arr, place(want)) if place else jnp.asarray(arr)
    return traverse_util.unflatten_dict(out)


def read_weight(flat, name, transpose, shape, where):
    """One checkpoint weight in our layout, if the config's shape for it fits."""
    if name not in flat:
        raise ValueError(f'{where}: weight {name!r} is missing')
    w = flat[name]
    want = shape[::-1] if transpose else shape   # transformers' linear weights are [out, in]
    if w.shape != tuple(want):
        raise ValueError(f'{where}: weight {name!r} has shape {w.shape}, the config wants {want}')
    return w.T if transpose else w


def t5_sources(cfg: T5Config) -> dict:
    """Our parameter path -> [(transformers name, transpose?)], one per layer for stacked ones."""
    src = {('embed',): [('shared.weight', False)]}
    if not cfg.tie_word_embeddings:
        src[('lm_head',)] = [('lm_head.weight', True)]
    for stack, L, blocks in stacks(cfg):
        bias = f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'
        src[(stack, 'rel_bias')] = [(bias, False)]
        src[(stack, 'final_norm')] = [(f'{stack}.final_layer_norm.weight', False)]
        # transformers numbers a block's sublayers: self-attention, (cross-attention,) feed-forward
        sublayers = [(ours, theirs, 'qkvo') for ours, theirs in blocks.items()]
        sublayers.append(('ffn', 'DenseReluDense', ffn_inputs(cfg) + ('wo',)))
        for j, (ours, theirs, weights) in enumerate(sublayers):
            names = [f'{stack}.block.{i}.layer.{j}.' for i in range(L)]
            src[(stack, 'layers', ours, 'norm')] = [(n + 'layer_norm.weight', False) for n in names]
            for w in weights:
                src[(stack, 'layers', ours, w)] = [(f'{n}{theirs}.{w}.weight', True) for n in names]
    return src


def load_t5(name_or_dir: str, place=None, **overrides):
    """(T5Config, params) from a hub name or a transformers directory. `overrides` set T5Config
    fields such as dtype or dropout_rate; `place` as in assign()."""
    d, config, flat = read_hf_checkpoint(name_or_dir)
    try:
        cfg = T5Config.from_hf(config, **overrides)
    except KeyError as e:
        raise ValueError(f'{d}/config.json: missing field {e} (not a T5 config?)') from None
    expected = jax.eval_shape(lambda: init_t5(cfg, jax.random.PRNGKey(0)))
    sources = t5_sources(cfg)
    if 'lm_head' in expected and 'lm_head.weight' not in flat and config.get('tie_word_embeddings'):
        # transformers 5 saves a v1.1 T5 with its output layer tied to the embedding (not rescaled:
        # scale_decoder_outputs false) and writes no lm_head.weight: read it as transformers does
        sources[('lm_head',)] = [('shared.weight', True)]
    return cfg, assign(expected, sources, flat, d, place)


def save_t5(params, cfg: T5Config, folder: str):
    """The inverse of load_t5: a transformers T5 folder (config.json, model.safetensors, float32)."""
    ours, weights = traverse_util.flatten_dict(params), {}
    for path, names in t5_sources(cfg).items():
        arr = np.asarray(ours[path], np.float32)
        for (name, transpose), w in zip(names, arr if 'layers' in path else [arr]):  # per layer
            weights[name] = np.ascontiguousarray(w.T if transpose else w)
    config = {theirs: getattr(cfg, ours) for ours, theirs in HF_KEYS.items()}
    config.update(architectures=['T5ForConditionalGeneration'], model_type='t5',
                  is_encoder_decoder=True, tie_word_embeddings=cfg.tie_word_embeddings,
                  feed_forward_proj='gated-gelu' if cfg.gated_gelu else 'relu',
                  decoder_start_token_id=PAD_ID, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    os.makedirs(folder, exist_ok=True)
    save_file(weights, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)


# RoBERTa module -> transformers' name, and its leaves -> (transformers' name, transpose?).
LINEAR = {'w': ('weight', True), 'b': ('bias', False)}
NORM = {'scale': ('weight', False), 'bias': ('bias', False)}
ROBERTA_LAYER = {'q': ('attention.self.query', LINEAR), 'k': ('attention.self.key', LINEAR),
                 'v': ('attention.self.value', LINEAR), 'o': ('attention.output.dense', LINEAR),
                 'attn_norm': ('attention.output.LayerNorm', NORM),
                 'fc1': ('intermediate.dense', LINEAR), 'fc2': ('output.dense', LINEAR),
                 'ffn_norm': ('output.LayerNorm', NORM)}


def roberta_sources(cfg: RobertaConfig, prefix: str) -> dict:
    """As t5_sources; prefix 'roberta.' in a RobertaForMaskedLM (the hub's roberta-base)."""
    e = prefix + 'embeddings.'
    src = {('word',): [(e + 'word_embeddings.weight', False)],
           ('pos',): [(e + 'position_embeddings.weight', False)],
           ('type',): [(e + 'token_type_embeddings.weight', False)],
           ('emb_norm', 'scale'): [(e + 'LayerNorm.weight', False)],
           ('emb_norm', 'bias'): [(e + 'LayerNorm.bias', False)]}
    for ours, (module, leaves) in ROBERTA_LAYER.items():
        names = [f'{prefix}encoder.layer.{i}.{module}.' for i in range(cfg.num_hidden_layers)]
        for leaf, (theirs, transpose) in leaves.items():
            src[('layers', ours, leaf)] = [(n + theirs, transpose) for n in names]
    return src


def load_roberta(name_or_dir: str, **overrides):
    """(RobertaConfig, params) from a hub name or a transformers directory."""
    d, config, flat = read_hf_checkpoint(name_or_dir)
    cfg = dataclasses.replace(RobertaConfig.from_hf(config), **overrides)
    prefix = 'roberta.' if 'roberta.embeddings.word_embeddings.weight' in flat else ''
    expected = jax.eval_shape(lambda: init_roberta(cfg, jax.random.PRNGKey(0)))
    return cfg, assign(expected, roberta_sources(cfg, prefix), flat, d)
