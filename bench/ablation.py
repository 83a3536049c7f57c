"""Ablation of DaRL's parts on one data folder: the paper-style table, rows 1-8, made by calling train.py.

    python bench/ablation.py                                  # rows 1-8, CPU size, seeds 0,1 for rows 3-6
    python bench/ablation.py --full                           # full splits (meant for a GPU)
    python bench/ablation.py --rows 1,3,6 --seeds 0 -- --max_steps 20   # train.py arguments after --
    python bench/ablation.py --plan                           # the train.py commands and a time estimate
    python bench/ablation.py --table-only                     # the table (and plot) again from the JSON files

Rows (train.py's defaults unless said; each row's OUT is WORK/<name>_seed<k>):
  1 zero-shot             --stage eval                       the base model, no adapter
  2 stage 1, sft_loss     --stage 1 --loss sft               naive generative fine-tuning
  3 stage 1, darl_loss    --stage 1
  4 random, 1 -> 2 -> 3   copy (3)'s stage1/; --stage 2 --select random; --stage 3 --select random
  5 DASA, 1 -> 2          the stage-2 half of row 6 (same OUT): costs nothing once row 6 ran
  6 DASA, 1 -> 2 -> 3     copy (3)'s stage1/; --stage 2; --stage 3        (full DaRL)
  7 DASA, 1 -> 3          copy (3)'s stage1/ and (6)'s stage2/ selection; --stage 3 --stage3_from 1
  8 DASA knn, 1 -> 2 -> 3 copy (3)'s stage1/; --stage 2 --ood_score knn; --stage 3 --ood_score knn
Every call also gets --data, --model, --out, --seed k, the size arguments (CPU_ARGS, or FULL_ARGS with
--full; none when the extra arguments set --limit), the extra arguments, and --resume (a cut stage
continues from its checkpoint). Rows 3-6 run for every seed in --seeds; rows 1, 2, 7, 8 for the first
seed only. Rows 4-8 need row 3 of their seed, which then runs first.

Outputs: RESULTS/ablation/<name>_seed<k>.json per finished row (metrics, ood_report, settings, stage
times, commands, git commit); RESULTS/ablation.md, generated from those files only (the table, per-run
details, settings, commands); RESULTS/ablation_f1.png (ID vs OOD macro-F1 per row) when matplotlib is
importable. RESULTS defaults to bench/results; WORK (train.py's outputs) to out/ablation.

Choices beyond the issue text, and why:
- One train.py process per stage: the stage's wall time is measured by itself (table, estimate), and a
  finished stage is never entered again (a stage whose adapter and results exist is not relaunched, so
  row 5 after row 6 launches nothing). The price is a model load per stage (seconds).
- CPU size: --limit 1000 on every split (train.py's CPU default). Rows processed, counting a
  training row as 3 forward rows, with train.py's defaults at limit L (budget L/5, batch 16): eval 2L,
  stage 1 14L (4 epochs, eval), stage 2 7.2L (features of 4 splits, 2 epochs over the selection, eval),
  stage 3 4.4L; the default table is 106.4L, 4.2 stage-all runs (25.6L). One stage-all run at L=1000
  takes ~15 min on this 2-core machine in bf16, so the table takes ~1 h. The size arguments are passed
  on every device, so the table does not depend on where it ran. --full passes --limit 0 (no cap).
- The seed also picks train.py's subsample, so the seed spread includes the choice of rows.
  Spread = +- half the range over seeds (for two seeds this equals the population std).
- Row 5 runs for every seed row 6 runs for: it is the stage-2 half of row 6, so it costs nothing.
- Wall time = the seconds of the train.py runs that made this row's listed stages in its OUT (rows
  4-8 do not count row 3's stage 1; row 7 does not count row 6's selection; the part of a run cut by
  SIGKILL is lost). Per OUT they are kept in OUT/bench_stages.json with the train rows and steps
  parsed from train.py's log lines.
- Stale results are refused, never mixed: each JSON and OUT/bench_settings.json hold the settings
  (data, model, train.py arguments); a rerun with other settings stops and names the file.
- --results DIR (the tests write into a temporary folder) and --plan (see the commands and the
  estimate before a two-hour run) are beyond the issue's CLI.
- Seed-major order: a complete one-seed table exists before the second seed starts.
"""
import argparse
import datetime
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_ARGS = ["--limit", "1000"]
FULL_ARGS = ["--limit", "0"]
ROWS = {  # stages: what train.py runs in OUT (the last one is reported); args: row-specific train.py arguments
    1: dict(name="1_zero_shot", run="zero-shot", stages=["eval"], args=[]),
    2: dict(name="2_sft", run="1 (sft_loss)", stages=["1"], args=["--loss", "sft"]),
    3: dict(name="3_darl", run="1 (darl_loss)", stages=["1"], args=[]),
    4: dict(name="4_random", run="1 -> 2 -> 3, random selection", stages=["2", "3"], args=["--select", "random"]),
    5: dict(name="5_dasa_s2", out="6_dasa", run="1 -> 2, DASA", stages=["2"], args=[]),
    6: dict(name="6_dasa", run="1 -> 2 -> 3, DASA (DaRL)", stages=["2", "3"], args=[]),
    7: dict(name="7_dasa_s3", run="1 -> 3, DASA", stages=["3"], args=["--stage3_from", "1"]),
    8: dict(name="8_knn", run="1 -> 2 -> 3, DASA by knn_score", stages=["2", "3"], args=["--ood_score", "knn"]),
}
MULTI_SEED = {3, 4, 5, 6}
FROM_ROW3 = {4, 5, 6, 7, 8}
RESERVED = {"--stage", "--out", "--seed", "--resume", "--loss", "--select", "--ood_score", "--stage3_from",
            "--adapter", "--data", "--model", "--input", "--output"}
