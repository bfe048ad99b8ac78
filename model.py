"""T5 (v1.0 and v1.1 / LM-adapted / Flan) and RoBERTa as plain JAX functions, checkpoint import, tokenizers.

Numerics follow Hugging Face transformers exactly (tests/test_parity.py checks it); the T5 math
follows t5x's examples/t5/network.py. Parameters are plain pytrees (flax only serializes), so the
trainer can jit, shard and checkpoint them directly. HINT plugs into the attention (generated
prefixes, and the encoded instruction as extra cross-attention memory) and into the feed-forward
block (a parallel adapter); plain T5 pays for neither when they are None. Shapes: B batch, T/S sequence, H heads, K head size, D width.
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

PAD_ID, EOS_ID = 0, 1  # shared by T5's SentencePiece vocabulary and the byte tokenizer

# ----------------------------------------------------------------------------------------------
# Hugging Face hub: a local folder as it is, else a hub name (data.py reads tokenizers with it too).


def resolve_dir(name_or_dir: str) -> str:
    """A local directory as is; otherwise a hub name, fetched (or read offline from the cache)."""
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if os.path.exists(name_or_dir):
        raise ValueError(f'{name_or_dir}: expected a checkpoint directory, found a file')
    from huggingface_hub import snapshot_download
    patterns = ['*.json', '*.model', '*.safetensors', '*.msgpack']
    try:
        return snapshot_download(name_or_dir, allow_patterns=patterns)
    except Exception as e:  # no network: fall back to the local cache
        try:
            return snapshot_download(name_or_dir, allow_patterns=patterns, local_files_only=True)
        except Exception:
            raise FileNotFoundError(
                f'{name_or_dir!r} is neither a local directory nor a reachable/cached Hugging Face '
                f'hub model ({type(e).__name__}: {str(e).splitlines()[0]})') from None



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
    remat: bool = False            # recompute each layer's activations in the backward pass (less memory)

    @staticmethod
    def from_hf(c: dict, **overrides) -> 'T5Config':
        act = c.get('feed_forward_proj', 'relu')
        if act not in ('relu', 'gated-gelu'):
            raise ValueError(f'config.json: feed_forward_proj={act!r} is not supported (relu, gated-gelu)')
        fields = dict(
            vocab_size=c['vocab_size'], d_model=c['d_model'], d_kv=c['d_kv'], d_ff=c['d_ff'],
            num_heads=c['num_heads'], num_layers=c['num_layers'],
            num_decoder_layers=c.get('num_decoder_layers') or c['num_layers'],
            num_buckets=c.get('relative_attention_num_buckets', 32),
            max_distance=c.get('relative_attention_max_distance', 128),
            dropout_rate=c.get('dropout_rate', 0.1), layer_norm_epsilon=c.get('layer_norm_epsilon', 1e-6),
            gated_gelu=act == 'gated-gelu',
            # transformers 5 writes tie_word_embeddings=true for every T5 and marks v1.1's untied, unscaled
            # output by scale_decoder_outputs=false
            tie_word_embeddings=c.get('scale_decoder_outputs', c.get('tie_word_embeddings', True)))
        return T5Config(**{**fields, **overrides})   # overrides (dropout, dtype) win over config.json


# T5 v1.1 / LM-adapted shapes (the underlying model of HINT), plus a tiny one for tests.
PRESETS = {
    'tiny': T5Config(vocab_size=259, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, num_decoder_layers=2),
    'small': T5Config(d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_layers=8, num_decoder_layers=8),
    'base': T5Config(d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12),
    'large': T5Config(d_model=1024, d_kv=64, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24),
    'xl': T5Config(d_model=2048, d_kv=64, d_ff=5120, num_heads=32, num_layers=24, num_decoder_layers=24),
    'xxl': T5Config(d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24, num_decoder_layers=24),
}


# ----------------------------------------------------------------------------------------------
# T5 parameters: a plain pytree. Layers are stacked on a leading axis [L, ...] and run with
# lax.scan, so compile time does not grow with depth. Kernels are [in, out] (x @ w).


def init_t5(cfg: T5Config, rng) -> dict:
    """Seeded random T5 weights (HF's T5 init scheme; lm head fan-in scaled)."""
    D, HK, F, L, Ld = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_decoder_layers
    keys = iter(jax.random.split(rng, 64))
    pdt = jnp.dtype(cfg.param_dtype)

    def normal(shape, std):
        return (jax.random.normal(next(keys), shape, jnp.float32) * std).astype(pdt)

    def attn(n):
        return {'norm': jnp.ones((n, D), pdt), 'q': normal((n, D, HK), (D * cfg.d_kv) ** -0.5),
                'k': normal((n, D, HK), D ** -0.5), 'v': normal((n, D, HK), D ** -0.5), 'o': normal((n, HK, D), HK ** -0.5)}

    def ffn(n):
        wi = {'wi_0': normal((n, D, F), D ** -0.5), 'wi_1': normal((n, D, F), D ** -0.5)} if cfg.gated_gelu \
            else {'wi': normal((n, D, F), D ** -0.5)}
        return {'norm': jnp.ones((n, D), pdt), **wi, 'wo': normal((n, F, D), F ** -0.5)}

    params = {
        'embed': normal((cfg.vocab_size, D), 1.0),
        'encoder': {'rel_bias': normal((cfg.num_buckets, cfg.num_heads), D ** -0.5), 'final_norm': jnp.ones((D,), pdt),
                    'layers': {'self_attn': attn(L), 'ffn': ffn(L)}},
        'decoder': {'rel_bias': normal((cfg.num_buckets, cfg.num_heads), D ** -0.5), 'final_norm': jnp.ones((D,), pdt),
                    'layers': {'self_attn': attn(Ld), 'cross_attn': attn(Ld), 'ffn': ffn(Ld)}},
    }
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
    large = max_exact + (jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(rel < max_exact, rel, large)


def position_bias(table, q_pos, k_pos, bidirectional, cfg):
    """[1, H, T, S] bias from learned bucket table [buckets, H]; computed once per stack."""
    buckets = relative_bucket(k_pos[None, :] - q_pos[:, None], bidirectional, cfg.num_buckets, cfg.max_distance)
    return jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))[None]


