"""bench/ablation.py and bench/rare_shift.py bookkeeping on the tiny Gemma and real rows: rows reuse what
they continue from, predictions are exported pairable, the intervals and verdicts come from them, finished
runs are not run again, other settings are refused, and a rare-shift budget's selection is the prefix of
the largest one's."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import ablation  # noqa: E402

TINY = "--cpu --dtype float32 --limit 60 --max_steps 2 --batch_size 4 --eval_batch_size 32 --max_len 64 --k 3"


def bench(script, tmp_path, model, data, *args, tiny=TINY):
    cmd = [sys.executable, str(REPO / "bench" / script), "--data", data, "--results", str(tmp_path / "res" / script[:-3]),
           "--work", str(tmp_path / "work" / script[:-3]), "--threads", "1", f"--train_args=--model {model} {tiny}",
           "--test_limit", "200", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


def launched(p):
    return [line for line in p.stdout.splitlines() if line.startswith("$ python train.py")]


@pytest.fixture(scope="module")
def ran(tiny_gemma, qbqtc2kuake, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    p = bench("ablation.py", tmp, tiny_gemma, qbqtc2kuake, "--rows", "zero_shot,darl,dasa_s2,dasa", "--seeds", "0,1")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    return tmp, p


def test_rows_reuse_stage1_share_an_out_and_export_pairable_predictions(ran):
    """Catches a row that retrains the stage 1 it continues (DASA rows must start from darl's adapter), a row
    sharing an OUT that trains again, and predictions scored on other rows than its reference's."""
    tmp, p = ran
    res, work = tmp / "res" / "ablation", tmp / "work" / "ablation"
    cmds = launched(p)
    assert sum("--stage 1 " in c for c in cmds) == 2  # darl, seeds 0 and 1: nothing else trains a stage 1
    assert sum("--stage 2 " in c for c in cmds) == 2 and sum("--stage 3 " in c for c in cmds) == 2  # dasa_s2 = dasa's OUT
    assert sum("--stage eval" in c for c in cmds) == 7  # zero-shot once, three rows x two seeds
    for seed in (0, 1):
        a, b = (work / f"{r}_seed{seed}" / "stage1" / "adapter_model.safetensors" for r in ("darl", "dasa"))
        assert a.read_bytes() == b.read_bytes()
    recs = {f.stem: json.loads(f.read_text()) for f in res.glob("*_seed*.json")}
    assert sorted(recs) == ["darl_seed0", "darl_seed1", "dasa_s2_seed0", "dasa_s2_seed1", "dasa_seed0", "dasa_seed1",
                            "zero_shot_seed0"]
    assert recs["dasa_s2_seed0"]["stage"] == "2" and recs["dasa_seed0"]["stage"] == "3"
    hashes = set()
    for rec in recs.values():
        assert set(rec["metrics"]) == set(ablation.eval_splits(rec["row"]))
        for split in ("id_test", "ood_test"):
            d = np.load(res / rec["preds"][split])
            assert d["probs"].dtype == np.float16 and len(d["probs"]) == rec["metrics"][split]["n"]
            np.testing.assert_allclose(d["probs"].astype(np.float64).argmax(1) == d["labels"],
                                       d["probs"].argmax(1) == d["labels"])
            hashes.add((split, str(d["ids_sha256"])))
    assert len(hashes) == 2  # every row scored on the same id_test rows and the same ood_test rows


def test_deltas_are_the_bootstrap_of_the_exported_predictions(ran):
    """Catches a delta computed on unpaired rows or seeds, or a verdict that does not follow its interval."""
    import darl
    tmp, _ = ran
    res = tmp / "res" / "ablation"
    claims = {(c["row"], c["ref"]): c for c in json.loads((res / "deltas.json").read_text())["claims"]}
    entry = claims[("dasa", "dasa_s2")]
    load = lambda name, split: np.load(res / "preds" / f"{name}_{split}.npz")  # noqa: E731
    a = [load(f"dasa_seed{s}", "ood_test")["probs"].astype(np.float64) for s in (0, 1)]
    b = [load(f"dasa_s2_seed{s}", "ood_test")["probs"].astype(np.float64) for s in (0, 1)]
    labels = load("dasa_seed0", "ood_test")["labels"].astype(np.int64)
    want = darl.paired_bootstrap(a, b, labels, n_boot=1000, groups=load("dasa_seed0", "ood_test")["groups"])
    got = entry["ood_test_macro_f1"]
    assert got["seeds"] == [0, 1] and (got["delta"], got["lo"], got["hi"]) == (want["delta"], want["lo"], want["hi"])
    assert entry["ood_test_verdict"] == ablation.verdict(got, 1)


def test_verdict_follows_the_interval():
    """Catches a verdict that reads the point estimate instead of the interval, or ignores the claimed sign."""
    assert ablation.verdict({"lo": 0.01, "hi": 0.05}, 1) == "reproduced"
    assert ablation.verdict({"lo": -0.01, "hi": 0.05}, 1) == "inconclusive"
    assert ablation.verdict({"lo": -0.05, "hi": -0.01}, 1) == "contradicted"
    assert ablation.verdict({"lo": -0.05, "hi": -0.01}, -1) == "reproduced"
    assert ablation.verdict({"lo": 0.01, "hi": 0.05}, None) == "—" and ablation.verdict(None, 1) == "not run"


def test_finished_rows_are_not_rerun_and_other_settings_are_refused(ran, tiny_gemma, qbqtc2kuake):
    """Catches a rerun that repeats hours of finished work, and a table mixing runs made with other settings."""
    tmp, _ = ran
    p = bench("ablation.py", tmp, tiny_gemma, qbqtc2kuake, "--rows", "zero_shot,darl,dasa_s2,dasa", "--seeds", "0,1")
    assert p.returncode == 0 and launched(p) == [], p.stdout[-2000:] + p.stderr
    p = bench("ablation.py", tmp, tiny_gemma, qbqtc2kuake, "--rows", "darl", "--seeds", "0", tiny=TINY.replace("60", "50"))
    assert p.returncode != 0 and "was made with other settings" in p.stderr and launched(p) == []


def test_rare_shift_pools_and_prefix_selections(ran, tiny_gemma, qbqtc2kuake):
    """Catches pool variants with other web rows or the wrong medical count, and a small budget whose
    selection is not the prefix of the largest budget's (the features are computed once per pool), and a
    record without the minutes of a stage 2 that an earlier, smaller budget trained for it."""
    tmp, _ = ran
    p = bench("rare_shift.py", tmp, tiny_gemma, qbqtc2kuake, "--cut", "--seeds", "0")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    work = tmp / "work" / "rare_shift"
    pools = {s: [json.loads(x) for x in open(work / f"data_med{s}" / "pool.jsonl", encoding="utf-8")] for s in (3, 25)}
    web = {s: [r["id"] for r in rows if r["domain"] == "web"] for s, rows in pools.items()}
    assert web[3] == web[25] and len(web[3]) == 750
    assert [sum(r["domain"] == "medical" for r in pools[s]) for s in (3, 25)] == [23, 250]
    for sel in ("dasa", "random"):
        for share in (3, 25):
            small, big = (open(work / f"med{share}_b{b}_{sel}_seed0" / "stage2" / "dasa_selected.jsonl").read().splitlines()
                          for b in (50, 200))
            assert len(small) == 50 and small == big[:50] and len(big) > 50
    assert sum(("--stage 1 " in c) for c in launched(p)) == 0  # stage 1 = the ablation's darl row, already there
    for f in (tmp / "res" / "rare_shift").glob("med*.json"):
        assert set(json.loads(f.read_text())["minutes"]) == {"2", "3", "eval"}, f.name
    table = (tmp / "res" / "rare_shift.md").read_text()
    assert table.count("| 3% |") == 2 and table.count("| 25% |") == 2


def test_a_finished_row_without_its_out_is_trained_again_not_scored(ran, tiny_gemma, qbqtc2kuake, tmp_path):
    """Catches a row that continues from a finished row whose OUT is gone (a clean checkout holds only the
    committed JSON): it crashed on the missing stage1/; now that stage trains again from the same seed
    (bit-identical here), and the finished row is not scored again."""
    tmp, _ = ran
    (tmp_path / "res" / "ablation" / "preds").mkdir(parents=True)
    for f in ["darl_seed0.json"] + [f"preds/darl_seed0_{split}.npz" for split in ablation.TEST]:
        (tmp_path / "res" / "ablation" / f).write_bytes((tmp / "res" / "ablation" / f).read_bytes())
    p = bench("ablation.py", tmp_path, tiny_gemma, qbqtc2kuake, "--rows", "dasa_s2", "--seeds", "0")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr
    cmds = launched(p)
    assert [c.split("--stage ")[1].split()[0] for c in cmds] == ["1", "2", "eval"]
    assert "darl_seed0" in cmds[0] and "darl_seed0" not in cmds[2]
    a, b = (w / "work" / "ablation" / "darl_seed0" / "stage1" / "adapter_model.safetensors" for w in (tmp, tmp_path))
    assert a.read_bytes() == b.read_bytes()


def test_rare_shift_tables_pair_the_seeds():
    """Catches a table cut mid-grid whose means take a seed only one selector has run, set beside a delta
    over the paired seeds (it showed ID F1 0.492 vs 0.516 next to a delta of +0.013)."""
    import rare_shift
    runs = {(3, 50, "dasa", 0): "a", (3, 50, "random", 0): "b", (3, 50, "dasa", 1): "c", (25, 50, "random", 0): "d"}
    assert rare_shift.paired(runs) == {(3, 50, "dasa", 0): "a", (3, 50, "random", 0): "b"}


def test_rare_shift_full_keeps_every_web_row_and_drops_the_caps(qbqtc2kuake, tmp_path):
    """Catches a --full that still runs the CPU size (750 web rows, --limit 1000), a medical count not
    matched to the web rows, and full-size pools written over the CPU ones."""
    import rare_shift
    args = rare_shift.get_args(["--full", "--data", qbqtc2kuake, "--work", str(tmp_path)])
    assert args.size == ["--limit", "0"]
    pool = [json.loads(x) for x in open(Path(qbqtc2kuake) / "pool.jsonl", encoding="utf-8")]
    folder = rare_shift.pool_variant(args, 3)
    assert folder != rare_shift.pool_variant(rare_shift.get_args(["--data", qbqtc2kuake, "--work", str(tmp_path)]), 3)
    rows = [json.loads(x) for x in open(folder / "pool.jsonl", encoding="utf-8")]
    web = sum(r["domain"] != "medical" for r in pool)
    assert sum(r["domain"] != "medical" for r in rows) == web and web > rare_shift.WEB_ROWS
    assert sum(r["domain"] == "medical" for r in rows) == round(web * 3 / 97)
