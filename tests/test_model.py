"""model.py against transformers / peft / sentencepiece on tiny random checkpoints built here (CPU, fp32)."""
import json
import sys

import pytest
import sentencepiece
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import model as M

torch.set_num_threads(2)
TOL = 1e-4
LENGTHS = [13, 7, 3]  # right-padded batch of unequal lengths, longer than the sliding window (4)

HF_CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8))),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        num_key_value_heads=1, head_dim=16, sliding_window=4, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        num_key_value_heads=2, tie_word_embeddings=True)),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4, sliding_window_pattern=2,
        rope_scaling=dict(rope_type="linear", factor=8.0))),
}


def build_hf(family, seed=0):
    """A tiny random HF model whose every parameter (norms included) is perturbed, so no term is trivial."""
    config_cls, model_cls, extra = HF_CONFIGS[family]
    config = config_cls(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                        num_attention_heads=4, pad_token_id=0, **extra)
    config._attn_implementation = "eager"  # the plain softmax reference, independent of SDPA
    torch.manual_seed(seed)
    hf = model_cls(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return hf.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (HF model, directory written by save_pretrained in safetensors)."""
    out = {}
    for family in HF_CONFIGS:
        hf = build_hf(family)
        path = tmp_path_factory.mktemp(family)
        hf.save_pretrained(path)
        out[family] = hf, path
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
    assert ours.args.model_type == ("llama" if family == "mistral" else family)
    assert not ours.training and hasattr(ours, "lm_head") == (not ours.args.tie_embeddings)
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


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_adapter_ours_to_peft(checkpoints, family, tmp_path):
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


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_adapter_peft_to_ours(checkpoints, family, tmp_path):
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
    tok = M.Tokenizer(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    text = "the lazy fox judges a query"
    ids = tok.encode(text)
    assert ids == sp.encode(text) and sp.eos_id() not in ids and tok.decode(ids) == text
    assert tok.encode(text, bos=True) == [sp.bos_id()] + ids and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.pad_id == tok.eos_id  # this model has no pad piece
    (tmp_path / "config.json").write_text(json.dumps({"pad_token_id": 0}))
    assert M.Tokenizer(tmp_path).pad_id == 0


def test_tokenizer_json(tmp_path, monkeypatch):
    import tokenizers
    vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<s>", "</s>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tok = M.Tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    assert tok.encode("hello world", bos=True) == [0, 2, 3] and tok.decode([0, 2, 3]) == "hello world"
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the package were not installed
    with pytest.raises(ImportError, match="pip install tokenizers"):
        M.Tokenizer(tmp_path)
