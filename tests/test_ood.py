"""ood.py: OOD metrics, k-NN / coverage / Mahalanobis / logit scores, dasa_select, annotation files,
feature extraction."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ood  # noqa: E402
from conftest import small_hf_gemma  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


# ---------------------------------------------------------------- metrics vs sklearn

def _sk_fpr(id_s, ood_s, tpr):
    y = np.r_[np.zeros(len(id_s)), np.ones(len(ood_s))]
    fpr, tp, _ = skm.roc_curve(y, np.r_[id_s, ood_s], drop_intermediate=False)
    return fpr[np.argmax(tp >= tpr)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ties", [False, True])
def test_ood_metrics_equal_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(20, 300, size=2)
    id_s, ood_s = rng.normal(0, 1, n_id), rng.normal(0.7, 1.3, n_ood)
    if ties:  # few distinct values: many ties within and across the two sets
        id_s, ood_s = np.round(id_s * 2), np.round(ood_s * 2)
    y, s = np.r_[np.zeros(n_id), np.ones(n_ood)], np.r_[id_s, ood_s]
    assert ood.auroc(id_s, ood_s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert ood.aupr(id_s, ood_s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    for tpr in (0.95, 0.8, 0.5):
        assert ood.fpr_at_tpr(id_s, ood_s, tpr) == pytest.approx(_sk_fpr(id_s, ood_s, tpr), abs=1e-12)
    assert ood.auroc(torch.tensor(id_s), torch.tensor(ood_s)) == pytest.approx(ood.auroc(id_s, ood_s))


def test_fpr_at_tpr_exact_fraction():
    ood_s = np.arange(20.0)  # 95% of 20 = 19 rows flagged: threshold 1.0
    assert ood.fpr_at_tpr([0.5, 1.0, 2.0, 30.0], ood_s, 0.95) == 0.75


# ---------------------------------------------------------------- knn_score

def _brute_kth(bank, queries, k, exclude_self=False):
    b, q = bank.double().numpy(), queries.double().numpy()
    d = np.sqrt(((q[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k,chunk", [(1, 7), (5, 16), (10, 1000), (37, 50)])
def test_knn_score_equals_brute_force(dtype, k, chunk):
    g = torch.Generator().manual_seed(k * 100 + chunk)
    bank = torch.nn.functional.normalize(torch.randn(203, 24, generator=g), dim=1).to(dtype)
    queries = torch.nn.functional.normalize(torch.randn(61, 24, generator=g), dim=1).to(dtype)
    got = ood.knn_score(bank, queries, k=k, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == (61,)
    np.testing.assert_allclose(got.numpy(), _brute_kth(bank, queries, k), rtol=1e-4, atol=1e-4)
    got = ood.knn_score(bank, bank, k=k, chunk=chunk, exclude_self=True)
    np.testing.assert_allclose(got.numpy(), _brute_kth(bank, bank, k, exclude_self=True), rtol=1e-4, atol=1e-4)


def test_knn_exclude_self_keeps_copies_and_checks_k():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    assert ood.knn_score(x, x, k=1, exclude_self=True).tolist() == [0.0, 0.0, 5.0]
    with pytest.raises(ValueError, match="k=3"):
        ood.knn_score(x, x, k=3, exclude_self=True)


# ---------------------------------------------------------------- synthetic shift

def _shift_pool(seed=0, n_outliers=0):
    """Bank: 2 ID classes from N(+-1 e0, I) in 8-D. Pool: 1000 ID rows + 120 rows of a tight shifted
    cluster + optional sparse ID outliers (a wide scatter: rare in the bank and in the pool)."""
    g = torch.Generator().manual_seed(seed)
    D = 8
    centers = torch.zeros(2, D)
    centers[:, 0] = torch.tensor([-1.0, 1.0])
    bank_labels = torch.randint(0, 2, (2000,), generator=g)
    bank = centers[bank_labels] + torch.randn(2000, D, generator=g)
    id_pool = centers[torch.randint(0, 2, (1000,), generator=g)] + torch.randn(1000, D, generator=g)
    shift_center = torch.zeros(D)
    shift_center[1] = 4.5
    shifted = shift_center + 0.3 * torch.randn(120, D, generator=g)
    outliers = 6.0 * torch.randn(n_outliers, D, generator=g)
    pool = torch.cat([id_pool, shifted, outliers])
    kind = np.r_[np.zeros(1000), np.ones(120), np.full(n_outliers, 2)]
    return bank, bank_labels, pool, kind


def test_scores_separate_a_shifted_cluster():
    bank, bank_labels, pool, kind = _shift_pool()
    scores = {
        "knn": ood.knn_score(bank, pool, k=10),
        "coverage": ood.coverage_score(bank, pool, k=10),
        "mahalanobis": ood.mahalanobis_score(bank, bank_labels, pool),
    }
    for name, s in scores.items():
        a = ood.auroc(s[kind == 0], s[kind == 1])
        assert a > 0.95, (name, a)


def test_coverage_ratio_ranks_dense_shift_above_sparse_outliers():
    bank, _, pool, kind = _shift_pool(seed=1, n_outliers=60)
    knn = ood.knn_score(bank, pool, k=10).numpy()
    cov = ood.coverage_score(bank, pool, k=10).numpy()
    top = lambda s: kind[np.argsort(-s)[:120]]  # noqa: E731
    assert (top(cov) == 1).mean() > 0.9  # the shifted cluster fills the top of the coverage ranking
    assert (top(knn) == 2).sum() >= 55  # plain KNN puts the sparse outliers first
    assert ood.auroc(cov[kind == 2], cov[kind == 1]) > 0.95
    assert ood.auroc(knn[kind == 2], knn[kind == 1]) < 0.2


def test_mahalanobis_matches_numpy_reference():
    rng = np.random.default_rng(3)
    bank, labels, q = rng.normal(size=(300, 6)), rng.integers(0, 3, 300), rng.normal(size=(40, 6))
    means = np.stack([bank[labels == c].mean(0) for c in range(3)])
    cov = np.cov((bank - means[labels]).T, bias=True)
    cov = 0.8 * cov + 0.2 * np.trace(cov) / 6 * np.eye(6)
    prec = np.linalg.inv(cov)
    ref = np.min([np.einsum("nd,de,ne->n", q - m, prec, q - m) for m in means], axis=0)
    got = ood.mahalanobis_score(torch.tensor(bank), torch.tensor(labels), torch.tensor(q), shrinkage=0.2)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


def test_mahalanobis_with_unsorted_sparse_labels_matches_scipy():
    """Labels given as a list of sparse, unsorted class ids (7, 2, 40): each row is centred on its own class mean.
    Catches class means matched to rows by position in unique() instead of by value, and a float32 covariance."""
    from scipy.spatial import distance
    rng = np.random.default_rng(8)
    labels = rng.choice([7, 2, 40], size=200).tolist()
    bank = rng.normal(size=(200, 5)) + np.array([[0, 3, 0, 0, 0]]) * (np.array(labels)[:, None] == 40)
    q = rng.normal(size=(30, 5)) * 2
    means = {c: bank[np.array(labels) == c].mean(0) for c in (2, 7, 40)}
    centered = bank - np.stack([means[c] for c in labels])
    cov = centered.T @ centered / len(bank)
    cov = 0.9 * cov + 0.1 * np.trace(cov) / 5 * np.eye(5)
    vi = np.linalg.inv(cov)
    ref = [min(distance.mahalanobis(x, m, vi) ** 2 for m in means.values()) for x in q]
    got = ood.mahalanobis_score(torch.tensor(bank, dtype=torch.float32), labels, torch.tensor(q, dtype=torch.float32))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4)


def test_coverage_score_is_the_ratio_of_brute_force_kth_distances():
    """coverage = d_k(pool row, bank) / d_k(pool row, other pool rows), each by brute force. Catches the ratio
    inverted (pool / bank: dense shifted clusters would rank last), the pool row counted as its own neighbour
    (d_pool = 0), and k mixed up between the two distances."""
    g = torch.Generator().manual_seed(9)
    bank, pool = torch.randn(150, 6, generator=g), torch.randn(90, 6, generator=g) * 1.5
    for k in (1, 4):
        ref = _brute_kth(bank, pool, k) / _brute_kth(pool, pool, k, exclude_self=True)
        np.testing.assert_allclose(ood.coverage_score(bank, pool, k=k, chunk=32).numpy(), ref, rtol=1e-4)


def test_rank_mean_equals_brute_force_ranks():
    """rank_mean == mean over scores of (number of rows scoring lower) / (n - 1). Catches argsort used as the rank
    (a permutation, not ranks), ranks not scaled to [0, 1] (scores on different scales weigh differently), and
    one score reversed."""
    rng = np.random.default_rng(10)
    a, b, c = rng.normal(size=37), rng.exponential(size=37) * 1000, -rng.normal(size=37)
    ref = np.mean([[np.sum(s < s[i]) / 36 for i in range(37)] for s in (a, b, c)], axis=0)
    np.testing.assert_allclose(ood.rank_mean(torch.tensor(a), b, torch.tensor(c)).numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(ood.rank_mean(a).numpy(), np.argsort(np.argsort(a)) / 36, atol=1e-6)


def test_rank_mean_gives_ties_their_average_rank():
    """Catches tied scores ranked in arbitrary order (argsort of argsort): equal scores must get equal ranks,
    so the combination does not depend on row order (Mahalanobis ties are common on duplicate rows)."""
    np.testing.assert_allclose(ood.rank_mean(np.array([1.0, 1.0, 2.0])).numpy(), [0.25, 0.25, 1.0])
    s = np.array([3.0, 1.0, 3.0, 2.0, 3.0])
    np.testing.assert_allclose(ood.rank_mean(s).numpy(), [0.75, 0.0, 0.75, 0.25, 0.75])


def test_pool_scores_dispatches_each_name_to_its_score():
    """Each name against an independent reference (brute-force k-th distances, a numpy Mahalanobis, brute-force
    ranks); an unknown name is an error. Catches a name wired to the wrong score (knn returning coverage),
    k not passed through, and maha_knn combining the wrong pair."""
    rng = np.random.default_rng(11)
    bank, pool = torch.tensor(rng.normal(size=(120, 5))), torch.tensor(rng.normal(size=(40, 5)) * 1.3)
    labels = rng.integers(0, 3, 120).tolist()
    knn = _brute_kth(bank, pool, 3)
    cov = knn / _brute_kth(pool, pool, 3, exclude_self=True)
    x, y = bank.numpy(), np.array(labels)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    cv = np.cov((x - means[y]).T, bias=True)
    prec = np.linalg.inv(0.9 * cv + 0.1 * np.trace(cv) / 5 * np.eye(5))
    maha = np.min([np.einsum("nd,de,ne->n", pool.numpy() - m, prec, pool.numpy() - m) for m in means], axis=0)
    rank = lambda s: np.array([np.sum(s < v) for v in s]) / (len(s) - 1)  # noqa: E731
    refs = {"knn": knn, "coverage": cov, "mahalanobis": maha, "maha_knn": (rank(maha) + rank(knn)) / 2}
    assert set(refs) == set(ood.SCORES)
    for name, ref in refs.items():
        got = ood.pool_scores(name, bank, pool, k=3, bank_labels=labels)
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-4, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="unknown OOD score 'energy'"):
        ood.pool_scores("energy", bank, pool)


def test_logit_scores_rank_flat_logits_as_more_ood():
    logits = torch.tensor([[9.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.0, 0.0]])
    msp = ood.msp_score(logits)
    assert msp[0] < msp[1] < msp[2] and msp[2].item() == pytest.approx(-1 / 3)
    energy = ood.energy_score(logits)
    assert energy[0] < energy[1] < energy[2] and energy[2].item() == pytest.approx(-np.log(3))
    assert ood.energy_score(logits, temperature=2.0)[2].item() == pytest.approx(-2 * np.log(3))


# ---------------------------------------------------------------- dasa_select

def test_dasa_select_takes_shifted_rows_random_takes_the_mix_rate():
    bank, _, pool, kind = _shift_pool(seed=2)
    cov = ood.coverage_score(bank, pool, k=10)
    for feats in (None, pool):
        picked = ood.dasa_select(cov, 100, features=feats)
        assert len(picked) == len(set(picked)) == 100
        assert (kind[picked] == 1).mean() >= 0.9
    rates = [(kind[ood.random_select(cov, 100, seed=s)] == 1).mean() for s in range(20)]
    assert abs(np.mean(rates) - 120 / 1120) < 0.03  # about the mix rate (0.107)
    assert max(rates) < 0.3


def test_diversity_step_selects_duplicates_once():
    g = torch.Generator().manual_seed(4)
    point = torch.randn(1, 16, generator=g)
    feats = torch.cat([point.repeat(50, 1), torch.randn(200, 16, generator=g)])
    scores = torch.cat([torch.full((50,), 10.0), torch.rand(200, generator=g)])  # copies score highest
    picked = ood.dasa_select(scores, 30, features=feats)
    assert len(picked) == 30 and picked[0] < 50
    assert sum(i < 50 for i in picked) == 1
    assert picked[1:] == [50 + i for i in torch.argsort(scores[50:], descending=True)[:29].tolist()]
    assert sum(i < 50 for i in ood.dasa_select(scores, 30)) == 30  # without features: all copies
    # near-duplicates: a min_distance above the jitter keeps one of each jittered copy
    jittered = feats + 1e-3 * torch.randn(feats.shape, generator=g)
    assert sum(i < 50 for i in ood.dasa_select(scores, 30, features=jittered)) == 30
    assert sum(i < 50 for i in ood.dasa_select(scores, 30, features=jittered, min_distance=0.1)) == 1


def _brute_walk(scores, budget, groups=None, cap=None, feats=None, min_distance=0.0, skip_top=0.0):
    """DASA's documented walk, written plainly: rows by descending score, the top skip_top fraction skipped;
    a row is taken unless its group already has `cap` rows or (with features) a taken row lies within
    min_distance (Euclidean); stop at the budget."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: -scores[i])[int(skip_top * n):]
    taken = []
    for i in order:
        if len(taken) == budget:
            break
        if cap is not None and groups is not None and groups[i] is not None \
                and sum(groups[j] == groups[i] for j in taken) >= cap:
            continue
        if feats is not None and any(np.linalg.norm(feats[i] - feats[j]) <= min_distance for j in taken):
            continue
        taken.append(i)
    return taken


