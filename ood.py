"""DASA: find the pool samples the training set covers worst, select some, get them labelled.

Path: pool -> `extract_features` (layer, pooling) -> a score against the training bank (higher =
less covered; `pool_scores` names them) -> `dasa_select` -> annotation (dataset.py) -> stage 2.
DaRL's DASA module (Liu et al., CIKM 2024) uses OOD detection to pick samples "not well covered by
the original training set"; a secondary summary of the paper names Mahalanobis distance and nearest
neighbours. Both are here (`mahalanobis_score`, `knn_score`, and their rank mean), with our own
`coverage_score`; bench/ood_features.py compares them on the dev splits (table in the README).
"""
import numpy as np
import torch

from darl import auroc, collate, sorted_chunks  # noqa: F401 (auroc: ood.auroc(id_scores, ood_scores), ID negative)

# Chosen on the dev splits by bench/ood_features.py (README, "Which split chose what"): with coverage_score,
# the last content token after block 17 of Gemma 3 270M's 18 (n - 1) found the most shifted rows of the
# dev pool (P@250 0.89; blocks 16 to final 0.87-0.89). None = final (after the final norm); k > 0 = the
# residual stream after block k; k < 0 = after block n + k.
DEFAULT_LAYER = -1
DEFAULT_POOLING = "last"


@torch.no_grad()
def extract_features(model, examples, pad_id, layer=DEFAULT_LAYER, pooling=DEFAULT_POOLING, batch_size=32):
    """(N, D) float32 CPU features, L2-normalised, in input order.

    `examples` are (ids, content) pairs from darl.encode_pair. Pooling is over content (query and
    item) tokens: 'last' = the last content token, 'mean' = their mean. Rows are sorted by length
    before batching so padding is small; model.forward(stop_at=layer) never runs the blocks after
    `layer` and no logits are built.
    """
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
    layer = model.args.n_layers + layer if layer is not None and layer < 0 else layer
    for i, (_, content) in enumerate(examples):
        if not any(content):
            raise ValueError(f"example {i}: no query or item tokens to pool over")
    device = next(model.parameters()).device
    out = [None] * len(examples)
    for idx in sorted_chunks(range(len(examples)), [len(ids) for ids, _ in examples], batch_size):
        batch = collate([examples[i] for i in idx], pad_id)
        hidden = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), stop_at=layer).float()
        content = batch["content_mask"].to(device)
        if pooling == "mean":
            pooled = (hidden * content[..., None]).sum(1) / content.sum(1, keepdim=True)
        else:
            positions = torch.arange(content.size(1), device=device)
            last = (content * positions).argmax(1)
            pooled = hidden[torch.arange(len(idx), device=device), last]
        pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        for j, i in enumerate(idx):
            out[i] = pooled[j]
    return torch.stack(out)


def knn_score(bank, queries, k=10, chunk=4096, exclude_self=False):
    """Distance from each query to its k-th nearest bank row (Sun et al., ICML 2022); higher = OOD.

    Exact, and chunked over queries and bank: each (chunk x chunk) block of distances is computed
    in float32 on the queries' device, merged into a running top-k and dropped, so a 10^6 x 1024
    float16 bank is never converted or compared whole. exclude_self: queries are the bank itself,
    and row i is not its own neighbour (copies of it elsewhere still are).
    """
    if exclude_self and queries.shape[0] != bank.shape[0]:
        raise ValueError("exclude_self needs queries to be the bank itself")
    if not 1 <= k <= bank.shape[0] - int(exclude_self):
        raise ValueError(f"k={k} needs at least {k + int(exclude_self)} bank rows, got {bank.shape[0]}")
    device = queries.device
    out = torch.empty(queries.shape[0], dtype=torch.float32, device=device)
    for q0 in range(0, queries.shape[0], chunk):
        q = queries[q0:q0 + chunk].float()
        best = torch.full((q.shape[0], k), float("inf"), device=device)
        for b0 in range(0, bank.shape[0], chunk):
            b = bank[b0:b0 + chunk].to(device).float()
            # |q - b|^2 = |q|^2 + (|b|^2 - 2 q.b): |q|^2 is constant along a row, so it is added after
            # the top-k, and one addmm makes the block (fewer passes over it; the search was 2x faiss)
            d2 = torch.addmm((b * b).sum(1)[None], q, b.T, alpha=-2)
            if exclude_self:
                rows = torch.arange(q.shape[0], device=device)
                cols = rows + q0 - b0
                keep = (cols >= 0) & (cols < b.shape[0])
                d2[rows[keep], cols[keep]] = float("inf")
            top = d2.topk(min(k, b.shape[0]), dim=1, largest=False).values
            best = torch.cat([best, top], 1).topk(k, dim=1, largest=False).values
        out[q0:q0 + chunk] = (best[:, -1] + (q * q).sum(1)).clamp_min(0).sqrt()
    return out


