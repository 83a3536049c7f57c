"""The experiment that settles DASA: pools in which the shift is rare. DASA vs random selection at several
annotation budgets, in pools whose medical share is 25%, 10% or 3% (the same web rows, fewer medical ones).

    python bench/rare_shift.py                  # the cut grid first (shares 3 and 25, budgets 50 and 200),
                                                # then the rest (share 10, budget 100); seeds 0,1,2; resumable
    python bench/rare_shift.py --cut            # only the cut grid
    python bench/rare_shift.py --table          # rare_shift.md, deltas and the plot from the files
    python bench/rare_shift.py --full --results R --work W   # every web row of the pool, no row caps: a GPU

Every run continues the ablation's `darl` stage-1 adapter of its seed (trained first when missing, also when
only the row's committed JSON is left; it is not scored here), then runs stages 2 and 3 of the darl schedule
on its pool variant (on CPU with DEV_ROWS rows of each dev split: they only feed the dev AUROC in
ood_report.json) and is scored once, on all of ood_test and ablation.TEST_LIMIT rows of id_test. Per seed,
pool share and selector, the selection is made once, at the largest budget: a smaller budget's selection is
its prefix (dasa_select and random_select walk one fixed order and stop at the budget), so the features are
computed once per adapter and pool. Pool variants: data/<name>/pool.jsonl's first 750 web rows plus
its first m medical rows (m = 250, 83, 23), in out/rare_shift/data_med<share>/ (--full: all its web rows, m
to match, in data_full_med<share>/), the other splits linked. Results: bench/results/rare_shift/.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ablation  # noqa: E402
from common import ROOT, machine, machine_line, now, git_commit, read_json, read_jsonl, rel, write_json  # noqa: E402

SHARES, BUDGETS, CUT_SHARES, CUT_BUDGETS = (25, 10, 3), (50, 100, 200), (3, 25), (50, 200)
WEB_ROWS = 750
DEV_ROWS = 250  # per dev split on CPU: they feed only stage 2's dev AUROC in ood_report.json, not the selection
RES = ROOT / "bench" / "results" / "rare_shift"


def get_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--cut", action="store_true", help="only shares 3 and 25, budgets 50 and 200")
    p.add_argument("--table", action="store_true")
    p.add_argument("--full", action="store_true", help="all web rows of the pool and no row caps (--limit 0): meant for a GPU")
    p.add_argument("--data", default=str(ROOT / "data" / "qbqtc2kuake"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", default=str(RES))
    p.add_argument("--work", default=str(ROOT / "out" / "rare_shift"))
    p.add_argument("--train_args", default="", help="extra train.py arguments for every call (tests: a tiny model)")
    p.add_argument("--test_limit", type=int, default=ablation.TEST_LIMIT, help="rows scored per test split (tests: fewer)")
    args = p.parse_args(argv)
    args.seeds, args.extra = [int(s) for s in args.seeds.split(",")], args.train_args.split()
    args.results, args.work = Path(args.results), Path(args.work)
    args.size = ["--limit", "0"] if args.full else ablation.CPU_ARGS + ["--eval_limit", str(DEV_ROWS)]
    return args


def grid(args):
    """(share, budget, selector, seed): the cut grid first, then the rest unless --cut."""
    cut = [(s, b) for s in CUT_SHARES for b in CUT_BUDGETS]
    rest = [] if args.cut else [(s, b) for s in SHARES for b in BUDGETS if (s, b) not in cut]
    return [(s, b, sel, seed) for s, b in cut + rest for seed in args.seeds for sel in ("dasa", "random")]


def pool_variant(args, share):
    """The data folder whose pool holds the first WEB_ROWS web rows (--full: all) and the first m medical rows."""
    folder = args.work / f"data{'_full' if args.full else ''}_med{share}"
    if (folder / "pool.jsonl").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(args.data)
    for f in src.glob("*.json*"):
        if f.name != "pool.jsonl" and not (folder / f.name).exists():
            (folder / f.name).symlink_to(f.resolve())
    pool = [json.loads(line) for line in open(src / "pool.jsonl", encoding="utf-8")]
    web = [r["id"] for r in pool if r["domain"] != "medical"][:None if args.full else WEB_ROWS]
    medical = [r["id"] for r in pool if r["domain"] == "medical"][:round(len(web) * share / (100 - share))]
    keep = set(web) | set(medical)
    tmp = folder / "pool.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool if r["id"] in keep), encoding="utf-8")
    tmp.replace(folder / "pool.jsonl")
    return folder


def out_dir(args, share, budget, selector, seed):
    return args.work / f"med{share}_b{budget}_{selector}_seed{seed}"


def train_cmd(args, share, budget, selector, seed, stage):
    return ["--stage", stage, "--out", rel(out_dir(args, share, budget, selector, seed)), "--seed", str(seed), "--resume",
            "--eval_on", "", "--data", rel(pool_variant(args, share)), "--budget", str(budget), "--select", selector,
            *args.size, *args.extra]


def eval_cmd(args, share, budget, selector, seed):
    out = out_dir(args, share, budget, selector, seed)
    return ["--stage", "eval", "--out", rel(out), "--seed", str(seed), "--adapter", rel(out / "stage3"),
            "--data", rel(pool_variant(args, share)), "--eval_limit", str(args.test_limit),
            "--eval_on", ",".join(ablation.TEST), *args.extra]


def start(args, share, budget, selector, seed):
    """stage1/ from the ablation's darl row; the selection as the prefix of the largest budget's."""
    out = out_dir(args, share, budget, selector, seed)
    out.mkdir(parents=True, exist_ok=True)
    ablation.copy_in(ablation.train_row(args.ablation, "darl", seed)[0], out / "stage1")
    top = max(BUDGETS)
    if budget == top or (out / "stage2" / "dasa_selected.jsonl").exists():
        return
    src = out_dir(args, share, top, selector, seed)
    if not (src / "stage2" / "dasa_selected.jsonl").exists():
        start(args, share, top, selector, seed)
        ablation.timed(args, train_cmd(args, share, top, selector, seed, "2"), src, "2")
    (out / "stage2").mkdir(exist_ok=True)
    lines = (src / "stage2" / "dasa_selected.jsonl").read_text(encoding="utf-8").splitlines()[:budget]
    ablation.copy_in(src / "stage2" / "ood_report.json", out / "stage2" / "ood_report.json")
    tmp = out / "stage2" / "dasa_selected.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out / "stage2" / "dasa_selected.jsonl")


def run_one(args, share, budget, selector, seed):
    path = args.results / f"med{share}_b{budget}_{selector}_seed{seed}.json"
    if path.exists():
        return
    out = out_dir(args, share, budget, selector, seed)
    start(args, share, budget, selector, seed)
    for stage in ("2", "3"):
        if not (out / f"stage{stage}" / "darl_config.json").exists():
            ablation.timed(args, train_cmd(args, share, budget, selector, seed, stage), out, stage)
    ablation.timed(args, eval_cmd(args, share, budget, selector, seed), out, "eval")
    name = f"med{share}_b{budget}_{selector}"
    results = [r for r in read_jsonl(out / "results.jsonl") if r["stage"].startswith("eval:")][-len(ablation.TEST):]
    selected = [json.loads(line) for line in open(out / "stage2" / "dasa_selected.jsonl", encoding="utf-8")]
    args.results.mkdir(parents=True, exist_ok=True)
    record = {"share": share, "budget": budget, "selector": selector, "seed": seed, "out": rel(out),
              "metrics": {r["split"]: r for r in results},
              "preds": ablation.export_predictions(args, name, seed, out, f"eval:{rel(out / 'stage3')}"),
              "selected_medical": sum(r.get("domain") == "medical" for r in selected), "selected": len(selected),
              "minutes": {k: round(v, 2) for k, v in ablation.stage_minutes(out).items()}, "commands": [
                  " ".join(train_cmd(args, share, budget, selector, seed, s)) for s in ("2", "3")]
              + [" ".join(eval_cmd(args, share, budget, selector, seed))],
              "settings": ablation.settings(args), "machine": machine_line(args.machine), "commit": git_commit(), "date": now()}
    write_json(path, record)


# ----------------------------------------------------------------------------- table and plot

def finished(args):
    """{(share, budget, selector, seed): record} of the paired runs (what every table and plot reads); a
    record made with other settings is an error."""
    out = {}
    for path in sorted(args.results.glob("med*.json")):
        r = read_json(path)
        if r["settings"] != ablation.settings(args):
            raise SystemExit(f"error: {path} was made with other settings ({r['settings']} vs now {ablation.settings(args)})")
        out[(r["share"], r["budget"], r["selector"], r["seed"])] = r
    return paired(out)


def paired(runs):
    """The runs whose other selector has run too (same share, budget and seed): every mean, delta and point
    of a table cut mid-grid is over the same seeds for both selectors."""
    other = {"dasa": "random", "random": "dasa"}
    return {k: r for k, r in runs.items() if (k[0], k[1], other[k[2]], k[3]) in runs}


def dasa_vs_random(args, runs, share, budget, split):
    """Paired bootstrap of DASA - random macro-F1 over the seeds of `runs` (paired: both selectors ran each,
    from the same stage 1, scored on the same test rows)."""
    import darl
    seeds = sorted(seed for (s, b, sel, seed) in runs if (s, b, sel) == (share, budget, "dasa"))
    load = lambda sel, seed: ablation.load_preds(args, runs[(share, budget, sel, seed)], split)  # noqa: E731
    a, b = [load("dasa", s) for s in seeds], [load("random", s) for s in seeds]
    ci = darl.paired_bootstrap([x[0] for x in a], [x[0] for x in b], a[0][1], n_boot=1000)
    return {**ci, "seeds": seeds, "verdict": ablation.verdict(ci, 1)}


def table(args, runs):
    """One line per (share, budget): OOD and ID macro-F1 of each selector (mean over seeds), medical rows
    selected, and the DASA - random delta with its interval and verdict."""
    lines = ["| medical share | budget | seeds | OOD F1 DASA | OOD F1 random | OOD delta [95% CI] | verdict | "
             "ID F1 DASA | ID F1 random | ID delta [95% CI] | medical rows DASA / random |",
             "|---:|---:|---|---:|---:|---|---|---:|---:|---|---|"]
    summary = []
    for share in SHARES:
        for budget in BUDGETS:
            by = {sel: [r for k, r in runs.items() if k[:3] == (share, budget, sel)] for sel in ("dasa", "random")}
            if not by["dasa"]:  # runs are paired: no dasa run, no random run
                continue
            m = lambda sel, split: ablation.mean([r["metrics"][split]["macro_f1"] for r in by[sel]])  # noqa: E731
            ood, idd = dasa_vs_random(args, runs, share, budget, "ood_test"), dasa_vs_random(args, runs, share, budget, "id_test")
            summary.append({"share": share, "budget": budget, "ood_test": ood, "id_test": idd})
            med = lambda sel: ablation.fmt(ablation.mean([r["selected_medical"] for r in by[sel]]), "{:.0f}")  # noqa: E731
            lines.append(f"| {share}% | {budget} | {','.join(str(r['seed']) for r in by['dasa'])} | "
                         f"{ablation.fmt(m('dasa', 'ood_test'))} | {ablation.fmt(m('random', 'ood_test'))} | "
                         f"{ablation.interval(ood)} | {ood['verdict']} | {ablation.fmt(m('dasa', 'id_test'))} | "
                         f"{ablation.fmt(m('random', 'id_test'))} | {ablation.interval(idd)} | {med('dasa')} / {med('random')} |")
    return lines, summary


def plot(args, runs):
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is missing (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for color, share in enumerate(SHARES):
        for sel, style in (("dasa", "-o"), ("random", "--s")):
            points = [(b, ablation.mean([r["metrics"]["ood_test"]["macro_f1"] for k, r in runs.items() if k[:3] == (share, b, sel)]))
                      for b in BUDGETS]
            points = [(b, v) for b, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), style, color=f"C{color}", label=f"{sel}, {share}% medical")
    ax.set_xlabel("annotation budget (pool rows)")
    ax.set_ylabel("OOD macro-F1 after stage 3 (mean over seeds)")
    ax.set_xticks(BUDGETS)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.results.parent / "rare_shift.png", dpi=120)


def write_tables(args):
    runs = finished(args)
    lines, summary = table(args, runs)
    write_json(args.results / "deltas.json", {"n_boot": 1000, "level": 0.95, "comparisons": summary})
    (args.results.parent / "rare_shift.md").write_text("\n".join(["# DASA vs random selection in pools where the shift is rare",
                                                                   "", *lines, ""]), encoding="utf-8")
    print("\n".join(lines))
    plot(args, runs)


def main(argv=None):
    args = get_args(sys.argv[1:] if argv is None else argv)
    args.ablation = ablation.get_args(["--rows", "darl", "--data", args.data, "--results", str(args.results.parent / "ablation"),
                                       "--work", str(args.work.parent / "ablation"), f"--train_args={' '.join(args.extra)}",
                                       "--test_limit", str(args.test_limit)] + (["--full"] if args.full else []))
    if args.table:
        return write_tables(args)
    args.machine = args.ablation.machine = machine(args.threads)
    args.ablation.threads = args.threads
    print(f"machine: {machine_line(args.machine)}", flush=True)
    finished(args)
    for share, budget, selector, seed in grid(args):
        run_one(args, share, budget, selector, seed)
        write_tables(args)


if __name__ == "__main__":
    main()
