"""A pure-PyTorch decoder (Gemma 3, Llama, Qwen2, Qwen3) that loads Hugging Face checkpoints exactly, plus LoRA.

Sources (transformers 5.x, read from site-packages): models/gemma3/modeling_gemma3.py and
configuration_gemma3.py, models/llama/modeling_llama.py, models/qwen2/modeling_qwen2.py,
models/qwen3/modeling_qwen3.py, models/mistral/modeling_mistral.py, modeling_rope_utils.py
(default/linear/llama3 inverse frequencies), masking_utils.py (causal, padding and sliding-window masks).
LoRA: peft/tuners/lora/layer.py (Hu et al. 2021). The tokenizer is in tokenizer.py.

Choices, each matching transformers unless said otherwise:
- Gemma 3 differs from Llama in five places, each marked `gemma`: RMSNorm weights are (1 + w) applied in fp32
  before the cast back; four norms per block (sandwich); q/k RMSNorm; embeddings times sqrt(dim) with the
  normaliser cast to the activation dtype first (so bf16 uses 55.5, not 55.4256); gated GELU-tanh MLP.
  Attention scale is query_pre_attn_scalar**-0.5 (Llama/Qwen: head_dim**-0.5, stored the same way).
- Qwen3 is Llama plus q/k RMSNorm (Llama-style weight) over head_dim before rope; head_dim comes from the
  config (default 128, not hidden/heads). Qwen2 is Llama plus q/k/v biases.
- Multimodal Gemma 3 (model_type gemma3): the decoder from text_config, whose missing fields take
  Gemma3TextConfig's defaults; tying from the top level; no final soft-capping (Gemma3ForConditionalGeneration).
- Sliding layers see keys with q - k < sliding_window (masking_utils.sliding_window_overlay) and use the
  local rope base (rope_local_base_freq, 1e4); full layers use rope_theta (1e6) and rope_scaling. Mistral
  slides on every layer, Qwen2/Qwen3 only with use_sliding_window on layers >= max_window_layers.
- Rope cos/sin are computed in fp32 from position ids on every forward (no buffers: loading on the meta
  device then assigning weights leaves nothing to re-initialise), then cast to the activation dtype.
- Position ids are cumsum(mask) - 1, so right- and left-padded batches get the positions of unpadded runs.
- One boolean mask per layer type (causal & key is real & window) feeds F.scaled_dot_product_attention;
  the diagonal is always allowed so padded query rows never see an empty row (NaN) — real rows are unchanged.
  Grouped-query attention uses enable_gqa=True instead of repeating k/v.
- Unsupported options (rope types other than default/linear/llama3, attention/MLP biases on Llama/Gemma,
  logit softcapping inside attention, bidirectional attention, partial rotary) raise ValueError naming them.
- Weights: safetensors only (never unpickled); vision-tower keys of multimodal Gemma 3 are skipped; stale
  `rotary_emb.inv_freq` buffers of old Llama checkpoints are ignored; tied models have no lm_head module.
- LoRA follows PEFT: A kaiming-uniform(a=sqrt(5)), B zero, scaling alpha/r, dropout on the LoRA input only,
  LoRA weights kept in fp32 (PEFT's autocast_adapter_dtype) and the sum cast back to the input dtype.
  Adapter files use the *ForCausalLM key layout ("base_model.model.model." + our name).
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

# Defaults of the transformers config classes (models/*/configuration_*.py), merged under a config.json
# before anything is read: google/gemma-3-4b-it's text_config, for one, leaves out the head counts and head_dim.
_DEFAULTS = {
    "gemma3_text": dict(vocab_size=262_208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=4096,
                        query_pre_attn_scalar=256, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh"),
    "llama": dict(vocab_size=32_000, num_attention_heads=32, rms_norm_eps=1e-6, rope_theta=1e4,
                  tie_word_embeddings=False, hidden_act="silu"),
    "mistral": dict(vocab_size=32_000, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6,
                    rope_theta=1e4, tie_word_embeddings=False, hidden_act="silu", sliding_window=4096),
    "qwen2": dict(vocab_size=151_936, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
                  rope_theta=1e4, tie_word_embeddings=False, hidden_act="silu", max_window_layers=28),
    "qwen3": dict(vocab_size=151_936, num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-6,
                  rope_theta=1e4, tie_word_embeddings=False, hidden_act="silu", max_window_layers=28),
}
# Required even after the merge: transformers has defaults for the sizes too, but they are one model's sizes.
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers")
# Options that change the math and that this file does not implement: key -> the only accepted value.
_UNSUPPORTED = {"attention_bias": False, "mlp_bias": False, "attn_logit_softcapping": None,
                "use_bidirectional_attention": False, "partial_rotary_factor": 1.0}


@dataclass
class ModelArgs:
    model_type: str  # "gemma3_text" | "llama" (also Mistral) | "qwen2" | "qwen3"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    rope_theta: float  # full-attention layers
    rope_local_theta: float  # sliding-window layers (no scaling)
    rope_scaling: dict | None  # full-attention layers: {"rope_type": "linear"|"llama3", ...} or None
    layer_types: tuple  # "full" | "sliding", one per layer
    sliding_window: int | None
    query_pre_attn_scalar: float  # attention scale = query_pre_attn_scalar ** -0.5
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # RMSNorm over head_dim on q and k before rope: Gemma 3, Qwen3
    tie_embeddings: bool
    act: str  # "silu" | "gelu_pytorch_tanh"
    final_logit_softcapping: float | None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Both layouts: Hub (rope_theta, rope_local_base_freq, sliding_window_pattern, rope_scaling) and
        transformers 5 (rope_parameters, per layer type for Gemma 3; layer_types)."""
        kind, top = cfg.get("model_type"), cfg
        if kind == "gemma3":  # multimodal checkpoint: the decoder is described by text_config
            cfg, kind = cfg.get("text_config") or {}, "gemma3_text"
        if kind not in _DEFAULTS:
            raise ValueError(f"model_type={kind!r} is not supported (supported: gemma3, {', '.join(_DEFAULTS)})")
        c = {**_DEFAULTS[kind], **cfg}
        if missing := [k for k in _REQUIRED if k not in c]:
            raise ValueError(f"model_type={kind!r}: missing field(s) {missing}")
        for key, ok in _UNSUPPORTED.items():
            if c.get(key) not in (None, ok):
                raise ValueError(f"model_type={kind!r}: {key}={c[key]!r} is not supported")
        gemma, n_heads = kind == "gemma3_text", c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // n_heads
        act = c.get("hidden_activation") or c.get("hidden_act")
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"model_type={kind!r}: activation {act!r} is not supported")
        types, window = _layer_types(kind, c)
        theta, local_theta, scaling = _rope(kind, c, types)
        if top is not cfg:  # Gemma3ForConditionalGeneration: tying from the top level, logits never soft-capped
            c.update(tie_word_embeddings=top.get("tie_word_embeddings", True), final_logit_softcapping=None)
        return cls(model_type="llama" if kind == "mistral" else kind, vocab_size=c["vocab_size"],
                   dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=n_heads,
                   n_kv_heads=c.get("num_key_value_heads") or n_heads, head_dim=head_dim,
                   hidden_dim=c["intermediate_size"], norm_eps=c["rms_norm_eps"], rope_theta=float(theta),
                   rope_local_theta=float(local_theta), rope_scaling=scaling, layer_types=types,
                   sliding_window=window if "sliding" in types else None,
                   query_pre_attn_scalar=c["query_pre_attn_scalar"] if gemma else head_dim,
                   qkv_bias=kind == "qwen2", qk_norm=kind in ("gemma3_text", "qwen3"),
                   tie_embeddings=bool(c["tie_word_embeddings"]), act=act,
                   final_logit_softcapping=c.get("final_logit_softcapping"))