def coverage_score(bank, pool, k=10, chunk=4096):
    """How much more common a pool row is in the pool than in the training bank: k-th NN distance
    to the bank / k-th NN distance to the other pool rows. Higher = a high p_pool(x) / p_train(x).

    OUR addition beyond the paper's abstract. A k-NN density is p(x) ~ k / (N d_k(x)^D), so the
    ratio of distances is a monotone function of the density ratio (the N's and the power D do not
    change the ranking). Plain knn_score also flags rows that are merely rare everywhere (diverse
    web queries); the ratio flags what the pool has much of and the bank lacks, e.g. a new domain.
    It fades when the shifted cluster has fewer than k rows, as any density ratio must; and dense
    clusters of repeated queries look 'shifted' too, so cap selections per query group.
    On the dev pool of bench/ood_features.py it beats knn, Mahalanobis and their rank mean at every
    layer and pooling (P@250 0.89 vs 0.51-0.62 at the default features).
    """
    d_bank = knn_score(bank, pool, k, chunk)
    d_pool = knn_score(pool, pool, k, chunk, exclude_self=True)
    return d_bank / d_pool.clamp_min(1e-6)


def mahalanobis_score(bank, bank_labels, queries, shrinkage=0.1):
    """Smallest Mahalanobis distance to a class mean, shared covariance (Lee et al., NeurIPS 2018);
    higher = OOD. Covariance shrunk toward (trace/D) I (Ledoit & Wolf 2004 target) so it stays
    invertible when D is near the bank size; 0.1 is a light, untuned default. float64 inside."""
    x = bank.double().cpu()
    y = torch.as_tensor(bank_labels).cpu()
    classes = y.unique()
    means = torch.stack([x[y == c].mean(0) for c in classes])
    centered = x - means[torch.searchsorted(classes, y)]
    cov = centered.T @ centered / x.shape[0]
    D = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * cov.trace() / D * torch.eye(D, dtype=cov.dtype)
    L = torch.linalg.cholesky(cov)
    q = queries.double().cpu()
    dist = torch.stack([torch.linalg.solve_triangular(L, (q - m).T, upper=False).pow(2).sum(0) for m in means])
    return dist.min(0).values.float()


def rank_mean(*scores):
    """Mean of each score's rank in [0, 1] over the same rows (ties share their average rank): combines
    scores on different scales (Mahalanobis distances and kNN distances) without a weight to tune."""
    ranks = []
    for score in scores:
        _, inverse, counts = np.unique(np.asarray(score, np.float64), return_inverse=True, return_counts=True)
        average = np.cumsum(counts) - (counts + 1) / 2.0  # 0-based rank, averaged over ties
        ranks.append(average[inverse.ravel()] / max(1, len(inverse) - 1))
    return torch.tensor(np.mean(ranks, axis=0), dtype=torch.float32)


def pool_scores(name, bank, pool, k=10, bank_labels=None):
    """The OOD score `name` of each pool row against the training bank; higher = less covered.
    coverage: ours (density ratio); knn: k-th NN distance; mahalanobis: class-conditional, shared
    covariance; maha_knn: the rank mean of those two (the detectors the secondary summary names)."""
    if name == "coverage":
        return coverage_score(bank, pool, k)
    if name == "knn":
        return knn_score(bank, pool, k)
    if name == "mahalanobis":
        return mahalanobis_score(bank, bank_labels, pool)
    if name == "maha_knn":
        return rank_mean(mahalanobis_score(bank, bank_labels, pool), knn_score(bank, pool, k))
    raise ValueError(f"unknown OOD score {name!r} (coverage, knn, mahalanobis, maha_knn)")


SCORES = ("coverage", "knn", "mahalanobis", "maha_knn")


