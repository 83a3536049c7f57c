"""darl.py: prompt encoding and truncation, grade tokens, grade_logits / GradeHead, losses, metrics, paired_bootstrap.

Every test names the bug it catches. References are independent of darl.py: hand loops in float64,
sklearn, transformers (each row alone, without padding), brute-force enumeration of bootstrap resamples.
"""
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import darl  # noqa: E402
from conftest import small_hf_gemma  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
WEIGHTS, SMOL, BENCH = ROOT / "data" / "gemma3_270m", ROOT / "data" / "smollm2_135m", ROOT / "data" / "qbqtc2kuake"


def need(path, script):
    if not Path(path).exists():
        pytest.fail(f"{path} is missing: run `python {script}` first (this test needs the real files)", pytrace=False)


class CharTokenizer:
    """One token per character (id = code point + 10), bos = 1 and prepended: lengths are easy to reason about."""
    bos_id, eos_id, pad_id, add_bos = 1, 2, 0, True

    def encode(self, text, bos=False, start=True):
        return [self.bos_id] * bos + [ord(c) + 10 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 10) for i in ids if i > 2)


# ---------------------------------------------------------------- prompt, truncation, collate

def test_encode_pair_content_mask_marks_exactly_query_and_item():
    """Catches a content mask shifted by the bos or a template piece, and the wrong slot order when the item
    comes first."""
    tok = CharTokenizer()
    ids, content = darl.encode_pair(tok, "abc", "wxyz", template="Q:{query} I:{item} A:", max_len=64)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == "Q:abc I:wxyz A:"
    assert tok.decode([i for i, c in zip(ids, content) if c]) == "abcwxyz"
    assert len(ids) == len(content)
    ids, content = darl.encode_pair(tok, "abc", "wxyz", template="{item}|{query}=", max_len=64)
    assert tok.decode(ids) == "wxyz|abc=" and content == [0, 1, 1, 1, 1, 0, 1, 1, 1, 0]


def test_encode_pair_bos_follows_tokenizer_add_bos():
    """Catches prepending bos whatever the tokenizer does (SmolLM2 never prepends one; transformers would not)."""
    tok = CharTokenizer()
    tok.add_bos = False
    ids, content = darl.encode_pair(tok, "ab", "xy", template="Q:{query} I:{item} A:", max_len=64)
    assert tok.decode(ids) == "Q:ab I:xy A:" and ids[0] != tok.bos_id and len(content) == len(ids)


def test_truncation_cuts_item_then_query_never_the_answer_position():
    """Catches cutting the template tail (the answer position), cutting the query before the item, and an
    off-by-one in the budget (a prompt one token over or under max_len)."""
    tok = CharTokenizer()
    template = "Q:{query} I:{item} A:"  # 8 template chars + bos = 9 fixed tokens
    ids, content = darl.encode_pair(tok, "abc", "x" * 100, template=template, max_len=20)
    assert len(ids) == 20 and tok.decode(ids) == "Q:abc I:" + "x" * 8 + " A:"
    ids, content = darl.encode_pair(tok, "q" * 50, "x" * 50, template=template, max_len=20)
    assert len(ids) == 20 and tok.decode(ids) == "Q:" + "q" * 11 + " I: A:" and sum(content) == 11
    ids, _ = darl.encode_pair(tok, "ab", "xy", template=template, max_len=20)  # short pair untouched
    assert tok.decode(ids) == "Q:ab I:xy A:"
    with pytest.raises(ValueError, match="max_len=9"):
        darl.encode_pair(tok, "a", "b", template=template, max_len=9)


@pytest.mark.parametrize("template,msg", [
    ("{query} {item} Grade: ", "whitespace"), ("{query} Grade:", "slot"),
    ("{query}{query}{item}:", "slot"), ("{query} {item}", "follow"),
])
def test_bad_template_is_rejected(template, msg):
    """Catches accepting a template whose answer cue is missing or ends in a space (the grade would be two tokens)."""
    with pytest.raises(ValueError, match=msg):
        darl.encode_pair(CharTokenizer(), "q", "i", template=template)


def test_grade_token_ids_refuses_multi_token_and_repeated_words():
    """Catches silently taking the first token of a multi-token grade word, and two grades sharing a token."""
    with pytest.raises(ValueError, match="'high'"):
        darl.grade_token_ids(CharTokenizer(), ["0", "high"])
    with pytest.raises(ValueError, match="repeated"):
        darl.grade_token_ids(CharTokenizer(), ["a", "a"])


