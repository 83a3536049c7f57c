"""Which features and which score find the shifted domain? layer x pooling x scorer on qbqtc2kuake.

Base Gemma 3 270M (no fine-tuning), the benchmark's own prompt (meta.json), a seeded subsample:
bank = 3000 id_train rows (the training set DASA compares against), 1000 id_test vs 1000 ood_test
(web vs medical) and 2000 pool rows (1500 web + 500 medical, the prepared 3:1 mix).

Columns:
  id-vs-ood AUROC / FPR95: id_test vs ood_test. knn and mahalanobis score against the bank;
      coverage treats id_test + ood_test as the pool (a 1:1 mix).
  pool AUROC / P@500: web vs medical rows of the pool (coverage uses the pool itself);
      P@500 = medical fraction of the 500 rows dasa_select takes (one per query group),
      random = 0.25.
Next to it a character TF-IDF k-NN baseline (scikit-learn; bench-only), and MSP / energy over the
base model's grade logits (they need no bank). Features come from one forward pass per batch with
hooks on every block; a spot check asserts they equal ood.extract_features. Pooled features are
cached in out/ so re-scoring is fast. Prints a markdown table; writes bench/results/ood_features.json.

    python bench/ood_features.py [--threads 2] [--k 10]
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import darl  # noqa: E402
import model as model_lib  # noqa: E402
import ood  # noqa: E402

DATA, WEIGHTS = ROOT / "data" / "qbqtc2kuake", ROOT / "data" / "gemma3_270m"
SIZES = dict(bank=3000, id_test=1000, ood_test=1000, pool_web=1500, pool_medical=500)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_rows(seed=0):
    rng = random.Random(seed)
    pool = read_jsonl(DATA / "pool.jsonl")
    return dict(
        bank=rng.sample(read_jsonl(DATA / "id_train.jsonl"), SIZES["bank"]),
        id_test=rng.sample(read_jsonl(DATA / "id_test.jsonl"), SIZES["id_test"]),
        ood_test=rng.sample(read_jsonl(DATA / "ood_test.jsonl"), SIZES["ood_test"]),
        pool=rng.sample([r for r in pool if r["domain"] == "web"], SIZES["pool_web"])
        + rng.sample([r for r in pool if r["domain"] == "medical"], SIZES["pool_medical"]),
    )


@torch.no_grad()
def all_layer_features(m, examples, pad_id, grade_ids, batch_size=16):
    """Un-normalised pooled features of every block output (1..L) and the final normed state, for
    'last' and 'mean' pooling, plus base-model grade logits at the answer position. One pass."""
    L = m.args.n_layers
    captured = {}
    hooks = [m.layers[i].register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i + 1, out))
             for i in range(L)]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    feats = {p: torch.zeros(L + 1, len(examples), m.args.dim) for p in ("last", "mean")}
    logits = torch.zeros(len(examples), len(grade_ids))
    t0 = time.time()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = darl.collate([examples[i] for i in idx], pad_id, multiple=8)
        final = m(b["input_ids"], b["attention_mask"])
        c = b["content_mask"].float()
        last = (b["content_mask"] * torch.arange(c.shape[1])).argmax(1)
        for layer in range(1, L + 2):
            h = (final if layer == L + 1 else captured[layer]).float()
            feats["mean"][layer - 1, idx] = (h * c[..., None]).sum(1) / c.sum(1, keepdim=True)
            feats["last"][layer - 1, idx] = h[torch.arange(len(idx)), last]
        answer = final[torch.arange(len(idx)), b["attention_mask"].sum(1) - 1]
        logits[idx] = m.logits(answer, grade_ids).float()
        if s // batch_size % 20 == 0:
            print(f"  {s + len(idx)}/{len(examples)} rows, {time.time() - t0:.0f}s", flush=True)
    for h in hooks:
        h.remove()
    return feats, logits


def tfidf_features(rows, bank_rows):
    """Character 1-3-gram TF-IDF of query + item, fit on the bank, rows L2-normalised (sparse)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
    vec.fit([r["query"] + " " + r["item"] for r in bank_rows])
    return {name: vec.transform([r["query"] + " " + r["item"] for r in rs]) for name, rs in rows.items()}


def sparse_kth(bank, queries, k, exclude_self=False):
    """k-th nearest Euclidean distance between unit-norm sparse rows: sqrt(2 - 2 cos)."""
    d = np.sqrt(np.clip(2 - 2 * (queries @ bank.T).toarray(), 0, None))
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


