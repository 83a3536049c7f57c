"""darl.py: prompt encoding and truncation, grade tokens, grade_logits, losses, relevance metrics."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import darl  # noqa: E402
from conftest import small_hf_gemma  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


class CharTokenizer:
    """One token per character (id = code point + 10), bos = 1: lengths are easy to reason about."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, bos=False):
        return [self.bos_id] * bos + [ord(c) + 10 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 10) for i in ids if i > 2)


# ---------------------------------------------------------------- prompt, truncation, collate

def test_default_prompt_ends_at_answer_position():
    assert "{query}" in darl.DEFAULT_PROMPT and "{item}" in darl.DEFAULT_PROMPT
    assert darl.DEFAULT_PROMPT == darl.DEFAULT_PROMPT.rstrip()


def test_encode_pair_content_mask_marks_exactly_query_and_item():
    tok = CharTokenizer()
    ids, content = darl.encode_pair(tok, "abc", "wxyz", template="Q:{query} I:{item} A:", max_len=64)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == "Q:abc I:wxyz A:"
    assert tok.decode([i for i, c in zip(ids, content) if c]) == "abcwxyz"
    assert len(ids) == len(content)
    # item before query also works
    ids, content = darl.encode_pair(tok, "abc", "wxyz", template="{item}|{query}=", max_len=64)
    assert tok.decode(ids) == "wxyz|abc=" and content == [0, 1, 1, 1, 1, 0, 1, 1, 1, 0]


def test_truncation_cuts_item_then_query_never_the_answer_position():
    tok = CharTokenizer()
    template = "Q:{query} I:{item} A:"  # 8 template chars + bos = 9 fixed tokens
    ids, content = darl.encode_pair(tok, "abc", "x" * 100, template=template, max_len=20)
    assert len(ids) == 20 and tok.decode(ids) == "Q:abc I:" + "x" * 8 + " A:"
    ids, _ = darl.encode_pair(tok, "q" * 50, "x" * 50, template=template, max_len=20)
    assert len(ids) == 20 and tok.decode(ids) == "Q:" + "q" * 11 + " I: A:"
    assert sum(darl.encode_pair(tok, "q" * 50, "x" * 50, template=template, max_len=20)[1]) == 11
    ids, _ = darl.encode_pair(tok, "ab", "xy", template=template, max_len=20)  # short pair untouched
    assert tok.decode(ids) == "Q:ab I:xy A:"
    with pytest.raises(ValueError, match="max_len=9"):
        darl.encode_pair(tok, "a", "b", template=template, max_len=9)


@pytest.mark.parametrize("template,msg", [
    ("{query} {item} Grade: ", "whitespace"), ("{query} Grade:", "slot"),
    ("{query}{query}{item}:", "slot"), ("{query} {item}", "follow"),
])
def test_bad_template_is_rejected(template, msg):
    with pytest.raises(ValueError, match=msg):
        darl.encode_pair(CharTokenizer(), "q", "i", template=template)


def test_grade_token_ids_checks_single_tokens():
    tok = CharTokenizer()
    assert darl.grade_token_ids(tok, ["0", "1", "2"]) == [ord("0") + 10, ord("1") + 10, ord("2") + 10]
    with pytest.raises(ValueError, match="'high'"):
        darl.grade_token_ids(tok, ["0", "high"])
    with pytest.raises(ValueError, match="repeated"):
        darl.grade_token_ids(tok, ["a", "a"])


def test_collate_right_pads_to_multiple():
    ex = [([5, 6, 7], [0, 1, 0]), ([5] * 33, [1] * 33)]
    b = darl.collate(ex, pad_id=0, multiple=32)
    assert b["input_ids"].shape == (2, 64)
    assert b["attention_mask"].sum(1).tolist() == [3, 33]
    assert b["input_ids"][0, :4].tolist() == [5, 6, 7, 0] and b["content_mask"][0, :4].tolist() == [0, 1, 0, 0]
    assert darl.collate(ex[:1], pad_id=9, multiple=8)["input_ids"].tolist() == [[5, 6, 7, 9, 9, 9, 9, 9]]


# ---------------------------------------------------------------- losses

def test_darl_loss_without_extras_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(64, 3, generator=g) * 3, torch.randint(0, 3, (64,), generator=g)
    assert darl.darl_loss(logits, labels, 0.0, 0.0).item() == F.cross_entropy(logits, labels).item()
    assert darl.darl_loss(logits, labels).item() > F.cross_entropy(logits, labels).item()