@pytest.mark.parametrize("budget,cap,use_feats,min_distance,skip_top", [
    (20, 3, False, 0.0, 0.0), (50, 2, False, 0.0, 0.0), (30, 4, True, 0.0, 0.0), (30, None, True, 0.0, 0.1),
    (25, 3, True, 0.5, 0.05), (400, 5, True, 0.0, 0.0), (12, 1, True, 1.0, 0.2)])
def test_dasa_select_is_the_documented_walk(budget, cap, use_feats, min_distance, skip_top):
    """dasa_select == a plain re-implementation of the walk on distinct scores (the seed then plays no part):
    highest first, per-group cap, exact duplicates (and rows within min_distance) taken once, the top skip_top
    fraction skipped, stopping at the budget (or when the pool runs out). Catches a cap off by one (> instead of
    >=), counting a skipped row against its group, a duplicate test against the first taken row only, a
    strict < min_distance (exact copies pass at distance 0), skip_top applied after the walk, ascending order."""
    rng = np.random.default_rng(5)
    n = 400
    scores = rng.permutation(n).astype(float) + rng.uniform(0, 0.5, n)
    groups = [f"q{i % 7}" for i in range(n)]
    groups[::50] = [None] * len(groups[::50])  # rows without a group are never capped
    feats = rng.normal(size=(n, 4))
    top = np.argsort(-scores)
    feats[top[1:6]] = feats[top[0]]  # exact copies of the best row, scored just below it
    feats[top[10:14]] = feats[top[8]] + 0.01 * rng.normal(size=(4, 4))  # near copies of a high row
    f = torch.tensor(feats, dtype=torch.float32) if use_feats else None
    picked = ood.dasa_select(torch.tensor(scores), budget, features=f, groups=groups, max_per_group=cap,
                             min_distance=min_distance, skip_top=skip_top, seed=3)
    ref = _brute_walk(scores, budget, groups, cap, feats if use_feats else None, min_distance, skip_top)
    assert picked == ref
    assert all(type(i) is int for i in picked)