def mask_bias(mask):
    """[..., S] bool (True = attend) -> additive float32 bias."""
    return jnp.where(mask, 0.0, -1e9).astype(jnp.float32)


def heads(x, cfg):  # [..., T, H*K] -> [..., T, H, K]
    return x.reshape(*x.shape[:-1], cfg.num_heads, cfg.d_kv)


def attend(q, k, v, bias, extra=(), prefix=None, rate=0.0, rng=None):
    """Softmax attention of q [B,T,H,K] over k/v [B,S,H,K] (+ bias [B|1,H|1,T,S]), jointly with extra
    key/value sets (k, v, bias [M] | [B,M] | None): HINT's fused instruction memory and, as in the
    paper, its generated prefixes (unmasked, no position bias). `prefix` (k, v) is the option
    `--prefix-attention separate`: a prefix with a softmax of its own whose output is added, so that
    zero prefix values leave T5 exactly as it was. An extra set or prefix may lack the batch axis
    ([M,H,K]): one task state shared by the whole batch, never copied. No 1/sqrt(K) scaling: T5 folds
    it into the query init."""
    f32 = jnp.float32
    qk = lambda ek: jnp.einsum('bthk,mhk->bhtm' if ek.ndim == 3 else 'bthk,bmhk->bhtm', q, ek, preferred_element_type=f32)
    # generated (float32) values in the compute dtype, so that a bfloat16 layer's output stays bfloat16
    pv = lambda p, ev: jnp.einsum('bhtm,mhk->bthk' if ev.ndim == 3 else 'bhtm,bmhk->bthk', p, ev.astype(p.dtype))
    scores = [jnp.einsum('bthk,bshk->bhts', q, k, preferred_element_type=f32) + bias]
    for ek, _, ebias in extra:
        s = qk(ek)
        if ebias is not None:
            s = s + (ebias if ebias.ndim == 1 else ebias[:, None, None, :])
        scores.append(s)
    sizes = [s.shape[-1] for s in scores]
    probs = dropout(jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1), rate, rng).astype(q.dtype)
    probs = jnp.split(probs, np.cumsum(sizes)[:-1], axis=-1)
    out = jnp.einsum('bhts,bshk->bthk', probs[0], v)
    for p, (_, ev, _) in zip(probs[1:], extra):
        out = out + pv(p, ev)
    if prefix is not None:
        p = dropout(jax.nn.softmax(qk(prefix['k']), axis=-1), rate, sub(rng, 1)).astype(q.dtype)
        out = out + pv(p, prefix['v'])
    return out.reshape(*out.shape[:2], -1)  # [B, T, H*K]


