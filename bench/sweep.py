"""Choose train.py settings on the dev splits: a grid of train.py arguments x seeds, each run scored on
id_dev and ood_dev only (the test splits are never read here), resumable run by run.

    python bench/sweep.py stage1 --grid lr=2e-4,4e-4,1e-3 --grid epochs=2,4 --seeds 0,1
    python bench/sweep.py stages23 --stages 2,3 --stage1_from out/sweeps/stage1/lr=4e-4_epochs=4_seed{seed} \
        --grid dasa_lr_scale=0.1,0.2,0.5 --seeds 0
    python bench/sweep.py stage1 --table                     # the table again from the results file

Each run's OUT is out/sweeps/NAME/<config>_seed<k>; the last of --stages is scored, and appends one line
per dev split to bench/results/sweeps/NAME.jsonl (metrics, `scored_on`, the minutes of that stage's train.py
call, machine, commit); a finished line is never run again. Arguments after `--` go to every train.py call
(e.g. --limit). With --stage1_from (a run dir holding stage1/; {seed} and the grid's keys, e.g. {batch_size},
filled in), runs start from that adapter; and when the grid changes nothing the DASA selection depends on
(its settings, the stage-1 adapter), the selection of --selection_from or of the first run is copied to the
others (the features of 4,000 rows are then computed once per seed, not once per run).
"""
import argparse
import itertools
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, append_jsonl, git_commit, machine, machine_line, read_jsonl, rel, run_train  # noqa: E402

DEV = ("id_dev", "ood_dev")
SELECTION_ARGS = {"ood_score", "select", "budget", "k", "max_per_query", "layer", "pooling", "limit"}


def get_args(argv):
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name")
    p.add_argument("--grid", action="append", default=[], help="ARG=v1,v2,... (train.py argument without --)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--stages", default="1", help="train.py stages run in order in each run's OUT")
    p.add_argument("--stage1_from", help="a run dir with stage1/ to start from; {seed} and the grid's keys are filled in")
    p.add_argument("--selection_from", help="a run dir whose stage2/ DASA selection to reuse; {seed} is filled in")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--table", action="store_true", help="print the table from the results file, run nothing")
    args = p.parse_args(argv)
    args.grid = [(k, v.split(",")) for k, v in (g.split("=", 1) for g in args.grid)]
    args.seeds, args.stages, args.extra = [int(s) for s in args.seeds.split(",")], args.stages.split(","), extra
    args.results = ROOT / "bench" / "results" / "sweeps" / f"{args.name}.jsonl"
    return args


def configs(args):
    keys = [k for k, _ in args.grid]
    return [dict(zip(keys, values)) for values in itertools.product(*[v for _, v in args.grid])]


def run_dir(args, config, seed):
    return ROOT / "out" / "sweeps" / args.name / ("_".join(f"{k}={v}" for k, v in config.items()) + f"_seed{seed}")


def done(args):
    found = read_jsonl(args.results) if args.results.exists() else []
    return {(tuple(sorted(r["config"].items())), r["seed"], r["stage"]) for r in found}


def stage1_from(args, config, seed):
    """The run dir --stage1_from names for this config and seed (None without --stage1_from)."""
    return args.stage1_from and args.stage1_from.format(seed=seed, **config)


def copy_start(args, out, seed, config):
    """stage1/ from --stage1_from; the selection of an earlier run of this seed when the grid keeps it and
    both runs continue the same stage-1 adapter (the features, and so the selection, come from it)."""
    start = stage1_from(args, config, seed)
    if start and not (out / "stage1").exists():
        shutil.copytree(Path(start) / "stage1", out / "stage1")
    if {k for k, _ in args.grid} & SELECTION_ARGS or (out / "stage2" / "dasa_selected.jsonl").exists():
        return
    given = [Path(args.selection_from.format(seed=seed))] if args.selection_from else []
    same_start = [] if "1" in args.stages else [c for c in configs(args) if c != config and stage1_from(args, c, seed) == start]
    for sel in [d / "stage2" for d in given] + [run_dir(args, c, seed) / "stage2" for c in same_start]:
        if (sel / "dasa_selected.jsonl").exists():
            (out / "stage2").mkdir(parents=True, exist_ok=True)
            shutil.copy(sel / "ood_report.json", out / "stage2")
            shutil.copy(sel / "dasa_selected.jsonl", out / "stage2")
            return