SHARE_OF_STAGE_ALL = {"eval": 2 / 25.6, "1": 14 / 25.6, "2": 7.2 / 25.6, "3": 4.4 / 25.6}  # rows processed, see above
SPLIT_RE = re.compile(r"\] (id_train|id_test|pool|ood_test): ([\d,]+) rows")
TRAIN_RE = re.compile(r"\] training ([\d,]+) rows: (\d+) steps of (\d+) rows")


class BenchError(RuntimeError):
    """A problem the user must fix (stale results, a failed train.py run); the message says how."""


# ----------------------------------------------------------------------------- settings and files

def get_args(argv):
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "qbqtc2kuake"))
    p.add_argument("--model", default=str(ROOT / "data" / "gemma3_270m"))
    p.add_argument("--out", default=str(ROOT / "out" / "ablation"), help="work dir for train.py's outputs")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where ablation/, .md and .png go")
    p.add_argument("--seeds", default="0,1", help="seeds for rows 3-6; the other rows use the first")
    p.add_argument("--rows", default="1,2,3,4,5,6,7,8")
    p.add_argument("--full", action="store_true", help="full splits instead of the CPU size (CPU_ARGS)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of each train.py run")
    p.add_argument("--plan", action="store_true", help="print the commands and the estimate, run nothing")
    p.add_argument("--table-only", action="store_true", help="regenerate the table and plot from the JSON files")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.rows = sorted({int(r) for r in args.rows.split(",")})
    if bad := [r for r in args.rows if r not in ROWS]:
        p.error(f"--rows: no row {bad[0]} (rows are 1-8)")
    if bad := [a for a in extra if a.split("=")[0] in RESERVED]:
        p.error(f"{bad[0]} after -- is set by the bench itself for each row")
    size = [] if any(a.split("=")[0] == "--limit" for a in extra) else FULL_ARGS if args.full else CPU_ARGS
    args.data, args.model = str(Path(args.data).resolve()), str(Path(args.model).resolve())  # train.py runs in ROOT
    args.config = {"data": rel(args.data), "model": rel(args.model), "train_args": size + extra}
    args.work, args.res = Path(args.out).resolve(), Path(args.results).resolve()
    return args