def test_ordinal_term_charges_far_errors_more():
    confident = {c: torch.full((1, 3), -8.0).index_fill_(1, torch.tensor([c]), 8.0) for c in range(3)}
    label2 = torch.tensor([2])

    def ordinal(pred):
        return (darl.darl_loss(confident[pred], label2, 1.0, 0.0) - F.cross_entropy(confident[pred], label2)).item()
    assert ordinal(0) > 1.9 * ordinal(1) and ordinal(1) > 0.4
    assert ordinal(2) < 1e-6
    # cross-entropy alone cannot tell the two errors apart
    assert abs(F.cross_entropy(confident[0], label2) - F.cross_entropy(confident[1], label2)) < 1e-5


def test_confidence_penalty_is_zero_at_uniform_and_grows_with_confidence():
    label = torch.tensor([1])

    def penalty(logits):
        return (darl.darl_loss(logits, label, 0.0, 1.0) - F.cross_entropy(logits, label)).item()
    assert abs(penalty(torch.zeros(1, 3))) < 1e-6
    assert 0 < penalty(torch.tensor([[0.0, 1.0, 0.0]])) < penalty(torch.tensor([[0.0, 5.0, 0.0]]))


def test_darl_loss_gradients_are_finite():
    logits = torch.tensor([[30.0, -30.0, 0.0], [0.0, 0.0, 0.0], [-1e3, 1e3, 5.0]], requires_grad=True)
    loss = darl.darl_loss(logits, torch.tensor([2, 0, 1]), 1.0, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ---------------------------------------------------------------- metrics

def _synthetic(n=20000, C=3, seed=0, sharpen=1.0):
    """Probabilities from a Dirichlet, labels drawn from them (calibrated), then optionally sharpened."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(C), size=n)
    labels = np.array([rng.choice(C, p=p) for p in probs])
    shown = probs ** sharpen
    return shown / shown.sum(1, keepdims=True), labels


def test_ece_small_when_calibrated_large_when_overconfident():
    probs, labels = _synthetic()
    assert darl.relevance_metrics(probs, labels)["ece"] < 0.02
    sharp, labels = _synthetic(sharpen=5.0)
    assert darl.relevance_metrics(sharp, labels)["ece"] > 0.15


def test_metrics_match_sklearn():
    probs, labels = _synthetic(n=3000, seed=1)
    m = darl.relevance_metrics(torch.tensor(probs), torch.tensor(labels))
    pred = probs.argmax(1)
    assert m["n"] == 3000
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, pred, average="macro"))
    p, r, f, s = skm.precision_recall_fscore_support(labels, pred, labels=[0, 1, 2], zero_division=0)
    for c in range(3):
        assert m["per_grade"][c] == pytest.approx(dict(precision=p[c], recall=r[c], f1=f[c], support=s[c]))
    assert m["confusion"] == skm.confusion_matrix(labels, pred, labels=[0, 1, 2]).tolist()
    score = probs[:, 1] * 0.5 + probs[:, 2]
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(labels > 0, score))
    assert 0 <= darl.expected_grade(torch.tensor(probs)).min() and darl.expected_grade(torch.tensor(probs)).max() <= 1


def test_macro_f1_with_a_grade_never_predicted_matches_sklearn():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 1, 0, 1]]  # grade 2 never predicted
    m = darl.relevance_metrics(probs, labels)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, probs.argmax(1), average="macro", zero_division=0))
    assert m["per_grade"][2]["precision"] == 0.0


def test_ndcg_matches_sklearn_per_query_mean():
    rng = np.random.default_rng(2)
    queries = [f"q{i}" for i in rng.integers(0, 40, size=600)] + ["single"]
    probs = rng.dirichlet(np.ones(3), size=len(queries))
    labels = rng.integers(0, 3, size=len(queries))
    labels[[i for i, q in enumerate(queries) if q == "q0"]] = 0  # a query with nothing relevant is skipped
    m = darl.relevance_metrics(probs, labels, queries)
    score = probs @ np.array([0.0, 0.5, 1.0])
    ref = []
    for q in sorted(set(queries)):
        idx = [i for i, x in enumerate(queries) if x == q]
        if len(idx) >= 2 and labels[idx].max() > 0:
            ref.append(skm.ndcg_score([2.0 ** labels[idx] - 1], [score[idx]], k=10))
    assert m["ndcg_queries"] == len(ref) and 30 <= len(ref) < 40
    assert m["ndcg@10"] == pytest.approx(np.mean(ref))
    assert "ndcg@10" not in darl.relevance_metrics(probs[:3], labels[:3], ["a", "b", "c"])


# ---------------------------------------------------------------- model-backed: tiny random Gemma 3

def _right_padded_batch():
    g = torch.Generator().manual_seed(1)
    ex = [(torch.randint(3, 320, (n,), generator=g).tolist(), [0] * n) for n in (9, 21, 14)]
    return darl.collate(ex, pad_id=0, multiple=8)


def test_grade_logits_and_sft_loss_match_transformers_full_logits(tmp_path, monkeypatch):
    hf, model = small_hf_gemma(tmp_path)
    b = _right_padded_batch()
    grade_ids = torch.tensor([17, 5, 300])
    with torch.no_grad():
        full = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    last = b["attention_mask"].sum(1) - 1
    ref = full[torch.arange(3), last]
    answers = torch.tensor([4, 200, 17])
    sft = darl.sft_loss(model, b["input_ids"], b["attention_mask"], answers)
    assert sft.item() == pytest.approx(F.cross_entropy(ref, answers).item(), abs=1e-5)

    real_logits = model.logits

    def no_full_vocab(hidden, token_ids=None):
        assert token_ids is not None, "grade_logits built full-vocabulary logits"
        return real_logits(hidden, token_ids)
    monkeypatch.setattr(model, "logits", no_full_vocab)
    got = darl.grade_logits(model, b["input_ids"], b["attention_mask"], grade_ids)
    assert got.shape == (3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref[:, grade_ids], atol=1e-5, rtol=1e-5)
    loss = darl.darl_loss(got, torch.tensor([0, 2, 1]))  # the loss backpropagates into the model
    loss.backward()
    assert model.embed_tokens.weight.grad is not None and torch.isfinite(model.embed_tokens.weight.grad).all()


# ---------------------------------------------------------------- real Gemma 3 270M and QBQTC rows

WEIGHTS, BENCH = ROOT / "data" / "gemma3_270m", ROOT / "data" / "qbqtc2kuake"


def test_real_gemma_grade_logits_and_truncated_qbqtc_prompt():
    for d, script in ((WEIGHTS, "data/gemma3_270m/prepare.py"), (BENCH, "data/qbqtc2kuake/prepare.py")):
        if not (d / ("config.json" if d == WEIGHTS else "meta.json")).exists():
            pytest.fail(f"{d} is not prepared: run `python {script}` first (this test needs the real files)")
    import model
    torch.manual_seed(0)
    tok, m = model.Tokenizer(WEIGHTS), model.Transformer.from_pretrained(WEIGHTS)
    grade_ids = torch.tensor(darl.grade_token_ids(tok, ["0", "1", "2"]))
    assert len(set(grade_ids.tolist())) == 3
    template = json.loads((BENCH / "meta.json").read_text(encoding="utf-8"))["prompt"]
    tail = template.rsplit("}", 1)[1]
    rows = [json.loads(line) for line in (BENCH / "id_test.jsonl").read_text(encoding="utf-8").splitlines()[:200]]
    rows = sorted(rows, key=lambda r: -len(r["item"]))[:2] + rows[:2]  # the two longest items and two others
    max_len = 56
    examples = []
    for r in rows:
        for t in (template, darl.DEFAULT_PROMPT):
            full, _ = darl.encode_pair(tok, r["query"], r["item"], t, max_len=1024)
            ids, content = darl.encode_pair(tok, r["query"], r["item"], t, max_len=max_len)
            assert len(ids) == min(len(full), max_len) and ids[0] == tok.bos_id
            t_tail = t.rsplit("}", 1)[1]
            assert ids[-len(tok.encode(t_tail)):] == tok.encode(t_tail), "answer position cut"
            assert tok.decode(ids).endswith(t_tail) and content[-1] == 0
            if t == template:
                examples.append((ids, content))
    assert tok.decode(examples[0][0]).endswith(tail) and len(examples[0][0]) == max_len  # really truncated
    b = darl.collate(examples, tok.pad_id)
    with torch.no_grad():
        got = darl.grade_logits(m, b["input_ids"], b["attention_mask"], grade_ids)
        h = m(b["input_ids"], b["attention_mask"])
        full_logits = m.logits(h[torch.arange(len(examples)), b["attention_mask"].sum(1) - 1])
    assert full_logits.shape[1] == m.args.vocab_size
    torch.testing.assert_close(got, full_logits[:, grade_ids].float(), atol=1e-4, rtol=0)


def test_darl_loss_class_weight_is_a_weighted_mean_of_row_losses():
    torch.manual_seed(0)
    logits, labels = torch.randn(12, 3), torch.randint(0, 3, (12,))
    w = torch.tensor([2.0, 0.5, 3.0])
    rows = torch.stack([darl.darl_loss(logits[i:i + 1], labels[i:i + 1]) for i in range(12)])
    assert torch.allclose(darl.darl_loss(logits, labels, class_weight=w), (rows * w[labels]).mean(), atol=1e-6)
    assert torch.allclose(darl.darl_loss(logits, labels, class_weight=torch.ones(3)), darl.darl_loss(logits, labels))
    ce = F.cross_entropy(logits, labels, reduction="none")
    got = darl.darl_loss(logits, labels, ordinal_weight=0, calibration_weight=0, class_weight=w)
    assert torch.allclose(got, (ce * w[labels]).mean(), atol=1e-6)
