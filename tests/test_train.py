"""train.py end to end on a tiny random Gemma 3 (real tokenizer) and a few hundred real benchmark rows.

The tiny model makes every stage run in seconds; the real tokenizer (from data/gemma3_270m, made by
data/gemma3_270m/prepare.py) and the real qbqtc2kuake rows (made by data/qbqtc2kuake/prepare.py from
../shared/data) keep the data path honest: Chinese text, real lengths, the real prompt and grade tokens.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
FAST = ["--cpu", "--dtype", "float32", "--limit", "120", "--eval_limit", "120", "--budget", "24", "--max_steps", "4", "--batch_size", "4",
        "--eval_batch_size", "16", "--max_len", "64", "--k", "5", "--log_every", "1", "--ckpt_every", "2"]


def run(args, **kw):
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=600, **kw)


def results(out):
    return [json.loads(line) for line in open(os.path.join(out, "results.jsonl"), encoding="utf-8")]


def adapter(d):
    return load_file(os.path.join(d, "adapter_model.safetensors"))


def same_adapter(a, b, atol=0.0):
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys() and len(ta) > 0
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=atol, msg=k)


def test_all_stages_eval_and_score(tiny_gemma, qbqtc2kuake, tmp_path):
    out = str(tmp_path / "out")
    p = run(["--stage", "all", "--model", tiny_gemma, "--data", qbqtc2kuake, "--out", out, *FAST])
    assert p.returncode == 0, p.stdout + p.stderr
    res = results(out)
    assert [(r["stage"], r["split"]) for r in res] == [(s, sp) for s in "123" for sp in train.EVAL_SPLITS]
    for r in res:
        assert r["n"] == 120 and 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1 and 0 <= r["ece"] <= 1
    for s in (1, 2, 3):
        cfg = json.load(open(os.path.join(out, f"stage{s}", "adapter_config.json")))
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    # the three stages really trained different adapters
    a1, a3 = adapter(os.path.join(out, "stage1")), adapter(os.path.join(out, "stage3"))
    assert any(not torch.equal(a1[k], a3[k]) for k in a1)
    sel = [json.loads(line) for line in open(os.path.join(out, "stage2", "dasa_selected.jsonl"))]
    assert len(sel) == 24 and len({s["id"] for s in sel}) == 24 and all("domain" in s for s in sel)
    rep = json.load(open(os.path.join(out, "stage2", "ood_report.json")))
    assert set(rep["selected_share"]) == {"web", "medical"} and 0 <= rep["pool_shift_auroc"] <= 1
    assert "| stage | split |" in p.stdout and os.path.exists(os.path.join(out, "log.txt"))

    # eval re-evaluates a saved adapter, and reproduces the stage-3 numbers exactly
    p = run(["--stage", "eval", "--adapter", os.path.join(out, "stage3"), "--model", tiny_gemma,
             "--data", qbqtc2kuake, "--out", out, *FAST])
    assert p.returncode == 0, p.stderr
    ev = results(out)[-4:]
    assert [r["split"] for r in ev] == list(train.EVAL_SPLITS)
    for r3, re in zip(res[-4:], ev):
        assert abs(r3["macro_f1"] - re["macro_f1"]) < 1e-9 and abs(r3["ece"] - re["ece"]) < 1e-6

    # score writes probabilities and an expected grade in [0, 1] for new pairs (no id, no label needed)
    inp, outp = tmp_path / "pairs.jsonl", tmp_path / "scored.jsonl"
    inp.write_text('{"query": "感冒吃什么药", "item": "感冒了吃什么药好得快"}\n{"query": "天气", "item": "北京今天天气"}\n',
                   encoding="utf-8")
    p = run(["--stage", "score", "--adapter", os.path.join(out, "stage3"), "--model", tiny_gemma,
             "--data", qbqtc2kuake, "--input", str(inp), "--output", str(outp), "--out", out, "--cpu", "--dtype", "float32"])
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in outp.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and rows[0]["query"] == "感冒吃什么药"
    for r in rows:
        assert len(r["probs"]) == 3 and abs(sum(r["probs"]) - 1) < 1e-4 and 0 <= r["relevance"] <= 1


def test_refuses_to_overwrite_without_resume(tiny_gemma, qbqtc2kuake, tmp_path):
    out = str(tmp_path / "out")
    assert run(["--stage", "1", "--model", tiny_gemma, "--data", qbqtc2kuake, "--out", out, *FAST]).returncode == 0
    before = adapter(os.path.join(out, "stage1"))
    p = run(["--stage", "1", "--model", tiny_gemma, "--data", qbqtc2kuake, "--out", out, *FAST])
    assert p.returncode != 0 and "--resume" in p.stderr
    same = adapter(os.path.join(out, "stage1"))
    assert all(torch.equal(before[k], same[k]) for k in before)


KILLER = """
import os, signal, sys, train
save = train.atomic_save
def dying_save(obj, path):
    save(obj, path)
    if path.endswith("ckpt.pt") and obj["step"] == int(os.environ["DIE_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
train.atomic_save = dying_save
sys.argv = ["train.py"] + sys.argv[1:]
train.main()
"""


def test_kill9_then_resume_is_bit_identical(tiny_gemma, qbqtc2kuake, tmp_path):
    args = ["--stage", "1", "--model", tiny_gemma, "--data", qbqtc2kuake, *FAST, "--max_steps", "7",
            "--lora_dropout", "0.1"]
    ref = str(tmp_path / "ref")
    assert run(args + ["--out", ref]).returncode == 0
    cut = str(tmp_path / "cut")
    p = subprocess.run([sys.executable, "-c", KILLER, *args, "--out", cut], env={**ENV, "DIE_AT": "4"},
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert os.path.exists(os.path.join(cut, "stage1", "ckpt.pt"))
    assert not os.path.exists(os.path.join(cut, "stage1", "adapter_model.safetensors"))
    p = run(args + ["--out", cut, "--resume"])
    assert p.returncode == 0, p.stderr
    assert "resumed" in p.stdout and "at step 4/7" in p.stdout
    same_adapter(os.path.join(ref, "stage1"), os.path.join(cut, "stage1"))
    assert not os.path.exists(os.path.join(cut, "stage1", "ckpt.pt"))


NAN = """
import functools, sys, torch, train, darl
real = darl.darl_loss
calls = []
@functools.wraps(real)
def nan_at_3(*a, **k):
    calls.append(1)
    out = real(*a, **k)
    return out * float("nan") if len(calls) == 3 else out
darl.darl_loss = nan_at_3
sys.argv = ["train.py"] + sys.argv[1:]
try:
    train.main()
except FloatingPointError as e:
    sys.exit(f"error: {e}")
"""


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tiny_gemma, qbqtc2kuake, tmp_path):
    out = str(tmp_path / "out")
    p = subprocess.run([sys.executable, "-c", NAN, "--stage", "1", "--model", tiny_gemma, "--data", qbqtc2kuake,
                        "--out", out, *FAST], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    assert "loss is nan at step 2" in p.stderr and "last good checkpoint" in p.stderr
    state = torch.load(os.path.join(out, "stage1", "ckpt.pt"), weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["weights"])


def test_ddp_two_processes_match_one(tiny_gemma, qbqtc2kuake, tmp_path):
    common = ["--stage", "1", "--model", tiny_gemma, "--data", qbqtc2kuake, *FAST, "--lora_dropout", "0"]
    one = str(tmp_path / "one")
    p = run(common + ["--out", one, "--micro_tokens", "64"])  # one row per forward pass
    assert p.returncode == 0, p.stderr
    two = str(tmp_path / "two")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                        os.path.join(REPO, "train.py"), *common, "--out", two],
                       env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    same_adapter(os.path.join(one, "stage1"), os.path.join(two, "stage1"), atol=1e-5)
    r1, r2 = results(one), results(two)
    for a, b in zip(r1, r2):
        assert a["n"] == b["n"] == 120 and abs(a["accuracy"] - b["accuracy"]) < 1e-9


def test_annotation_round_trip(tiny_gemma, qbqtc2kuake, tmp_path):
    """A pool without labels: stage 2 writes the annotation file and stops; filled in, it continues."""
    data = tmp_path / "data"
    shutil.copytree(qbqtc2kuake, data)
    pool = [json.loads(line) for line in open(data / "pool.jsonl", encoding="utf-8")]
    truth = {r["id"]: r.pop("label") for r in pool}
    (data / "pool.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool), encoding="utf-8")
    out = str(tmp_path / "out")
    args = ["--model", tiny_gemma, "--data", str(data), "--out", out, *FAST]
    assert run(["--stage", "1", *args]).returncode == 0
    p = run(["--stage", "2", *args, "--resume"])
    todo = os.path.join(out, "stage2", "to_annotate.jsonl")
    assert p.returncode != 0 and todo in p.stderr and "annotated.jsonl" in p.stderr
    rows = [json.loads(line) for line in open(todo, encoding="utf-8")]
    assert len(rows) == 24 and all(r["label"] in (None, "") for r in rows)
    with open(os.path.join(out, "stage2", "annotated.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({**r, "label": truth[r["id"]]}, ensure_ascii=False) + "\n")
    p = run(["--stage", "2", *args, "--resume"])
    assert p.returncode == 0, p.stderr
    assert [r["stage"] for r in results(out)] == ["1"] * 4 + ["2"] * 4