def energy_score(logits, temperature=1.0):
    """Energy -T logsumexp(f/T) of the grade logits (Liu et al., NeurIPS 2020); higher = OOD."""
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=-1)


def msp_score(logits):
    """Negative maximum softmax probability (Hendrycks & Gimpel, ICLR 2017); higher = OOD."""
    return -logits.float().softmax(-1).max(-1).values



def fpr_at_tpr(id_scores, ood_scores, tpr=0.95):
    """Fraction of ID rows flagged at the highest threshold that flags >= tpr of the OOD rows
    (FPR95 at the default); equals sklearn's roc_curve read at the first point with TPR >= tpr."""
    id_s = np.asarray(id_scores, np.float64).ravel()
    ood_s = np.sort(np.asarray(ood_scores, np.float64).ravel())[::-1]
    n = len(ood_s)
    k = int(np.argmax(np.arange(1, n + 1) / n >= tpr))  # fewest OOD rows that reach the TPR, minus one
    return float((id_s >= ood_s[k]).mean())


def aupr(id_scores, ood_scores):
    """Average precision with OOD as the positive class (AUPR-Out): sum over distinct thresholds
    of (recall step) x precision, no interpolation; equals sklearn's average_precision_score."""
    s = np.concatenate([np.asarray(id_scores, np.float64).ravel(), np.asarray(ood_scores, np.float64).ravel()])
    y = np.concatenate([np.zeros(np.size(id_scores)), np.ones(np.size(ood_scores))])
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_tie]
    seen = (np.arange(1, len(s) + 1))[last_of_tie]
    recall = tp / y.sum()
    return float((np.diff(np.r_[0.0, recall]) * tp / seen).sum())


def _walk(order, budget, groups, max_per_group, features=None, min_distance=0.0):
    """Walk `order` and keep rows until `budget`: at most max_per_group per group, and (with
    features) none within min_distance of a row already kept."""
    taken, per_group = [], {}
    kept = None if features is None else torch.empty(budget, features.shape[1])
    for i in order:
        if len(taken) == budget:
            break
        g = None if groups is None else groups[i]
        if max_per_group is not None and g is not None and per_group.get(g, 0) >= max_per_group:
            continue
        if kept is not None:
            x = features[i].float()
            if taken and (kept[:len(taken)] - x).norm(dim=1).min() <= min_distance:
                continue
            kept[len(taken)] = x
        per_group[g] = per_group.get(g, 0) + 1
        taken.append(int(i))
    return taken


def dasa_select(scores, budget, features=None, groups=None, skip_top=0.0, min_distance=0.0,
                max_per_group=None, seed=0):
    """The DASA step: indices (list, best first) of up to `budget` rows the training set covers worst.

    Highest scores first, after skipping the top `skip_top` fraction (the most extreme rows are
    often noise: empty, garbled or mislabelled pairs). Diversity step, with `features`: a row whose
    distance to an already selected row is <= min_distance is skipped and the walk goes on down the
    ranking, so exact duplicates (distance 0, the default) are selected once and the budget is
    not spent on near-duplicates (raise min_distance for those). `max_per_group` caps rows per
    group (e.g. per query: repeated queries form dense clusters a density ratio also flags).
    Deterministic for a seed (the seed only breaks ties in the score).

    Why not greedy k-center (Sener & Savarese 2018) among the top 3 x budget candidates: it picks
    the candidates farthest from each other, i.e. the sparse false positives around a dense
    shifted cluster. On the synthetic shift in tests/test_ood.py it selected 1% shifted rows
    where this walk selects >= 90%.
    """
    s = np.asarray(scores.cpu() if torch.is_tensor(scores) else scores, np.float64)
    perm = np.random.default_rng(seed).permutation(len(s))
    order = perm[np.argsort(-s[perm], kind="stable")][int(skip_top * len(s)):]
    feats = None if features is None else features.cpu()
    return _walk(order, budget, groups, max_per_group, feats, min_distance)


def random_select(scores, budget, features=None, groups=None, skip_top=0.0, min_distance=0.0,
                  max_per_group=None, seed=0):
    """Baseline with dasa_select's signature: a seeded uniform sample of rows, with the same
    per-group cap; scores, features, skip_top and min_distance are ignored."""
    order = np.random.default_rng(seed).permutation(len(scores))
    return _walk(order, budget, groups, max_per_group)
