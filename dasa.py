"""The DASA step of a run (Distribution-Aware Sample Augmentation): the features of id_train (the bank),
the pool and the dev splits -> an OOD score per pool row (ood.pool_scores) -> dasa_select -> the rows'
labels (oracle from the pool, or an annotation round trip). The selection is made once per OUT and
reused; ood_report.json says how well the score separated id_dev from ood_dev and the pool's domains.
"""
import json
import os
import time

import numpy as np
import torch

import ood
from dataset import DataError, read_annotations, read_jsonl, write_annotation_file, write_json, write_jsonl


def features_with_progress(judge, data, splits, rt):
    """Features of each split, with a progress line per split (minutes on a CPU)."""
    feats, t0, done, total = {}, time.time(), 0, sum(len(data[s]) for s in splits)
    for split in splits:
        feats[split] = judge.features(data[split])
        done += len(data[split])
        rt.log(f"features {split}: {done:,}/{total:,} rows, {time.time() - t0:.0f}s, "
               f"eta {(time.time() - t0) / done * (total - done) / 60:.1f} min")
    return feats


def score_pool(judge, data, args, rt):
    """OOD score of every pool row against the id_train features (the bank), and a report: the settings,
    and how well the score tells id_dev from ood_dev (those two as its pool) when there is an ood_dev."""
    for split, need in (("id_train", args.k), ("pool", args.k + 1)):
        if len(data[split]) < need:
            raise DataError(f"{os.path.join(args.data, split + '.jsonl')}: {len(data[split])} rows (after --limit), "
                            f"but --k {args.k} needs at least {need}")
    feats = features_with_progress(judge, data, [s for s in ("id_train", "pool", "id_dev", "ood_dev") if s in data], rt)
    bank, bank_labels = feats["id_train"], [r["label"] for r in data["id_train"]]
    scores = ood.pool_scores(args.ood_score, bank, feats["pool"], args.k, bank_labels)
    report = {k: getattr(args, k) for k in ("ood_score", "select", "budget", "k", "max_per_query", "layer", "pooling")}
    if "ood_dev" in feats:
        n = len(feats["id_dev"])
        dev = ood.pool_scores(args.ood_score, bank, torch.cat([feats["id_dev"], feats["ood_dev"]]), args.k, bank_labels)
        report |= {"dev_auroc": ood.auroc(dev[:n], dev[n:]), "dev_fpr95": ood.fpr_at_tpr(dev[:n], dev[n:])}
    return scores, feats["pool"], report


def shift_report(pool, scores, idx):
    """With a `domain` on every pool row: each domain's share of the pool and of the selection, and the
    AUROC of the score for the domains other than the largest one (the shift)."""
    domains = [r.get("domain") for r in pool]
    if not all(domains):
        return {}
    names, main_domain = sorted(set(domains)), max(set(domains), key=domains.count)
    is_shift, s = np.array([d != main_domain for d in domains]), np.asarray(scores, dtype=np.float64)
    return {"pool": len(pool), "selected": len(idx),
            "selected_share": {n: sum(domains[i] == n for i in idx) / max(1, len(idx)) for n in names},
            "pool_share": {n: domains.count(n) / len(pool) for n in names},
            "pool_shift_auroc": ood.auroc(s[~is_shift], s[is_shift])}


def selection_dir(args):
    """Where the selection is made: the DASA stage (darl: stage 2; lpft: stage 1, before the probe)."""
    return os.path.join(args.out, "stage1" if args.schedule == "lpft" else "stage2")


def make_selection(judge, data, args, rt):
    """Score the pool (not for --select random: it reads no score), pick --budget rows, write
    dasa_selected.jsonl and ood_report.json."""
    pool = data["pool"]
    if args.select == "random":
        scores, report = np.zeros(len(pool)), {"select": "random", "budget": args.budget, "max_per_query": args.max_per_query}
        idx = ood.random_select(scores, args.budget, groups=[r["query"] for r in pool], max_per_group=args.max_per_query,
                                seed=args.seed)
    else:
        scores, pool_feats, report = score_pool(judge, data, args, rt)
        idx = ood.dasa_select(scores, args.budget, features=pool_feats, groups=[r["query"] for r in pool],
                              max_per_group=args.max_per_query, seed=args.seed)
    idx = [int(i) for i in idx]
    report |= shift_report(pool, scores, idx)
    rt.log("DASA: " + json.dumps(report))
    if rt.main:
        write_json(os.path.join(selection_dir(args), "ood_report.json"), report)
        write_jsonl(os.path.join(selection_dir(args), "dasa_selected.jsonl"),
                    [{"id": pool[i]["id"], "score": float(scores[i]), **({"domain": pool[i]["domain"]} if "domain" in pool[i] else {})}
                     for i in idx])
    rt.barrier()


def labelled(judge, picks, data, args, rt):
    """The selected pool rows with labels: the pool's own (oracle) when every one has a label, else
    annotated.jsonl; without that, to_annotate.jsonl is written and the run stops with what to do."""
    by_id = {r["id"]: r for r in data["pool"]}
    selected = [by_id[p["id"]] for p in picks]
    if all(r.get("label") is not None for r in selected):
        rt.log(f"labels for {len(selected)} selected rows: oracle (the pool carries labels)")
        return selected
    done, todo = (os.path.join(selection_dir(args), name) for name in ("annotated.jsonl", "to_annotate.jsonl"))
    if os.path.exists(done):
        labels = read_annotations(done, [r["id"] for r in selected], len(judge.grade_ids))
        return [{**r, "label": labels[r["id"]]} for r in selected]
    if rt.main:
        write_annotation_file(todo, selected, [p["score"] for p in picks])
    raise SystemExit(f"{len(selected)} selected pool rows need labels: fill the 'label' field of each row in {todo}, "
                     f"save the file as {done}, then rerun the same command with --resume.")


def select(judge, data, args, rt, adapter_dir=None):
    """DASA's labelled rows: the selection is made once per OUT (with the features of adapter_dir's
    model, or of the base model) and reused by every later stage."""
    path = os.path.join(selection_dir(args), "dasa_selected.jsonl")
    if not os.path.exists(path):
        if adapter_dir:
            judge.load(adapter_dir)
        make_selection(judge, data, args, rt)
    else:
        rt.log(f"DASA: reusing the selection in {path}")
    return labelled(judge, [row for _, row in read_jsonl(path)], data, args, rt)
