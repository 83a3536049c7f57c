"""Which features and which score find the shifted domain? layer x pooling x score, on the dev splits only.

Base Gemma 3 270M (no fine-tuning), the benchmark's own prompt (meta.json), seeded subsamples:
bank = 1,000 id_train rows (what DASA compares against in the CPU run), id_dev vs ood_dev (1,000 each),
and a dev-only pool of 750 id_dev + 250 ood_dev rows (the 3:1 web:medical mix of the real pool).
No test split and no row of the real pool is read: these numbers choose ood.py's defaults.

Columns:
  dev AUROC / FPR95: id_dev vs ood_dev. knn, mahalanobis and maha_knn score against the bank;
      coverage treats id_dev + ood_dev as its pool (a 1:1 mix).
  pool AUROC / P@250: web vs medical rows of the dev pool (coverage uses that pool itself);
      P@250 = medical share of the 250 rows dasa_select takes (at most 3 per query, as train.py), random 0.25.
  The defaults are the (layer, pooling, score) with the best P@250 (what DASA is for), then AUROC.
Next to it a character TF-IDF k-NN baseline (scikit-learn; bench-only), and MSP / energy over the
base model's grade logits. Features come from one forward pass per batch with hooks on every block;
a spot check asserts they equal ood.extract_features. Writes bench/results/ood_features.json.

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
sys.path.insert(0, str(ROOT / "bench"))
import darl  # noqa: E402
from common import git_commit, machine, machine_line, now  # noqa: E402
import model as model_lib  # noqa: E402
import tokenizer  # noqa: E402
import ood  # noqa: E402

DATA, WEIGHTS = ROOT / "data" / "qbqtc2kuake", ROOT / "data" / "gemma3_270m"
SIZES = dict(bank=1000, id_dev=1000, ood_dev=1000, pool_web=750, pool_medical=250)
SCORES = ("knn", "mahalanobis", "maha_knn", "coverage")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_rows(seed=0):
    """bank, id_dev, ood_dev and the dev pool (its rows are id_dev and ood_dev rows: no extra features)."""
    rng = random.Random(seed)
    rows = dict(bank=rng.sample(read_jsonl(DATA / "id_train.jsonl"), SIZES["bank"]),
                id_dev=rng.sample(read_jsonl(DATA / "id_dev.jsonl"), SIZES["id_dev"]),
                ood_dev=rng.sample(read_jsonl(DATA / "ood_dev.jsonl"), SIZES["ood_dev"]))
    pool = rows["id_dev"][:SIZES["pool_web"]] + rows["ood_dev"][:SIZES["pool_medical"]]
    return rows, [r["id"] for r in random.Random(seed).sample(pool, len(pool))]


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


def top_precision(scores, is_ood, groups, budget=250):
    picked = ood.dasa_select(torch.as_tensor(scores), budget, groups=groups, max_per_group=3)
    return float(is_ood[picked].mean())


def evaluate(F, k, labels, is_ood_pool, groups):
    """Every score for one feature set F = {bank, id_dev, ood_dev, pool: (N, D) float32 tensors}."""
    id_d, ood_d = F["id_dev"], F["ood_dev"]
    out = {}
    for name in SCORES:
        s = ood.pool_scores(name, F["bank"], torch.cat([id_d, ood_d]), k, labels)
        s_id, s_ood = s[:len(id_d)], s[len(id_d):]
        p = ood.pool_scores(name, F["bank"], F["pool"], k, labels).numpy()
        out[name] = dict(auroc=ood.auroc(s_id, s_ood), fpr95=ood.fpr_at_tpr(s_id, s_ood),
                         pool_auroc=ood.auroc(p[~is_ood_pool], p[is_ood_pool]), **{"pool_p@250": top_precision(p, is_ood_pool, groups)})
    return out


def pool_of(rows, pool_ids, x, split):
    """The dev pool's rows of a per-row array x (the pool is made of id_dev and ood_dev rows)."""
    where = {r["id"]: split[n].start + j for n in ("id_dev", "ood_dev") for j, r in enumerate(rows[n])}
    return x[[where[i] for i in pool_ids]]


