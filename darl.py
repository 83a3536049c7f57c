"""DaRL relevance judging: prompt -> grade logits at the answer position -> loss and metrics.

Path: (query, item) -> `encode_pair` -> `collate` -> `grade_logits` (hidden state at the last real
token times the C grade rows of the output head) -> `darl_loss` / `expected_grade` / `relevance_metrics`.
DaRL: Liu et al., "Boosting LLM-based Relevance Modeling with Distribution-Aware Robust Learning",
CIKM 2024 (arXiv 2412.12504).
The paper's abstract names a loss that sharpens fine-grained grades but not its formula; `darl_loss`
is our choice and documents it. Runtime needs only torch and numpy.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

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
    function, so they agree. (Tokenizers that prepend a dummy space to every call, such as Llama 2's,
    would insert spaces at the slots; Gemma, Llama 3 and Qwen2 tokenizers do not.)
    Over max_len the item is cut from its end first, then the query; the template, and so the
    answer position, is never cut.
    """
    head, first, middle, second, tail = _split_template(template)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # Qwen2 has no bos
    fixed = [tokenizer.encode(t) for t in (head, middle, tail)]
    n_fixed = len(bos) + sum(len(t) for t in fixed)
    if n_fixed >= max_len:
        raise ValueError(f"prompt template: needs {n_fixed} tokens, leaving none of max_len={max_len}")
    text = {"query": tokenizer.encode(query), "item": tokenizer.encode(item)}
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
        t = tokenizer.encode(w)
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


def _last_hidden(model, input_ids, attention_mask):
    """Final hidden state at the last real token of each right-padded row (the answer position)."""
    hidden = model(input_ids, attention_mask)
    if attention_mask is None:
        return hidden[:, -1]
    last = attention_mask.long().sum(1) - 1
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


def grade_logits(model, input_ids, attention_mask, grade_ids):
    """(B, C) float32 logits of the grade tokens only: C output rows instead of the whole vocabulary
    (262k rows for Gemma 3), which saves the (B, V) matmul and its memory."""
    h = _last_hidden(model, input_ids, attention_mask)
    return model.logits(h, grade_ids.to(h.device)).float()


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
    h = _last_hidden(model, input_ids, attention_mask)
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


def _ndcg_at_10(scores, labels, queries):
    """Mean NDCG@10 over queries with >= 2 rows and at least one relevant row (IDCG > 0).
    Gain 2^label - 1 (Burges et al. 2005), discount log2(rank + 1); ties in the score keep input order."""
    groups = {}
    for i, q in enumerate(queries):
        groups.setdefault(q, []).append(i)
    values = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        idx = np.asarray(idx)
        gain = 2.0 ** labels[idx] - 1
        discount = 1 / np.log2(np.arange(2, min(len(idx), 10) + 2))
        ideal = (np.sort(gain)[::-1][:10] * discount).sum()
        if ideal > 0:
            ranked = gain[np.argsort(-scores[idx], kind="stable")][:10]
            values.append((ranked * discount).sum() / ideal)
    return (float(np.mean(values)) if values else float("nan")), len(values)


def relevance_metrics(probs, labels, queries=None):
    """Accuracy, macro-F1, per-grade P/R/F1/support, confusion matrix [true][pred], ECE, AUROC of
    relevant (grade > 0) vs irrelevant by expected grade, and NDCG@10 when queries repeat.

    Macro-F1 averages over the grades present in labels or predictions (what sklearn does), and
    precision of a never-predicted grade is 0. ECE: 15 equal-width bins (lo, hi] on the max
    probability, sum_b |B|/n |acc_b - conf_b| (Guo et al. 2017).
    """
    p = probs.detach().float().cpu().numpy() if torch.is_tensor(probs) else np.asarray(probs, np.float64)
    y = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    y = y.astype(np.int64)
    n, C = p.shape
    pred = p.argmax(1)
    confusion = np.zeros((C, C), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)
    tp = np.diag(confusion).astype(np.float64)
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(C), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(C), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(C), where=precision + recall > 0)
    present = (support + predicted) > 0

    conf = p.max(1)
    bins = np.clip(np.ceil(conf * 15).astype(np.int64) - 1, 0, 14)
    correct = (pred == y).astype(np.float64)
    ece = 0.0
    for b in range(15):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())

    score = expected_grade(p)
    out = dict(
        n=int(n),
        accuracy=float(correct.mean()),
        macro_f1=float(f1[present].mean()),
        per_grade=[dict(precision=float(precision[c]), recall=float(recall[c]), f1=float(f1[c]),
                        support=int(support[c])) for c in range(C)],
        confusion=confusion.tolist(),
        ece=float(ece),
        auroc=auroc(score[y == 0], score[y > 0]),
    )
    if queries is not None and len(set(queries)) < len(queries):
        out["ndcg@10"], out["ndcg_queries"] = _ndcg_at_10(score, y, list(queries))
    return out
