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


def test_dasa_select_group_cap_skip_and_determinism():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 5, size=400).astype(float)  # many ties: the seed decides among them
    groups = [f"q{i % 7}" for i in range(400)]
    feats = torch.tensor(rng.normal(size=(400, 4)), dtype=torch.float32)
    for f in (None, feats):
        picked = ood.dasa_select(scores, 20, features=f, groups=groups, max_per_group=3)
        assert len(picked) == 20  # 7 groups x 3 = 21 >= 20
        counts = {g: sum(groups[i] == g for i in picked) for g in set(groups)}
        assert max(counts.values()) <= 3
        assert picked == ood.dasa_select(scores, 20, features=f, groups=groups, max_per_group=3)
        assert len(ood.dasa_select(scores, 50, features=f, groups=groups, max_per_group=2)) == 14
    a, b = ood.dasa_select(scores, 20, seed=0), ood.dasa_select(scores, 20, seed=1)
    assert a != b and sorted(scores[a]) == sorted(scores[b])  # seed only breaks ties
    skipped = ood.dasa_select(np.arange(100.0), 10, skip_top=0.05)
    assert skipped == list(range(94, 84, -1))
    r = ood.random_select(scores, 20, groups=groups, max_per_group=3, seed=7)
    assert r == ood.random_select(scores, 20, groups=groups, max_per_group=3, seed=7)
    assert max(sum(groups[i] == g for i in r) for g in set(groups)) <= 3


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


@pytest.mark.parametrize("layer,pooling", [(2, "last"), (2, "mean"), (None, "mean"), (None, "last")])
def test_extract_features_matches_transformers_hidden_states(tmp_path, monkeypatch, layer, pooling):
    hf, model = small_hf_gemma(tmp_path)
    examples = _examples()

    def must_not_run(*args, **kwargs):
        raise AssertionError("extract_features built logits or ran a block after `layer`")
    monkeypatch.setattr(model, "logits", must_not_run)
    if layer is not None:
        model.layers[layer].register_forward_pre_hook(must_not_run)
    feats = ood.extract_features(model, examples, pad_id=0, layer=layer, pooling=pooling, batch_size=4)
    assert feats.dtype == torch.float32 and feats.shape == (11, 64) and feats.device.type == "cpu"
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(11))
    for i, (ids, content) in enumerate(examples):  # one at a time through transformers, input order
        with torch.no_grad():
            hs = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        h = hs[-1 if layer is None else layer][0]
        c = torch.tensor(content, dtype=torch.bool)
        ref = h[c].mean(0) if pooling == "mean" else h[c][-1]
        torch.testing.assert_close(feats[i], torch.nn.functional.normalize(ref, dim=0), atol=2e-5, rtol=1e-4)


def test_extract_features_rejects_empty_content_and_bad_pooling(tmp_path):
    _, model = small_hf_gemma(tmp_path)
    with pytest.raises(ValueError, match="example 1"):
        ood.extract_features(model, [([2, 5, 6], [0, 1, 0]), ([2, 5, 6], [0, 0, 0])], pad_id=0)
    with pytest.raises(ValueError, match="pooling"):
        ood.extract_features(model, _examples(2), pad_id=0, pooling="max")