def feature_table(saved, rows, pool_ids, split, k, n_layers):
    """One result row per (layer, pooling): every score's dev AUROC / FPR95 and pool AUROC / P@250."""
    by_id = {r["id"]: r for n in ("id_dev", "ood_dev") for r in rows[n]}
    is_ood_pool = np.array([by_id[i]["domain"] == "medical" for i in pool_ids])
    groups = [by_id[i]["query"] for i in pool_ids]
    labels = torch.tensor([r["label"] for r in rows["bank"]])
    out = []
    for pooling in ("last", "mean"):
        for layer in range(1, n_layers + 2):
            x = torch.nn.functional.normalize(saved["feats"][pooling][layer - 1].float(), dim=1)
            F = {n: x[split[n]] for n in ("bank", "id_dev", "ood_dev")} | {"pool": pool_of(rows, pool_ids, x, split)}
            res = evaluate(F, k, labels, is_ood_pool, groups)
            out.append(dict(layer=layer if layer <= n_layers else "final", pooling=pooling, **res))
            print(pooling, layer, {s: (round(v["auroc"], 3), round(v["pool_p@250"], 3)) for s, v in res.items()}, flush=True)
    random_p = float(np.mean([is_ood_pool[ood.random_select(np.zeros(len(groups)), 250, groups=groups, max_per_group=3,
                                                            seed=s)].mean() for s in range(10)]))
    return out, random_p, is_ood_pool, groups


def baselines(rows, pool_ids, saved, split, k, is_ood_pool, groups):
    """Character TF-IDF k-NN / coverage (no model), and MSP / energy of the base model's grade logits."""
    T = tfidf_features({n: rows[n] for n in ("bank", "id_dev", "ood_dev")}, rows["bank"])
    by_id = {r["id"]: r for n in ("id_dev", "ood_dev") for r in rows[n]}
    T["pool"] = tfidf_features({"pool": [by_id[i] for i in pool_ids]}, rows["bank"])["pool"]
    from scipy.sparse import vstack  # scikit-learn's own dependency; bench-only
    both = vstack([T["id_dev"], T["ood_dev"]]).tocsr()
    n_id, tf = T["id_dev"].shape[0], {}
    coverage = lambda q: sparse_kth(T["bank"], q, k) / np.maximum(sparse_kth(q, q, k, exclude_self=True), 1e-6)  # noqa: E731
    for name, dev, pool in (("knn", sparse_kth(T["bank"], both, k), sparse_kth(T["bank"], T["pool"], k)),
                            ("coverage", coverage(both), coverage(T["pool"]))):
        tf[name] = dict(auroc=ood.auroc(dev[:n_id], dev[n_id:]), fpr95=ood.fpr_at_tpr(dev[:n_id], dev[n_id:]),
                        pool_auroc=ood.auroc(pool[~is_ood_pool], pool[is_ood_pool]),
                        **{"pool_p@250": top_precision(pool, is_ood_pool, groups)})
    logits = {}
    for name, fn in (("msp", ood.msp_score), ("energy", ood.energy_score)):
        s = fn(saved["logits"])
        logits[name] = dict(auroc=ood.auroc(s[split["id_dev"]], s[split["ood_dev"]]),
                            fpr95=ood.fpr_at_tpr(s[split["id_dev"]], s[split["ood_dev"]]))
    return tf, logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--cache", default=str(ROOT / "out" / "bench_ood_features_dev.pt"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for d in (WEIGHTS, DATA):
        if not d.exists():
            sys.exit(f"{d} is missing: run {d.relative_to(ROOT)}/prepare.py first")
    rows, pool_ids = load_rows()
    meta = json.loads((DATA / "meta.json").read_text(encoding="utf-8"))
    tok = tokenizer.Tokenizer(WEIGHTS)
    m = model_lib.Transformer.from_pretrained(WEIGHTS)
    grade_ids = torch.tensor(darl.grade_token_ids(tok, meta.get("verbalizer", [str(g) for g in range(len(meta["grades"]))])))
    names = list(rows)
    examples = [darl.encode_pair(tok, r["query"], r["item"], meta["prompt"], args.max_len) for n in names for r in rows[n]]
    cache, key = Path(args.cache), dict(sizes=SIZES, max_len=args.max_len, template=meta["prompt"], n=len(examples))
    if cache.exists() and torch.load(cache)["key"] == key:
        saved = torch.load(cache)
    else:
        print(f"extracting features for {len(examples)} rows ({m.args.n_layers} layers, one pass)", flush=True)
        t0 = time.time()
        feats, logits = all_layer_features(m, examples, tok.pad_id, grade_ids)
        saved = dict(key=key, feats={p: f.half() for p, f in feats.items()}, logits=logits, seconds=time.time() - t0)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(saved, cache)
    for layer, pooling in ((6, "mean"), (None, "last")):  # spot check: the hooked pass equals ood.extract_features
        ref = ood.extract_features(m, examples[:8], tok.pad_id, layer=layer, pooling=pooling)
        got = torch.nn.functional.normalize(saved["feats"][pooling][(layer or m.args.n_layers + 1) - 1, :8].float(), dim=1)
        assert (got - ref).abs().max() < 2e-2, (layer, pooling, (got - ref).abs().max())  # fp16 cache
    bounds = np.cumsum([0] + [len(rows[n]) for n in names])
    split = {n: slice(bounds[i], bounds[i + 1]) for i, n in enumerate(names)}
    table, random_p, is_ood_pool, groups = feature_table(saved, rows, pool_ids, split, args.k, m.args.n_layers)
    tfidf, logits = baselines(rows, pool_ids, saved, split, args.k, is_ood_pool, groups)
    best = max(((r["layer"], r["pooling"], s) for r in table for s in SCORES),
               key=lambda c: next((r[c[2]]["pool_p@250"], r[c[2]]["auroc"]) for r in table if (r["layer"], r["pooling"]) == c[:2]))
    results = dict(setup=dict(sizes=SIZES, k=args.k, max_len=args.max_len, model=str(WEIGHTS.relative_to(ROOT)),
                              extract_seconds=saved["seconds"], threads=args.threads,
                              machine=machine_line(machine(args.threads)), commit=git_commit(), date=now()),
                   scored_on=dict(auroc="id_dev vs ood_dev (1,000 each)", pool="750 id_dev + 250 ood_dev rows",
                                  bank="1,000 id_train rows"),
                   rows=table, **{"random_p@250": random_p}, tfidf_char_1_3=tfidf, grade_logits=logits,
                   chosen=dict(layer=best[0], pooling=best[1], score=best[2], rule="best pool P@250, then dev AUROC"))
    out = ROOT / "bench" / "results" / "ood_features.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(table_lines(results)))
    print(out)


