"""DaRL's parts, one at a time: the ablation table with paired-bootstrap intervals, made by calling train.py.

    python bench/ablation.py                          # every row, seeds 0,1,2, in PRIORITY order, resumable
    python bench/ablation.py --rows darl,sft_w --seeds 0
    python bench/ablation.py --full                   # no row caps (meant for a GPU)
    python bench/ablation.py --plan                   # what is left, and the commands
    python bench/ablation.py --table                  # deltas.json and ablation.md again from the files

Each (row, seed) trains in out/ablation/<row>_seed<k> (train.py with the row's arguments, the CPU size and
--eval_on "": no split is scored while training), then its reported stage is scored
once by `train.py --stage eval` on the dev splits and the large test sets (TEST_LIMIT rows of id_test,
all of ood_test). Per finished (row, seed): bench/results/ablation/<row>_seed<k>.json (metrics, DASA
report, minutes, commands, machine, commit) and preds/<row>_seed<k>_<split>.npz (per-row test
probabilities), from which deltas.json holds each comparison's paired bootstrap (darl.paired_bootstrap,
1,000 resamples of test rows and of seeds, over the seeds both rows have) and the verdict it gives.
Rows that continue another row's stage 1 (or selection) copy it into their own OUT; rows sharing an OUT
(`out`) cost only their evaluation.
"""
import argparse
import hashlib
import re
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import ROOT, machine, machine_line, now, git_commit, read_json, read_jsonl, rel, run_train, write_json  # noqa: E402

CPU_ARGS = ["--limit", "1000"]
TEST_LIMIT = 2913  # id_test rows scored (of 4,989), and all 2,913 of ood_test
LPFT = ["--schedule", "lpft", "--lp_lr", "1e-3"]  # the LP-FT rows ran at 1e-3, the default before the lp sweep's seed 1
# stages: train.py stages run in OUT; report: the stage scored; src: copy that row's stage1/ first; out: share that
# row's OUT; dev: also scored on the dev splits (the rows the defaults are chosen among: schedule and OOD score)
ROWS = {
    "zero_shot": dict(run="zero-shot (base model)", stages=[], report=None, args=[]),
    "sft_w": dict(run="stage 1, sft_loss (full vocabulary), class-weighted", stages=["1"], report="1", args=["--loss", "sft"]),
    "ce": dict(run="stage 1, CE over the grade tokens", stages=["1"], report="1",
               args=["--ordinal_weight", "0", "--calibration_weight", "0", "--class_weight", "none"]),
    "ce_w": dict(run="+ class weights", stages=["1"], report="1", args=["--ordinal_weight", "0", "--calibration_weight", "0"]),
    "ce_w_ord": dict(run="+ ordinal term", stages=["1"], report="1", args=["--calibration_weight", "0"]),
    "darl": dict(run="+ confidence penalty = darl_loss (stage 1)", stages=["1"], report="1", args=[]),
    "random": dict(run="1 -> 2 -> 3, random rows", stages=["2", "3"], report="3", args=["--select", "random"], src="darl"),
    "dasa_s2": dict(run="1 -> 2, DASA", stages=["2"], report="2", args=[], src="darl", out="dasa"),
    "dasa": dict(run="1 -> 2 -> 3, DASA (DaRL, ours)", stages=["2", "3"], report="3", args=[], src="darl", dev=True),
    "dasa_s3": dict(run="1 -> 3, DASA", stages=["3"], report="3", args=["--stage3_from", "1"], src="darl", selection="dasa"),
    "knn": dict(run="1 -> 2 -> 3, DASA by knn_score", stages=["2", "3"], report="3", args=["--ood_score", "knn"], src="darl",
                dev=True),
    "maha": dict(run="1 -> 2 -> 3, DASA by Mahalanobis + kNN", stages=["2", "3"], report="3",
                 args=["--ood_score", "maha_knn"], src="darl", dev=True),
    "lpft_id": dict(run="LP-FT on id_train only", stages=["1", "2", "3"], report="3", args=LPFT + ["--select", "none"]),
    "lpft_noint": dict(run="LP-FT with DASA rows, alpha = 1", stages=["1", "2"], report="2", args=LPFT, out="lpft"),
    "lpft": dict(run="LP-FT with DASA rows, interpolated", stages=["1", "2", "3"], report="3", args=LPFT, dev=True),
    "ft_only": dict(run="FT with DASA rows, no LP", stages=["1", "2"], report="2", args=LPFT + ["--lp_steps", "0"]),
    "lpft_maha": dict(run="LP-FT, DASA by Mahalanobis + kNN", stages=["1", "2", "3"], report="3",
                      args=LPFT + ["--ood_score", "maha_knn"], dev=True),
}
# Comparisons: (row, reference row, the claim). A verdict follows from the interval of the ID or OOD delta.
UP, OOD_UP = {"id_test": 1, "ood_test": 1}, {"id_test": None, "ood_test": 1}
CLAIMS = [  # (row, reference row, what the comparison tests, the claimed sign of the macro-F1 delta per test split)
    ("darl", "sft_w", "the discriminative loss beats generative fine-tuning (same class weights)", UP),
    ("ce_w", "sft_w", "scoring only the grade tokens (both class-weighted)", UP),
    ("ce_w", "ce", "class weights", UP),
    ("ce_w_ord", "ce_w", "the ordinal term", UP),
    ("darl", "ce_w_ord", "the confidence penalty", UP),
    ("dasa", "random", "DASA's rows beat random pool rows", OOD_UP),
    ("dasa_s2", "darl", "stage 2 on the DASA rows", OOD_UP),
    ("dasa", "dasa_s2", "stage 3 (replay) after stage 2", UP),
    ("dasa", "dasa_s3", "stage 2 before stage 3", UP),
    ("dasa", "knn", "coverage score vs plain kNN", OOD_UP),
    ("dasa", "maha", "coverage score vs Mahalanobis + kNN (the paper's detectors)", OOD_UP),
    ("lpft", "dasa", "LP-FT + interpolation vs our three stages", UP),
    ("lpft", "lpft_id", "DASA rows inside LP-FT", OOD_UP),
    ("lpft", "lpft_noint", "weight interpolation", UP),
    ("lpft_noint", "ft_only", "linear probing before fine-tuning", UP),
    ("lpft", "lpft_maha", "coverage vs Mahalanobis + kNN under LP-FT", OOD_UP),
]
PRIORITY = ["darl", "sft_w", "zero_shot", "dasa_s2", "dasa", "random", "lpft_noint", "lpft", "dasa_s3", "knn", "maha",
            "ce", "ce_w", "ce_w_ord", "lpft_id", "ft_only", "lpft_maha"]
