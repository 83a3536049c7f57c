"""bench/ablation.py's bookkeeping on the tiny Gemma and a few real rows: JSON per row, the generated table,
skipping finished rows, reuse across rows (stage 1, row 5 from row 6), a cut evaluation, stale settings."""
import importlib.util
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "ablation.py")
TINY = ["--cpu", "--dtype", "float32", "--limit", "60", "--budget", "12", "--max_steps", "2", "--batch_size", "4",
        "--eval_batch_size", "16", "--max_len", "64", "--k", "3"]
spec = importlib.util.spec_from_file_location("ablation", SCRIPT)
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def bench(tmp_path, model, data, *args, extra=TINY):
    cmd = [sys.executable, SCRIPT, "--data", data, "--model", model, "--out", str(tmp_path / "work"),
           "--results", str(tmp_path / "res"), "--threads", "1", *args, "--", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def launched(p):
    return [line for line in p.stdout.splitlines() if line.startswith("$ python train.py")]


def table_rows(md):
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    body = []
    for line in lines[1:]:  # the |---| line is not in lines
        if line.startswith("| row |"):  # the next table (per run) starts
            break
        body.append(dict(zip(head, (c.strip() for c in line.strip("|").split("|")))))
    return head, body


def test_rows_json_table_skip_reuse(tiny_gemma, qbqtc2kuake, tmp_path):
    res, work = tmp_path / "res", tmp_path / "work"
    t0 = time.time()
    p = bench(tmp_path, tiny_gemma, qbqtc2kuake, "--rows", "1,3,6", "--seeds", "0")
    first = time.time() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("plan: 4 train.py stage runs (1 x eval, 1 x stage 1, 1 x stage 2, 1 x stage 3)")
    assert len(launched(p)) == 4
    files = sorted(os.listdir(res / "ablation"))
    assert files == ["1_zero_shot_seed0.json", "3_darl_seed0.json", "6_dasa_seed0.json"]
    d = {r: json.load(open(res / "ablation" / f, encoding="utf-8")) for r, f in zip((1, 3, 6), files)}
    assert [d[r]["stage"] for r in (1, 3, 6)] == ["eval", "1", "3"]
    for r in (1, 3, 6):
        assert d[r]["id_test"]["n"] == d[r]["ood_test"]["n"] == 60 and d[r]["seed"] == 0
        assert d[r]["config"]["train_args"] == TINY and d[r]["wall_seconds"] > 0 and d[r]["commit"]
        assert d[r]["splits"] == {"id_train": 60, "id_test": 60, "pool": 60, "ood_test": 60}
    assert d[1]["ood_report"] is None and d[3]["train"] == {"1": {"rows": 60, "steps": 2, "batch": 4}}
    assert d[6]["train"] == {"2": {"rows": 12, "steps": 2, "batch": 4}, "3": {"rows": 24, "steps": 2, "batch": 4}}
    rep = d[6]["ood_report"]
    assert rep["selected"] == 12 and set(rep["selected_share"]) == {"web", "medical"}
    # row 6 continued from row 3's stage-1 adapter instead of training its own
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (work / "3_darl_seed0" / "stage1" / f).read_bytes() == (work / "6_dasa_seed0" / "stage1" / f).read_bytes()
    assert [r["stage"] for r in map(json.loads, open(work / "6_dasa_seed0" / "results.jsonl"))] == ["2", "2", "3", "3"]

    md = (res / "ablation.md").read_text(encoding="utf-8")
    head, body = table_rows(md)
    assert head == ["row", "run", "seeds", "ID acc", "ID F1", "ID ECE", "OOD acc", "OOD F1", "OOD ECE", "F1 gap",
                    "sel. medical", "kNN AUROC", "wall min"]
    assert [b["row"] for b in body] == ["1", "3", "6"] and all(b["seeds"] == "0" for b in body)
    assert body[2]["OOD F1"] == f"{d[6]['ood_test']['macro_f1']:.3f}"
    assert body[2]["F1 gap"] == f"{d[6]['id_test']['macro_f1'] - d[6]['ood_test']['macro_f1']:.3f}"
    assert body[2]["sel. medical"] == f"{rep['selected_share']['medical']:.3f}"
    assert body[2]["kNN AUROC"] == f"{rep['knn_test_auroc']:.3f}" and body[0]["kNN AUROC"] == "—"
    assert "--limit 60" in md and "id_train 60" in md and "DASA budget 12" in md
    if importlib.util.find_spec("matplotlib"):
        assert (res / "ablation_f1.png").stat().st_size > 0
    else:
        assert "plot skipped: matplotlib is missing" in p.stdout and not (res / "ablation_f1.png").exists()

    # --plan runs nothing; its minutes come from the stages measured so far (rows 3 and 6)
    p = bench(tmp_path, tiny_gemma, qbqtc2kuake, "--rows", "2,8", "--seeds", "0", "--plan")
    assert p.returncode == 0, p.stderr
    minutes = (d[3]["stage_seconds"]["1"] + d[6]["stage_seconds"]["2"] + d[6]["stage_seconds"]["3"]) / 60
    assert p.stdout.startswith("plan: 3 train.py stage runs (1 x stage 1, 1 x stage 2, 1 x stage 3)")
    assert f"; estimate {minutes:.3g} min" in p.stdout and "--loss sft" in p.stdout and "--ood_score knn" in p.stdout
    assert sorted(os.listdir(work)) == ["1_zero_shot_seed0", "3_darl_seed0", "6_dasa_seed0"]

    # a rerun skips every finished row and launches nothing
    stamps = {f: os.path.getmtime(res / "ablation" / f) for f in files}
    t0 = time.time()
    p = bench(tmp_path, tiny_gemma, qbqtc2kuake, "--rows", "1,3,6", "--seeds", "0")
    assert p.returncode == 0, p.stderr
    assert launched(p) == [] and all(f"skip row {r} seed 0" in p.stdout for r in (1, 3, 6))
    assert stamps == {f: os.path.getmtime(res / "ablation" / f) for f in files} and time.time() - t0 < first / 2

    # row 5 is the stage-2 half of row 6: no train.py run
    p = bench(tmp_path, tiny_gemma, qbqtc2kuake, "--rows", "5", "--seeds", "0")
    assert p.returncode == 0, p.stderr
    assert launched(p) == [] and "skip row 3 seed 0" in p.stdout
    d5 = json.load(open(res / "ablation" / "5_dasa_s2_seed0.json", encoding="utf-8"))
    stage2 = [r for r in map(json.loads, open(work / "6_dasa_seed0" / "results.jsonl")) if r["stage"] == "2"]
    assert d5["stage"] == "2" and [d5["id_test"], d5["ood_test"]] == stage2
    assert d5["stage_seconds"] == {"2": d[6]["stage_seconds"]["2"]} and d5["ood_report"] == rep

    # stage 3 trained but cut before its evaluation: only an eval of its adapter runs, with the same numbers
    lines = open(work / "6_dasa_seed0" / "results.jsonl").readlines()
    (work / "6_dasa_seed0" / "results.jsonl").write_text("".join(lines[:2]))
    os.remove(res / "ablation" / "6_dasa_seed0.json")
    p = bench(tmp_path, tiny_gemma, qbqtc2kuake, "--rows", "6", "--seeds", "0")
    assert p.returncode == 0, p.stdout + p.stderr
    assert len(launched(p)) == 1 and "--stage eval" in launched(p)[0] and "--adapter" in launched(p)[0]
    again = json.load(open(res / "ablation" / "6_dasa_seed0.json", encoding="utf-8"))
    for split in ("id_test", "ood_test"):
        assert abs(again[split]["macro_f1"] - d[6][split]["macro_f1"]) < 1e-9

    # --table-only rebuilds the same table from the JSON files, without the train.py arguments
    os.remove(res / "ablation.md")
    p = subprocess.run([sys.executable, SCRIPT, "--results", str(res), "--table-only"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    head2, body2 = table_rows((res / "ablation.md").read_text(encoding="utf-8"))
    assert head2 == head and [b["row"] for b in body2] == ["1", "3", "5", "6"]
    assert [b["OOD F1"] for b in body2 if b["row"] != "5"] == [b["OOD F1"] for b in body]

    # other settings never mix with finished rows
    p = bench(tmp_path, tiny_gemma, qbqtc2kuake, "--rows", "1", "--seeds", "0",
              extra=[a if a != "60" else "50" for a in TINY])
    assert p.returncode != 0 and "1_zero_shot_seed0.json was made with other settings" in p.stderr
    assert launched(p) == []


def test_plan_order_dependencies_and_spread():
    args = ablation.get_args(["--rows", "6,7", "--seeds", "0,1"])
    assert ablation.plan(args) == [(3, 0), (6, 0), (7, 0), (3, 1), (6, 1)]  # row 7: first seed only
    assert ablation.plan(ablation.get_args(["--rows", "2", "--seeds", "1,0"])) == [(2, 1)]
    assert args.config["train_args"] == ablation.CPU_ARGS
    assert ablation.get_args(["--full", "--", "--max_steps", "3"]).config["train_args"] == [*ablation.FULL_ARGS, "--max_steps", "3"]
    assert ablation.get_args(["--", "--limit", "7"]).config["train_args"] == ["--limit", "7"]
    assert ablation.cell([0.5, 0.6]) == "0.550 ± 0.050" and ablation.cell([0.5]) == "0.500" and ablation.cell([None]) == "—"


def test_refuses_row_arguments_after_the_separator():
    p = subprocess.run([sys.executable, SCRIPT, "--plan", "--", "--loss", "sft"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0 and "--loss after -- is set by the bench itself" in p.stderr