def top_precision(scores, is_ood, groups, budget=500):
    picked = ood.dasa_select(torch.as_tensor(scores), budget, groups=groups, max_per_group=1)
    return float(is_ood[picked].mean())


def evaluate(F, k, labels, is_ood_pool, groups):
    """All scores for one feature set F = {split: (N, D) float32 tensors}."""
    id_t, ood_t = F["id_test"], F["ood_test"]
    out = {}
    s_id, s_ood = ood.knn_score(F["bank"], id_t, k), ood.knn_score(F["bank"], ood_t, k)
    out["knn"] = dict(auroc=ood.auroc(s_id, s_ood), fpr95=ood.fpr_at_tpr(s_id, s_ood))
    s_id, s_ood = (ood.mahalanobis_score(F["bank"], labels, x) for x in (id_t, ood_t))
    out["mahalanobis"] = dict(auroc=ood.auroc(s_id, s_ood), fpr95=ood.fpr_at_tpr(s_id, s_ood))
    s = ood.coverage_score(F["bank"], torch.cat([id_t, ood_t]), k)
    s_id, s_ood = s[:len(id_t)], s[len(id_t):]
    out["coverage"] = dict(auroc=ood.auroc(s_id, s_ood), fpr95=ood.fpr_at_tpr(s_id, s_ood))
    for name, s in (("knn", ood.knn_score(F["bank"], F["pool"], k)), ("coverage", ood.coverage_score(F["bank"], F["pool"], k))):
        s = s.numpy()
        out[name]["pool_auroc"] = ood.auroc(s[~is_ood_pool], s[is_ood_pool])
        out[name]["pool_p@500"] = top_precision(s, is_ood_pool, groups)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--cache", default=str(ROOT / "out" / "bench_ood_features.pt"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for d in (WEIGHTS, DATA):
        if not d.exists():
            sys.exit(f"{d} is missing: run {d.relative_to(ROOT)}/prepare.py first")
    rows = load_rows()
    meta = json.loads((DATA / "meta.json").read_text(encoding="utf-8"))
    template = meta.get("prompt", darl.DEFAULT_PROMPT)
    tok = model_lib.Tokenizer(WEIGHTS)
    m = model_lib.Transformer.from_pretrained(WEIGHTS)
    grade_ids = torch.tensor(darl.grade_token_ids(tok, [str(g) for g in range(len(meta["grades"]))]))
    names = list(rows)
    examples = [darl.encode_pair(tok, r["query"], r["item"], template, args.max_len) for n in names for r in rows[n]]
    cache = Path(args.cache)
    key = dict(sizes=SIZES, max_len=args.max_len, template=template, n=len(examples))
    if cache.exists() and torch.load(cache)["key"] == key:
        saved = torch.load(cache)
    else:
        print(f"extracting features for {len(examples)} rows ({m.args.n_layers} layers, one pass)", flush=True)
        t0 = time.time()
        feats, logits = all_layer_features(m, examples, tok.pad_id, grade_ids)
        saved = dict(key=key, feats={p: f.half() for p, f in feats.items()}, logits=logits,
                     seconds=time.time() - t0)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, cache)
    # spot check: the hooked pass equals ood.extract_features
    for layer, pooling in ((6, "mean"), (None, "last")):
        ref = ood.extract_features(m, examples[:8], tok.pad_id, layer=layer, pooling=pooling)
        got = torch.nn.functional.normalize(saved["feats"][pooling][(layer or m.args.n_layers + 1) - 1, :8].float(), dim=1)
        assert (got - ref).abs().max() < 2e-2, (layer, pooling, (got - ref).abs().max())  # fp16 cache

    bounds = np.cumsum([0] + [len(rows[n]) for n in names])
    split = {n: slice(bounds[i], bounds[i + 1]) for i, n in enumerate(names)}
    labels = torch.tensor([r["label"] for r in rows["bank"]])
    is_ood_pool = np.array([r["domain"] == "medical" for r in rows["pool"]])
    groups = [r["group"] for r in rows["pool"]]
    results = dict(setup=dict(sizes=SIZES, k=args.k, max_len=args.max_len, model=str(WEIGHTS.relative_to(ROOT)),
                              prompt="meta.json", extract_seconds=saved["seconds"], threads=args.threads),
                   rows=[])
    results["random_p@500"] = float(np.mean([is_ood_pool[ood.random_select(np.zeros(len(groups)), 500, groups=groups,
                                                                          max_per_group=1, seed=s)].mean()
                                             for s in range(10)]))
    L = m.args.n_layers
    for pooling in ("last", "mean"):
        for layer in range(1, L + 2):
            raw = saved["feats"][pooling][layer - 1].float()
            for centred in (False, True):
                x = raw - raw[split["bank"]].mean(0) if centred else raw
                F = {n: torch.nn.functional.normalize(x[split[n]], dim=1) for n in names}
                res = evaluate(F, args.k, labels, is_ood_pool, groups)
                results["rows"].append(dict(layer=layer if layer <= L else "final", pooling=pooling,
                                            centred=centred, **res))
                print(pooling, layer, centred, {s: round(v["auroc"], 3) for s, v in res.items()}, flush=True)
    T = tfidf_features(rows, rows["bank"])
    s_id, s_ood = sparse_kth(T["bank"], T["id_test"], args.k), sparse_kth(T["bank"], T["ood_test"], args.k)
    tf = dict(knn=dict(auroc=ood.auroc(s_id, s_ood), fpr95=ood.fpr_at_tpr(s_id, s_ood)))
    from scipy.sparse import vstack  # scikit-learn's own dependency; bench-only
    both = vstack([T["id_test"], T["ood_test"]]).tocsr()
    s = sparse_kth(T["bank"], both, args.k) / np.maximum(sparse_kth(both, both, args.k, exclude_self=True), 1e-6)
    tf["coverage"] = dict(auroc=ood.auroc(s[:len(s_id)], s[len(s_id):]), fpr95=ood.fpr_at_tpr(s[:len(s_id)], s[len(s_id):]))
    for name, s in (("knn", sparse_kth(T["bank"], T["pool"], args.k)),
                    ("coverage", sparse_kth(T["bank"], T["pool"], args.k)
                     / np.maximum(sparse_kth(T["pool"], T["pool"], args.k, exclude_self=True), 1e-6))):
        tf[name]["pool_auroc"] = ood.auroc(s[~is_ood_pool], s[is_ood_pool])
        tf[name]["pool_p@500"] = top_precision(s, is_ood_pool, groups)
    results["tfidf_char_1_3"] = tf
    logits = saved["logits"]
    results["grade_logits"] = {}
    for name, fn in (("msp", ood.msp_score), ("energy", ood.energy_score)):
        s = fn(logits)
        s_id, s_ood = s[split["id_test"]], s[split["ood_test"]]
        results["grade_logits"][name] = dict(auroc=ood.auroc(s_id, s_ood), fpr95=ood.fpr_at_tpr(s_id, s_ood))

    out = ROOT / "bench" / "results" / "ood_features.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    print(out)


