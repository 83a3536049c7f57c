"""model.py on real converted weights vs transformers: Gemma 3 270M (data/gemma3_270m) and the Llama-family
SmolLM2-135M-Instruct (data/smollm2_135m, GPT-2 byte-level BPE through tokenizer.json), each made by its prepare.py.

transformers loads the same converted weights, so these check model.py and the conversion's
loadability, not closeness to the original bf16 weights (the GGUFs are Q4_K_M and Q4_1).
Texts come from the real relevance data in ../shared/data (QBQTC, KUAKE-QTR dev sets).
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch

import model
from conftest import SHARED_DATA

CKPT = Path(__file__).resolve().parents[1] / "data" / "gemma3_270m"
DATA = SHARED_DATA
FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")


def real_rows(n_per_file):
    """(query, title) rows: the first n of QBQTC dev (JSON lines) and of KUAKE-QTR dev (JSON array)."""
    with open(DATA / "qbqtc" / "dev.json", encoding="utf-8") as f:
        qbqtc = [json.loads(line) for _, line in zip(range(n_per_file), f)]
    kuake = json.loads((DATA / "kuake_qtr" / "KUAKE-QTR_dev.json").read_text(encoding="utf-8"))[:n_per_file]
    return [(r["query"], r["title"]) for r in qbqtc + kuake]


def need_checkpoint(path, files):
    missing = [name for name in files if not (path / name).exists()]
    if missing:
        pytest.fail(f"{path} lacks {missing}: run `python data/{path.name}/prepare.py` first")
    torch.set_num_threads(2)
    return path


def hf_model_of(ckpt):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()


def hf_tokenizer_of(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


def ours_of(ckpt):
    return model.Transformer.from_pretrained(ckpt, dtype=torch.float32), model.Tokenizer(ckpt)


@pytest.fixture(scope="module")
def ckpt():
    return need_checkpoint(CKPT, FILES)


@pytest.fixture(scope="module")
def hf_model(ckpt):
    return hf_model_of(ckpt)


@pytest.fixture(scope="module")
def hf_tokenizer(ckpt):
    return hf_tokenizer_of(ckpt)


@pytest.fixture(scope="module")
def ours(ckpt):
    return ours_of(ckpt)


def test_logits_match_transformers(ours, hf_model):
    """Right-padded batch of 8 prompts (English, Chinese, real rows): same logits at every real token."""
    ours_model, tok = ours
    (q0, t0), (q1, _), (_, t2), (q3, t3) = real_rows(2)  # two QBQTC rows, two KUAKE-QTR rows
    prompts = ["The capital of France is", "Query: how to cure a cold\nTitle: home remedies for colds",
               "1, 2, 3, 4,", f"查询：{q0}\n标题：{t0}\n相关性：", q1, t2,
               f"Is '{q3}' relevant to '{t3}'? Answer:", "今天天气很好，我们去公园散步吧。"]
    ids = [tok.encode(p, bos=True) for p in prompts]
    T = max(map(len, ids))
    assert min(map(len, ids)) < T  # the batch really is padded
    input_ids = torch.tensor([x + [tok.pad_id] * (T - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])
    with torch.no_grad():
        ref = hf_model(input_ids=input_ids, attention_mask=mask).logits
        got = ours_model.logits(ours_model(input_ids, mask))
    real = mask.bool()
    diff = (got[real] - ref[real]).abs().max().item()
    print(f"max |logit diff| over {int(real.sum())} positions: {diff:.2e}")
    assert diff <= 2e-3
    assert torch.equal(got[real].argmax(-1), ref[real].argmax(-1))


def test_tokenizer_matches_transformers(ours, hf_tokenizer):
    """model.Tokenizer (SentencePiece) == transformers' GemmaTokenizer built from the same tokenizer.model,
    on 500 real rows (query and title encoded separately) and a few edge cases. Only runs of 32+ spaces may differ: the
    longest whitespace piece is 31 '▁', and SentencePiece (greedy user-defined match) and tokenizers
    (BPE merges) split longer runs differently."""
    _, tok = ours
    texts = [t for row in real_rows(250) for t in row]
    assert len(texts) == 1000
    texts += ["  two  spaces ", "tab\tnew\n\nline", "1234567 3.14", "emoji 🤗 ü", "<b>html</b> <start_of_turn>user\n",
              "x" + " " * 40 + "y"]  # whitespace runs, digits, byte fallback, added tokens; the last may differ
    mismatched = [t for t in texts if tok.encode(t) != hf_tokenizer(t, add_special_tokens=False)["input_ids"]]
    print(f"tokenizer mismatches: {len(mismatched)}/{len(texts)} texts: {mismatched}")
    assert all(re.search(" {32,}", t) for t in mismatched), mismatched[:3]
    assert tok.encode("查询", bos=True) == hf_tokenizer("查询")["input_ids"]  # bos handled alike
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)


def test_converted_model_is_a_language_model(hf_model, hf_tokenizer):
    """A broken conversion (norms off by 1, wrong names, q/k rows permuted) gives near-uniform or
    garbage predictions; a real LM continues the weekdays and finds real text far likelier than the
    same tokens shuffled."""
    def nll(ids):
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([ids])).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()

    ids = hf_tokenizer("Monday, Tuesday, Wednesday,")["input_ids"]
    with torch.no_grad():
        top1 = hf_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
    assert hf_tokenizer.decode([top1]) == " Thursday"

    text = "The quick brown fox jumps over the lazy dog. Paris is the capital and largest city of France."
    ids = hf_tokenizer(text)["input_ids"]
    g = torch.Generator().manual_seed(0)
    shuffled = ids[:1] + [ids[1:][i] for i in torch.randperm(len(ids) - 1, generator=g).tolist()]
    real, rand = nll(ids), nll(shuffled)
    print(f"NLL/token: real {real:.2f}, shuffled {rand:.2f}, uniform {math.log(262144):.2f}")
    assert real < 0.4 * math.log(262144)
    assert real < rand - 2.0


# ---- SmolLM2-135M-Instruct: Llama architecture (GQA 9/3 heads, tied embeddings), tokenizer.json ----

SMOL = Path(__file__).resolve().parents[1] / "data" / "smollm2_135m"
SMOL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def smol_ckpt():
    return need_checkpoint(SMOL, SMOL_FILES)


@pytest.fixture(scope="module")
def smol_hf_model(smol_ckpt):
    return hf_model_of(smol_ckpt)


@pytest.fixture(scope="module")
def smol_hf_tokenizer(smol_ckpt):
    return hf_tokenizer_of(smol_ckpt)


@pytest.fixture(scope="module")
def smol_ours(smol_ckpt):
    return ours_of(smol_ckpt)


def test_smollm2_logits_match_transformers(smol_ours, smol_hf_model):
    """Right-padded batch of 6 prompts of unequal length (English, Chinese, real rows): same logits
    at every real token. Padding is <|im_end|> (the pad id), which the mask must hide."""
    ours_model, tok = smol_ours
    rows = real_rows(2)  # two QBQTC rows, then two KUAKE-QTR rows
    (q0, t0), (_, t1), (q2, t2) = rows[0], rows[1], rows[3]
    prompts = ["The capital of France is", "Query: how to cure a cold\nTitle: home remedies for colds",
               f"查询：{q0}\n标题：{t0}\n相关性：", t1, f"Is '{q2}' relevant to '{t2}'? Answer:",
               "今天天气很好，我们去公园散步吧。"]
    ids = [tok.encode(p, bos=True) for p in prompts]
    T = max(map(len, ids))
    assert min(map(len, ids)) < T  # the batch really is padded
    input_ids = torch.tensor([x + [tok.pad_id] * (T - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])
    with torch.no_grad():
        ref = smol_hf_model(input_ids=input_ids, attention_mask=mask).logits
        got = ours_model.logits(ours_model(input_ids, mask))
    real = mask.bool()
    diff = (got[real] - ref[real]).abs().max().item()
    print(f"SmolLM2 max |logit diff| over {int(real.sum())} positions: {diff:.2e}")
    assert diff <= 2e-3
    assert torch.equal(got[real].argmax(-1), ref[real].argmax(-1))


def test_smollm2_tokenizer_matches_transformers(smol_ours, smol_hf_tokenizer):
    """model.Tokenizer (tokenizers on tokenizer.json) == transformers' GPT2Tokenizer on the same dir, on 150
    real rows (query and title encoded separately) and edge cases. Both run the same byte-level BPE,
    so this checks the wrapping: no bos/eos added by encode, special tokens in text, special ids."""
    _, tok = smol_ours
    texts = [t for row in real_rows(75) for t in row]
    assert len(texts) == 300
    texts += ["  two  spaces ", "tab\tnew\n\nline", "1234567 3.14", "emoji 🤗 ü", "<|im_start|>user\nhi<|im_end|>",
              "x" + " " * 40 + "y"]
    mismatched = [t for t in texts if tok.encode(t) != smol_hf_tokenizer(t, add_special_tokens=False)["input_ids"]]
    print(f"SmolLM2 tokenizer mismatches: {len(mismatched)}/{len(texts)} texts: {mismatched}")
    assert not mismatched, mismatched[:3]
    hf = smol_hf_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    assert tok.encode("查询", bos=True) == [hf.bos_token_id] + hf("查询", add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode(texts[0])) == texts[0]


def test_smollm2_is_a_language_model(smol_ours):
    """A broken conversion (q/k rows left in GGUF's permuted order, wrong tying, bad dequantization) does
    not complete this; checked on model.py end to end, from text to decoded top-1 token."""
    ours_model, tok = smol_ours
    ids = tok.encode("The capital of France is", bos=True)
    with torch.no_grad():
        probs = ours_model.logits(ours_model(torch.tensor([ids])))[0, -1].softmax(-1)
    print(f"SmolLM2 p(top-1 {tok.decode([probs.argmax().item()])!r}) = {probs.max().item():.2f}")
    assert tok.decode([probs.argmax().item()]) == " Paris"
