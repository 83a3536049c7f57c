"""dasa.py: the DASA step of a run, with a stand-in judge whose features are fixed per row id (no model), so
every number can be recomputed by brute force: the pool is scored against id_train (the bank), the selection
is the documented walk with the per-query cap, the report's AUROCs, and the stage-1 adapter is loaded first."""
import argparse
import json
import types

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

import dasa

D = 6


class FakeJudge:
    """features(rows) from a fixed table by row id; records load() and features() calls in order."""

    def __init__(self, table):
        self.table, self.calls, self.grade_ids = table, [], [0, 1, 2]

    def load(self, directory):
        self.calls.append(("load", directory))

    def features(self, rows):
        self.calls.append(("features", len(rows)))
        return torch.stack([self.table[r["id"]] for r in rows])


def world(seed=0):
    """id_train: 80 rows around two ID centres; pool: 60 ID-like web rows (30 queries) + 18 medical rows of a
    tight shifted cluster on 3 queries (6 rows each); id_dev ID-like, ood_dev shifted."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((2, D))
    centres[:, 0] = [-1, 1]
    shift = np.zeros(D)
    shift[1] = 5.0
    table, data = {}, {s: [] for s in ("id_train", "pool", "id_dev", "ood_dev")}

    def add(split, rid, x, query, domain="web", label=None):
        table[rid] = torch.tensor(x, dtype=torch.float32)
        data[split].append(dict(id=rid, query=query, item=f"item {rid}", label=int(rng.integers(0, 3)) if label is None
                                else label, domain=domain))
    for i in range(80):
        add("id_train", f"t{i}", centres[i % 2] + rng.normal(size=D), f"tq{i}")
    for i in range(60):
        add("pool", f"w{i}", centres[i % 2] + rng.normal(size=D), f"wq{i // 2}")
    for i in range(18):
        add("pool", f"m{i}", shift + 0.3 * rng.normal(size=D), f"mq{i // 6}", domain="medical")
    for i in range(20):
        add("id_dev", f"d{i}", centres[i % 2] + rng.normal(size=D), f"dq{i}")
        add("ood_dev", f"o{i}", shift + 0.3 * rng.normal(size=D), f"oq{i}", domain="medical")
    return table, data


def make_args(tmp_path, **over):
    args = argparse.Namespace(ood_score="knn", select="dasa", budget=10, k=3, max_per_query=2, layer=None,
                              pooling="last", seed=0, data=str(tmp_path / "data"), out=str(tmp_path / "out"),
                              schedule="darl")
    for k, v in over.items():
        setattr(args, k, v)
    (tmp_path / "out" / "stage2").mkdir(parents=True, exist_ok=True)
    return args


def runtime():
    return types.SimpleNamespace(log=lambda msg: None, barrier=lambda: None, main=True)


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def brute_kth(bank, queries, k):
    d = np.sqrt(((queries[:, None, :] - bank[None, :, :]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k - 1]


def feats(table, rows):
    return np.stack([table[r["id"]].double().numpy() for r in rows])


@pytest.mark.parametrize("score", ["knn", "coverage"])
def test_pool_is_scored_against_id_train(tmp_path, score):
    """score_pool == the k-th NN distance from each pool row to the id_train features (coverage: over the k-th
    distance to the other pool rows), and dev_auroc separates ood_dev from id_dev. Catches the bank taken from
    the pool (or from the dev splits), k not passed, and the dev AUROC with ID and OOD swapped."""
    table, data = world()
    args = make_args(tmp_path, ood_score=score)
    scores, pool_feats, report = dasa.score_pool(FakeJudge(table), data, args, runtime())
    bank, pool = feats(table, data["id_train"]), feats(table, data["pool"])
    ref = brute_kth(bank, pool, 3)
    if score == "coverage":
        d = np.sqrt(((pool[:, None] - pool[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        ref = ref / np.sort(d, axis=1)[:, 2]
    np.testing.assert_allclose(np.asarray(scores, np.float64), ref, rtol=1e-4)
    np.testing.assert_allclose(pool_feats.double().numpy(), pool)
    assert report["ood_score"] == score and report["k"] == 3 and report["dev_auroc"] > 0.95


def test_pool_smaller_than_k_is_refused(tmp_path):
    """Catches a k-NN score computed with fewer rows than k (a crash deep in topk, or a silent clamp)."""
    table, data = world()
    data["pool"] = data["pool"][:3]
    with pytest.raises(ValueError, match="pool.jsonl: 3 rows"):
        dasa.score_pool(FakeJudge(table), data, make_args(tmp_path), runtime())


def test_selection_takes_the_shift_capped_per_query_and_reports_it(tmp_path):
    """make_selection: the budget filled from the top of the score with at most max_per_query rows per query, so
    the 3 shifted queries give 6 rows and the rest come from the web rows; dasa_selected.jsonl lists them best
    first with their scores; the shift report's shares and AUROC (medical positive) match sklearn. Catches the
    per-query cap not passed to dasa_select, rows written in another order than selected, and the shift AUROC
    computed with the domains swapped."""
    table, data = world()
    args = make_args(tmp_path)
    dasa.make_selection(FakeJudge(table), data, args, runtime())
    picked = read(tmp_path / "out" / "stage2" / "dasa_selected.jsonl")
    assert len(picked) == 10
    by_id = {r["id"]: r for r in data["pool"]}
    queries = [by_id[p["id"]]["query"] for p in picked]
    assert max(queries.count(q) for q in set(queries)) == 2
    assert sum(p["id"].startswith("m") for p in picked) == 6  # 3 shifted queries x 2
    scores = brute_kth(feats(table, data["id_train"]), feats(table, data["pool"]), 3)
    assert [p["score"] for p in picked] == sorted((p["score"] for p in picked), reverse=True)
    ref = [scores[data["pool"].index(by_id[p["id"]])] for p in picked]
    np.testing.assert_allclose([p["score"] for p in picked], ref, rtol=1e-4)
    report = json.loads((tmp_path / "out" / "stage2" / "ood_report.json").read_text(encoding="utf-8"))
    is_medical = np.array([r["domain"] == "medical" for r in data["pool"]])
    assert report["pool_shift_auroc"] == pytest.approx(skm.roc_auc_score(is_medical, scores), abs=1e-6)
    assert report["pool_shift_auroc"] > 0.95
    assert report["selected_share"] == {"medical": 0.6, "web": 0.4}
    assert report["pool_share"]["medical"] == pytest.approx(18 / 78)


def test_select_scores_with_the_stage1_adapter_then_reuses_the_selection(tmp_path):
    """select(adapter_dir=...) loads the stage-1 adapter before any feature is computed, returns the selected pool
    rows with their oracle labels, and a second call reuses dasa_selected.jsonl (no features, same rows). Catches
    DASA scored with the base model's features, a selection redone (and changed) by stage 3, and labels lost."""
    table, data = world()
    args = make_args(tmp_path)
    j = FakeJudge(table)
    first = dasa.select(j, data, args, runtime(), adapter_dir="OUT/stage1")
    assert j.calls[0] == ("load", "OUT/stage1") and all(c[0] == "features" for c in j.calls[1:])
    by_id = {r["id"]: r for r in data["pool"]}
    assert len(first) == 10 and all(r == by_id[r["id"]] and r["label"] is not None for r in first)
    j.calls.clear()
    again = dasa.select(j, data, args, runtime(), adapter_dir="OUT/stage1")
    assert again == first and not any(c[0] == "features" for c in j.calls)