def joined(m, name):
    """A generated prefix that shares the layer's softmax, as an extra key/value set ([] if absent)."""
    p = m.get(name)
    return [] if p is None else [(p['k'], p['v'], None)]


def bmm(x, w):
    """x [B,T,D] @ w: [D,N] shared by the batch or [B,D,N] per instance."""
    return jnp.einsum('btd,dn->btn' if w.ndim == 2 else 'btd,bdn->btn', x, w.astype(x.dtype))


def lora(x, a, b):
    """A generated LoRA's term (x A) B: x [B,T,D], A [(B,)D,R], B [(B,)R,N] -> [B,T,N]."""
    return bmm(bmm(x, a), b)


def project(h, w, n, m, cfg):
    """Attention projection n of h [B,T,D] -> [B,T,H,K], plus the generated LoRA m (if any) on q and v."""
    y = h @ w[n].astype(h.dtype)
    if m is not None and n in 'qv':
        y = y + lora(h, m[n + '_a'], m[n + '_b'])
    return heads(y, cfg)


def add_bias(x, b):  # x [B,T,N]; b [N] shared or [B,N]
    return x + (b if b.ndim == 1 else b[:, None, :]).astype(x.dtype)


def ffn(p, h, cfg, rng):
    dt = h.dtype
    if cfg.gated_gelu:  # gelu_new (tanh approximation) gate times linear
        a = jax.nn.gelu(h @ p['wi_0'].astype(dt), approximate=True) * (h @ p['wi_1'].astype(dt))
    else:
        a = jax.nn.relu(h @ p['wi'].astype(dt))
    return dropout(a, cfg.dropout_rate, rng) @ p['wo'].astype(dt)


def adapter(m, h):
    """HINT's parallel adapter: gelu(h Wd + bd) Wu + bu, generated per task."""
    return add_bias(bmm(jax.nn.gelu(add_bias(bmm(h, m['down']), m['down_bias']), approximate=False), m['up']), m['up_bias'])


def rngs(rng, n):  # per-layer dropout keys (None when deterministic)
    return None if rng is None else jax.random.split(rng, n)


def sub(rng, i):
    return None if rng is None else jax.random.fold_in(rng, i)


# ----------------------------------------------------------------------------------------------
# T5 stacks. `mods` is HINT's task state in stack layout (see hypernet.py); None = plain T5.
# Every entry of mods['encoder'] / mods['decoder'] has a leading layer axis and is scanned with
# the layer weights; an entry may be None (that module switched off).