def rel(path):
    """A path relative to the repository when inside it, so settings compare across checkouts."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def git_commit():
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+uncommitted" if git("status", "--porcelain", "--untracked-files=no") else "")


def out_dir(args, r, seed):
    return args.work / f"{ROWS[r].get('out', ROWS[r]['name'])}_seed{seed}"


def result_path(args, r, seed):
    return args.res / "ablation" / f"{ROWS[r]['name']}_seed{seed}.json"


def check_settings(path, config):
    """Stop when a file was made with other settings: mixing them would make a wrong table."""
    old = read_json(path)
    old = old.get("config", old)
    if old != config:
        raise BenchError(f"{path} was made with other settings ({old} vs now {config}): "
                         "delete it (or its folder), or choose another --out / --results")


def stage_results(out, stage):
    """id_test and ood_test lines of OUT/results.jsonl for a stage (its own lines, or an eval of its adapter)."""
    keys = {"eval:zero-shot"} if stage == "eval" else {stage, f"eval:{rel(out / f'stage{stage}')}"}
    found, path = {}, out / "results.jsonl"
    if path.exists():
        for line in open(path, encoding="utf-8"):
            r = json.loads(line)
            if r["stage"] in keys:
                found[r["split"]] = r
    return found if len(found) == 2 else None


def stage_done(out, stage):
    trained = stage == "eval" or (out / f"stage{stage}" / "adapter_model.safetensors").exists()
    return trained and stage_results(out, stage) is not None


# ----------------------------------------------------------------------------- running rows

def command(args, r, seed, stage, adapter=None):
    """The train.py command line, as run from the repository root (paths inside it relative)."""
    out = out_dir(args, r, seed)
    cmd = ["python", "train.py", "--stage", "eval" if adapter else stage, "--data", rel(args.data),
           "--model", rel(args.model), "--out", rel(out), "--seed", str(seed), *args.config["train_args"]]
    if adapter:
        return cmd + ["--adapter", rel(adapter)]
    return cmd + ROWS[r]["args"] + ([] if stage == "eval" else ["--resume"])


def launch(args, cmd, out, stage):
    """One train.py run, its output streamed; seconds, train rows/steps and split sizes into OUT/bench_stages.json."""
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    lines, t0 = [], time.time()
    try:
        with subprocess.Popen([sys.executable, *cmd[1:]], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as p:
            for line in p.stdout:
                print("    " + line, end="", flush=True)
                lines.append(line)
    finally:  # also on Ctrl-C: the time spent so far belongs to this stage
        info_path = out / "bench_stages.json"
        info = read_json(info_path) if info_path.exists() else {"seconds": {}, "train": {}, "splits": {}}
        info["seconds"][stage] = round(info["seconds"].get(stage, 0) + time.time() - t0, 1)
        for line in lines:
            if m := SPLIT_RE.search(line):
                info["splits"][m[1]] = int(m[2].replace(",", ""))
            if m := TRAIN_RE.search(line):
                info["train"][stage] = {"rows": int(m[1].replace(",", "")), "steps": int(m[2]), "batch": int(m[3])}
        out.mkdir(parents=True, exist_ok=True)
        write_json(info_path, info)
    if p.returncode != 0:
        raise BenchError(f"train.py failed (exit {p.returncode}) in {out}; see {out / 'log.txt'}. "
                         "Fix the cause and rerun the same bench command: it continues (--resume).")


def copy_in(src, dst):
    """Copy a finished directory or file into a row's OUT, atomically (a cut copy is redone)."""
    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True) if src.is_dir() else tmp.unlink(missing_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp)
    os.replace(tmp, dst)


