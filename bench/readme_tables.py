"""Regenerate the README's measured tables from the committed result files, so none is typed by hand.

    python bench/readme_tables.py            # rewrite the blocks in README.md
    python bench/readme_tables.py --check    # exit 1 when README.md is not what the files give (a test runs this)

A block is the text between `<!-- table: NAME -->` and `<!-- /table -->` in README.md; NAME is one of
BLOCKS. Each block starts with a line naming its source files, date, commit and settings, read from
those files. The prose around the blocks is written by hand and must agree with them.
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))


def rel(path):
    return str(Path(path).relative_to(ROOT))


def main_run():
    """`python train.py --stage all` with the defaults: metrics per stage, wall time, peak RSS, DASA share."""
    res, log, rep = (RES / "train_cpu" / n for n in ("main_run.jsonl", "main_run_log.txt", "main_run_ood_report.json"))
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    text = log.read_text()
    head = re.search(r"^\[\S+\] (train\.py --stage all.*)$", text, re.M)
    done = re.search(r"done in ([\d.]+) min, peak RSS ([\d.]+) GiB", text)
    report = json.loads(rep.read_text())
    by = {(r["stage"], r["split"]): r for r in rows}
    out = [f"From `{rel(res)}`, `{rel(log)}`, `{rel(rep)}`: `{head.group(1)}`; **{done.group(1)} min wall, peak RSS {done.group(2)} GiB**.", "",
           "| stage | ID acc | ID macro-F1 | ID ECE | OOD acc | OOD macro-F1 | OOD ECE | ID-OOD F1 gap |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in sorted({r["stage"] for r in rows}):
        i, o = by[(stage, "id_test")], by[(stage, "ood_test")]
        out.append(f"| {stage} | {i['accuracy']:.3f} | {i['macro_f1']:.3f} | {i['ece']:.3f} | {o['accuracy']:.3f} "
                   f"| {o['macro_f1']:.3f} | {o['ece']:.3f} | {i['macro_f1'] - o['macro_f1']:+.3f} |")
    shares = ", ".join(f"{k} {v:.1%}" for k, v in sorted(report["selected_share"].items()))
    pool = ", ".join(f"{k} {v:.1%}" for k, v in sorted(report["pool_share"].items()))
    out += ["", f"DASA ({report['ood_score']} score, budget {report['budget']}, k={report['k']}): selected {shares} "
                f"(pool: {pool}); AUROC of the score for the pool's shifted domain "
                f"{report['pool_shift_auroc']:.3f}; id_test vs ood_test AUROC of the score {report['test_auroc']:.3f}, "
                f"of plain kNN {report['knn_test_auroc']:.3f}."]
    return out


def ablation():
    import ablation as ab
    args = ab.get_args(["--table-only"])
    rows, config = ab.load_results(args)
    ds = [d for v in rows.values() for d in v]
    return [f"From `bench/results/ablation/*.json` (full report: `bench/results/ablation.md`): data `{config['data']}`, "
            f"model `{config['model']}`, train.py arguments `{' '.join(config['train_args'])}` + defaults, "
            f"{', '.join(sorted({str(d['threads']) for d in ds}))} thread(s) per run, finished "
            f"{max(d['date'] for d in ds)[:10]}, commit(s) {', '.join(sorted({d['commit'][:7] for d in ds}))}.", "",
            *ab.table(args, rows)]


def speed():
    import speed as sp
    d = json.loads((RES / "speed_cpu.json").read_text())
    s, m = d["settings"], d["machine"]
    return [f"From `bench/results/speed_cpu.json`: {m['date'][:10]}, commit {m['git_commit'][:7]}, {m['cpu_model']} "
            f"({m['cpu_count']} cores, bf16 flags: {', '.join(m['cpu_bf16_matmul_flags']) or 'none'}), {m['threads']} "
            f"thread(s), torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; batch {s['batch']} x "
            f"{s['seq']} tokens, {s['steps']} timed steps over {s['rounds']} rounds; check: max |ours - peft_grade| "
            f"{d['check']['max_diff_peft_grade']:.1e}, vs peft_full's grade columns {d['check']['max_diff_peft_full']:.1e}.",
            "", *sp.table_lines(s["device"], d["rows"], d["matmul_ceiling_tflops"])]


def ood_scale():
    import ood_scale as osc
    d = json.loads((RES / "ood_scale.json").read_text())
    s, e = d["settings"], d["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in e["versions"].items() if v)
    return [f"From `bench/results/ood_scale.json`: {e['date'][:10]}, commit {e['git_commit'][:7]}, {e['cpu']} "
            f"({e['cpu_count']} cores), {e['threads']} thread(s), {versions}; "
            f"dim {s['dim']}, k={s['k']}, {s['queries']:,} queries.", "", *osc.table_lines(d)]


BLOCKS = {"main_run": main_run, "ablation": ablation, "speed": speed, "ood_scale": ood_scale}
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