def t5_encode(params, cfg, ids, mods=None, rng=None):
    """ids [B, S] (0 = padding) -> encoder states [B, S, D]."""
    dt, eps = jnp.dtype(cfg.dtype), cfg.layer_norm_epsilon
    rate = cfg.dropout_rate if rng is not None else 0.0
    pos = jnp.arange(ids.shape[1])
    pos_bias = position_bias(params['encoder']['rel_bias'], pos, pos, True, cfg)       # [1, H, S, S]
    pad_bias = mask_bias(ids != PAD_ID)[:, None, None, :]                            # [B, 1, 1, S]
    x = dropout(params['embed'][ids].astype(dt), rate, sub(rng, 0))
    layer_mods = (mods or {}).get('encoder') or {}

    def layer(x, inputs):
        p, m, r = inputs
        a = p['self_attn']
        h = rms_norm(x, a['norm'], eps)
        q, k, v = (project(h, a, n, m.get('lora'), cfg) for n in 'qkv')
        bias = pos_bias + pad_bias   # [B, H, S, S], made in the layer: --remat does not keep it
        o = attend(q, k, v, bias, joined(m, 'prefix'), m.get('prefix_separate'), rate, sub(r, 0))
        o = o @ a['o'].astype(dt)
        x = x + dropout(o, rate, sub(r, 1))
        h = rms_norm(x, p['ffn']['norm'], eps)
        y = ffn(p['ffn'], h, cfg, sub(r, 2))
        if m.get('adapter') is not None:
            y = y + adapter(m['adapter'], h)
        return x + dropout(y, rate, sub(r, 3)), None

    layer = jax.checkpoint(layer) if cfg.remat else layer
    x, _ = jax.lax.scan(layer, x, (params['encoder']['layers'], layer_mods, rngs(sub(rng, 1), cfg.num_layers)))
    return dropout(rms_norm(x, params['encoder']['final_norm'], eps), rate, sub(rng, 2))


def cross_kv(params, cfg, enc, enc_mask, mods=None):
    """Cross-attention keys/values of every decoder layer, computed once per input (and per task
    for the fused instruction memory): {'k','v': [Ld,B,S,H,K], 'bias': [B,1,1,S], 'memory': ...}."""
    dt = jnp.dtype(cfg.dtype)
    w = params['decoder']['layers']['cross_attn']
    proj = lambda x, n: heads(jnp.einsum('...sd,ldn->l...sn', x.astype(dt), w[n].astype(dt)), cfg)
    kv = {'k': proj(enc, 'k'), 'v': proj(enc, 'v'), 'bias': mask_bias(enc_mask)[:, None, None, :], 'memory': None}
    lo = ((mods or {}).get('decoder') or {}).get('cross_lora')
    every_layer = jax.vmap(lora, in_axes=(None, 0, 0))   # x [B,S,D], A/B [Ld,...] -> [Ld,B,S,H*K]
    if lo is not None:  # the generated LoRA's value term, (enc A_v) B_v
        kv['v'] = kv['v'] + heads(every_layer(enc.astype(dt), lo['v_a'], lo['v_b']), cfg)
    memory = (mods or {}).get('memory')
    if memory is not None:  # HINT instruction fusion: the encoded instruction E [(B), n, D] and its mask
        kv['memory'] = {'k': proj(memory['E'], 'k'), 'v': proj(memory['E'], 'v'), 'bias': mask_bias(memory['mask'])}
        if lo is not None:  # E goes through the same value projection, so through its LoRA as well
            E = memory['E'].reshape(-1, *memory['E'].shape[-2:]).astype(dt)               # [B or 1, n, D]
            term = heads(every_layer(E, lo['v_a'], lo['v_b']), cfg)             # [Ld, B or 1, n, H, K]
            kv['memory']['v'] = kv['memory']['v'] + term.reshape(kv['memory']['v'].shape)
    return kv