@pytest.fixture(scope="module")
def llama2_style_tokenizer(tmp_path_factory):
    """A Llama 2-style SentencePiece (add_dummy_prefix, split digits) trained here in under a second."""
    import sentencepiece
    out = tmp_path_factory.mktemp("llama2_style")
    need(BENCH / "id_train.jsonl", "data/qbqtc2kuake/prepare.py")
    rows = [json.loads(line) for line in (BENCH / "id_train.jsonl").read_text(encoding="utf-8").splitlines()[:400]]
    lines = [t for r in rows for t in (r["query"], r["item"])] + darl.DEFAULT_PROMPT.split("\n") * 20
    (out / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(out / "corpus.txt"), model_prefix=str(out / "tokenizer"), vocab_size=2000, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, minloglevel=2)
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        add_bos_token=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>", legacy=False,
        tokenizer_class="LlamaTokenizer")))
    return out


@pytest.mark.parametrize("which", ["gemma", "smollm2", "llama2_style"])
def test_prompt_and_grade_tokens_are_what_transformers_feeds_the_model(request, which):
    """encode_pair(query, item) + [grade id] == AutoTokenizer(prompt + grade word) on real rows, for both prompts.
    Catches grade ids taken with a dummy prefix ('▁2' or '▁','2' under Llama 2-style SentencePiece, while the
    model sees '2' right after 'Grade:'), a bos the tokenizer would not add (SmolLM2), and prompt pieces
    tokenized differently from the whole string."""
    from transformers import AutoTokenizer

    import tokenizer
    if which == "llama2_style":
        path = request.getfixturevalue("llama2_style_tokenizer")
    else:
        path = WEIGHTS if which == "gemma" else SMOL
        need(path / "config.json", f"data/{path.name}/prepare.py")
    need(BENCH / "meta.json", "data/qbqtc2kuake/prepare.py")
    tok, hf = tokenizer.Tokenizer(path), AutoTokenizer.from_pretrained(path)
    words = ["0", "1", "2"]
    grade_ids = darl.grade_token_ids(tok, words)
    rows = [json.loads(line) for line in (BENCH / "id_test.jsonl").read_text(encoding="utf-8").splitlines()[:20]]
    templates = [darl.DEFAULT_PROMPT, json.loads((BENCH / "meta.json").read_text(encoding="utf-8"))["prompt"]]
    for template in templates:
        for r, word in zip(rows, itertools.cycle(range(3))):
            ids, _ = darl.encode_pair(tok, r["query"], r["item"], template, max_len=4096)
            whole = template.format(query=r["query"], item=r["item"])
            full = hf(whole)["input_ids"]
            assert ids == full, (which, whole)
            assert hf(whole + words[word])["input_ids"] == full + [grade_ids[word]], (which, whole)


def test_collate_right_pads_to_multiple():
    """Catches left padding, a length not rounded up to the multiple, and content/attention masks that disagree."""
    ex = [([5, 6, 7], [0, 1, 0]), ([5] * 33, [1] * 33)]
    b = darl.collate(ex, pad_id=0, multiple=32)
    assert b["input_ids"].shape == (2, 64)
    assert b["attention_mask"].sum(1).tolist() == [3, 33] and b["attention_mask"][0, :3].tolist() == [1, 1, 1]
    assert b["input_ids"][0, :4].tolist() == [5, 6, 7, 0] and b["content_mask"][0, :4].tolist() == [0, 1, 0, 0]
    assert darl.collate(ex[:1], pad_id=9, multiple=8)["input_ids"].tolist() == [[5, 6, 7, 9, 9, 9, 9, 9]]


# ---------------------------------------------------------------- losses vs a float64 hand loop

def _hand_darl(logits, labels, ordinal_weight, calibration_weight, class_weight=None):
    """darl_loss's documented formula, one row at a time in float64 with math only."""
    total = []
    for z, t in zip(logits.double().tolist(), labels.tolist()):
        C, m = len(z), max(z)
        lse = m + math.log(sum(math.exp(v - m) for v in z))
        p = [math.exp(v - lse) for v in z]
        ce = lse - z[t]
        rps = sum((sum(p[:c + 1]) - (1.0 if t <= c else 0.0)) ** 2 for c in range(C - 1)) / (C - 1)
        kl = math.log(C) + sum(pi * math.log(pi) for pi in p if pi > 0)  # log C - H(p)
        row = ce + ordinal_weight * rps + calibration_weight * kl
        total.append(row * (1.0 if class_weight is None else float(class_weight[t])))
    return sum(total) / len(total)