DEV, TEST = ("id_dev", "ood_dev"), ("id_test", "ood_test")
RES = ROOT / "bench" / "results" / "ablation"


def get_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(PRIORITY))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--full", action="store_true", help="no row caps (--limit 0): meant for a GPU")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plan", action="store_true")
    p.add_argument("--table", action="store_true")
    p.add_argument("--data", default=str(ROOT / "data" / "qbqtc2kuake"))
    p.add_argument("--results", default=str(RES))
    p.add_argument("--work", default=str(ROOT / "out" / "ablation"))
    p.add_argument("--train_args", default="", help="extra train.py arguments for every call (tests: a tiny model)")
    p.add_argument("--test_limit", type=int, default=TEST_LIMIT, help="rows scored per test split (tests: fewer)")
    args = p.parse_args(argv)
    args.rows, args.seeds = args.rows.split(","), [int(s) for s in args.seeds.split(",")]
    if bad := [r for r in args.rows if r not in ROWS]:
        p.error(f"--rows: unknown {bad} (rows: {', '.join(ROWS)})")
    args.size = ["--limit", "0"] if args.full else CPU_ARGS
    args.extra = args.train_args.split()
    args.results, args.work = Path(args.results), Path(args.work)
    return args


def out_dir(args, row, seed):
    return args.work / f"{ROWS[row].get('out', row)}_seed{seed}"


def train_cmd(args, row, seed, stage):
    return ["--stage", stage, "--out", rel(out_dir(args, row, seed)), "--seed", str(seed), "--resume", "--data",
            rel(args.data), "--eval_on", "", *args.size, *ROWS[row]["args"], *args.extra]


def eval_cmd(args, row, seed):
    out, stage = out_dir(args, row, seed), ROWS[row]["report"]
    adapter = ["--adapter", rel(out / f"stage{stage}")] if stage else []
    return ["--stage", "eval", "--out", rel(out), "--seed", str(seed), "--data", rel(args.data), "--eval_limit",
            str(args.test_limit), "--eval_on", ",".join(eval_splits(row)), *adapter, *args.extra]


def eval_splits(row):
    return (DEV if ROWS[row].get("dev") else ()) + TEST


def run(args, cmd, out):
    rc, seconds, _ = run_train(cmd, threads=args.threads)
    if rc != 0:
        sys.exit(f"error: train.py failed (exit {rc}) in {out}; see {out / 'log.txt'}; rerun the same command to continue")
    return seconds


def copy_in(src, dst):
    """Copy a finished stage dir (or a file) into another OUT, atomically."""
    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp)
    tmp.replace(dst)