def _layer_types(kind: str, c: dict) -> tuple[tuple, int | None]:
    """("full"|"sliding" per layer, window). layer_types when given (transformers 5), else each family's rule:
    Gemma 3 makes every sliding_window_pattern-th layer full (configuration_gemma3.py), Mistral slides everywhere,
    Qwen2/Qwen3 slide from max_window_layers on and only with use_sliding_window (configuration_qwen2/3.py)."""
    n = c["num_hidden_layers"]
    slides = kind in ("gemma3_text", "mistral") or (kind in ("qwen2", "qwen3") and c.get("use_sliding_window"))
    window = c.get("sliding_window") if slides else None
    types = c.get("layer_types")
    if types is None and kind == "gemma3_text":
        pattern = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    elif types is None:
        first_sliding = c["max_window_layers"] if kind in ("qwen2", "qwen3") else 0
        types = ["sliding_attention" if i >= first_sliding else "full_attention" for i in range(n)]
    if len(types) != n or not set(types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"model_type={kind!r}: layer_types={types!r} is not {n} of full/sliding_attention")
    return tuple("sliding" if t == "sliding_attention" and window else "full" for t in types), window


def _rope(kind: str, c: dict, types: tuple) -> tuple[float, float, dict | None]:
    """(theta of full layers, theta of sliding layers, scaling of full layers or None) from rope_parameters
    (transformers 5; per layer type for Gemma 3) or the Hub's rope_theta / rope_local_base_freq / rope_scaling."""
    rp = c.get("rope_parameters")
    if rp and "full_attention" in rp:
        full, local = dict(rp["full_attention"]), dict(rp.get("sliding_attention") or {})
    elif rp:
        full, local = dict(rp), {}
    else:
        full = {**(c.get("rope_scaling") or {}), "rope_theta": c["rope_theta"]}
        local = {"rope_theta": c.get("rope_local_base_freq", c["rope_theta"])}
    theta = full.pop("rope_theta", c["rope_theta"])
    local_theta = local.get("rope_theta", c.get("rope_local_base_freq", theta) if kind == "gemma3_text" else theta)
    for params in (full, local):
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"model_type={kind!r}: partial_rotary_factor is not supported")
    rope_type = full.pop("type", None) or full.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"model_type={kind!r}: rope scaling type {rope_type!r} is not supported")
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(f"model_type={kind!r}: rope scaling on sliding layers is not supported")
    scaling = None if rope_type == "default" else {**full, "rope_type": rope_type}
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", c.get("max_position_embeddings"))
    if scaling and kind != "gemma3_text" and "sliding" in types:
        raise ValueError(f"model_type={kind!r}: rope scaling with sliding-window layers is not supported")
    return theta, local_theta, scaling


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies in fp32: modeling_rope_utils.py (_compute_default/linear/llama3_parameters)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # Llama 3.1: long wavelengths divided by factor, a smooth ramp in between
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """(B,T) positions -> cos, sin of shape (B,1,T,head_dim), computed in fp32 then cast (as transformers)."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rope (modeling_llama.apply_rotary_pos_emb)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    """Llama: weight * normed.to(dtype). Gemma: (normed * (1 + weight)) in fp32, then cast (PR #29402)."""

    def __init__(self, dim: int, eps: float, gemma: bool):
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.scale = args.query_pre_attn_scalar ** -0.5
        self.qk_norm = args.qk_norm
        if self.qk_norm:  # over head_dim; Gemma 3: (1 + w), Qwen3: w (modeling_qwen3.Qwen3Attention)
            gemma = args.model_type == "gemma3_text"
            self.q_norm, self.k_norm = (RMSNorm(args.head_dim, args.norm_eps, gemma) for _ in range(2))

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.gelu = args.act == "gelu_pytorch_tanh"

    def forward(self, x):
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gemma = args.model_type == "gemma3_text"
        self.self_attn, self.mlp = Attention(args), MLP(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps, self.gemma)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps, self.gemma)
        if self.gemma:  # Gemma's sandwich: post_attention normalises the attention output
            self.pre_feedforward_layernorm = RMSNorm(args.dim, args.norm_eps, True)
            self.post_feedforward_layernorm = RMSNorm(args.dim, args.norm_eps, True)

    def forward(self, x, cos, sin, mask):
        if self.gemma:
            h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