def table_lines(results):
    """The (layer, pooling) x score table, P@250 and AUROC per score, best P@250 in bold; baselines below."""
    lines = ["| layer | pooling | " + " | ".join(f"{s} AUROC / P@250" for s in SCORES) + " |", "|---|---|" + "---:|" * len(SCORES)]
    c = results["chosen"]
    for r in results["rows"]:
        cells = [f"{r[s]['auroc']:.2f} / {r[s]['pool_p@250']:.2f}" for s in SCORES]
        cells = [f"**{x}**" if (r["layer"], r["pooling"], s) == (c["layer"], c["pooling"], c["score"]) else x
                 for x, s in zip(cells, SCORES)]
        lines.append(f"| {r['layer']} | {r['pooling']} | " + " | ".join(cells) + " |")
    t = results["tfidf_char_1_3"]
    lines += ["", f"Character TF-IDF: knn AUROC {t['knn']['auroc']:.2f} / P@250 {t['knn']['pool_p@250']:.2f}, "
                  f"coverage {t['coverage']['auroc']:.2f} / {t['coverage']['pool_p@250']:.2f}. Grade logits of the base "
                  f"model: MSP AUROC {results['grade_logits']['msp']['auroc']:.2f}, energy "
                  f"{results['grade_logits']['energy']['auroc']:.2f}. Random selection P@250 {results['random_p@250']:.2f}. "
                  f"Chosen: layer {c['layer']}, pooling {c['pooling']}, score {c['score']} ({c['rule']})."]
    return lines


if __name__ == "__main__":
    main()
