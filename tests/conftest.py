"""Shared test fixtures: the repo root on sys.path, and seeded random Hugging Face checkpoints.

`hf_t5(shape)` / `hf_roberta()` build a transformers (PyTorch) model with seeded random weights ONCE per
session, save it with `save_pretrained` (safetensors) and return `Ckpt(path, model)`; `model` is the
PyTorch model in eval mode (float32), usable as the reference. torch/transformers are imported lazily,
so test files that do not use these fixtures do not pay for them.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, NamedTuple

import pytest

# One persistent XLA compilation cache for the whole test session, in this process and in the scripts
# the tests start: most of a tiny run's time is compiling steps that other tests compiled already.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'hint-test-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SHARED = os.path.join(ROOT, '..', 'shared')  # data files shared between checkouts (may be absent)

_T5 = dict(vocab_size=32128, d_kv=64, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
T5_SHAPES = {
    # the real google-t5/t5-small shape (T5 v1.0: relu, tied embeddings, logits scaled by d_model**-0.5)
    't5-small': dict(_T5, d_model=512, d_ff=2048, num_heads=8, num_layers=6, feed_forward_proj='relu',
                     tie_word_embeddings=True),
    # the real google/t5-v1_1-small (and t5-small-lm-adapt) shape: gated-gelu, separate lm_head, no scaling
    't5-v1_1-small': dict(_T5, d_model=512, d_ff=1024, num_heads=6, num_layers=8,
                          feed_forward_proj='gated-gelu', tie_word_embeddings=False),
    # small and fast, for tests that only need *a* checkpoint
    'tiny': dict(_T5, vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2,
                 feed_forward_proj='gated-gelu', tie_word_embeddings=False),
}


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: multi-process tests (a minute or more); CI runs them too')


class Ckpt(NamedTuple):
    path: str   # checkpoint dir: config.json + model.safetensors
    model: Any  # the transformers model the checkpoint was saved from (eval mode, float32)


def _reinit_t5(model, seed: int, tied: bool, std: float = 0.05):
    """Redraw every weight so that every part of the network matters to the output (HF's init is ~0 in
    places, e.g. relative_attention_bias), while staying well-conditioned in float32 (HF float32 vs float64
    logits ~1e-5): T5 has no 1/sqrt(d_kv) in attention, so q gets std 0.005 (scores std ~1, not ~10).
    Tied (v1.0): logits = E h / sqrt(d); with a large E, E[prev token] dominates h and greedy decoding just
    repeats the previous token, so E gets std 0.05 and the decoder's final norm x20 keeps logits O(1)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters are listed once
            r = torch.randn(p.shape, generator=g)
            if name.endswith('layer_norm.weight'):
                p.copy_((20.0 if tied and name == 'decoder.final_layer_norm.weight' else 1.0) * (1.0 + 0.1 * r))
            elif 'relative_attention_bias' in name:
                p.copy_(r)
            elif name == 'shared.weight':
                p.copy_((std if tied else 1.0) * r)
            elif name.endswith('.q.weight'):
                p.copy_(0.005 * r)
            else:
                p.copy_(std * r)


def save_random_t5(path: str, shape: str = 't5-small', seed: int = 0, **overrides) -> Any:
    """A seeded random transformers T5ForConditionalGeneration at `T5_SHAPES[shape]`, saved to `path`."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    kw = dict(T5_SHAPES[shape], **overrides)
    tied = kw['tie_word_embeddings']
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**kw)).eval()
    if not tied:
        # transformers 5 always ties lm_head to `shared` at construction (config.tie_word_embeddings is forced
        # True; False only turns into scale_decoder_outputs=False): untie by giving lm_head its own weights.
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    _reinit_t5(model, seed, tied)
    model.save_pretrained(path)
    if not tied:
        # Write config.json as the hub's v1.1 checkpoints have it (tie_word_embeddings false, no
        # transformers-5-only scale_decoder_outputs key): that is what load_t5 meets in practice.
        cfg_path = os.path.join(path, 'config.json')
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg['tie_word_embeddings'] = False
        cfg.pop('scale_decoder_outputs', None)
        with open(cfg_path, 'w') as f:
            json.dump(cfg, f, indent=2)
    return model


@pytest.fixture(scope='session')
def hf_t5(tmp_path_factory):
    """Factory: hf_t5('t5-small' | 't5-v1_1-small' | 'tiny') -> Ckpt, built once per session."""
    cache = {}

    def get(shape: str = 't5-small') -> Ckpt:
        if shape not in cache:
            path = str(tmp_path_factory.mktemp(f'hf_{shape}'))
            cache[shape] = Ckpt(path, save_random_t5(path, shape))
        return cache[shape]
    return get


@pytest.fixture(scope='session')
def hf_roberta(tmp_path_factory):
    """A 2-layer RobertaModel at roberta-base width (vocab 50265, pad id 1), seeded random, saved."""
    import torch
    from transformers import RobertaConfig, RobertaModel
    cfg = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    model = RobertaModel(cfg, add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # std 0.02 init is fine for BERT-style nets; also randomize LayerNorm affine
        for name, p in model.named_parameters():
            if 'LayerNorm' in name:
                p.copy_((1.0 if name.endswith('weight') else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith('bias'):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    path = str(tmp_path_factory.mktemp('hf_roberta'))
    model.save_pretrained(path)
    return Ckpt(path, model)