def prepare(args, row, seed):
    """Copy in what the row continues from: another row's stage 1, or its selection."""
    spec, out = ROWS[row], out_dir(args, row, seed)
    out.mkdir(parents=True, exist_ok=True)
    if "src" in spec:
        run_row(args, spec["src"], seed)
        copy_in(train_row(args, spec["src"], seed, upto="1")[0], out / "stage1")
    if "selection" in spec:
        run_row(args, spec["selection"], seed)
        sel = train_row(args, spec["selection"], seed, upto="2")[0]
        (out / "stage2").mkdir(exist_ok=True)
        copy_in(sel / "ood_report.json", out / "stage2" / "ood_report.json")
        copy_in(sel / "dasa_selected.jsonl", out / "stage2" / "dasa_selected.jsonl")


def stage_minutes(out):
    """Minutes of each stage's train.py run, from OUT/bench_minutes.json."""
    path = out / "bench_minutes.json"
    return read_json(path) if path.exists() else {}


def timed(args, cmd, out, key):
    """Run train.py and add its minutes to OUT/bench_minutes.json under `key`: they survive a cut run and a
    stage trained by an earlier call (rare_shift's start() trains the largest budget's stage 2). Returns them."""
    minutes = stage_minutes(out)
    minutes[key] = minutes.get(key, 0) + run(args, cmd, out) / 60
    write_json(out / "bench_minutes.json", minutes)
    return minutes


def train_row(args, row, seed, upto=None):
    """Train the row's missing stages (up to stage `upto`), each timed into OUT/bench_minutes.json. Also called
    for a finished row whose OUT is gone (its JSON is committed, its adapters are not): the rows and runs that
    continue from it get its stage trained again from the same seed. Returns (the last stage's dir, minutes,
    the stages found finished without a time: trained elsewhere and copied in)."""
    spec, out = ROWS[row], out_dir(args, row, seed)
    stages = spec["stages"][:spec["stages"].index(upto) + 1] if upto else spec["stages"]
    prepare(args, row, seed)
    minutes = stage_minutes(out)
    found = [s for s in stages if (out / f"stage{s}" / "darl_config.json").exists() and s not in minutes]
    for stage in stages:
        if not (out / f"stage{stage}" / "darl_config.json").exists():
            minutes = timed(args, train_cmd(args, row, seed, stage), out, stage)
    return out / f"stage{stages[-1]}" if stages else None, minutes, found


def run_row(args, row, seed):
    """Train what is missing, evaluate the reported stage, write the row's JSON and test predictions."""
    path = args.results / f"{row}_seed{seed}.json"
    if path.exists():
        record = read_json(path)
        if record["settings"] != settings(args):
            raise SystemExit(f"error: {path} was made with other settings ({record['settings']} vs now {settings(args)})")
        return record
    spec, out = ROWS[row], out_dir(args, row, seed)
    _, minutes, found = train_row(args, row, seed)
    minutes["eval"] = run(args, eval_cmd(args, row, seed), out) / 60
    stage = spec["report"]
    results = [r for r in read_jsonl(out / "results.jsonl") if r["stage"].startswith("eval:")]
    metrics = {r["split"]: r for r in results[-len(eval_splits(row)):]}
    preds = export_predictions(args, row, seed, out, f"eval:{rel(out / f'stage{stage}') if stage else 'zero-shot'}")
    report = out / "stage2" / "ood_report.json" if (out / "stage2" / "ood_report.json").exists() else out / "stage1" / "ood_report.json"
    interp = [r for r in read_jsonl(out / "results.jsonl") if r["split"] == "interpolation"]
    record = {"row": row, "run": spec["run"], "seed": seed, "stage": stage, "out": rel(out), "metrics": metrics,
              "preds": preds, "ood_report": read_json(report) if report.exists() else None,
              "interpolation": interp[-1] if interp and stage == "3" else None,
              "minutes": {s: round(m, 2) for s, m in minutes.items() if s in spec["stages"] + ["eval"]},
              "stages_found_finished": found,  # trained elsewhere with the same arguments and copied in (see the README)
              "commands": [" ".join(train_cmd(args, row, seed, s)) for s in spec["stages"]] + [" ".join(eval_cmd(args, row, seed))],
              "settings": settings(args), "machine": machine_line(args.machine), "commit": git_commit(), "date": now()}
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record


