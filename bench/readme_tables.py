"""Regenerate the README's measured tables from the committed result files, so none is typed by hand.

    python bench/readme_tables.py            # rewrite the blocks in README.md
    python bench/readme_tables.py --check    # exit 1 when README.md is not what the files give (a test runs this)

A block is the text between `<!-- table: NAME -->` and `<!-- /table -->` in README.md; NAME is one of
BLOCKS. Each block starts with a line naming its source files, the machine (CPU, matmul ceiling) and
commit, read from those files; a block whose files do not exist yet says so and names the command that
makes them. The prose around the blocks is written by hand and must agree with them.
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


def rel(path):
    return str(Path(path).relative_to(ROOT))


def missing(path, command):
    return [f"Not measured yet: `{command}` writes `{rel(path)}`."]


def main_run(name="main_run", command="python train.py --stage all"):
    """`python train.py --stage all` with the defaults (or another schedule): dev and test metrics per stage,
    wall time, peak RSS, DASA, and the interpolation curve where there is one."""
    res, log, rep, mach = (RES / "train_cpu" / f"{name}{end}" for end in (".jsonl", "_log.txt", "_ood_report.json",
                                                                           "_machine.json"))
    if not mach.exists():
        return missing(res, command)
    lines = [json.loads(line) for line in res.read_text().splitlines()]
    rows = [r for r in lines if "macro_f1" in r]
    text, report, machine = log.read_text(), json.loads(rep.read_text()), json.loads(mach.read_text())
    head = re.search(r"^\[\S+\] (train\.py --stage all.*)$", text, re.M)
    done = re.search(r"done in ([\d.]+) min, peak RSS ([\d.]+) GiB", text)
    by = {(r["stage"], r["split"]): r for r in rows}
    out = [f"From `{rel(res)}`, `{rel(log)}`, `{rel(rep)}`: `{head.group(1)}` on {machine['line']}, commit "
           f"{machine['commit']}; **{done.group(1)} min wall, peak RSS {done.group(2)} GiB**.", "",
           "| stage | id_dev F1 | ood_dev F1 | ID (id_test) acc | ID F1 | ID ECE | OOD (ood_test) acc | OOD F1 | OOD ECE | ID-OOD F1 gap |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in sorted({r["stage"] for r in rows}):
        d, o, i, t = (by[(stage, s)] for s in ("id_dev", "ood_dev", "id_test", "ood_test"))
        out.append(f"| {stage} | {d['macro_f1']:.3f} | {o['macro_f1']:.3f} | {i['accuracy']:.3f} | {i['macro_f1']:.3f} | "
                   f"{i['ece']:.3f} | {t['accuracy']:.3f} | {t['macro_f1']:.3f} | {t['ece']:.3f} | {i['macro_f1'] - t['macro_f1']:+.3f} |")
    shares = ", ".join(f"{k} {v:.1%}" for k, v in sorted(report["selected_share"].items()))
    pool = ", ".join(f"{k} {v:.1%}" for k, v in sorted(report["pool_share"].items()))
    out += ["", f"DASA ({report['ood_score']} score, budget {report['budget']}, k={report['k']}): selected {shares} "
                f"(pool: {pool}); AUROC of the score for the pool's shifted domain {report['pool_shift_auroc']:.3f}, "
                f"for id_dev vs ood_dev {report['dev_auroc']:.3f}."]
    for r in [r for r in lines if r["split"] == "interpolation"]:
        curve = ", ".join(f"{c['alpha']:g}: {c['mean']:.3f}" for c in r["curve"])
        out += ["", f"Interpolation (stage {r['stage']}): alpha {r['chosen_alpha']:g} chosen by the mean of "
                    f"{' and '.join(r['chosen_on'])} macro-F1 (alpha: mean {curve})."]
    return out


def main_run_lpft():
    return main_run("main_run_lpft", "python train.py --stage all --schedule lpft")


def sweeps():
    """The dev sweeps that chose train.py's defaults (bench/sweep.py), one table per sweep file."""
    import sweep
    files = sorted((RES / "sweeps").glob("*.jsonl"))
    if not files:
        return missing(RES / "sweeps", "python bench/sweep.py stage1 ...")
    out = []
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        machines = sorted({r["machine"] for r in rows})
        out += [f"`{rel(path)}` (scored on {', '.join(sorted({r['scored_on'] for r in rows}))}; {'; '.join(machines)}; "
                f"train.py arguments beyond the grid: `{' '.join(extra_args(rows[0]))}`):", "", *sweep.table(rows), ""]
    return out[:-1]


def extra_args(row):
    """The sweep's fixed train.py arguments: the command minus --stage/--out/--seed/--resume/--eval_on and the grid."""
    cmd, skip, out = row["train_args"], {"--stage", "--out", "--seed", "--eval_on"} | {f"--{k}" for k in row["config"]}, []
    i = 0
    while i < len(cmd):
        if cmd[i] in skip:
            i += 2
        elif cmd[i] == "--resume":
            i += 1
        else:
            out.append(cmd[i])
            i += 1
    return out


def ood_features():
    import ood_features as of
    path = RES / "ood_features.json"
    d = json.loads(path.read_text())
    if "scored_on" not in d:
        return missing(path, "python bench/ood_features.py")
    s = d["setup"]
    return [f"From `{rel(path)}`: base model `{s['model']}`, k={s['k']}, {s['machine']}, commit {s['commit']}; AUROC: "
            f"{d['scored_on']['auroc']}; P@250 on the dev pool ({d['scored_on']['pool']}), bank {d['scored_on']['bank']}.",
            "", *of.table_lines(d)]


