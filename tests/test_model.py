"""model.py against transformers / peft / sentencepiece on tiny random checkpoints built here (CPU, fp32)."""
import hashlib
import json
import sys

import pytest
import sentencepiece
import torch
import torch.nn as nn
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import model as M
import tokenizer

torch.set_num_threads(2)
TOL = 1e-4
LENGTHS = [13, 7, 3]  # right-padded batch of unequal lengths, longer than the sliding window (4)

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
             pad_token_id=0)
# google/gemma-3-4b-it's config.json (Hub, 2025): text_config omits the head counts, head_dim, vocab_size,
# query_pre_attn_scalar and the rope thetas, which transformers fills from Gemma3TextConfig's defaults.
GEMMA3_4B = dict(
    architectures=["Gemma3ForConditionalGeneration"], boi_token_index=255999, eoi_token_index=256000,
    eos_token_id=[1, 106], image_token_index=262144, initializer_range=0.02, mm_tokens_per_image=256,
    model_type="gemma3", torch_dtype="bfloat16", transformers_version="4.50.0.dev0",
    text_config=dict(hidden_size=2560, intermediate_size=10240, model_type="gemma3_text", num_hidden_layers=34,
                     rope_scaling=dict(factor=8.0, rope_type="linear"), sliding_window=1024),
    vision_config=dict(hidden_size=1152, image_size=896, intermediate_size=4304, model_type="siglip_vision_model",
                       num_attention_heads=16, num_hidden_layers=27, patch_size=14, vision_use_head=False))
# The same keys at tiny sizes: 8 heads of 256 and a 262,208 vocabulary still come from the defaults, 6 layers
# give one full layer under the default pattern, and the SigLIP tower sees one 2x2-patch image.
GEMMA3_TINY = {**GEMMA3_4B, "mm_tokens_per_image": 1,
               "text_config": {**GEMMA3_4B["text_config"], "hidden_size": 32, "intermediate_size": 48,
                               "num_hidden_layers": 6, "sliding_window": 4},
               "vision_config": {**GEMMA3_4B["vision_config"], "hidden_size": 16, "image_size": 28,
                                 "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1}}

HF_CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        SMALL, num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        SMALL, num_key_value_heads=1, head_dim=16, sliding_window=4, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    # head_dim 16 != hidden/heads; layers 2-3 slide with a window shorter than the batch
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(
        SMALL, num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        SMALL, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
        sliding_window_pattern=2, rope_scaling=dict(rope_type="linear", factor=8.0))),
    # saved with GEMMA3_TINY's sparse keys as its config.json (checkpoints)
    "gemma3": (transformers.Gemma3Config, transformers.Gemma3ForConditionalGeneration, GEMMA3_TINY),
}


def build_hf(family, seed=0):
    """A tiny random HF model whose every parameter (norms included) is perturbed, so no term is trivial."""
    config_cls, model_cls, kwargs = HF_CONFIGS[family]
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"  # the plain softmax reference, independent of SDPA
    torch.manual_seed(seed)
    hf = model_cls(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return hf.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (HF model, directory written by save_pretrained in safetensors). The multimodal Gemma 3 gets
    its sparse config.json back, so the defaults must be filled in by us as transformers filled them."""
    out = {}
    for family, (_, _, kwargs) in HF_CONFIGS.items():
        hf = build_hf(family)
        path = tmp_path_factory.mktemp(family)
        hf.save_pretrained(path)
        if family == "gemma3":
            (path / "config.json").write_text(json.dumps(kwargs))
        out[family] = hf, path
    return out


def implied_args(hf) -> dict:
    """ModelArgs fields as transformers' modeling code reads them from its defaults-filled config (and, given a
    model, from its modules): a reading of config.json independent of from_hf_config's."""
    config = hf.config if isinstance(hf, nn.Module) else hf
    c = config.get_text_config()
    window = getattr(c, "sliding_window", None)
    types = getattr(c, "layer_types", None) or ["sliding_attention"] * c.num_hidden_layers  # Mistral: all slide
    types = tuple("sliding" if t == "sliding_attention" and window else "full" for t in types)
    full = c.rope_parameters.get("full_attention", c.rope_parameters)
    local = c.rope_parameters.get("sliding_attention", full)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    out = dict(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
               n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, head_dim=head_dim,
               hidden_dim=c.intermediate_size, norm_eps=c.rms_norm_eps, rope_theta=full["rope_theta"],
               rope_local_theta=local["rope_theta"], layer_types=types,
               rope_scaling=None if full["rope_type"] == "default" else
               {k: v for k, v in full.items() if k != "rope_theta"},
               sliding_window=window if "sliding" in types else None, tie_embeddings=config.tie_word_embeddings,
               query_pre_attn_scalar=getattr(c, "query_pre_attn_scalar", head_dim),
               act=getattr(c, "hidden_activation", None) or c.hidden_act)
    if isinstance(hf, nn.Module):
        attn = hf.get_decoder().layers[0].self_attn
        out.update(qkv_bias=attn.q_proj.bias is not None, qk_norm=hasattr(attn, "q_norm"),
                   final_logit_softcapping=getattr(hf.config, "final_logit_softcapping", None))
        assert attn.scaling == out["query_pre_attn_scalar"] ** -0.5
    return out