def test_unlabelled_pool_writes_the_annotation_file_and_stops(tmp_path):
    """Without pool labels: to_annotate.jsonl holds the selected rows (label null) and the run stops saying what
    to do; with annotated.jsonl the labels come from it. Catches an unlabelled row trained on (label None) and
    annotations matched to the wrong rows."""
    table, data = world()
    truth = {r["id"]: r["label"] for r in data["pool"]}
    for r in data["pool"]:
        r["label"] = None
    args = make_args(tmp_path)
    with pytest.raises(SystemExit, match="annotated.jsonl"):
        dasa.select(FakeJudge(table), data, args, runtime())
    todo = read(tmp_path / "out" / "stage2" / "to_annotate.jsonl")
    assert len(todo) == 10 and all(r["label"] is None for r in todo)
    with open(tmp_path / "out" / "stage2" / "annotated.jsonl", "w", encoding="utf-8") as f:
        for r in reversed(todo):
            f.write(json.dumps({**r, "label": truth[r["id"]]}) + "\n")
    rows = dasa.select(FakeJudge(table), data, args, runtime())
    assert [r["id"] for r in rows] == [r["id"] for r in todo] and all(r["label"] == truth[r["id"]] for r in rows)


def test_random_selection_is_capped_and_reads_no_features(tmp_path):
    """--select random: a seeded sample under the same per-query cap, computed without scoring the pool. Catches a
    baseline that is not capped (unlike DASA: the comparison would not be like for like) or that is secretly
    ranked by the OOD score."""
    table, data = world()
    args = make_args(tmp_path, select="random", budget=12)
    j = FakeJudge(table)
    dasa.make_selection(j, data, args, runtime())
    picked = [p["id"] for p in read(tmp_path / "out" / "stage2" / "dasa_selected.jsonl")]
    by_id = {r["id"]: r for r in data["pool"]}
    queries = [by_id[i]["query"] for i in picked]
    assert len(picked) == 12 and max(queries.count(q) for q in set(queries)) <= 2
    assert not j.calls and sum(i.startswith("m") for i in picked) < 6  # ranked by score: 6 (3 queries x 2)