def run_row(args, r, seed):
    out, row = out_dir(args, r, seed), ROWS[r]
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "bench_settings.json"
    if settings.exists():
        check_settings(settings, args.config)
    else:
        write_json(settings, args.config)
    reused = []
    if r in FROM_ROW3:
        src = out_dir(args, 3, seed) / "stage1"
        if not (out / "stage1").exists() and not (src / "adapter_model.safetensors").exists():
            raise BenchError(f"row {r} needs row 3's stage-1 adapter {src}, which is missing (its JSON exists but "
                             f"its OUT is gone?): delete {result_path(args, 3, seed)} to rerun row 3")
        copy_in(src, out / "stage1")
        reused.append(f"stage1/ from {rel(src)}")
    sel = out_dir(args, 6, seed) / "stage2"
    if r == 7 and (sel / "dasa_selected.jsonl").exists() and not (out / "stage2" / "dasa_selected.jsonl").exists():
        check_settings(sel.parent / "bench_settings.json", args.config)
        (out / "stage2").mkdir(exist_ok=True)
        copy_in(sel / "ood_report.json", out / "stage2" / "ood_report.json")
        copy_in(sel / "dasa_selected.jsonl", out / "stage2" / "dasa_selected.jsonl")  # last: train.py looks for it
    if r == 7 and (sel / "dasa_selected.jsonl").exists() and filecmp.cmp(sel / "dasa_selected.jsonl",
                                                                         out / "stage2" / "dasa_selected.jsonl", shallow=False):
        reused.append(f"stage2/dasa_selected.jsonl and ood_report.json from {rel(sel)}")
    for stage in row["stages"]:
        if stage_done(out, stage):
            continue
        if stage == "eval" or not (out / f"stage{stage}" / "adapter_model.safetensors").exists():
            launch(args, command(args, r, seed, stage), out, stage)
        if not stage_done(out, stage):  # trained, but cut before its evaluation was written
            launch(args, command(args, r, seed, stage, adapter=out / f"stage{stage}"), out, stage)
    stage = row["stages"][-1]
    if (res := stage_results(out, stage)) is None:
        raise BenchError(f"{out / 'results.jsonl'}: no id_test/ood_test lines for stage {stage} after its run")
    info_path = out / "bench_stages.json"
    info = read_json(info_path) if info_path.exists() else {"seconds": {}, "train": {}, "splits": {}}
    report = out / "stage2" / "ood_report.json"
    write_json(result_path(args, r, seed), {
        "row": r, "name": row["name"], "run": row["run"], "seed": seed, "stage": stage, "out": rel(out),
        "id_test": res["id_test"], "ood_test": res["ood_test"],
        "ood_report": read_json(report) if r in FROM_ROW3 and report.exists() else None,
        "stage_seconds": {s: info["seconds"].get(s) for s in row["stages"]},
        "wall_seconds": round(sum(info["seconds"].get(s, 0) for s in row["stages"]), 1),
        "train": {s: info["train"].get(s) for s in row["stages"] if s != "eval"}, "splits": info["splits"],
        "reused": reused, "commands": [" ".join(command(args, r, seed, s)) for s in row["stages"]],
        "config": args.config, "threads": args.threads, "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})


def plan(args):
    """(row, seed) in seed-major order: the requested rows, plus row 3 where a row needs its stage 1."""
    todo = set()
    for i, seed in enumerate(args.seeds):
        for r in args.rows:
            if r in MULTI_SEED or i == 0:
                todo |= {(r, seed)} | ({(3, seed)} if r in FROM_ROW3 else set())
    return sorted(todo, key=lambda rs: (args.seeds.index(rs[1]), rs[0]))


def measured_seconds(args):
    """{(OUT name, stage): seconds} of the stage runs made with these settings, from the row JSON files
    (a fresh work dir) and the work dir's OUT/bench_stages.json (runs whose row is not finished yet)."""
    found = {}
    for path in args.res.glob("ablation/*_seed*.json"):
        d = read_json(path)
        if d["config"] == args.config:
            found |= {(Path(d["out"]).name, s): sec for s, sec in d["stage_seconds"].items() if sec}
    for path in args.work.glob("*/bench_stages.json"):
        if read_json(path.parent / "bench_settings.json") == args.config:
            found |= {(path.parent.name, s): sec for s, sec in read_json(path)["seconds"].items() if sec}
    return found


def estimate(args, todo):
    """One line: the stage runs still to do, in stage-all runs (SHARE_OF_STAGE_ALL) and in minutes
    (per-stage means of the measured runs), once every kind of stage has been measured."""
    kinds = [s for _, s in sorted({(out_dir(args, r, seed).name, s) for r, seed in todo for s in ROWS[r]["stages"]
                                   if not result_path(args, r, seed).exists() and not stage_done(out_dir(args, r, seed), s)})]
    if not kinds:
        return "nothing left to run"
    measured = measured_seconds(args)
    secs = {k: [v for (_, s), v in measured.items() if s == k] for k in SHARE_OF_STAGE_ALL}
    counts = ", ".join(f"{kinds.count(k)} x {'eval' if k == 'eval' else 'stage ' + k}" for k in SHARE_OF_STAGE_ALL if k in kinds)
    line = (f"{len(kinds)} train.py stage runs ({counts}), about {sum(SHARE_OF_STAGE_ALL[k] for k in kinds):.1f} x "
            "one 'train.py --stage all' run")
    if missing := sorted({k for k in kinds if not secs[k]}):
        return line + f"; minutes: not yet (no measured run of stage {', '.join(missing)})"
    return line + (f"; estimate {sum(sum(secs[k]) / len(secs[k]) for k in kinds) / 60:.3g} min "
                   f"(per-stage means of {len(measured)} measured runs)")


# ----------------------------------------------------------------------------- the table

def load_results(args):
    """The finished rows by row number; all made with one config (--table-only: the first file's, else this run's)."""
    rows, config = {}, None if args.table_only else args.config
    for path in sorted((args.res / "ablation").glob("*_seed*.json")):
        d = read_json(path)
        config = config or d["config"]
        if d["config"] != config:
            raise BenchError(f"{path} was made with other settings ({d['config']} vs {config}): one table holds "
                             "one setting; delete the files of the other, or use another --results")
        rows.setdefault(d["row"], []).append(d)
    if not rows:
        raise BenchError(f"no results in {args.res / 'ablation'}: run the bench first")
    return {r: sorted(v, key=lambda d: d["seed"]) for r, v in sorted(rows.items())}, config


def shift_share(report):
    """Share of selected rows from the domains other than the pool's largest one (the shift), and their names."""
    if not report or "selected_share" not in report:
        return None, []
    main = max(report["pool_share"], key=report["pool_share"].get)
    names = [n for n in report["selected_share"] if n != main]
    return sum(report["selected_share"][n] for n in names), names


def cell(values, fmt="{:.3f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean = sum(values) / len(values)
    return fmt.format(mean) + (" ± " + fmt.format((max(values) - min(values)) / 2) if len(values) > 1 else "")


COLUMNS = (("ID acc", lambda d: d["id_test"]["accuracy"]), ("ID F1", lambda d: d["id_test"]["macro_f1"]),
           ("ID ECE", lambda d: d["id_test"]["ece"]), ("OOD acc", lambda d: d["ood_test"]["accuracy"]),
           ("OOD F1", lambda d: d["ood_test"]["macro_f1"]), ("OOD ECE", lambda d: d["ood_test"]["ece"]),
           ("F1 gap", lambda d: d["id_test"]["macro_f1"] - d["ood_test"]["macro_f1"]),
           ("sel. {shift}", lambda d: shift_share(d["ood_report"])[0]),
           ("kNN AUROC", lambda d: (d["ood_report"] or {}).get("knn_test_auroc")))


def table(args, rows):
    shift = sorted({n for v in rows.values() for d in v for n in shift_share(d["ood_report"])[1]})
    heads = ["row", "run", "seeds"] + [h.format(shift="+".join(shift) or "shift") for h, _ in COLUMNS] + ["wall min"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r, v in rows.items():
        lines.append(f"| {r} | {ROWS[r]['run']} | {','.join(str(d['seed']) for d in v)} | "
                     + " | ".join(cell([f(d) for d in v]) for _, f in COLUMNS)
                     + f" | {cell([d['wall_seconds'] / 60 for d in v], '{:.1f}')} |")
    return lines


def details(rows):
    lines = ["| row | seed | OUT | train rows / steps per stage | seconds per stage | reused |", "|---|---|---|---|---|---|"]
    for r, v in rows.items():
        for d in v:
            train = ", ".join(f"{s}: {t['rows']} / {t['steps']}" for s, t in d["train"].items() if t) or "—"
            secs = ", ".join(f"{s}: {sec}" for s, sec in d["stage_seconds"].items())
            lines.append(f"| {r} | {d['seed']} | {Path(d['out']).name} | {train} | {secs} | {'; '.join(d['reused']) or '—'} |")
    return lines


def write_table(args):
    rows, config = load_results(args)
    ds = [d for v in rows.values() for d in v]
    reports = [d["ood_report"] for d in ds if d["ood_report"]]
    per_seed = []
    for seed in sorted({d["seed"] for d in ds}):  # the subsample (and so the pool mix) depends on the seed
        splits = sorted({", ".join(f"{k} {n:,}" for k, n in d["splits"].items()) for d in ds if d["seed"] == seed})
        pool = sorted({", ".join(f"{k} {v:.3f}" for k, v in sorted(d["ood_report"]["pool_share"].items()))
                       for d in ds if d["seed"] == seed and d["ood_report"] and "pool_share" in d["ood_report"]})
        per_seed.append(f"- seed {seed}: rows per split (after --limit) {' / '.join(splits)}"
                        + (f"; pool domain shares {' / '.join(pool)}" if pool else ""))
    seeds = sorted({d["seed"] for d in ds})
    md = ["# DaRL ablation", "",
          f"Data `{config['data']}`, model `{config['model']}`, generated by `bench/ablation.py` from "
          "`ablation/*.json`. Metrics of each row's last stage on id_test (ID) and ood_test (OOD): accuracy, "
          "macro-F1 (F1), ECE; gap = ID F1 - OOD F1. `sel.` = share of the DASA-selected pool rows that come "
          "from the shift domain (pool shares in the settings). kNN AUROC = knn_score separating id_test from "
          "ood_test with the stage-1 features. wall = minutes of the train.py runs of the row's stages; rows "
          "4-8 reuse row 3's stage 1 (not counted), row 7 row 6's selection.", "",
          *table(args, rows), "",
          f"A row with several seeds (of {','.join(map(str, seeds))}) shows mean ± half the range over them; the "
          "other rows ran with the first seed only. The seed also picks train.py's subsample of every split.", "",
          "## Settings", "",
          f"- train.py arguments of every row: `{' '.join(config['train_args']) or '(train.py defaults)'}`",
          *per_seed,
          *[f"- DASA budget {b} rows per selection ({', '.join(sorted({str(rep['ood_score']) for rep in reports}))} "
            f"scores, k={', '.join(sorted({str(rep['k']) for rep in reports}))})" for b in sorted({rep['budget'] for rep in reports})],
          f"- threads per train.py run: {', '.join(sorted({str(d['threads']) for d in ds}))}",
          f"- rows finished {min(d['date'] for d in ds)} .. {max(d['date'] for d in ds)}; "
          f"table generated {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
          f"- git commit(s): {', '.join(sorted({d['commit'] for d in ds}))}", "",
          "## Per run", "", *details(rows), "",
          "## Commands (first seed of each row; stages already done in OUT are not rerun)", ""]
    for r, v in rows.items():
        md += [f"{r}. " + "<br>".join(f"`{c}`" for c in v[0]["commands"])]
    args.res.mkdir(parents=True, exist_ok=True)
    (args.res / "ablation.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(table(args, rows)))
    print(f"wrote {args.res / 'ablation.md'}")
    plot(args, rows, config)


def plot(args, rows, config):
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is missing (pip install matplotlib for ablation_f1.png)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for j, split in enumerate(("id_test", "ood_test")):
        vals = [[d[split]["macro_f1"] for d in v] for v in rows.values()]
        ax.bar([i + (j - 0.5) * 0.4 for i in range(len(vals))], [sum(x) / len(x) for x in vals], 0.4,
               yerr=[(max(x) - min(x)) / 2 for x in vals], capsize=3, label=("ID" if j == 0 else "OOD") + " macro-F1")
    ax.set_xticks(range(len(rows)), [f"row {r}: {ROWS[r]['run']}" for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_title(f"DaRL ablation: ID vs OOD macro-F1 ({config['data']})", fontsize=10)
    ax.set_ylabel("macro-F1 (± half range over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.res / "ablation_f1.png", dpi=120)
    print(f"wrote {args.res / 'ablation_f1.png'}")


def main(argv=None):
    args = get_args(sys.argv[1:] if argv is None else argv)
    if args.table_only:
        return write_table(args)
    for path in sorted(args.res.glob("ablation/*_seed*.json")):  # before hours of work, not after
        check_settings(path, args.config)
    todo = plan(args)
    print("plan: " + estimate(args, todo), flush=True)
    if args.plan:
        for r, seed in todo:
            out, copies = out_dir(args, r, seed), []
            if r in FROM_ROW3:
                copies.append(f"cp -r {rel(out_dir(args, 3, seed) / 'stage1')} {rel(out / 'stage1')}")
            if r == 7:
                copies.append(f"cp {rel(out_dir(args, 6, seed) / 'stage2')}/{{ood_report.json,dasa_selected.jsonl}} "
                              f"{rel(out / 'stage2')}/   # when row 6 made them")
            cmds = copies + [" ".join(command(args, r, seed, s)) for s in ROWS[r]["stages"]]
            print(f"row {r} seed {seed} ({ROWS[r]['run']}):\n  " + "\n  ".join(cmds))
        return
    (args.res / "ablation").mkdir(parents=True, exist_ok=True)
    for n, (r, seed) in enumerate(todo):
        path = result_path(args, r, seed)
        if path.exists():
            print(f"skip row {r} seed {seed}: {path} exists", flush=True)
            continue
        t0 = time.time()
        print(f"=== row {r} seed {seed}: {ROWS[r]['run']} -> {out_dir(args, r, seed)}", flush=True)
        run_row(args, r, seed)
        print(f"=== row {r} seed {seed} done in {(time.time() - t0) / 60:.1f} min; left: {estimate(args, todo[n + 1:])}", flush=True)
    write_table(args)


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.exit(f"error: {e}")