def batch(vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = (torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]).long()
    return ids * mask, mask  # pad id 0 on the right


def max_diff_real(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("family", list(HF_CONFIGS))
def test_matches_transformers(checkpoints, family):
    hf, path = checkpoints[family]
    ours = M.Transformer.from_pretrained(path)
    assert ours.args.model_type == {"mistral": "llama", "gemma3": "gemma3_text"}.get(family, family)
    assert not ours.training  # LoRA added later follows the base's mode: a training base would drop out
    # Every field as transformers reads it: a wrong default or key the 13-token batch cannot show (a window
    # longer than the batch, a theta on layers that are all full, eps below tolerance) fails here.
    got = {k: v for k, v in vars(ours.args).items() if k != "model_type"}
    assert got == {**got, **implied_args(hf)}, {k: (got[k], v) for k, v in implied_args(hf).items() if got[k] != v}
    ids, mask = batch()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, output_hidden_states=True)
        hidden = ours(ids, mask)
        logits = ours.logits(hidden)
        ref_last = hf.model(ids, attention_mask=mask).last_hidden_state
        d_hidden = max_diff_real(hidden, ref_last, mask)
        d_logits = max_diff_real(logits, ref.logits, mask)
        print(f"{family}: hidden {d_hidden:.2e} logits {d_logits:.2e}")
        assert d_hidden <= TOL and d_logits <= TOL
        for k in range(1, ours.args.n_layers):
            assert max_diff_real(ours(ids, mask, stop_at=k), ref.hidden_states[k], mask) <= TOL, k
        chosen = torch.tensor([5, 0, 42, 5, 96])
        assert torch.allclose(ours.logits(hidden[:, -1], chosen), logits[:, -1, chosen], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="stop_at"):
        ours(ids, mask, stop_at=0)


@pytest.mark.parametrize("family,hole", [("llama", True), ("gemma3_text", False)])
def test_positions_follow_the_mask(checkpoints, family, hole):
    """Padding anywhere is invisible: the row equals its tokens run alone. Rope is relative, so only a hole
    in the middle tells cumsum(mask) - 1 from the index (Gemma's window counts indices, as transformers does)."""
    ours = M.Transformer.from_pretrained(checkpoints[family][1])
    row = batch()[0][:1, :9]
    pad = lambda n: torch.zeros(1, n, dtype=torch.long)
    parts = [pad(4), row[:, :5], pad(3 if hole else 0), row[:, 5:]]
    padded = torch.cat(parts, 1)
    mask = padded.ne(0).long()  # real ids are >= 3, pads are 0
    with torch.no_grad():
        d = (ours(padded, mask)[mask.bool()] - ours(row)[0]).abs().max().item()
    assert d <= 1e-5


def test_sliding_window_and_rope_matter(checkpoints):
    """The tiny Gemma 3 really exercises both layer types: other windows/bases change the output."""
    hf, path = checkpoints["gemma3_text"]
    ours = M.Transformer.from_pretrained(path)
    assert ours.args.layer_types == ("sliding", "full", "sliding", "full") and ours.args.sliding_window == 4
    ids, mask = batch()
    with torch.no_grad():
        base = ours(ids, mask)
        for change in (dict(sliding_window=8), dict(rope_local_theta=1e6), dict(rope_scaling=None)):
            saved = {k: getattr(ours.args, k) for k in change}
            ours.args.__dict__.update(change)
            assert max_diff_real(ours(ids, mask), base, mask) > 1e-3, change
            ours.args.__dict__.update(saved)