def export_predictions(args, row, seed, out, stage):
    """The test splits' per-row probabilities of train.py's evaluation `stage` as float16 with labels and
    query indices, plus a hash of the row ids (pairs are only formed between files of the same rows)."""
    (args.results / "preds").mkdir(parents=True, exist_ok=True)
    tag, files = re.sub(r"[^0-9A-Za-z]+", "_", stage), {}  # as train.evaluate names the file
    for split in TEST:
        d = np.load(out / "predictions" / f"{tag}_{split}.npz")
        _, groups = np.unique(d["groups"], return_inverse=True)
        name = f"preds/{row}_seed{seed}_{split}.npz"
        np.savez_compressed(args.results / name, probs=d["probs"].astype(np.float16), labels=d["labels"].astype(np.int8),
                            groups=groups.astype(np.int32),
                            ids_sha256=hashlib.sha256("\n".join(d["ids"].tolist()).encode()).hexdigest())
        files[split] = name
    return files


# ----------------------------------------------------------------------------- intervals and the table

def load_preds(args, record, split):
    d = np.load(args.results / record["preds"][split])
    return d["probs"].astype(np.float64), d["labels"].astype(np.int64), d["groups"], str(d["ids_sha256"])


def settings(args):
    """What every row of one table must share: the data, the size, the extra train.py arguments, the test rows."""
    return {"data": rel(args.data), "size": args.size, "extra": args.extra, "test_limit": args.test_limit}


def finished(args, records_glob="*_seed*.json"):
    """{row: {seed: record}} of the rows with a JSON file; one made with other settings is an error
    (a table mixing them would compare unlike runs)."""
    rows = {}
    for path in sorted(args.results.glob(records_glob)):
        record = read_json(path)
        if record["settings"] != settings(args):
            raise SystemExit(f"error: {path} was made with other settings ({record['settings']} vs now {settings(args)}): "
                             "delete it, or use another --results")
        rows.setdefault(record.get("row"), {})[record["seed"]] = record
    return rows


def common_seeds(rows, row, ref):
    """Seeds both rows ran; zero-shot (no training, one run) pairs with every seed of the other row."""
    if not ROWS[row]["stages"] or not ROWS[ref]["stages"]:
        return sorted(rows[ref] if not ROWS[row]["stages"] else rows[row])
    return sorted(set(rows[row]) & set(rows[ref]))


def compare(args, rows, row, ref, metric, split):
    """Paired bootstrap of metric(row) - metric(ref) on split, over the seeds both rows have."""
    import darl
    seeds = common_seeds(rows, row, ref)
    if not seeds:
        return None
    pick = lambda r, s: rows[r][s] if ROWS[r]["stages"] else next(iter(rows[r].values()))  # noqa: E731
    a, b = [load_preds(args, pick(row, s), split) for s in seeds], [load_preds(args, pick(ref, s), split) for s in seeds]
    if len({x[3] for x in a + b}) != 1:
        raise SystemExit(f"{row} vs {ref} on {split}: scored on different rows (ids hash differs); rerun with one TEST_LIMIT")
    ci = darl.paired_bootstrap([x[0] for x in a], [x[0] for x in b], a[0][1], metric=metric, groups=a[0][2], n_boot=1000)
    return {**ci, "seeds": seeds}


def verdict(ci, sign):
    """For a claimed direction sign (+1: row above ref): 'reproduced' when the 95% interval lies on that
    side of 0, 'contradicted' when on the other, else 'inconclusive'."""
    if ci is None or sign is None:
        return "—" if sign is None else "not run"
    lo, hi = sorted((ci["lo"] * sign, ci["hi"] * sign))
    return "reproduced" if lo > 0 else "contradicted" if hi < 0 else "inconclusive"


def deltas(args, rows):
    """Every CLAIMS comparison that has results: ID and OOD macro-F1 and ECE deltas with intervals."""
    out = []
    for row, ref, claim, expect in CLAIMS:
        if row not in rows or ref not in rows:
            continue
        entry = {"row": row, "ref": ref, "claim": claim, "expect": expect}
        for split in TEST:
            for metric in ("macro_f1", "ece"):
                entry[f"{split}_{metric}"] = compare(args, rows, row, ref, metric, split)
            entry[f"{split}_verdict"] = verdict(entry[f"{split}_macro_f1"], expect[split])
        out.append(entry)
    return out


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(x, spec="{:.3f}"):
    return "—" if x is None else spec.format(x)


def shift_share(report):
    """Share of the selection from domains other than the pool's largest (the shift)."""
    if not report or "selected_share" not in report:
        return None
    main = max(report["pool_share"], key=report["pool_share"].get)
    return sum(v for k, v in report["selected_share"].items() if k != main)