def run(args, config, seed, mach):
    out = run_dir(args, config, seed)
    out.mkdir(parents=True, exist_ok=True)
    copy_start(args, out, seed, config)
    grid_args = [a for k, v in config.items() for a in (f"--{k}", v)]
    for stage in args.stages:
        key = (tuple(sorted(config.items())), seed, stage)
        if key in done(args) or (out / f"stage{stage}" / "darl_config.json").exists() and stage != args.stages[-1]:
            continue
        evals = ",".join(DEV) if stage == args.stages[-1] else ""  # only the last stage is scored: it is what is chosen
        cmd = ["--stage", stage, "--out", rel(out), "--seed", str(seed), "--resume", "--eval_on", evals,
               *grid_args, *args.extra]
        rc, seconds, _ = run_train(cmd, threads=args.threads)
        if rc != 0:
            sys.exit(f"error: train.py failed (exit {rc}) in {out}; see {out / 'log.txt'}; rerun to continue")
        if not evals:
            continue
        lines = [r for r in read_jsonl(out / "results.jsonl") if r["stage"] == stage and r["split"] in DEV]
        for r in lines[-len(DEV):]:
            append_jsonl(args.results, {
                "sweep": args.name, "config": config, "seed": seed, "stage": stage, "scored_on": r["split"],
                "n": r["n"], "macro_f1": r["macro_f1"], "accuracy": r["accuracy"], "ece": r["ece"],
                "minutes": round(seconds / 60, 2), "train_args": cmd, "machine": machine_line(mach),
                "stage1_from": stage1_from(args, config, seed),
                "commit": git_commit()})


def table(results):
    """Mean dev macro-F1 per (config, stage) over its seeds; the chosen config of each stage in bold: by
    id_dev for stage 1 (it trains on ID rows only), by the mean of id_dev and ood_dev for later stages."""
    rows = {}
    for r in results:
        rows.setdefault((tuple(r["config"].items()), r["stage"]), {}).setdefault(r["scored_on"], []).append(r)
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    lines = ["| stage | config | seeds | id_dev macro-F1 | ood_dev macro-F1 | id_dev ECE | minutes |",
             "|---|---|---|---:|---:|---:|---:|"]
    best = {}
    for (config, stage), by in rows.items():
        splits = ["id_dev"] if stage == "1" else [s for s in DEV if s in by]
        score = sum(mean(by[s], "macro_f1") for s in splits) / len(splits) if all(s in by for s in splits) else -1
        if score > best.get(stage, (-1, None))[0]:
            best[stage] = (score, config)
    for (config, stage), by in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        name = " ".join(f"{k}={v}" for k, v in config)
        name = f"**{name}**" if best.get(stage, (0, None))[1] == config else name
        seeds = ",".join(str(s) for s in sorted(r["seed"] for r in by.get("id_dev", [])))
        cell = lambda split, key: f"{mean(by[split], key):.3f}" if split in by else "—"  # noqa: E731
        lines.append(f"| {stage} | {name} | {seeds} | {cell('id_dev', 'macro_f1')} | {cell('ood_dev', 'macro_f1')} | "
                     f"{cell('id_dev', 'ece')} | {mean(by.get('id_dev', by.get('ood_dev')), 'minutes'):.1f} |")
    return lines


def main(argv=None):
    args = get_args(sys.argv[1:] if argv is None else argv)
    if not args.table:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        mach = machine(args.threads)
        print(f"machine: {machine_line(mach)}", flush=True)
        for seed in args.seeds:
            for config in configs(args):
                run(args, config, seed, mach)
    print("\n".join(table(read_jsonl(args.results))))


if __name__ == "__main__":
    main()
