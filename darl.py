"""DaRL relevance judging: prompt -> grade logits at the answer position -> loss and metrics.

Path: (query, item) -> `encode_pair` -> `collate` -> `grade_logits` (hidden state at the last real
token times the C grade rows of the output head) -> `darl_loss` / `expected_grade` / `relevance_metrics`.
DaRL: Liu et al., "Boosting LLM-based Relevance Modeling with Distribution-Aware Robust Learning",
CIKM 2024 (arXiv 2412.12504).
The paper's abstract names a loss that sharpens fine-grained grades but not its formula; `darl_loss`
is our choice and documents it. Runtime needs torch, numpy and safetensors (the grade head file).
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# English default; a benchmark's meta.json may carry its own (our Chinese one does). It ends exactly
# at the answer position: the grade token follows "Grade:" directly. No trailing space, because with
# SentencePiece (Gemma) " 2" is two tokens ("▁", "2"), so the grade would no longer be one token.
# Slots start a line rather than follow "Query: ": the space would become a token of its own when
# the template is tokenized in pieces (encode_pair); with newlines the pieces tokenize exactly as
# the whole string does (checked with Gemma 3 on 200 QBQTC rows, vs 55/200 with the space).
DEFAULT_PROMPT = (
    "Judge how relevant the document is to the search query.\n"
    "0 = irrelevant, 1 = partly relevant, 2 = highly relevant.\n"
    "Query:\n{query}\n"
    "Document:\n{item}\n"
    "Grade:"
)


def _split_template(template):
    """Split a template into (head, first_slot, middle, second_slot, tail); slots are 'query'/'item'."""
    if template.count("{query}") != 1 or template.count("{item}") != 1:
        raise ValueError("prompt template: needs exactly one '{query}' and one '{item}' slot")
    if template != template.rstrip():
        raise ValueError("prompt template: must end at the answer position, not with whitespace")
    first = "query" if template.index("{query}") < template.index("{item}") else "item"
    second = "item" if first == "query" else "query"
    head, rest = template.split("{" + first + "}")
    middle, tail = rest.split("{" + second + "}")
    if not tail:
        raise ValueError("prompt template: text must follow the last slot (the answer cue, e.g. 'Grade:')")
    return head, first, middle, second, tail


def encode_pair(tokenizer, query, item, template=DEFAULT_PROMPT, max_len=128):
    """Token ids of the prompt and a content mask (1 on query/item tokens, 0 on template and bos).

    Template pieces, query and item are tokenized separately so the content tokens are known
    exactly and the item can be cut in tokens; the whole string tokenized at once may split a
    slot boundary differently, but training, scoring and feature extraction all use this one
    function, so they agree. Only the first piece starts the string: a tokenizer with a dummy prefix
    (Llama 2, Mistral v0.1) puts its space there alone, as on the whole string (tokenizer.Tokenizer.encode).
    Over max_len the item is cut from its end first, then the query; the template, and so the
    answer position, is never cut.
    """
    head, first, middle, second, tail = _split_template(template)
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []  # as transformers' tokenizer does for this checkpoint
    # only the first piece of the string starts it (gets a dummy prefix where the tokenizer has one)
    fixed = [tokenizer.encode(head) if head else [], tokenizer.encode(middle, start=False), tokenizer.encode(tail, start=False)]
    n_fixed = len(bos) + sum(len(t) for t in fixed)
    if n_fixed >= max_len:
        raise ValueError(f"prompt template: needs {n_fixed} tokens, leaving none of max_len={max_len}")
    values = {"query": query, "item": item}
    text = {first: tokenizer.encode(values[first], start=not head), second: tokenizer.encode(values[second], start=False)}
    budget = max_len - n_fixed
    n_item = min(len(text["item"]), max(0, budget - len(text["query"])))
    text["item"] = text["item"][:n_item]
    text["query"] = text["query"][:budget - n_item]
    ids, content = list(bos), [0] * len(bos)
    for part, is_content in ((fixed[0], 0), (text[first], 1), (fixed[1], 0), (text[second], 1), (fixed[2], 0)):
        ids += part
        content += [is_content] * len(part)
    return ids, content


def grade_token_ids(tokenizer, words):
    """One vocabulary id per grade word; a word that is not exactly one token is an error."""
    ids = []
    for w in words:
        t = tokenizer.encode(w, start=False)  # it follows the answer cue: no dummy prefix (Llama 2)
        if len(t) != 1:
            raise ValueError(f"grade word {w!r} is {len(t)} tokens {t} for this tokenizer, must be exactly one")
        ids.append(t[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"grade words {words} map to repeated token ids {ids}")
    return ids


PAD_MULTIPLE = 16


def collate(examples, pad_id, multiple=PAD_MULTIPLE):
    """Right-pad (ids, content) pairs to T rounded up to `multiple`: few distinct shapes (8 up to
    128 tokens), so the allocator reuses buffers instead of growing with every new length. 16, not
    32: our benchmark rows average 38 tokens, which 32 would pad to 64 (1.7x the work)."""
    T = max(len(ids) for ids, _ in examples)
    T = -(-T // multiple) * multiple
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), T), dtype=torch.long)
    content_mask = torch.zeros((len(examples), T), dtype=torch.long)
    for b, (ids, content) in enumerate(examples):
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, :len(ids)] = 1
        content_mask[b, :len(ids)] = torch.tensor(content, dtype=torch.long)
    return dict(input_ids=input_ids, attention_mask=attention_mask, content_mask=content_mask)


def sorted_chunks(idx, lengths, size):
    """idx sorted by length, cut into chunks of `size`: batches with little padding and few shapes."""
    idx = sorted(idx, key=lambda i: lengths[i])
    return [idx[s:s + size] for s in range(0, len(idx), size)]


def answer_hidden(model, input_ids, attention_mask):
    """Final hidden state at the last real token of each right-padded row (the answer position).
    A left-padded batch is refused: its last real token is not at mask.sum() - 1."""
    hidden = model(input_ids, attention_mask)
    if attention_mask is None:
        return hidden[:, -1]
    if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
        raise ValueError("attention_mask: rows must be right-padded (1s, then 0s); darl.collate pads that way")
    last = attention_mask.long().sum(1) - 1
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


class GradeHead(nn.Module):
    """A C x D grade classifier on the answer-position hidden state, for linear probing then fine-tuning
    (LP-FT, Kumar et al., ICLR 2022). Initialised from the grade tokens' output rows, so before training
    it gives exactly the head-less `grade_logits`; fp32, saved beside the PEFT files (HEAD_FILE)."""

    def __init__(self, weight, softcap=None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.softcap = softcap

    @classmethod
    def from_model(cls, model, grade_ids):
        out = model.lm_head.weight if hasattr(model, "lm_head") else model.embed_tokens.weight
        return cls(out[grade_ids.to(out.device)], model.args.final_logit_softcapping)

    def forward(self, hidden):
        logits = F.linear(hidden.float(), self.weight)
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def save(self, directory):
        meta = {"softcap": json.dumps(self.softcap)}
        save_file({"weight": self.weight.detach().cpu().contiguous()}, f"{directory}/{HEAD_FILE}.tmp", metadata=meta)
        os.replace(f"{directory}/{HEAD_FILE}.tmp", f"{directory}/{HEAD_FILE}")

    @classmethod
    def load(cls, directory, device="cpu"):
        """The head saved in `directory`, or None when it has none (an adapter trained without a head)."""
        path = os.path.join(directory, HEAD_FILE)
        if not os.path.exists(path):
            return None
        with safe_open(path, framework="pt", device=str(device)) as f:
            return cls(f.get_tensor("weight"), json.loads(f.metadata()["softcap"]))


HEAD_FILE = "grade_head.safetensors"


def grade_logits(model, input_ids, attention_mask, grade_ids, head=None):
    """(B, C) float32 logits of the grade tokens only: C output rows instead of the whole vocabulary
    (262k rows for Gemma 3), which saves the (B, V) matmul and its memory; a GradeHead when given."""
    h = answer_hidden(model, input_ids, attention_mask)
    return head(h) if head is not None else model.logits(h, grade_ids.to(h.device)).float()


def darl_loss(logits, labels, ordinal_weight=1.0, calibration_weight=0.1, class_weight=None):
    """Cross-entropy over the C grade logits + ordinal term + confidence penalty.

    - Cross-entropy: the likelihood of the true grade among the C grades only, so no probability
      mass is spent on the rest of the vocabulary (the point against `sft_loss`).
    - Ordinal term: the ranked probability score (Epstein 1969), i.e. the squared distance between
      predicted and one-hot target cumulative distributions, sum_{c<C-1} (P(y<=c) - 1[t<=c])^2,
      divided by C-1 so it lies in [0, 1] for any C. Cross-entropy charges calling a "2" a "0" the
      same as calling it a "1"; this term charges the far error more (for one-hot predictions:
      2 vs 1), which is what fine-grained grades need. It is the squared-CDF "EMD^2" loss of
      Hou et al. 2016 for 1-D ordered classes.
    - Confidence penalty (Pereyra et al. 2017): KL(p || uniform) = log C - H(p). Same gradient as
      their -H(p), but zero at the uniform distribution so the total stays >= 0. Relevance labels
      are noisy (annotators disagree between adjacent grades) and the scores are read as
      probabilities (ECE, expected grade), so we discourage saturated predictions.
    Defaults: ordinal_weight=1.0 puts the [0, 1] ordinal term on the scale of cross-entropy at
    start (log 3 = 1.1), so neither term dominates; calibration_weight=0.1 is the smallest value
    Pereyra et al. searched and only taxes near-one-hot outputs. Neither is tuned here: the
    benchmark compares them. With both weights 0 and no class_weight this is F.cross_entropy.
    class_weight (C,): each row's loss times the weight of its grade, then the plain mean (not
    divided by the sum of weights, unlike F.cross_entropy(weight=...), so per-row losses add up the
    same in any split of a batch); balanced weights n / (C n_c) average 1 over the training set.
    """
    logits = logits.float()
    C = logits.size(1)
    loss = F.cross_entropy(logits, labels, reduction="none")
    p = logits.softmax(-1)
    if ordinal_weight:
        cdf = p.cumsum(-1)[:, :-1]
        target = (labels[:, None] <= torch.arange(C - 1, device=labels.device)).float()
        loss = loss + ordinal_weight * ((cdf - target) ** 2).sum(-1) / (C - 1)
    if calibration_weight:
        neg_entropy = (p * logits.log_softmax(-1)).sum(-1)
        loss = loss + calibration_weight * (math.log(C) + neg_entropy)
    if class_weight is not None:
        loss = loss * class_weight.to(loss.device)[labels]
    return loss.mean()


def sft_loss(model, input_ids, attention_mask, answer_ids, weight=None):
    """The naive baseline: next-token cross-entropy over the full vocabulary at the answer position,
    i.e. plain supervised fine-tuning on the grade token. Kept only for comparison. weight (B,):
    each row's loss times it, then the plain mean, as darl_loss's class_weight, so that the two losses
    differ only in what they score (the whole vocabulary vs the grade tokens), not in the weighting."""
    h = answer_hidden(model, input_ids, attention_mask)
    loss = F.cross_entropy(model.logits(h).float(), answer_ids.to(h.device), reduction="none")
    return (loss if weight is None else loss * weight.to(loss.device)).mean()


def expected_grade(probs):
    """Relevance score for ranking: E[grade] / (C-1) under the predicted distribution, in [0, 1]."""
    C = probs.shape[-1]
    grades = torch.arange(C, dtype=probs.dtype, device=probs.device) if torch.is_tensor(probs) else np.arange(C)
    return (probs * grades).sum(-1) / (C - 1)


def auroc(neg_scores, pos_scores):
    """P(positive scores above negative), ties count 1/2: the Mann-Whitney U statistic over
    average ranks. ood.auroc reuses it with in-distribution as negative, OOD as positive."""
    neg, pos = np.asarray(neg_scores, np.float64).ravel(), np.asarray(pos_scores, np.float64).ravel()
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.concatenate([neg, pos]), return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank, averaged over a tie
    pos_ranks = avg_rank[inverse.ravel()][len(neg):]
    return float((pos_ranks.sum() - len(pos) * (len(pos) + 1) / 2.0) / (len(pos) * len(neg)))


def _ndcg_per_query(scores, labels, queries):
    """NDCG@10 of each query (sorted unique order), NaN where undefined: fewer than 2 rows, or no
    relevant row (IDCG = 0). Gain 2^label - 1 (Burges et al. 2005), discount log2(rank + 1); ties in
    the score keep input order."""
    _, inverse = np.unique(np.asarray(queries), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    values = []
    for idx in np.split(order, np.cumsum(np.bincount(inverse))[:-1]):
        gain = 2.0 ** labels[idx] - 1
        discount = 1 / np.log2(np.arange(2, min(len(idx), 10) + 2))
        ideal = (np.sort(gain)[::-1][:10] * discount).sum()
        ranked = gain[np.argsort(-scores[idx], kind="stable")][:10]
        values.append((ranked * discount).sum() / ideal if len(idx) >= 2 and ideal > 0 else np.nan)
    return np.array(values)


def _per_grade(pred, y, C):
    """Confusion [true][pred], and per-grade precision, recall, F1 (0 where undefined) and presence."""
    confusion = np.bincount(y * C + pred, minlength=C * C).reshape(C, C)
    tp = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(C), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(C), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(C), where=precision + recall > 0)
    return confusion, precision, recall, f1, (support + predicted) > 0


def _ece(p, y, bins=15):
    """sum_b |B|/n |acc_b - conf_b| over equal-width bins (lo, hi] of the max probability (Guo et al. 2017)."""
    conf = p.max(1)
    b = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    gap = np.bincount(b, weights=(p.argmax(1) == y) - conf, minlength=bins)  # sum of (correct - conf) per bin
    return float(np.abs(gap).sum() / len(y))


METRICS = {  # name -> f(probs (N, C) array, labels (N,)): the row-level statistics of paired_bootstrap
    "accuracy": lambda p, y: float((p.argmax(1) == y).mean()),
    "macro_f1": lambda p, y: float(np.mean((parts := _per_grade(p.argmax(1), y, p.shape[1]))[3][parts[4]])),
    "ece": _ece,
}


def relevance_metrics(probs, labels, queries=None):
    """Accuracy, macro-F1, per-grade P/R/F1/support, confusion matrix [true][pred], ECE, AUROC of
    relevant (grade > 0) vs irrelevant by expected grade, and NDCG@10 when queries repeat.

    Macro-F1 averages over the grades present in labels or predictions (what sklearn does), and
    precision of a never-predicted grade is 0. ECE: 15 equal-width bins (lo, hi] on the max
    probability, sum_b |B|/n |acc_b - conf_b| (Guo et al. 2017).
    """
    p = probs.detach().float().cpu().numpy() if torch.is_tensor(probs) else np.asarray(probs, np.float64)
    y = (labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)).astype(np.int64)
    n, C = p.shape
    confusion, precision, recall, f1, present = _per_grade(p.argmax(1), y, C)
    score = expected_grade(p)
    out = dict(
        n=int(n),
        accuracy=METRICS["accuracy"](p, y),
        macro_f1=float(f1[present].mean()),
        per_grade=[dict(precision=float(precision[c]), recall=float(recall[c]), f1=float(f1[c]),
                        support=int(confusion[c].sum())) for c in range(C)],
        confusion=confusion.tolist(),
        ece=_ece(p, y),
        auroc=auroc(score[y == 0], score[y > 0]),
    )
    if queries is not None and len(set(queries)) < len(queries):
        per_query = _ndcg_per_query(score, y, queries)
        defined = per_query[~np.isnan(per_query)]
        out["ndcg@10"], out["ndcg_queries"] = (float(defined.mean()) if len(defined) else float("nan")), len(defined)
    return out


def paired_bootstrap(a, b, labels, metric="macro_f1", groups=None, n_boot=1000, seed=0, level=0.95):
    """Paired bootstrap interval of metric(a) - metric(b) on the same test rows, pooled over seeds.

    a, b: one (N, C) probability array per seed (a[s] and b[s] share the seed: paired), labels (N,).
    Each of n_boot resamples draws the test units with replacement (rows; queries for "ndcg@10", whose
    per-query values are computed once, `groups` giving each row's query) and, second level, the seeds
    with replacement, and takes the mean over the drawn seeds of metric(a_s) - metric(b_s) on the drawn
    units (one draw of units for all seeds: every seed was scored on the same test set). Resampling the seeds too puts the training noise (seed to seed) into the interval, not only
    the test-set noise (Davison & Hinkley 1997, sec. 3.8, two-stage resampling).
    Returns {delta (all rows, all seeds), lo, hi, n_boot}.
    """
    y = np.asarray(labels)
    if metric == "ndcg@10":
        if groups is None:
            raise ValueError("ndcg@10 needs groups (each row's query): the query is its resampling unit")
        per_query = [[_ndcg_per_query(expected_grade(np.asarray(p, np.float64)), y, groups) for p in side] for side in (a, b)]
        defined = ~np.isnan(per_query[0][0])  # the same queries for every prediction: NaN = fewer than 2 rows or none relevant
        per_query = [[v[defined] for v in side] for side in per_query]
        stat = lambda s, idx: per_query[0][s][idx].mean() - per_query[1][s][idx].mean()  # noqa: E731
        n_units = int(defined.sum())
    else:
        a, b, fn = [np.asarray(p, np.float64) for p in a], [np.asarray(p, np.float64) for p in b], METRICS[metric]
        stat = lambda s, idx: fn(a[s][idx], y[idx]) - fn(b[s][idx], y[idx])  # noqa: E731
        n_units = len(y)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):  # one draw of the test units, shared by the drawn seeds: they all saw the same test set
        idx, seeds = rng.integers(n_units, size=n_units), rng.integers(len(a), size=len(a))
        draws.append(np.mean([stat(s, idx) for s in seeds]))
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    delta = np.mean([stat(s, np.arange(n_units)) for s in range(len(a))])
    return {"delta": float(delta), "lo": float(lo), "hi": float(hi), "n_boot": n_boot}