def _hand_grad(logits, labels, ordinal_weight, calibration_weight, class_weight=None):
    """Analytic d loss / d logits in float64: CE (p - onehot); RPS 2/(C-1) sum_c (F_c - T_c) p_j ([j<=c] - F_c);
    KL(p || uniform) p_j (log p_j + H(p)); each row times its class weight, over N."""
    z = logits.double().numpy()
    N, C = z.shape
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = np.zeros_like(z)
    for i, t in enumerate(labels.tolist()):
        onehot = np.eye(C)[t]
        F_ = np.cumsum(p[i])[:-1]
        T = (t <= np.arange(C - 1)).astype(float)
        rps = np.array([2 / (C - 1) * sum((F_[c] - T[c]) * p[i, j] * ((j <= c) - F_[c]) for c in range(C - 1))
                        for j in range(C)])
        H = -(p[i] * np.log(p[i])).sum()
        kl = p[i] * (np.log(p[i]) + H)
        w = 1.0 if class_weight is None else float(class_weight[t])
        g[i] = w * ((p[i] - onehot) + ordinal_weight * rps + calibration_weight * kl) / N
    return g


def _random_logits(n, C, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, generator=g) * scale, torch.randint(0, C, (n,), generator=g)


def test_darl_loss_without_extras_is_cross_entropy():
    """Both weights 0 = the mean of -log softmax(z)[t], by hand in float64. Catches a CE over the wrong axis,
    a sum instead of a mean, and softmax temperature or label smoothing slipped in."""
    logits, labels = _random_logits(64, 3, 0)
    got = darl.darl_loss(logits, labels, 0.0, 0.0).item()
    assert got == pytest.approx(_hand_darl(logits, labels, 0.0, 0.0), rel=1e-6)


@pytest.mark.parametrize("C", [3, 5])
def test_ordinal_term_is_the_ranked_probability_score(C):
    """The ordinal term alone equals sum_{c<C-1} (P(y<=c) - 1[t<=c])^2 / (C-1) by hand on random rows (C = 3 and 5).
    Catches a flipped target (1[t>=c]), the CDF taken from the wrong end (cumsum[1:]), normalisation by C
    instead of C-1, and a missing square."""
    logits, labels = _random_logits(40, C, C)
    ce = _hand_darl(logits, labels, 0.0, 0.0)
    for w in (1.0, 0.5):
        got = darl.darl_loss(logits, labels, ordinal_weight=w, calibration_weight=0.0).item()
        assert got - ce == pytest.approx(_hand_darl(logits, labels, w, 0.0) - ce, rel=1e-5)
    # the point of the term: a confident '0' for a true '2' costs twice a confident '1' (CE cannot tell them apart)
    confident = {c: torch.full((1, 3), -30.0).index_fill_(1, torch.tensor([c]), 30.0) for c in range(3)}
    ordinal = {c: darl.darl_loss(confident[c], torch.tensor([2]), 1.0, 0.0).item()
               - darl.darl_loss(confident[c], torch.tensor([2]), 0.0, 0.0).item() for c in range(3)}
    assert ordinal[0] == pytest.approx(1.0, abs=1e-5) and ordinal[1] == pytest.approx(0.5, abs=1e-5)
    assert abs(ordinal[2]) < 1e-6


def test_confidence_penalty_is_log_c_minus_entropy_with_its_gradient():
    """The calibration term alone equals log C - H(p) (KL to uniform) on random rows, and its gradient is
    p_j (log p_j + H(p)). Catches a stub with the right zero and monotonicity (max p - 1/C, or +H instead of
    -H, which rewards confidence), a missing log C (negative loss), and a detached term (value right, no gradient)."""
    logits, labels = _random_logits(50, 4, 1)
    ce = _hand_darl(logits, labels, 0.0, 0.0)
    got = darl.darl_loss(logits, labels, ordinal_weight=0.0, calibration_weight=1.0).item()
    assert got - ce == pytest.approx(_hand_darl(logits, labels, 0.0, 1.0) - ce, rel=1e-5)
    uniform = darl.darl_loss(torch.zeros(2, 3), torch.tensor([0, 1]), 0.0, 1.0).item()
    assert uniform == pytest.approx(math.log(3), abs=1e-6)  # CE log 3, penalty 0
    z = logits.clone().requires_grad_(True)
    darl.darl_loss(z, labels, ordinal_weight=0.0, calibration_weight=0.3).backward()
    np.testing.assert_allclose(z.grad.numpy(), _hand_grad(logits, labels, 0.0, 0.3), atol=1e-6)


def test_darl_loss_value_and_gradient_with_every_term_and_class_weights():
    """All three terms and class weights at once, value and gradient vs the float64 hand formulas. Catches a
    class weight applied to one term only, normalised by the sum of weights (F.cross_entropy's weight=),
    indexed by row instead of by label, and any term whose value is right but gradient is cut."""
    logits, labels = _random_logits(30, 3, 2)
    w = torch.tensor([2.0, 0.5, 3.0])
    z = logits.clone().requires_grad_(True)
    loss = darl.darl_loss(z, labels, ordinal_weight=0.7, calibration_weight=0.2, class_weight=w)
    assert loss.item() == pytest.approx(_hand_darl(logits, labels, 0.7, 0.2, w), rel=1e-5)
    loss.backward()
    np.testing.assert_allclose(z.grad.numpy(), _hand_grad(logits, labels, 0.7, 0.2, w), atol=1e-6)
    default = darl.darl_loss(logits, labels).item()  # documented defaults 1.0 and 0.1
    assert default == pytest.approx(_hand_darl(logits, labels, 1.0, 0.1), rel=1e-5)