def attention_masks(attention_mask: torch.Tensor, sliding_window: int | None) -> dict:
    """(B,T) 0/1 -> {"full", "sliding"}: (B,1,T,T) bool, True = may attend (masking_utils semantics)."""
    T = attention_mask.shape[1]
    i = torch.arange(T, device=attention_mask.device)
    causal = i[:, None] >= i[None, :]
    eye = i[:, None] == i[None, :]  # padded query rows attend to themselves rather than to nothing
    full = (causal & attention_mask.bool()[:, None, None, :]) | eye
    masks = {"full": full}
    if sliding_window is not None:
        masks["sliding"] = full & ((i[:, None] - i[None, :] < sliding_window) | eye)
    return masks


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gradient_checkpointing = False
        self.name_or_path = None  # set by from_pretrained; written into adapter_config.json
        self.config_sha256 = None  # set by from_pretrained: which base model an adapter belongs to
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.model_type == "gemma3_text")
        if not args.tie_embeddings:
            self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, stop_at: int | None = None):
        """(B,T) ids -> (B,T,D). stop_at=k: residual stream after block k (no final norm, later blocks skipped)."""
        args = self.args
        if stop_at is not None and not 1 <= stop_at <= args.n_layers:
            raise ValueError(f"stop_at={stop_at} must be in 1..{args.n_layers}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        x = self.embed_tokens(input_ids)
        if args.model_type == "gemma3_text":  # gemma: normaliser cast to the activation dtype first
            x = x * torch.tensor(args.dim ** 0.5).to(x.dtype)
        masks = attention_masks(attention_mask, args.sliding_window)
        rope = {"full": rope_cos_sin(positions, rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling),
                                     x.dtype)}
        if "sliding" in masks:
            rope["sliding"] = rope_cos_sin(positions, rope_inv_freq(args.head_dim, args.rope_local_theta), x.dtype)
        for kind, layer in zip(args.layer_types, self.layers[:stop_at]):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, *rope[kind], masks[kind], use_reentrant=False)
            else:
                x = layer(x, *rope[kind], masks[kind])
        return x if stop_at is not None else self.norm(x)

    def logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits; with token_ids only those rows of the output matrix are used (cheap)."""
        weight = self.embed_tokens.weight if self.args.tie_embeddings else self.lm_head.weight
        out = F.linear(hidden, weight if token_ids is None else weight[token_ids])
        cap = self.args.final_logit_softcapping
        return out if cap is None else torch.tanh(out / cap) * cap

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        """config.json + model.safetensors (or a sharded model.safetensors.index.json) -> eval-mode model."""
        path = Path(path)
        config_file = path / "config.json"
        config_bytes = config_file.read_bytes()
        try:
            args = ModelArgs.from_hf_config(json.loads(config_bytes))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{config_file}: {e}") from e
        index = path / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
        with torch.device("meta"):
            model = cls(args)
        expected, state = set(model.state_dict()), {}
        for file in files:
            with safe_open(path / file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    name = _checkpoint_name(key)
                    if name is None or (name == "lm_head.weight" and args.tie_embeddings):
                        continue
                    state[name] = f.get_tensor(key).to(dtype)
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{path} ({', '.join(files)}): missing weights {missing[:5]} "
                             f"unexpected weights {unexpected[:5]}")
        model.load_state_dict(state, assign=True)
        model.name_or_path, model.config_sha256 = str(path), hashlib.sha256(config_bytes).hexdigest()
        return model.eval()


def _checkpoint_name(key: str) -> str | None:
    """Checkpoint key -> our parameter name, None for keys that are not part of the text decoder."""
    if key.endswith("rotary_emb.inv_freq") or "vision_tower." in key or "multi_modal_projector." in key:
        return None
    for prefix in ("model.language_model.", "language_model.model.", "language_model.", "model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


class LoRALinear(nn.Module):
    """base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / rank — names as PEFT's lora.Linear."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        kw = dict(bias=False, device=base_layer.weight.device, dtype=torch.float32)
        self.base_layer, self.alpha, self.scaling = base_layer, alpha, alpha / rank
        self.lora_A = nn.Linear(base_layer.in_features, rank, **kw)
        self.lora_B = nn.Linear(rank, base_layer.out_features, **kw)
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.train(base_layer.training)  # LoRA added to an eval-mode model must not start dropping out

    def forward(self, x):
        lora = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling
        return (self.base_layer(x) + lora).to(x.dtype)