def test_sharded_bf16_checkpoint(checkpoints, tmp_path):
    hf, _ = checkpoints["llama"]
    hf_bf16 = build_hf("llama").to(torch.bfloat16)
    hf_bf16.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    ours = M.Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    ref = {k.removeprefix("model."): v.float() for k, v in hf_bf16.state_dict().items()}
    for name, p in ours.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, ref[name]), name
    ours16 = M.Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ids, mask = batch()
    with torch.no_grad():
        ref16 = hf_bf16.model(ids, attention_mask=mask).last_hidden_state.float()
        d = max_diff_real(ours16(ids, mask).float(), ref16, mask)
    print(f"bf16 hidden diff {d:.3e} (scale {ref16.abs().max():.2f})")
    # bf16 rounding noise only: transformers' own eager and sdpa paths differ by about as much (~2% of scale)
    assert all(p.dtype == torch.bfloat16 for p in ours16.parameters()) and d < 0.05 * ref16.abs().max()


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bf16_norm_and_rope_bitwise(family):
    """Cast order matters only in low precision: RMSNorm and rope cos/sin equal transformers' bit for bit."""
    hf = build_hf(family)  # fp32 inv_freq buffer, as transformers' from_pretrained(dtype=bf16) keeps it
    ours = M.RMSNorm(32, 1e-6, gemma=family == "gemma3_text").to(torch.bfloat16)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16) * 3
    with torch.no_grad():
        ours.weight.copy_(hf.model.norm.weight)
        assert torch.equal(ours(x), hf.model.norm.to(torch.bfloat16)(x))
    positions = torch.tensor([[0, 1, 2, 3, 200, 5000]])
    args = M.ModelArgs.from_hf_config(hf.config.to_dict())
    kinds = {"full": (args.rope_theta, args.rope_scaling), "sliding": (args.rope_local_theta, None)}
    for kind in set(args.layer_types):
        cos, sin = M.rope_cos_sin(positions, M.rope_inv_freq(args.head_dim, *kinds[kind]), torch.bfloat16)
        extra = (kind + "_attention",) if family == "gemma3_text" else ()
        ref_cos, ref_sin = hf.model.rotary_emb(x, positions, *extra)
        assert torch.equal(cos[:, 0], ref_cos) and torch.equal(sin[:, 0], ref_sin), kind


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])
def test_multimodal_gemma3_layout(checkpoints, tmp_path, prefix):
    """model_type gemma3: decoder from text_config, weights under either prefix, vision keys skipped."""
    hf, path = checkpoints["gemma3_text"]
    tensors = {prefix + k.removeprefix("model."): v for k, v in load_file(path / "model.safetensors").items()}
    tensors["model.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(3)
    save_file(tensors, tmp_path / "model.safetensors")
    text_config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text_config}))
    ours, ref = M.Transformer.from_pretrained(tmp_path), M.Transformer.from_pretrained(path)
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(ours(ids, mask), ref(ids, mask))
    del tensors[prefix + "norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="norm.weight"):
        M.Transformer.from_pretrained(tmp_path)


def test_gemma3_4b_sparse_config():
    """google/gemma-3-4b-it's exact config.json reads as transformers reads it (Gemma3Config fills the text
    defaults): 8 heads, 4 kv heads of 256, 29 sliding + 5 full layers, linear x8 rope on full layers only, window
    1024, 262,208 rows, tied. Catches checking required fields before merging the defaults ('missing field(s)
    num_attention_heads'), and any default of ours that differs from Gemma3TextConfig's."""
    ours = M.ModelArgs.from_hf_config(GEMMA3_4B)
    want = implied_args(transformers.Gemma3Config(**GEMMA3_4B))
    assert {k: getattr(ours, k) for k in want} == want
    assert (ours.n_heads, ours.n_kv_heads, ours.head_dim, ours.layer_types.count("full")) == (8, 4, 256, 5)
    assert (ours.rope_theta, ours.rope_local_theta, ours.rope_scaling) == (1e6, 1e4, {"rope_type": "linear",
                                                                                     "factor": 8.0})


def test_multimodal_gemma3_no_final_softcap(checkpoints, tmp_path):
    """Gemma3ForConditionalGeneration.forward never soft-caps its logits (only Gemma3ForCausalLM does), whatever
    text_config says: capping at 30 would move these logits by ~0.1 and fail."""
    _, path = checkpoints["gemma3"]
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["final_logit_softcapping"] = 30.0
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = M.Transformer.from_pretrained(tmp_path)
    ids, mask = batch()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        d = max_diff_real(ours.logits(ours(ids, mask)), ref, mask)
    print(f"gemma3 multimodal, text_config final_logit_softcapping=30: logits {d:.2e}")
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration" and ours.args.final_logit_softcapping is None
    assert d <= TOL and ref[mask.bool()].abs().max() > 3, d


def test_config_sha256(checkpoints):
    """The base model's identity for adapters: sha256 of the config.json bytes as stored (not of a re-dump,
    which would change with key order or float spelling)."""
    _, path = checkpoints["qwen3"]
    ours = M.Transformer.from_pretrained(path)
    assert ours.config_sha256 == hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    assert ours.name_or_path == str(path) and ours.args.model_type == "qwen3"


def test_config_layouts_agree():
    """Hub layout (rope_theta, rope_local_base_freq, sliding_window_pattern, rope_scaling) == transformers 5."""
    hub = dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
               num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
               query_pre_attn_scalar=256, rope_theta=1e6, rope_local_base_freq=1e4, sliding_window=512,
               sliding_window_pattern=6, rope_scaling={"rope_type": "linear", "factor": 8.0},
               final_logit_softcapping=None, attn_logit_softcapping=None)
    new = transformers.Gemma3TextConfig(**hub).to_dict()
    assert "rope_parameters" in new and "layer_types" in new
    a, b = M.ModelArgs.from_hf_config(hub), M.ModelArgs.from_hf_config(new)
    assert a == b
    assert a.layer_types == tuple("full" if (i + 1) % 6 == 0 else "sliding" for i in range(12))
    assert (a.rope_theta, a.rope_local_theta, a.rope_scaling) == (1e6, 1e4, {"rope_type": "linear", "factor": 8.0})
    assert (a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.tie_embeddings, a.act) == (
        640, 4, 1, 256, True, "gelu_pytorch_tanh")
    # the 270M Hub file spells the pattern "_sliding_window_pattern" and lists layer_types
    hub270 = {**hub, "_sliding_window_pattern": 6, "layer_types": new["layer_types"]}
    del hub270["sliding_window_pattern"]
    assert M.ModelArgs.from_hf_config(hub270) == a
    llama = dict(model_type="llama", vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=5e5, tie_word_embeddings=True,
                 rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    a, b = M.ModelArgs.from_hf_config(llama), M.ModelArgs.from_hf_config(transformers.LlamaConfig(**llama).to_dict())
    assert a == b and a.rope_scaling["rope_type"] == "llama3" and a.layer_types == ("full", "full")


def test_config_errors(checkpoints, tmp_path):
    base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(ValueError, match="gpt2"):
        M.ModelArgs.from_hf_config({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="yarn"):
        M.ModelArgs.from_hf_config({**base, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4}})
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        M.ModelArgs.from_hf_config({**base, "model_type": "gemma3_text", "attn_logit_softcapping": 50.0})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        M.ModelArgs.from_hf_config({"model_type": "llama", "hidden_size": 32})
    # the head counts have defaults (merged first), the sizes do not
    with pytest.raises(ValueError, match=r"missing field\(s\) \['intermediate_size'\]"):
        M.ModelArgs.from_hf_config({"model_type": "gemma3", "text_config": {"hidden_size": 32, "num_hidden_layers": 2}})
    with pytest.raises(ValueError, match="attention_bias"):  # Qwen3 with q/k/v/o biases: not implemented
        M.ModelArgs.from_hf_config({**base, "model_type": "qwen3", "attention_bias": True})
    (tmp_path / "config.json").write_text(json.dumps({**base, "model_type": "bert"}))
    with pytest.raises(ValueError, match="config.json.*bert"):
        M.Transformer.from_pretrained(tmp_path)


def perturb_lora(model, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_lora_zero_init_and_merge(checkpoints, family):
    _, path = checkpoints[family]
    ours = M.Transformer.from_pretrained(path)
    ids, mask = batch()
    with torch.no_grad():
        base = ours(ids, mask)
        M.add_lora(ours, rank=4, alpha=8)
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert len(trainable) == 2 * 7 * ours.args.n_layers
        assert torch.equal(ours(ids, mask), base)  # B = 0
        perturb_lora(ours)
        unmerged = ours(ids, mask)
        assert max_diff_real(unmerged, base, mask) > 1e-2
        M.merge_lora(ours)
        assert not any(isinstance(m, M.LoRALinear) for m in ours.modules())
        d = max_diff_real(ours(ids, mask), unmerged, mask)
    print(f"{family}: merged vs unmerged {d:.2e}")
    assert d <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_adapter_ours_to_peft(checkpoints, family, tmp_path):
    """Our adapter files load into peft on the transformers model and give our logits. Catches a key layout peft
    does not match (silently left at B = 0: hence `moved`), A/B swapped, or a scaling other than alpha/r."""
    hf, path = checkpoints[family]
    ours = M.add_lora(M.Transformer.from_pretrained(path), rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    perturb_lora(ours)
    M.save_adapter(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)
    peft = PeftModel.from_pretrained(build_hf(family), tmp_path).eval()
    ids, mask = batch()
    with torch.no_grad():
        d = max_diff_real(ours.logits(ours(ids, mask)), peft(ids, attention_mask=mask).logits, mask)
        moved = max_diff_real(peft(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits, mask)
    print(f"{family}: ours->peft {d:.2e} (lora effect {moved:.2e})")
    assert d <= TOL and moved > 1e-2


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_adapter_peft_to_ours(checkpoints, family, tmp_path):
    """peft's adapter files (dropout > 0, odd alpha/r, a subset of targets) load into ours with peft's logits.
    Catches reading peft keys wrongly, LoRA on the wrong modules, and unexpected keys accepted silently."""
    _, path = checkpoints[family]
    targets = ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"]
    peft = get_peft_model(build_hf(family), LoraConfig(r=2, lora_alpha=5, lora_dropout=0.1, target_modules=targets,
                                                       task_type="CAUSAL_LM"))
    perturb_lora(peft)
    peft.save_pretrained(tmp_path)
    ours = M.load_adapter(M.Transformer.from_pretrained(path), tmp_path)
    assert {n for _, n, _ in M._lora_modules(ours)} == set(targets)
    ids, mask = batch()
    with torch.no_grad():
        d = max_diff_real(ours.logits(ours(ids, mask)), peft.eval()(ids, attention_mask=mask).logits, mask)
    print(f"{family}: peft->ours {d:.2e}")
    assert d <= TOL
    with pytest.raises(ValueError, match="lora_alpha"):  # an existing LoRA with another scaling
        M.load_adapter(M.add_lora(M.Transformer.from_pretrained(path), rank=2, alpha=2), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="unexpected keys.*layers.9"):
        M.load_adapter(M.Transformer.from_pretrained(path), tmp_path)


def test_gradient_checkpointing_same_grads(checkpoints):
    _, path = checkpoints["gemma3_text"]
    ids, mask = batch()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # the same lora_A init
        ours = M.add_lora(M.Transformer.from_pretrained(path), rank=4, alpha=8, dropout=0.2).train()
        perturb_lora(ours)
        ours.gradient_checkpointing = ckpt
        torch.manual_seed(7)  # same dropout masks; checkpoint must replay them in the recomputation
        logits = ours.logits(ours(ids, mask)[:, :5], torch.tensor([4, 9, 11]))
        logits.square().mean().backward()
        grads.append({n: p.grad for n, p in ours.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0 and torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


TEXT = ["the quick brown fox jumps over the lazy dog", "relevance of a query to an item",
        "pack my box with five dozen liquor jugs", "sphinx of black quartz judge my vow"] * 5


def test_sentencepiece_tokenizer(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(TEXT) + "\n")
    sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                             vocab_size=60, model_type="bpe", minloglevel=2)
    tok = tokenizer.Tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    text = "the lazy fox judges a query"
    ids = tok.encode(text)
    assert ids == sp.encode(text) and sp.eos_id() not in ids and tok.decode(ids) == text
    assert tok.encode(text, bos=True) == [sp.bos_id()] + ids and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.pad_id == tok.eos_id  # this model has no pad piece
    (tmp_path / "config.json").write_text(json.dumps({"pad_token_id": 0}))
    assert tokenizer.Tokenizer(tmp_path).pad_id == 0


def test_tokenizer_json(tmp_path, monkeypatch):
    import tokenizers
    vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<s>", "</s>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tok = tokenizer.Tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    assert tok.encode("hello world", bos=True) == [0, 2, 3] and tok.decode([0, 2, 3]) == "hello world"
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the package were not installed
    with pytest.raises(ImportError, match="pip install tokenizers"):
        tokenizer.Tokenizer(tmp_path)


@pytest.mark.parametrize("flags", [{}, {"add_bos_token": False}, {"add_eos_token": True}])
def test_tokenizer_json_bos_template(tmp_path, flags):
    """Llama 3's layout: tokenizer.json's TemplateProcessing puts bos first, and with a tokenizer.json transformers 5
    drops tokenizer_config.json's add_bos_token/add_eos_token. Catches ignoring the template (no bos for Llama 3)
    or trusting the flags over it; a template that puts another token first is refused, not silently dropped."""
    import tokenizers
    from transformers import AutoTokenizer
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<s>": 0, "</s>": 1, "hello": 2, "[UNK]": 3}, "[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<s>", "</s>"])
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast", **flags}))
    tok = tokenizer.Tokenizer(tmp_path)
    assert tok.add_bos and [tok.bos_id] + tok.encode("hello") == AutoTokenizer.from_pretrained(tmp_path)("hello")[
        "input_ids"] == [0, 2]
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])
    tk.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"ids \[1\] before the text, not the bos token \(0\)"):
        tokenizer.Tokenizer(tmp_path)
