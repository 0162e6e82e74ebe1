"""Write a tiny Hugging Face Llama model as an F32 GGUF file, for tests.

The llama.cpp backend loads models only from GGUF files. The tests need a tiny random model that
both the HF backend (through transformers' GGUF loader) and the llama.cpp backend load, so that
their log-probs can be compared. :func:`write_llama_gguf` writes such a file from a
``LlamaForCausalLM`` (e.g. :func:`smcdecode.testing.tiny_llama`). The weights are kept in float32.
The tokenizer is a minimal SentencePiece-style ("llama") vocabulary with one piece per id, so
llama.cpp accepts the file. It is not meant for real text.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q or k projection from HF's rotary layout (rotate-half: the two
    halves of each head pair up) to llama.cpp's (adjacent rows pair up). This is the inverse of
    the reordering that transformers' GGUF loader applies when it reads a llama GGUF file."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"write_llama_gguf: rope scaling {params.get('rope_type')!r} is not supported")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def write_llama_gguf(
    model: Any,
    path: str | os.PathLike[str],
    tokenizer_alphabet: Sequence[str] | None = None,
    chat_template: str | None = None,
) -> str:
    """Write ``model`` (a ``transformers.LlamaForCausalLM``) to ``path`` as an F32 GGUF file of
    architecture "llama" and return the path as a string.

    The tokenizer has one piece per id: ``tokenizer_alphabet`` (exactly ``vocab_size`` strings)
    or, by default, ``"</s>"``, ``"<s>"`` and then the letters ``a, b, c, ...``. The ids of the
    model config's ``eos_token_id`` and ``bos_token_id`` are control tokens; every other id is a
    normal token. No BOS is added when encoding and no space prefix, so ``"ab"`` encodes as the
    ids of ``"a"`` and ``"b"``. ``chat_template`` is stored as ``tokenizer.chat_template``.
    """
    import gguf
    import torch

    cfg = model.config
    vocab = int(cfg.vocab_size)
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("write_llama_gguf: models with attention or MLP biases are not supported")
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else None
    bos = cfg.bos_token_id if isinstance(cfg.bos_token_id, int) else None

    if tokenizer_alphabet is None:
        letters = [chr(ord("a") + i) for i in range(26)] + [chr(ord("A") + i) for i in range(26)]
        pieces = ["</s>", "<s>"] + letters[: max(0, vocab - 2)]
    else:
        pieces = list(tokenizer_alphabet)
    if len(pieces) != vocab or len(set(pieces)) != vocab:
        raise ValueError(f"tokenizer_alphabet: need {vocab} distinct pieces (the vocabulary size), got {len(pieces)}")
    special = {i for i in (eos, bos) if i is not None and 0 <= i < vocab}
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(vocab)]

    sd = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}
    if "lm_head.weight" not in sd:  # tied embeddings: llama.cpp reuses token_embd when output is absent
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]

    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_vocab_size(vocab)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))

    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def put(name: str, arr: np.ndarray) -> None:
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(int(cfg.num_hidden_layers)):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", _rope_permute(sd[p + "self_attn.q_proj.weight"], n_head))
        put(f"blk.{i}.attn_k.weight", _rope_permute(sd[p + "self_attn.k_proj.weight"], n_kv))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return os.fspath(path)