def _lora_modules(model: nn.Module):
    """(parent, child name, LoRALinear) for every LoRA wrapper in the model."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, LoRALinear)]


def add_lora(model, rank=8, alpha=16, dropout=0.0,
             targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """Freeze every base parameter and wrap each nn.Linear whose attribute name is in targets."""
    model.requires_grad_(False)
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"add_lora: no nn.Linear named one of {targets}")
    return model


def merge_lora(model):
    """Fold B @ A * scaling into each base weight and drop the wrappers (the base stays frozen)."""
    for parent, name, lora in _lora_modules(model):
        weight = lora.base_layer.weight
        with torch.no_grad():
            weight += (lora.lora_B.weight @ lora.lora_A.weight * lora.scaling).to(weight.dtype)
        setattr(parent, name, lora.base_layer)
    return model


def _peft_key(name: str) -> str:
    """Our parameter name -> PEFT adapter key of the matching *ForCausalLM model."""
    return "base_model.model." + (name if name.startswith("lm_head") else "model." + name)


def _lora_params(model) -> dict:
    return {_peft_key(n): p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def save_adapter(model, path):
    """adapter_config.json + adapter_model.safetensors as peft 0.21 writes them; each file tmp + os.replace."""
    mods = _lora_modules(model)
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA")
    lora = mods[0][2]
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=model.name_or_path,
                  r=lora.lora_A.out_features, lora_alpha=lora.alpha, lora_dropout=lora.dropout.p,
                  target_modules=sorted({name for _, name, _ in mods}), bias="none", fan_in_fan_out=False,
                  inference_mode=True, init_lora_weights=True, use_rslora=False, use_dora=False,
                  lora_bias=False, modules_to_save=None, layers_to_transform=None, layers_pattern=None,
                  rank_pattern={}, alpha_pattern={}, revision=None)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: p.detach().cpu().contiguous() for k, p in _lora_params(model).items()}
    save_file(tensors, path / "adapter_model.safetensors.tmp", metadata={"format": "pt"})
    os.replace(path / "adapter_model.safetensors.tmp", path / "adapter_model.safetensors")
    (path / "adapter_config.json.tmp").write_text(json.dumps(config, indent=2) + "\n")
    os.replace(path / "adapter_config.json.tmp", path / "adapter_config.json")


# adapter_config.json fields that change the LoRA math; any value other than empty/false/"none" is refused.
_PEFT_UNSUPPORTED = ("use_dora", "use_rslora", "lora_bias", "bias", "fan_in_fan_out", "rank_pattern",
                     "alpha_pattern", "layers_to_transform", "modules_to_save", "exclude_modules",
                     "target_parameters", "trainable_token_indices", "layer_replication", "use_qalora")


def load_adapter(model, path):
    """Load a PEFT LoRA adapter (adding LoRA from adapter_config.json when the model has none)."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    cfg = json.loads(config_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type={cfg.get('peft_type')!r}, only 'LORA' is supported")
    for key in _PEFT_UNSUPPORTED:
        if cfg.get(key) not in (None, False, {}, [], "none"):
            raise ValueError(f"{config_file}: {key}={cfg[key]!r} is not supported")
    if not isinstance(cfg.get("target_modules"), list):
        raise ValueError(f"{config_file}: target_modules={cfg.get('target_modules')!r} must be a list of names")
    if not _lora_modules(model):
        add_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), tuple(cfg["target_modules"]))
    if any(m.scaling != cfg["lora_alpha"] / cfg["r"] for _, _, m in _lora_modules(model)):
        raise ValueError(f"{config_file}: lora_alpha/r differs from the LoRA already in the model")
    tensors, params = load_file(path / "adapter_model.safetensors"), _lora_params(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{path / 'adapter_model.safetensors'}: missing keys {missing[:5]} "
                         f"unexpected keys {unexpected[:5]}")
    with torch.no_grad():
        for key, p in params.items():
            if tensors[key].shape != p.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {tuple(p.shape)}")
            p.copy_(tensors[key])
    return model