def ablation_rows():
    import ablation as ab
    args = ab.get_args(["--table"])
    rows = ab.finished(args)
    if not rows:
        return missing(ab.RES, "python bench/ablation.py")
    recs = [r for by in rows.values() for r in by.values()]
    return [f"From `bench/results/ablation/*.json` (full report: `bench/results/ablation.md`): train.py size "
            f"`{' '.join(recs[0]['settings']['size'])}`, test rows {recs[0]['settings']['test_limit']:,} per test split; "
            f"{'; '.join(sorted({r['machine'] for r in recs}))}; commits {', '.join(sorted({r['commit'] for r in recs}))}.",
            "", *ab.row_table(rows)]


def ablation_claims():
    import ablation as ab
    path = ab.RES / "deltas.json"
    if not path.exists():
        return missing(path, "python bench/ablation.py")
    d = json.loads(path.read_text())
    return [f"From `{rel(path)}`: paired bootstrap, {d['n_boot']:,} resamples of test rows and seeds, "
            f"{d['level']:.0%} intervals; verdict per test split from the macro-F1 interval (— = no claim on that split).",
            "", *ab.claims_table(d["claims"])]


def rare_shift():
    import rare_shift as rs
    files = sorted(rs.RES.glob("med*.json")) if rs.RES.exists() else []
    if not files:
        return missing(rs.RES, "python bench/rare_shift.py")
    args = rs.get_args([])
    lines, _ = rs.table(args, rs.finished(args))
    recs = [json.loads(f.read_text()) for f in files]
    return [f"From `bench/results/rare_shift/*.json`: {'; '.join(sorted({r['machine'] for r in recs}))}; commits "
            f"{', '.join(sorted({r['commit'] for r in recs}))}.", "", *lines,
            *(["", "![OOD macro-F1 against the budget, per selector and medical share](bench/results/rare_shift.png)"]
              if (rs.RES.parent / "rare_shift.png").exists() else [])]


def speed():
    import speed as sp
    d = json.loads((RES / "speed_cpu.json").read_text())
    s, m = d["settings"], d["machine"]
    ceiling = " / ".join(f"{v:.2f} {k.replace('float32', 'fp32').replace('bfloat16', 'bf16')}" for k, v in d["matmul_ceiling_tflops"].items())
    return [f"From `bench/results/speed_cpu.json`: {m['date'][:10]}, commit {m['git_commit'][:7]}, {m['cpu_model']} "
            f"({m['cpu_count']} cores, bf16 flags: {', '.join(m['cpu_bf16_matmul_flags']) or 'none'}, matmul ceiling "
            f"{ceiling} TFLOP/s), {m['threads']} thread(s), torch {m['torch']}, transformers {m['transformers']}, peft "
            f"{m['peft']}; batch {s['batch']} x {s['seq']} tokens, {s['steps']} timed steps over {s['rounds']} rounds; check: "
            f"max |ours - peft_grade| {d['check']['max_diff_peft_grade']:.1e}, vs peft_full's grade columns "
            f"{d['check']['max_diff_peft_full']:.1e}.", "", *sp.table_lines(s["device"], d["rows"], d["matmul_ceiling_tflops"])]


def ood_scale():
    import ood_scale as osc
    d = json.loads((RES / "ood_scale.json").read_text())
    s, e = d["settings"], d["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in e["versions"].items() if v)
    return [f"From `bench/results/ood_scale.json`: {e['date'][:10]}, commit {e['git_commit'][:7]}, {e['cpu']} "
            f"({e['cpu_count']} cores; this run did not record its matmul ceiling: bench/speed.py measured 0.13 fp32 / "
            f"0.37 bf16 TFLOP/s on the same machine type that day), {e['threads']} thread(s), {versions}; "
            f"dim {s['dim']}, k={s['k']}, {s['queries']:,} queries.", "", *osc.table_lines(d)]


def score_memory():
    path = RES / "score_memory.json"
    if not path.exists():
        return missing(path, "python bench/score_memory.py")
    d = json.loads(path.read_text())
    return [f"From `{rel(path)}`: {d['machine']}, commit {d['commit']}, chunks of {d['chunk']:,} lines.", "",
            "| input lines | peak RSS GiB | seconds | pairs/s |", "|---:|---:|---:|---:|",
            *[f"| {r['lines']:,} | {r['peak_rss_gib']:.2f} | {r['seconds']:.0f} | {r['pairs_per_s']:,} |" for r in d["rows"]]]


BLOCKS = {"main_run": main_run, "main_run_lpft": main_run_lpft, "sweeps": sweeps, "ood_features": ood_features,
          "ablation": ablation_rows, "claims": ablation_claims, "rare_shift": rare_shift, "speed": speed,
          "ood_scale": ood_scale, "score_memory": score_memory}
PATTERN = re.compile(r"(<!-- table: (\w+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(readme):
    def block(m):
        if m.group(2) not in BLOCKS:
            raise SystemExit(f"README.md: unknown table block {m.group(2)!r} (known: {', '.join(BLOCKS)})")
        return m.group(1) + "\n".join(BLOCKS[m.group(2)]()) + "\n" + m.group(4)
    return PATTERN.sub(block, readme)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md differs")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args(argv)
    old = args.readme.read_text(encoding="utf-8")
    new = render(old)
    if args.check:
        if new != old:
            raise SystemExit(f"{args.readme}: tables differ from bench/results; run python bench/readme_tables.py")
        print(f"{args.readme}: {len(PATTERN.findall(old))} tables match bench/results")
        return
    args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: {len(PATTERN.findall(new))} tables regenerated")


if __name__ == "__main__":
    main()