def test_dasa_select_ties_broken_by_seed_only():
    """Tied scores: the seed chooses among rows of equal score and nothing else; the cap holds for every seed.
    Catches the seed reordering distinct scores, and ties always broken by index (the seed ignored)."""
    rng = np.random.default_rng(6)
    scores = rng.integers(0, 5, size=400).astype(float)  # many ties
    groups = [f"q{i % 7}" for i in range(400)]
    runs = [ood.dasa_select(scores, 20, groups=groups, max_per_group=3, seed=s) for s in range(4)]
    assert len({tuple(r) for r in runs}) > 1
    assert runs[0] == ood.dasa_select(scores, 20, groups=groups, max_per_group=3, seed=0)
    for r in runs:
        assert sorted(scores[r], reverse=True) == list(scores[r]) and list(scores[r]) == list(scores[runs[0]])
        assert max(sum(groups[i] == g for i in r) for g in set(groups)) <= 3


def test_random_select_ignores_scores_and_respects_the_cap():
    """random_select: a seeded sample (same seed, same rows; other seed, other rows) that ignores the scores,
    under the same per-group cap. Catches a baseline that secretly ranks by score, and a cap not applied to it."""
    rng = np.random.default_rng(7)
    scores = rng.normal(size=300)
    groups = [f"q{i % 10}" for i in range(300)]
    r = ood.random_select(scores, 25, groups=groups, max_per_group=2, seed=7)
    assert len(r) == 20 and len(set(r)) == 20  # 10 groups x 2
    assert max(sum(groups[i] == g for i in r) for g in set(groups)) == 2
    assert r == ood.random_select(-scores, 25, groups=groups, max_per_group=2, seed=7)
    assert r != ood.random_select(scores, 25, groups=groups, max_per_group=2, seed=8)
    top = set(np.argsort(-scores)[:25].tolist())
    assert len(top & set(ood.random_select(scores, 25, seed=1))) < 10