def test_darl_loss_gradients_are_finite():
    """Catches log(0) = -inf in the entropy or the CE at saturated logits (NaN gradients stop training)."""
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


def _hand_ece(p, y, bins):
    """sum_b |B|/n |acc_b - conf_b| with bins (b/bins, (b+1)/bins], a row at a time (1.0 in the last bin)."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        rows = [i for i in range(len(y)) if lo < p[i].max() <= hi]
        if rows:
            acc = np.mean([p[i].argmax() == y[i] for i in rows])
            conf = np.mean([p[i].max() for i in rows])
            total += len(rows) / len(y) * abs(acc - conf)
    return total


def test_ece_matches_a_hand_loop_and_bins_are_lo_exclusive_hi_inclusive():
    """ECE vs a per-bin hand loop (15 bins) on random rows; then with 4 bins on confidences exactly on the
    edges 0.5, 0.75 and 1.0, which belong to the bin below ((lo, hi]). Catches [lo, hi) binning (floor), |sum of
    gaps| instead of sum of |gaps|, and a mean over bins instead of the |B|/n weighting."""
    probs, labels = _synthetic(n=2000, seed=3, sharpen=2.0)
    assert darl.METRICS["ece"](probs, labels) == pytest.approx(_hand_ece(probs, labels, 15), abs=1e-12)
    assert darl.relevance_metrics(probs, labels)["ece"] == pytest.approx(_hand_ece(probs, labels, 15), abs=1e-12)
    edge = np.array([[0.5, 0.25, 0.25], [0.75, 0.25, 0.0], [1.0, 0.0, 0.0], [0.25, 0.5, 0.25], [0.6, 0.2, 0.2]])
    y = np.array([0, 1, 0, 1, 2])
    # (0.25, 0.5]: rows 0 (right) and 3 (right), conf 0.5 -> gap 0.5 x 2/5; (0.5, 0.75]: rows 1 (wrong), 4
    # (wrong), conf 0.675 -> 0.675 x 2/5; (0.75, 1]: row 2 right at conf 1 -> 0
    assert darl._ece(edge, y, bins=4) == pytest.approx(0.4 * 0.5 + 0.4 * 0.675, abs=1e-12)
    assert darl._ece(edge, y, bins=4) == pytest.approx(_hand_ece(edge, y, 4), abs=1e-12)


def test_ece_small_when_calibrated_large_when_overconfident():
    """Catches an ECE on the wrong probability (e.g. of the true grade rather than the predicted one)."""
    probs, labels = _synthetic()
    assert darl.relevance_metrics(probs, labels)["ece"] < 0.02
    sharp, labels = _synthetic(sharpen=5.0)
    assert darl.relevance_metrics(sharp, labels)["ece"] > 0.15


@pytest.mark.parametrize("case", ["random", "grade_never_predicted", "grade_absent"])
def test_metrics_dict_matches_sklearn(case):
    """darl.METRICS (the bootstrap's statistics) and relevance_metrics vs sklearn accuracy and macro-F1.
    Catches a macro-F1 averaged over all C grades when one is absent from both labels and predictions (sklearn
    averages over the grades present), and a precision of a never-predicted grade that is NaN instead of 0."""
    probs, labels = _synthetic(n=500, seed=4)
    if case == "grade_never_predicted":
        probs = np.eye(3)[[0, 1, 1, 1, 1, 0, 1]] * 0.8 + 0.2 / 3
        labels = np.array([0, 0, 1, 1, 2, 2, 2])
    elif case == "grade_absent":  # grade 2 neither true nor predicted
        probs = np.eye(3)[[0, 1, 1, 0, 1, 0]] * 0.7 + 0.1
        labels = np.array([0, 0, 1, 1, 1, 0])
    pred = probs.argmax(1)
    acc, f1 = skm.accuracy_score(labels, pred), skm.f1_score(labels, pred, average="macro", zero_division=0)
    assert darl.METRICS["accuracy"](probs, labels) == pytest.approx(acc, abs=1e-12)
    assert darl.METRICS["macro_f1"](probs, labels) == pytest.approx(f1, abs=1e-12)
    m = darl.relevance_metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(acc, abs=1e-12) and m["macro_f1"] == pytest.approx(f1, abs=1e-12)


def test_relevance_metrics_match_sklearn():
    """Per-grade P/R/F1/support, confusion [true][pred] and the relevant-vs-irrelevant AUROC of the expected grade
    vs sklearn. Catches a transposed confusion matrix, support counted on predictions, and an AUROC on P(grade 2)."""
    probs, labels = _synthetic(n=3000, seed=1)
    m = darl.relevance_metrics(torch.tensor(probs), torch.tensor(labels))
    pred = probs.argmax(1)
    assert m["n"] == 3000
    p, r, f, s = skm.precision_recall_fscore_support(labels, pred, labels=[0, 1, 2], zero_division=0)
    for c in range(3):
        assert m["per_grade"][c] == pytest.approx(dict(precision=p[c], recall=r[c], f1=f[c], support=s[c]))
    assert m["confusion"] == skm.confusion_matrix(labels, pred, labels=[0, 1, 2]).tolist()
    score = probs[:, 1] * 0.5 + probs[:, 2]
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(labels > 0, score))
    np.testing.assert_allclose(darl.expected_grade(torch.tensor(probs)).numpy(), score, atol=1e-12)


def test_ndcg_matches_sklearn_per_query_mean():
    """Catches NDCG pooled over all rows instead of per query, linear gains instead of 2^label - 1, a cutoff other
    than 10, and counting queries with one row or nothing relevant (undefined NDCG)."""
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


# ---------------------------------------------------------------- paired_bootstrap vs enumeration of all resamples

def _bootstrap_draws(monkeypatch, **kw):
    """paired_bootstrap's result and its draws (caught on their way into np.quantile)."""
    seen, real = [], np.quantile

    def spy(a, q, *args, **kwargs):
        seen.append(np.array(a, dtype=np.float64))
        return real(a, q, *args, **kwargs)
    monkeypatch.setattr(np, "quantile", spy)
    out = darl.paired_bootstrap(**kw)
    monkeypatch.setattr(np, "quantile", real)
    assert len(seen) == 1 and len(seen[0]) == kw["n_boot"]
    return out, seen[0]


def _safe_level(values):
    """The interval level in 0.50..0.98 whose two quantile levels lie farthest from any step of the exact CDF."""
    cdf = np.cumsum(np.unique(np.round(values, 12), return_counts=True)[1]) / len(values)
    levels = np.arange(0.5, 0.981, 0.005)
    margin = [min(np.abs(cdf - (1 - v) / 2).min(), np.abs(cdf - (1 + v) / 2).min()) for v in levels]
    return float(levels[int(np.argmax(margin))])


def _check_against_exact(draws, out, values, level):
    """Every draw is a possible resample value, the draws follow the exact distribution (KS), and lo/hi are the
    exact distribution's quantiles (the case is checked to be far from a CDF step, so sampling cannot move them)."""
    values = np.asarray(values)
    atoms, counts = np.unique(np.round(values, 12), return_counts=True)
    assert np.isin(np.round(draws, 12), atoms).all(), "a draw that no paired resample can produce"
    cdf = np.cumsum(counts) / counts.sum()
    emp = np.searchsorted(np.sort(np.round(draws, 12)), atoms, side="right") / len(draws)
    assert np.abs(emp - cdf).max() < 0.03, np.abs(emp - cdf).max()
    for q, got in (((1 - level) / 2, out["lo"]), ((1 + level) / 2, out["hi"])):
        assert np.abs(cdf - q).min() > 0.012, "test case: a CDF step too close to the quantile level"
        assert got == pytest.approx(atoms[np.searchsorted(cdf, q)], abs=1e-9)


def test_paired_bootstrap_one_seed_equals_enumeration_of_all_row_resamples(monkeypatch):
    """N = 4 rows, one seed: the 4^4 equally likely row resamples, each scored with sklearn's macro-F1 on a and b
    paired (the same rows), give the exact bootstrap distribution. Catches an unpaired bootstrap (b resampled
    separately, or not at all), quantiles at the wrong levels, and a delta not on all rows."""
    y = np.array([0, 1, 2, 1])
    a = [np.eye(3)[[0, 1, 2, 2]] * 0.7 + 0.1]
    b = [np.eye(3)[[0, 0, 2, 1]] * 0.7 + 0.1]
    f1 = lambda p, rows: skm.f1_score(y[rows], p.argmax(1)[rows], average="macro", zero_division=0)  # noqa: E731
    values = [f1(a[0], list(r)) - f1(b[0], list(r)) for r in itertools.product(range(4), repeat=4)]
    level = _safe_level(values)
    out, draws = _bootstrap_draws(monkeypatch, a=a, b=b, labels=y, metric="macro_f1", n_boot=4000, seed=0, level=level)
    assert out["delta"] == pytest.approx(f1(a[0], [0, 1, 2, 3]) - f1(b[0], [0, 1, 2, 3]), abs=1e-12)
    assert out["n_boot"] == 4000
    _check_against_exact(draws, out, values, level)


def test_paired_bootstrap_two_seeds_equals_enumeration_of_rows_and_seeds(monkeypatch):
    """Two seeds, N = 4 rows: the 4^4 row resamples x 2^2 seed resamples (1,024 equally likely outcomes), each the
    mean over the drawn seeds of acc(a_s) - acc(b_s) on the drawn rows. Catches seeds paired wrongly (a_0 with
    b_1: the delta is unchanged, the draws are not), seeds not resampled (only the test-set noise), and a
    separate row draw per seed."""
    y = np.array([0, 1, 2, 1])
    a = [np.eye(3)[[0, 1, 2, 2]] * 0.7 + 0.1, np.eye(3)[[0, 1, 1, 1]] * 0.7 + 0.1]
    b = [np.eye(3)[[0, 0, 2, 1]] * 0.7 + 0.1, np.eye(3)[[2, 2, 2, 0]] * 0.7 + 0.1]
    acc = lambda p, rows: float((p.argmax(1)[list(rows)] == y[list(rows)]).mean())  # noqa: E731
    values = [np.mean([acc(a[s], r) - acc(b[s], r) for s in seeds])
              for r in itertools.product(range(4), repeat=4) for seeds in itertools.product(range(2), repeat=2)]
    level = _safe_level(values)
    out, draws = _bootstrap_draws(monkeypatch, a=a, b=b, labels=y, metric="accuracy", n_boot=4000, seed=1, level=level)
    delta = np.mean([acc(a[s], range(4)) - acc(b[s], range(4)) for s in range(2)])
    assert out["delta"] == pytest.approx(delta, abs=1e-12)
    _check_against_exact(draws, out, values, level)


def test_paired_bootstrap_ndcg_resamples_queries(monkeypatch):
    """ndcg@10: the unit is the query. 4 queries of 3 rows: the 4^4 query resamples of the mean per-query NDCG
    (sklearn's, gains 2^label - 1) of a minus b. Catches resampling rows instead of queries and NDCG pooled over
    all rows; a missing `groups` is an error, not a silent row-level bootstrap."""
    rng = np.random.default_rng(7)
    groups = np.repeat(["qa", "qb", "qc", "qd"], 3)
    y = np.array([2, 0, 1, 1, 0, 2, 0, 1, 2, 2, 1, 0])
    a, b = [rng.dirichlet(np.ones(3), size=12)], [rng.dirichlet(np.ones(3), size=12)]
    per_query = [[skm.ndcg_score([2.0 ** y[groups == q] - 1], [p[0][groups == q] @ np.array([0, 0.5, 1])], k=10)
                  for q in ("qa", "qb", "qc", "qd")] for p in (a, b)]
    values = [np.mean([per_query[0][i] for i in r]) - np.mean([per_query[1][i] for i in r])
              for r in itertools.product(range(4), repeat=4)]
    level = _safe_level(values)
    out, draws = _bootstrap_draws(monkeypatch, a=a, b=b, labels=y, metric="ndcg@10", groups=list(groups), n_boot=4000,
                                  seed=2, level=level)
    assert out["delta"] == pytest.approx(np.mean(per_query[0]) - np.mean(per_query[1]), abs=1e-12)
    _check_against_exact(draws, out, values, level)
    with pytest.raises(ValueError, match="groups"):
        darl.paired_bootstrap(a, b, y, metric="ndcg@10")


def test_paired_bootstrap_ndcg_leaves_out_queries_without_an_ndcg():
    """Queries with one row or no relevant row have no NDCG: they must not be resampling units (a draw of
    only such queries made the interval NaN). With them added, the interval equals the one without them
    in distribution: same point estimate, finite bounds inside the range of the defined queries' deltas."""
    rng = np.random.default_rng(3)
    groups = np.repeat(["qa", "qb", "qc", "qd", "qe"], [3, 3, 1, 3, 2])
    y = np.array([2, 0, 1, 1, 0, 2, 1, 2, 1, 0, 0, 0])  # qc: one row; qe: nothing relevant
    a, b = [rng.dirichlet(np.ones(3), size=12)], [rng.dirichlet(np.ones(3), size=12)]
    out = darl.paired_bootstrap(a, b, y, metric="ndcg@10", groups=list(groups), n_boot=500)
    keep = ~np.isin(groups, ["qc", "qe"])
    ref = darl.paired_bootstrap([a[0][keep]], [b[0][keep]], y[keep], metric="ndcg@10", groups=list(groups[keep]), n_boot=500)
    assert np.isfinite([out["lo"], out["hi"]]).all() and out == ref


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy", "ece", "ndcg@10"])
def test_paired_bootstrap_of_a_system_against_itself_is_zero(metric):
    """a == b: every paired resample gives exactly 0. Catches any unpairing (rows or seeds drawn apart for b)."""
    probs, labels = _synthetic(n=60, seed=5)
    a = [probs, probs[::-1].copy()]
    groups = [f"q{i % 9}" for i in range(60)]
    out = darl.paired_bootstrap(a, [p.copy() for p in a], labels, metric=metric, groups=groups,
                                n_boot=200, seed=3)
    assert out["delta"] == 0.0 and out["lo"] == 0.0 and out["hi"] == 0.0


# ---------------------------------------------------------------- model-backed: tiny random checkpoints

def _right_padded_batch(vocab=320):
    g = torch.Generator().manual_seed(1)
    ex = [(torch.randint(3, vocab, (n,), generator=g).tolist(), [0] * n) for n in (9, 21, 14)]
    return darl.collate(ex, pad_id=0, multiple=8), [ids for ids, _ in ex]


def _hf_last_token_logits(hf, rows):
    """transformers' logits at the last token of each row, run one row at a time with no padding at all."""
    with torch.no_grad():
        return torch.stack([hf(input_ids=torch.tensor([ids])).logits[0, -1] for ids in rows]).double()


def _tiny(path, kind):
    """(transformers model, ours) of a tiny random checkpoint: 'gemma' (tied, no softcap), 'gemma_softcap'
    (final logit soft-capping 0.2, which bites on these logits), 'llama' (untied lm_head)."""
    import transformers

    import model
    if kind == "gemma":
        return small_hf_gemma(path)
    torch.manual_seed(0)
    if kind == "gemma_softcap":
        cfg = transformers.Gemma3TextConfig(
            vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16, final_logit_softcapping=0.2)
        hf = transformers.Gemma3ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(cfg)
    hf.eval().save_pretrained(path)
    return hf, model.Transformer.from_pretrained(path)


def test_grade_logits_match_transformers_at_each_rows_last_token(tmp_path, monkeypatch):
    """grade_logits on a right-padded batch == transformers' logits of the grade tokens at each row's last token,
    each row run alone without padding (so no index formula is shared with darl). Catches the answer position off
    by one (mask.sum() - 2, or the last padded column), positions that do not follow the mask, and building the
    (B, V) full-vocabulary logits."""
    hf, model = small_hf_gemma(tmp_path)
    b, rows = _right_padded_batch()
    grade_ids = torch.tensor([17, 5, 300])
    ref = _hf_last_token_logits(hf, rows)
    real_logits = model.logits

    def no_full_vocab(hidden, token_ids=None):
        assert token_ids is not None, "grade_logits built full-vocabulary logits"
        return real_logits(hidden, token_ids)
    monkeypatch.setattr(model, "logits", no_full_vocab)
    got = darl.grade_logits(model, b["input_ids"], b["attention_mask"], grade_ids)
    assert got.shape == (3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref[:, grade_ids], atol=1e-5, rtol=1e-5)
    loss = darl.darl_loss(got, torch.tensor([0, 2, 1]))  # the loss backpropagates into the model
    loss.backward()
    assert model.embed_tokens.weight.grad is not None and model.embed_tokens.weight.grad.abs().sum() > 0


def test_sft_loss_is_weighted_full_vocabulary_cross_entropy(tmp_path):
    """sft_loss == mean_i w_i (logsumexp(z_i) - z_i[answer_i]) over the full vocabulary at each row's last token
    (transformers, rows alone), and the plain mean without weights. Catches a weighted mean normalised by the sum
    of weights, weights ignored, the CE taken over the grade tokens only, and the answer position off by one."""
    hf, model = small_hf_gemma(tmp_path)
    b, rows = _right_padded_batch()
    ref = _hf_last_token_logits(hf, rows)
    answers, w = torch.tensor([4, 200, 17]), torch.tensor([0.5, 2.0, 3.0])
    ce = torch.logsumexp(ref, 1) - ref[torch.arange(3), answers]
    with torch.no_grad():
        got_w = darl.sft_loss(model, b["input_ids"], b["attention_mask"], answers, w).item()
        got = darl.sft_loss(model, b["input_ids"], b["attention_mask"], answers).item()
    assert got_w == pytest.approx((w.double() * ce).mean().item(), abs=1e-5)
    assert got == pytest.approx(ce.mean().item(), abs=1e-5)


def test_answer_hidden_refuses_left_padding(tmp_path):
    """A left-padded batch's last real token is the last column, not mask.sum() - 1: refused, not silently
    read at a padding position. Catches the check removed or testing the wrong direction (refusing right padding)."""
    _, model = small_hf_gemma(tmp_path)
    ids = torch.randint(3, 320, (2, 6))
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        darl.answer_hidden(model, ids, left)
    with pytest.raises(ValueError, match="right-padded"):
        darl.grade_logits(model, ids, left, torch.tensor([3, 4]))
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert darl.answer_hidden(model, ids, right).shape == (2, 64)


@pytest.mark.parametrize("kind", ["gemma", "gemma_softcap", "llama"])
def test_grade_head_at_init_is_exactly_the_headless_grade_logits(tmp_path, kind):
    """GradeHead.from_model before training gives bit for bit the head-less grade_logits (fp32), and both match
    transformers' soft-capped logits. Catches a head initialised from the input embeddings of an untied model
    (llama: lm_head differs), a head that drops the final soft-capping (gemma_softcap), the grade rows in the
    wrong order, and a random init (LP-FT would start from a different model)."""
    hf, model = _tiny(tmp_path, kind)
    assert (model.args.final_logit_softcapping is not None) == (kind == "gemma_softcap")
    assert hasattr(model, "lm_head") == (kind == "llama")
    b, rows = _right_padded_batch()
    grade_ids = torch.tensor([300, 17, 5])
    head = darl.GradeHead.from_model(model, grade_ids)
    assert head.weight.dtype == torch.float32 and head.weight.shape == (3, 64) and head.weight.requires_grad
    with torch.no_grad():
        plain = darl.grade_logits(model, b["input_ids"], b["attention_mask"], grade_ids)
        headed = darl.grade_logits(model, b["input_ids"], b["attention_mask"], grade_ids, head)
    assert torch.equal(plain, headed)
    torch.testing.assert_close(headed.double(), _hf_last_token_logits(hf, rows)[:, grade_ids], atol=1e-5, rtol=1e-5)
    if kind == "gemma_softcap":  # the cap bites: uncapped logits go well past 0.2
        with torch.no_grad():
            h = darl.answer_hidden(model, b["input_ids"], b["attention_mask"])
        assert headed.abs().max() < 0.2 < (h @ model.embed_tokens.weight[grade_ids].T).abs().max() - 0.1


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_grade_head_save_load_round_trip(tmp_path, softcap):
    """A trained head saved and loaded back gives the same weights, soft-cap and logits; a dir without a head
    loads as None. Catches the soft-cap lost on save (a JSON null vs a number), the weight saved before its
    update (a stale copy), and a crash on adapters trained without a head."""
    g = torch.Generator().manual_seed(0)
    head = darl.GradeHead(torch.randn(3, 16, generator=g).to(torch.bfloat16), softcap=softcap)
    with torch.no_grad():
        head.weight.add_(torch.randn(3, 16, generator=g))  # "trained"
    head.save(str(tmp_path))
    back = darl.GradeHead.load(str(tmp_path))
    assert back.softcap == softcap and back.weight.dtype == torch.float32
    assert torch.equal(back.weight, head.weight)
    h = torch.randn(5, 16, generator=g) * 3
    assert torch.equal(back(h), head(h))
    ref = h.double() @ head.weight.detach().double().T
    ref = ref if softcap is None else torch.tanh(ref / softcap) * softcap
    torch.testing.assert_close(back(h).double(), ref, atol=1e-5, rtol=1e-5)
    assert darl.GradeHead.load(str(tmp_path / "nothing_here")) is None


# ---------------------------------------------------------------- real Gemma 3 270M and QBQTC rows

def test_real_gemma_grade_logits_and_truncated_qbqtc_prompt():
    """On the real model and benchmark prompt: truncation keeps the answer cue, and grade_logits on a padded
    batch equals the model run on each row alone (no padding), read at its last token. Catches truncation
    that cuts the cue, and any padding-dependent answer position or attention on real lengths."""
    need(WEIGHTS / "config.json", "data/gemma3_270m/prepare.py")
    need(BENCH / "meta.json", "data/qbqtc2kuake/prepare.py")
    import model
    import tokenizer
    torch.manual_seed(0)
    tok, m = tokenizer.Tokenizer(WEIGHTS), model.Transformer.from_pretrained(WEIGHTS)
    grade_ids = torch.tensor(darl.grade_token_ids(tok, ["0", "1", "2"]))
    template = json.loads((BENCH / "meta.json").read_text(encoding="utf-8"))["prompt"]
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
            assert ids[-len(tok.encode(t_tail, start=False)):] == tok.encode(t_tail, start=False), "answer position cut"
            assert tok.decode(ids).endswith(t_tail) and content[-1] == 0
            if t == template:
                examples.append((ids, content))
    assert len(examples[0][0]) == max_len and len({len(ids) for ids, _ in examples}) > 1  # truncated, unequal lengths
    b = darl.collate(examples, tok.pad_id)
    with torch.no_grad():
        got = darl.grade_logits(m, b["input_ids"], b["attention_mask"], grade_ids)
        alone = torch.stack([m.logits(m(torch.tensor([ids]))[0, -1], grade_ids) for ids, _ in examples]).float()
    torch.testing.assert_close(got, alone, atol=2e-4, rtol=0)