def t5_decode(params, cfg, tokens, kv, mods=None, rng=None, cache=None, index=0):
    """Decoder on tokens [B, T] -> logits float32 [B, T, V]. With `cache` ({'k','v': [Ld,B,Tmax,H,K]})
    the tokens sit at positions index.. (incremental decoding); returns (logits, their keys/values
    [Ld,B,T,H,K]), which the caller writes into its cache once (a copy out of every layer costs more)."""
    dt, eps = jnp.dtype(cfg.dtype), cfg.layer_norm_epsilon
    rate = cfg.dropout_rate if rng is not None else 0.0
    T = tokens.shape[1]
    q_pos = index + jnp.arange(T)
    k_pos = jnp.arange(cache['k'].shape[2] if cache is not None else T)
    self_bias = position_bias(params['decoder']['rel_bias'], q_pos, k_pos, False, cfg) \
        + mask_bias(k_pos[None, :] <= q_pos[:, None])
    x = dropout(params['embed'][tokens].astype(dt), rate, sub(rng, 0))
    layer_mods = (mods or {}).get('decoder') or {}

    def layer(x, inputs):
        p, m, ck, cv, mem, cache_l, r = inputs
        a = p['self_attn']
        h = rms_norm(x, a['norm'], eps)
        q, k, v = (project(h, a, n, m.get('self_lora'), cfg) for n in 'qkv')
        if cache_l is not None:
            k_all = jax.lax.dynamic_update_slice(cache_l['k'], k.astype(cache_l['k'].dtype), (0, index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache_l['v'], v.astype(cache_l['v'].dtype), (0, index, 0, 0))
            cache_l, k, v = {'k': k, 'v': v}, k_all, v_all   # only this step's keys/values leave the layer
        o = attend(q, k, v, self_bias, joined(m, 'self_prefix'), m.get('self_prefix_separate'), rate, sub(r, 0))
        o = o @ a['o'].astype(dt)
        x = x + dropout(o, rate, sub(r, 1))
        c = p['cross_attn']
        h = rms_norm(x, c['norm'], eps)
        q = project(h, c, 'q', m.get('cross_lora'), cfg)   # its v-term is in cross_kv, once per input
        extra = [(mem['k'], mem['v'], kv['memory']['bias'])] if mem is not None else []
        extra += joined(m, 'cross_prefix')
        o = attend(q, ck, cv, kv['bias'], extra, m.get('cross_prefix_separate'), rate, sub(r, 2))
        o = o @ c['o'].astype(dt)
        x = x + dropout(o, rate, sub(r, 3))
        h = rms_norm(x, p['ffn']['norm'], eps)
        y = ffn(p['ffn'], h, cfg, sub(r, 4))
        if m.get('adapter') is not None:
            y = y + adapter(m['adapter'], h)
        return x + dropout(y, rate, sub(r, 5)), cache_l

    mem = None if kv['memory'] is None else {'k': kv['memory']['k'], 'v': kv['memory']['v']}
    xs = (params['decoder']['layers'], layer_mods, kv['k'], kv['v'], mem, cache, rngs(sub(rng, 1), cfg.num_decoder_layers))
    x, cache = jax.lax.scan(jax.checkpoint(layer) if cfg.remat else layer, x, xs)
    x = dropout(rms_norm(x, params['decoder']['final_norm'], eps), rate, sub(rng, 2))
    if cfg.tie_word_embeddings:  # v1.0: tied embedding, output rescaled by d^-0.5
        logits = (x * cfg.d_model ** -0.5) @ params['embed'].astype(dt).T
    else:
        logits = x @ params['lm_head'].astype(dt)
    logits = logits.astype(jnp.float32)
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
    cache = {'k': jnp.zeros(shape, cfg.dtype), 'v': jnp.zeros(shape, cfg.dtype)}
    out = jnp.zeros((B, max_len), jnp.int32)

    def body(state):
        i, prev, done, out, cache = state
        logits, new = t5_decode(params, cfg, prev[:, None], kv, mods, cache=cache, index=i)
        cache = {n: jax.lax.dynamic_update_slice(cache[n], new[n], (0, 0, i, 0, 0)) for n in 'kv'}
        nxt = jnp.where(done, PAD_ID, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, done | (nxt == EOS_ID), out, cache

    def cond(state):
        return (state[0] < max_len) & ~jnp.all(state[2])

    init = (jnp.int32(0), jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool), out, cache)
    return jax.lax.while_loop(cond, body, init)[3]


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
    def from_hf(c: dict) -> 'RobertaConfig':
        return RobertaConfig(**{f.name: c[f.name] for f in dataclasses.fields(RobertaConfig) if f.name in c})


def init_roberta(cfg: RobertaConfig, rng) -> dict:
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    keys = iter(jax.random.split(rng, 16))
    normal = lambda shape: jax.random.normal(next(keys), shape, jnp.float32) * 0.02
    dense = lambda i, o: {'w': normal((L, i, o)), 'b': jnp.zeros((L, o))}
    norm = lambda *lead: {'scale': jnp.ones((*lead, D)), 'bias': jnp.zeros((*lead, D))}
    return {'word': normal((cfg.vocab_size, D)), 'pos': normal((cfg.max_position_embeddings, D)),
            'type': normal((cfg.type_vocab_size, D)), 'emb_norm': norm(),
            'layers': {'q': dense(D, D), 'k': dense(D, D), 'v': dense(D, D), 'o': dense(D, D), 'attn_norm': norm(L),
                       'fc1': dense(D, F), 'fc2': dense(F, D), 'ffn_norm': norm(L)}}


def layer_norm(x, p, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * p['scale'] + p['bias']).astype(x.dtype)


def roberta_forward(params, cfg, ids):
    """ids [B, T] (cfg.pad_token_id = padding) -> last hidden states [B, T, D]."""
    dt, H = jnp.dtype(cfg.dtype), cfg.num_attention_heads
    mask = ids != cfg.pad_token_id
    positions = jnp.cumsum(mask, axis=1) * mask + cfg.pad_token_id  # padding keeps position pad_id
    x = params['word'][ids] + params['pos'][positions] + params['type'][jnp.zeros_like(ids)]
    x = layer_norm(x.astype(dt), params['emb_norm'], cfg.layer_norm_eps)
    bias = mask_bias(mask)[:, None, None, :]
    scale = (cfg.hidden_size // H) ** -0.5

    def layer(x, p):
        dense = lambda h, n: h @ p[n]['w'].astype(dt) + p[n]['b'].astype(dt)
        split = lambda h: h.reshape(*h.shape[:2], H, -1)
        o = attend(split(dense(x, 'q')) * scale, split(dense(x, 'k')), split(dense(x, 'v')), bias)
        x = layer_norm(x + dense(o, 'o'), p['attn_norm'], cfg.layer_norm_eps)
        y = dense(jax.nn.gelu(dense(x, 'fc1'), approximate=False), 'fc2')
        return layer_norm(x + y, p['ffn_norm'], cfg.layer_norm_eps), None

    return jax.lax.scan(layer, x, params['layers'])[0]


# ----------------------------------------------------------------------------------------------
# Checkpoint import from Hugging Face layouts. Weights are read into one flat {name: array} dict
# in PyTorch's naming and layout ([out, in] linears), then mapped onto our pytree.


def read_hf_weights(d: str) -> dict:
    """model.safetensors (single or sharded via its index), flax_model.msgpack, or pytorch_model.bin."""
    path = lambda f: os.path.join(d, f)
    if os.path.exists(path('model.safetensors.index.json')):
        weight_map = json.load(open(path('model.safetensors.index.json')))['weight_map']
        return LazyWeights({name: path(f) for name, f in weight_map.items()})
    if os.path.exists(path('model.safetensors')):
        from safetensors import safe_open
        with safe_open(path('model.safetensors'), 'np') as f:
            return LazyWeights({name: path('model.safetensors') for name in f.keys()})
    if os.path.exists(path('flax_model.msgpack')):
        from flax import serialization, traverse_util
        tree = serialization.msgpack_restore(open(path('flax_model.msgpack'), 'rb').read())
        flat = {}
        for k, v in traverse_util.flatten_dict(tree).items():
            v = np.asarray(v)
            if k[-1] == 'kernel':  # flax Dense kernels are [in, out]
                v = v.T
            flat['.'.join(k[:-1] + (('weight',) if k[-1] in ('kernel', 'embedding', 'scale') else (k[-1],)))] = v
        return flat
    if os.path.exists(path('pytorch_model.bin')):
        try:
            import torch
        except ImportError:
            raise ImportError(f'{path("pytorch_model.bin")}: reading PyTorch checkpoints needs torch. Accepted without '
                              'torch: model.safetensors (or sharded with its index), flax_model.msgpack') from None
        sd = torch.load(path('pytorch_model.bin'), map_location='cpu', weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items()}
    raise FileNotFoundError(f'{d}: no weights found. Accepted: model.safetensors, model.safetensors.index.json '
                            '(sharded), flax_model.msgpack, pytorch_model.bin (needs torch)')


class LazyWeights(dict):
    """{name: file} of safetensors weights, each read from its file only when looked up: an XL or XXL
    checkpoint is never all in host memory at once."""
    def __getitem__(self, name):
        from safetensors import safe_open
        with safe_open(super().__getitem__(name), 'np') as f:
            return f.get_tensor(name)


def read_hf_checkpoint(name_or_dir: str, kind: str):
    """(directory, config.json as a dict, flat weights) of a hub name or a local directory."""
    d = resolve_dir(name_or_dir)
    config_path = os.path.join(d, 'config.json')
    if not os.path.exists(config_path):
        raise FileNotFoundError(f'{config_path}: missing (a {kind} checkpoint directory needs config.json)')
    try:
        config = json.load(open(config_path))
    except json.JSONDecodeError as e:
        raise ValueError(f'{config_path}: not valid JSON ({e})') from None
    return d, config, read_hf_weights(d)


def assign(expected, sources: dict, flat: dict, where: str, place=None):
    """Fill the pytree `expected` (shape structs) from `sources` {our path: [(hf name, transpose)]};
    stacked layers come from several names. Fails on the first missing name or shape mismatch.
    place(shape struct) -> sharding puts each array straight onto its devices (e.g. FSDP shards)."""
    out = {}
    for path, names in sources.items():
        parts = []
        for name, transpose in names:
            if name not in flat:
                raise KeyError(f'{where}: weight {name!r} is missing from the checkpoint')
            weight = flat[name]
            parts.append(weight.T if transpose else weight)
        arr = np.stack(parts) if len(names) > 1 or path_is_stacked(path) else parts[0]
        want = get_path(expected, path).shape
        if arr.shape != tuple(want):
            bad = names[0][0]
            raise ValueError(f'{where}: checkpoint weight {bad!r} has shape {tuple(flat[bad].shape)} but the config '
                             f'expects {tuple(want)}{" per layer" if path_is_stacked(path) else ""} for {"/".join(path)}')
        arr = np.asarray(arr, get_path(expected, path).dtype)
        set_path(out, path, jax.device_put(arr, place(get_path(expected, path))) if place else jnp.asarray(arr))
    return out


def path_is_stacked(path):
    return 'layers' in path


def get_path(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def t5_sources(cfg: T5Config) -> dict:
    """Our parameter path -> list of (transformers name, transpose?)."""
    src = {('embed',): [('shared.weight', False)]}
    if not cfg.tie_word_embeddings:
        src[('lm_head',)] = [('lm_head.weight', True)]
    ffn_names = ('wi_0', 'wi_1', 'wo') if cfg.gated_gelu else ('wi', 'wo')
    for stack, n, blocks in (('encoder', cfg.num_layers, (('self_attn', 'SelfAttention'),)),
                             ('decoder', cfg.num_decoder_layers, (('self_attn', 'SelfAttention'), ('cross_attn', 'EncDecAttention')))):
        src[(stack, 'rel_bias')] = [(f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight', False)]
        src[(stack, 'final_norm')] = [(f'{stack}.final_layer_norm.weight', False)]
        for j, (ours, theirs) in enumerate(blocks):
            src[(stack, 'layers', ours, 'norm')] = [(f'{stack}.block.{i}.layer.{j}.layer_norm.weight', False) for i in range(n)]
            for w in 'qkvo':
                src[(stack, 'layers', ours, w)] = [(f'{stack}.block.{i}.layer.{j}.{theirs}.{w}.weight', True) for i in range(n)]
        j = len(blocks)
        src[(stack, 'layers', 'ffn', 'norm')] = [(f'{stack}.block.{i}.layer.{j}.layer_norm.weight', False) for i in range(n)]
        for w in ffn_names:
            src[(stack, 'layers', 'ffn', w)] = [(f'{stack}.block.{i}.layer.{j}.DenseReluDense.{w}.weight', True) for i in range(n)]
    return src


def load_t5(name_or_dir: str, place=None, **overrides):
    """(T5Config, params) from a hub name or a local transformers-style directory. `overrides` set
    T5Config fields such as dtype or dropout_rate; `place` as in assign()."""
    d, config, flat = read_hf_checkpoint(name_or_dir, 'T5')
    try:
        cfg = T5Config.from_hf(config, **overrides)
    except KeyError as e:
        raise ValueError(f'{os.path.join(d, "config.json")}: missing field {e} (not a T5 config?)') from None
    expected = jax.eval_shape(lambda: init_t5(cfg, jax.random.PRNGKey(0)))
    sources = t5_sources(cfg)
    if 'lm_head' in expected and 'lm_head.weight' not in flat and config.get('tie_word_embeddings'):
        # transformers 5 saves a v1.1 T5 with its output layer tied to the embedding (not rescaled:
        # scale_decoder_outputs false) and writes no lm_head.weight: read it as transformers does
        sources[('lm_head',)] = [('shared.weight', True)]
    return cfg, assign(expected, sources, flat, d, place)


def save_t5(params, cfg: T5Config, folder: str):
    """The inverse of load_t5: a transformers T5 folder (config.json, model.safetensors, float32)."""
    from safetensors.numpy import save_file
    weights = {}
    for path, names in t5_sources(cfg).items():
        arr = np.asarray(get_path(params, path), np.float32)
        for (name, transpose), w in zip(names, arr if path_is_stacked(path) else [arr]):   # one per layer
            weights[name] = np.ascontiguousarray(w.T if transpose else w)
    config = dict(
        architectures=['T5ForConditionalGeneration'], model_type='t5', is_encoder_decoder=True,
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_heads=cfg.num_heads,
        num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers,
        relative_attention_num_buckets=cfg.num_buckets, relative_attention_max_distance=cfg.max_distance,
        dropout_rate=cfg.dropout_rate, layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj='gated-gelu' if cfg.gated_gelu else 'relu',
        tie_word_embeddings=cfg.tie_word_embeddings,   # what the hub's v1.0 (true) and v1.1 (false) write
        decoder_start_token_id=PAD_ID, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    os.makedirs(folder, exist_ok=True)
    save_file(weights, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(config, f, indent=2)


def roberta_sources(cfg: RobertaConfig, prefix: str) -> dict:
    e, L = prefix + 'embeddings.', range(cfg.num_hidden_layers)
    src = {('word',): [(e + 'word_embeddings.weight', False)], ('pos',): [(e + 'position_embeddings.weight', False)],
           ('type',): [(e + 'token_type_embeddings.weight', False)],
           ('emb_norm', 'scale'): [(e + 'LayerNorm.weight', False)], ('emb_norm', 'bias'): [(e + 'LayerNorm.bias', False)]}
    names = {'q': 'attention.self.query', 'k': 'attention.self.key', 'v': 'attention.self.value',
             'o': 'attention.output.dense', 'fc1': 'intermediate.dense', 'fc2': 'output.dense'}
    for ours, theirs in names.items():
        for w, t in (('w', True), ('b', False)):
            src[('layers', ours, w)] = [(f'{prefix}encoder.layer.{i}.{theirs}.{"weight" if w == "w" else "bias"}', t) for i in L]
    for ours, theirs in (('attn_norm', 'attention.output.LayerNorm'), ('ffn_norm', 'output.LayerNorm')):
        for w, hf in (('scale', 'weight'), ('bias', 'bias')):
            src[('layers', ours, w)] = [(f'{prefix}encoder.layer.{i}.{theirs}.{hf}', False) for i in L]
    return src


def load_roberta(name_or_dir: str, **overrides):
    d, config, flat = read_hf_checkpoint(name_or_dir, 'RoBERTa')
    cfg = dataclasses.replace(RobertaConfig.from_hf(config), **overrides)
    prefix = 'roberta.' if 'roberta.embeddings.word_embeddings.weight' in flat else ''
    expected = jax.eval_shape(lambda: init_roberta(cfg, jax.random.PRNGKey(0)))
    return cfg, assign(expected, roberta_sources(cfg, prefix), flat, d)