# ---------------------------------------------------------------- extract_features (tiny random Gemma 3)

def _examples(n=11, seed=0):
    """Token lists of varied length: 2 template tokens, content, 3 template tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = int(rng.integers(1, 40))
        ids = [2] + rng.integers(3, 320, size=c + 4).tolist()
        out.append((ids, [0, 0] + [1] * c + [0, 0, 0]))
    return out


@pytest.mark.parametrize("layer,pooling", [(2, "last"), (2, "mean"), (None, "mean"), (None, "last"), (-1, "last"),
                                           (-3, "mean")])
def test_extract_features_matches_transformers_hidden_states(tmp_path, monkeypatch, layer, pooling):
    """Features == transformers' hidden_states at the layer (k: after block k; -k: after block n - k; None: final,
    normed), pooled over the content tokens of each row run alone. Catches pooling over template or padding
    tokens, the layer off by one, a negative layer counted from the wrong end, rows returned in length order,
    and blocks (or the logits) run past `layer`."""
    hf, model = small_hf_gemma(tmp_path)
    examples = _examples()

    def must_not_run(*args, **kwargs):
        raise AssertionError("extract_features built logits or ran a block after `layer`")
    monkeypatch.setattr(model, "logits", must_not_run)
    if layer is not None:
        model.layers[layer % 4].register_forward_pre_hook(must_not_run)
    feats = ood.extract_features(model, examples, pad_id=0, layer=layer, pooling=pooling, batch_size=4)
    assert feats.dtype == torch.float32 and feats.shape == (11, 64) and feats.device.type == "cpu"
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(11))
    for i, (ids, content) in enumerate(examples):  # one at a time through transformers, input order
        with torch.no_grad():
            hs = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        h = hs[-1 if layer is None else layer % 4][0]  # 4 blocks: -1 = after block 3, -3 = after block 1
        c = torch.tensor(content, dtype=torch.bool)
        ref = h[c].mean(0) if pooling == "mean" else h[c][-1]
        torch.testing.assert_close(feats[i], torch.nn.functional.normalize(ref, dim=0), atol=2e-5, rtol=1e-4)


def test_extract_features_rejects_empty_content_and_bad_pooling(tmp_path):
    _, model = small_hf_gemma(tmp_path)
    with pytest.raises(ValueError, match="example 1"):
        ood.extract_features(model, [([2, 5, 6], [0, 1, 0]), ([2, 5, 6], [0, 0, 0])], pad_id=0)
    with pytest.raises(ValueError, match="pooling"):
        ood.extract_features(model, _examples(2), pad_id=0, pooling="max")