def print_table(results):
    f = lambda v: f"{v:.2f}"  # noqa: E731
    print("\n| layer | pooling | centred | knn AUROC | knn FPR95 | maha AUROC | maha FPR95 | cov AUROC | cov FPR95 "
          "| pool knn AUROC | pool knn P@500 | pool cov AUROC | pool cov P@500 |")
    print("|" + "---|" * 13)
    for r in results["rows"]:
        k, mh, c = r["knn"], r["mahalanobis"], r["coverage"]
        print(f"| {r['layer']} | {r['pooling']} | {'yes' if r['centred'] else 'no'} | {f(k['auroc'])} | {f(k['fpr95'])} "
              f"| {f(mh['auroc'])} | {f(mh['fpr95'])} | {f(c['auroc'])} | {f(c['fpr95'])} | {f(k['pool_auroc'])} "
              f"| {f(k['pool_p@500'])} | {f(c['pool_auroc'])} | {f(c['pool_p@500'])} |")
    t = results["tfidf_char_1_3"]
    print(f"| TF-IDF char 1-3 | - | - | {f(t['knn']['auroc'])} | {f(t['knn']['fpr95'])} | - | - "
          f"| {f(t['coverage']['auroc'])} | {f(t['coverage']['fpr95'])} | {f(t['knn']['pool_auroc'])} "
          f"| {f(t['knn']['pool_p@500'])} | {f(t['coverage']['pool_auroc'])} | {f(t['coverage']['pool_p@500'])} |")
    for name, v in results["grade_logits"].items():
        print(f"| grade logits | {name} | - | {f(v['auroc'])} | {f(v['fpr95'])} | - | - | - | - | - | - | - | - |")
    print(f"\nrandom P@500 = {results['random_p@500']:.2f}")


if __name__ == "__main__":
    main()