def row_table(rows):
    """One line per row: means over its seeds of the test (and dev) metrics, the DASA selection, minutes."""
    lines = ["| row | run | seeds | ID F1 | OOD F1 | ID ECE | OOD ECE | id_dev F1 | ood_dev F1 | sel. shift | min/seed |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in [r for r in ROWS if r in rows]:
        recs = list(rows[row].values())
        m = lambda split, key: mean([r["metrics"].get(split, {}).get(key) for r in recs])  # noqa: E731
        lines.append(f"| {row} | {ROWS[row]['run']} | {','.join(str(r['seed']) for r in recs)} | "
                     f"{fmt(m('id_test', 'macro_f1'))} | {fmt(m('ood_test', 'macro_f1'))} | {fmt(m('id_test', 'ece'))} | "
                     f"{fmt(m('ood_test', 'ece'))} | {fmt(m('id_dev', 'macro_f1'))} | {fmt(m('ood_dev', 'macro_f1'))} | "
                     f"{fmt(mean([shift_share(r['ood_report']) for r in recs]), '{:.0%}')} | "
                     f"{fmt(mean([sum(r['minutes'].values()) for r in recs]), '{:.0f}')} |")
    return lines


def interval(ci):
    return "—" if ci is None else f"{ci['delta']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"


def claims_table(entries):
    """One line per comparison: macro-F1 and ECE deltas with 95% intervals, and the verdicts."""
    lines = ["| comparison | row - ref | seeds | ID macro-F1 delta [95% CI] | OOD macro-F1 delta [95% CI] | "
             "ID ECE delta | OOD ECE delta | verdict ID / OOD |", "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        seeds = (e["id_test_macro_f1"] or {}).get("seeds", [])
        lines.append(f"| {e['claim']} | {e['row']} - {e['ref']} | {','.join(map(str, seeds))} | "
                     f"{interval(e['id_test_macro_f1'])} | {interval(e['ood_test_macro_f1'])} | "
                     f"{interval(e['id_test_ece'])} | {interval(e['ood_test_ece'])} | "
                     f"{e['id_test_verdict']} / {e['ood_test_verdict']} |")
    return lines


def write_tables(args):
    """deltas.json (the intervals) and ablation.md (both tables, settings, per-run details)."""
    rows = finished(args)
    entries = deltas(args, rows)
    write_json(args.results / "deltas.json", {"n_boot": 1000, "level": 0.95, "test_limit": args.test_limit, "claims": entries})
    recs = [r for by in rows.values() for r in by.values()]
    md = ["# DaRL ablation", "", f"Generated by `bench/ablation.py --table` from `{rel(args.results)}/*.json`; "
          f"machines: {'; '.join(sorted({r['machine'] for r in recs}))}; commits {', '.join(sorted({r['commit'] for r in recs}))}.", "",
          *row_table(rows), "", "## Comparisons (paired bootstrap, 1,000 resamples of test rows and seeds)", "",
          *claims_table(entries), "", "## Runs", "", "| row | seed | minutes per stage | commands |", "|---|---|---|---|"]
    for r in recs:
        md.append(f"| {r['row']} | {r['seed']} | {', '.join(f'{s}: {m:.1f}' for s, m in r['minutes'].items())} | "
                  + "<br>".join(f"`python train.py {c}`" for c in r["commands"]) + " |")
    (args.results.parent / "ablation.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(row_table(rows) + [""] + claims_table(entries)))


def todo(args):
    """(row, seed), row by row in --rows order (PRIORITY: the rows the main claims rest on first, each with
    all its seeds); a row without training (zero-shot) runs once."""
    return [(row, seed) for row in args.rows for seed in args.seeds if ROWS[row]["stages"] or seed == args.seeds[0]]


def main(argv=None):
    args = get_args(sys.argv[1:] if argv is None else argv)
    if args.table:
        return write_tables(args)
    finished(args)  # refuses before hours of work, not after, when the finished rows were made otherwise
    left = [(row, seed) for row, seed in todo(args) if not (args.results / f"{row}_seed{seed}.json").exists()]
    print(f"plan: {len(left)} (row, seed) runs left: {', '.join(f'{r}/{s}' for r, s in left)}", flush=True)
    if args.plan:
        for row, seed in left:
            print(f"{row} seed {seed}:\n  " + "\n  ".join(
                f"python train.py {' '.join(c)}" for c in [train_cmd(args, row, seed, s) for s in ROWS[row]["stages"]]
                + [eval_cmd(args, row, seed)]))
        return
    args.machine = machine(args.threads)
    print(f"machine: {machine_line(args.machine)}", flush=True)
    for row, seed in left:
        run_row(args, row, seed)
        write_tables(args)  # the tables grow as rows finish: a cut session leaves them up to date


if __name__ == "__main__":
    main()
