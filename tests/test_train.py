"""train.py, judge.py and dasa.py on a tiny random Gemma 3 (real tokenizer) and real benchmark rows.

The tiny model makes every stage run in seconds; the real tokenizer (data/gemma3_270m) and the real
qbqtc2kuake rows (made by data/qbqtc2kuake/prepare.py from ../shared/data) keep the data path honest.
Each test names the bug it catches.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import darl
import judge as judge_mod
import ood
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
FAST = ["--cpu", "--dtype", "float32", "--limit", "120", "--eval_limit", "60", "--budget", "24", "--max_steps", "4",
        "--batch_size", "4", "--eval_batch_size", "16", "--max_len", "64", "--k", "5", "--log_every", "1", "--ckpt_every", "2"]


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


def preds(out, tag, split):
    return np.load(os.path.join(out, "predictions", f"{tag}_{split}.npz"))


def args_for(tiny_gemma, data, out, *extra):
    args = train.get_args(["--stage", "1", "--model", tiny_gemma, "--data", data, "--out", str(out), *FAST, *extra])
    rt = judge_mod.Runtime(args)
    train.resolve_defaults(args, rt)
    return args, rt


@pytest.fixture(scope="module")
def darl_run(tiny_gemma, qbqtc2kuake, tmp_path_factory):
    """One --stage all run of the darl schedule, shared by the tests that read it."""
    out = str(tmp_path_factory.mktemp("darl") / "out")
    p = run(["--stage", "all", "--model", tiny_gemma, "--data", qbqtc2kuake, "--out", out, *FAST])
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p


@pytest.fixture(scope="module")
def lpft_run(tiny_gemma, qbqtc2kuake, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lpft") / "out")
    p = run(["--stage", "all", "--schedule", "lpft", "--model", tiny_gemma, "--data", qbqtc2kuake, "--out", out, *FAST,
             "--lp_steps", "30", "--alphas", "0,0.5,1"])
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p


# ----------------------------------------------------------------------------- the loop's pieces

def test_lr_schedule_values():
    """Catches a warmup that starts at 0 or overshoots, a cosine that ends anywhere but 10% of lr, or an
    off-by-one between warmup and decay (the numbers are the formulas worked by hand)."""
    steps, warmup, lr = 10, 2, 1.0
    got = [train.lr_at(s, steps, warmup, lr) for s in range(steps)]
    want = [0.5, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[2] == pytest.approx(1.0) and train.lr_at(steps, steps, warmup, lr) == pytest.approx(0.1)


def test_epoch_batches_cover_rows_once_group_lengths_and_depend_on_seed_and_epoch():
    """Catches an epoch that repeats or drops rows, batches of the wrong size, an order that does not
    change across epochs (or that a resume could not rebuild), and length grouping that does nothing."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 120, size=403).tolist()
    a = train.epoch_batches(lengths, 16, seed=0, epoch=0)
    assert len(a) == 403 // 16 and all(len(b) == 16 for b in a)
    flat = [i for b in a for i in b]
    assert len(set(flat)) == len(flat) == 25 * 16
    assert a == train.epoch_batches(lengths, 16, seed=0, epoch=0)
    assert a != train.epoch_batches(lengths, 16, seed=0, epoch=1) != train.epoch_batches(lengths, 16, seed=1, epoch=0)
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a])
    random_spread = np.mean([np.ptp(rng.choice(lengths, 16, replace=False)) for _ in range(200)])
    assert spread < 0.5 * random_spread


def test_micro_batches_respect_the_token_budget_and_keep_every_row():
    """Catches micro-batches over --micro_tokens (memory), rows lost or repeated, or padding miscounted."""
    lengths = [5, 40, 17, 33, 64, 1, 16, 90]
    parts = train.micro_batches(list(range(8)), lengths, micro_tokens=128)
    assert sorted(i for p in parts for i in p) == list(range(8))
    for p in parts:
        padded = -(-max(lengths[i] for i in p) // darl.PAD_MULTIPLE) * darl.PAD_MULTIPLE
        assert len(p) * padded <= 128 or len(p) == 1
    assert [lengths[i] for p in parts for i in p] == sorted(lengths)


def test_class_weights_match_sklearn_balanced():
    """Catches a balanced-weight formula off by the class count or inverted; absent grades must get 0."""
    from sklearn.utils.class_weight import compute_class_weight
    labels = torch.tensor([0, 1, 1, 1, 1, 1, 2, 2, 0, 1])
    got = train.class_weights(labels, 4, "balanced", log=lambda m: None)
    ref = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=labels.numpy())
    torch.testing.assert_close(got[:3], torch.tensor(ref, dtype=torch.float32) * 3 / 4)  # n / (C n_c) with C = 4 grades
    assert got[3] == 0 and train.class_weights(labels, 4, "none", log=print) is None


def tiny_judge(tiny_gemma, data, out, *extra):
    args, rt = args_for(tiny_gemma, data, out, *extra)
    meta = train.load_meta(data)
    spec = {"grades": meta["grades"], "prompt": meta["prompt"], "verbalizer": meta["verbalizer"], "max_len": args.max_len}
    judge = judge_mod.Judge(args, rt, spec)
    rows = train.load_data(args, rt, 3)
    return args, rt, judge, rows


def grads(judge):
    return [p.grad.clone() for p in judge.trainable()]


@pytest.mark.parametrize("loss", ["darl", "sft"])
def test_train_step_gradient_is_the_batch_mean_under_any_micro_batching(tiny_gemma, qbqtc2kuake, tmp_path, loss):
    """Catches gradient accumulation scaled wrongly (each micro-batch's mean must count by its rows), and
    the class weights lost on one of the two losses: the gradient of 8 rows cut into 1-row micro-batches
    equals the gradient of one pass of a directly computed weighted loss."""
    args, rt, judge, data = tiny_judge(tiny_gemma, qbqtc2kuake, tmp_path / "out", "--loss", loss)
    judge.new_lora()
    torch.manual_seed(1)
    for p in judge.trainable():  # B = 0 at init would give zero LoRA-A gradients
        p.data.normal_(0, 0.05)
    rows = data["id_train"][:8]
    examples, labels = judge.encode(rows), torch.tensor([r["label"] for r in rows])
    weight = torch.tensor([1.5, 0.5, 2.0])
    args.micro_tokens = 1  # one row per micro-batch
    train.train_step(judge, examples, labels, weight, list(range(8)), judge.trainable(), args, rt)
    split = grads(judge)
    for p in judge.trainable():
        p.grad = None
    batch = darl.collate(examples, judge.tok.pad_id)
    if loss == "sft":
        h = darl.answer_hidden(judge.model, batch["input_ids"], batch["attention_mask"])
        ce = torch.nn.functional.cross_entropy(judge.model.logits(h).float(), judge.grade_ids[labels], reduction="none")
    else:
        logits = darl.grade_logits(judge.model, batch["input_ids"], batch["attention_mask"], judge.grade_ids)
        ce = torch.stack([darl.darl_loss(logits[i:i + 1], labels[i:i + 1]) for i in range(8)])
    (ce * weight[labels]).mean().backward()
    for a, b in zip(split, grads(judge)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_fit_clips_the_gradient_norm_before_each_update(tiny_gemma, qbqtc2kuake, tmp_path, monkeypatch):
    """Catches clipping dropped or applied after the update (AdamW's scale invariance hides it from the
    end-to-end runs): at every optimizer step the gradient norm is at most --grad_clip."""
    args, rt, judge, data = tiny_judge(tiny_gemma, qbqtc2kuake, tmp_path / "out", "--grad_clip", "1e-4", "--max_steps", "3")
    judge.new_lora()
    norms, step = [], torch.optim.AdamW.step

    def recording_step(opt, *a, **k):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"]])))
        return step(opt, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    os.makedirs(tmp_path / "out" / "stage1")
    train.fit(judge, data["id_train"][:40], str(tmp_path / "out" / "stage1"), 1e-3, 1, args, rt)
    assert len(norms) == 3 and all(n <= 1e-4 * (1 + 1e-5) for n in norms), norms


DDP_STEP = """
import sys, torch, train, judge as J
args = train.get_args(sys.argv[1:])
rt = J.Runtime(args)
train.resolve_defaults(args, rt)
meta = train.load_meta(args.data)
jd = J.Judge(args, rt, {"grades": meta["grades"], "prompt": meta["prompt"], "verbalizer": meta["verbalizer"], "max_len": 64})
rows = train.load_data(args, rt, 3)["id_train"][:6]
jd.new_lora()
torch.manual_seed(1)
for p in jd.trainable():
    p.data.normal_(0, 0.05)
train.train_step(jd, jd.encode(rows), torch.tensor([r["label"] for r in rows]), None, list(range(6)), jd.trainable(), args, rt)
if rt.main:
    torch.save([p.grad for p in jd.trainable()], args.out + "/grads.pt")
"""


def test_data_parallel_gradient_is_the_one_process_gradient(tiny_gemma, qbqtc2kuake, tmp_path):
    """Catches per-rank gradients averaged instead of summed (each rank's loss is already scaled by its share of
    the global batch), or ranks that score overlapping rows: the summed gradient of 2 ranks over 6 rows (3 + 3)
    equals 1 process's over the same 6."""
    script = tmp_path / "step.py"
    script.write_text(DDP_STEP)
    common = [str(script), "--stage", "1", "--model", tiny_gemma, "--data", qbqtc2kuake, *FAST]
    got = {}
    for n, launcher in ((1, [sys.executable]), (2, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                    "--master_port", "29533"])):
        out = tmp_path / f"p{n}"
        p = subprocess.run([*launcher, *common, "--out", str(out)], env=ENV, cwd=REPO, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
        got[n] = torch.load(out / "grads.pt", weights_only=True)
    for a, b in zip(got[1], got[2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_grad_checkpointing_gives_the_same_gradient(tiny_gemma, qbqtc2kuake, tmp_path):
    """Catches --grad_ckpt changing the math (e.g. recomputing a block with other inputs or dropping a layer)."""
    args, rt, judge, data = tiny_judge(tiny_gemma, qbqtc2kuake, tmp_path / "out")
    judge.new_lora()
    for p in judge.trainable():
        p.data.normal_(0, 0.05)
    examples, labels = judge.encode(data["id_train"][:6]), torch.tensor([r["label"] for r in data["id_train"][:6]])
    result = []
    for ckpt in (False, True):
        judge.model.gradient_checkpointing = ckpt
        judge.model.train()
        train.train_step(judge, examples, labels, None, list(range(6)), judge.trainable(), args, rt)
        result.append(grads(judge))
        for p in judge.trainable():
            p.grad = None
    for a, b in zip(*result):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_dtype_auto_follows_the_cpu_bf16_units(monkeypatch, tmp_path):
    """Catches --dtype auto picking emulated bf16 on a CPU without bf16 units (slower than fp32), or
    ignoring bf16 units where they exist."""
    for units, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(judge_mod, "cpu_has_bf16_units", lambda: units)
        args = train.get_args(["--stage", "1", "--cpu", "--out", str(tmp_path)])
        assert judge_mod.Runtime(args).dtype == want


def test_replay_rows_are_a_seeded_sample_of_id_train(qbqtc2kuake):
    """Catches a stage-3 replay of the wrong size, drawn with --limit's seed (the same rows again) or unseeded."""
    args = train.get_args(["--stage", "3", "--seed", "4"])
    id_train = train.load_splits(qbqtc2kuake, 3, None, print)["id_train"][:500]
    a = train.replay_rows(id_train, 40, args)
    assert len(a) == 40 and [r["id"] for r in a] == [r["id"] for r in train.subsample(id_train, 40, 7)]
    assert [r["id"] for r in a] != [r["id"] for r in train.subsample(id_train, 40, 4)]


# ----------------------------------------------------------------------------- whole runs (darl schedule)

def test_all_stages_results_selection_and_adapters(darl_run):
    """Catches a stage that does not train (same adapter as the one before), a selection of the wrong size
    or with repeats, stage 3 without its replay rows, results missing a split, an adapter dir without what
    scoring needs, and a missing whole-run estimate."""
    out, p = darl_run
    res = results(out)
    assert [(r["stage"], r["split"]) for r in res] == [(s, sp) for s in "123" for sp in train.EVAL_SPLITS]
    assert all(r["n"] == 60 for r in res)
    a1, a2, a3 = (adapter(os.path.join(out, f"stage{s}")) for s in (1, 2, 3))
    assert all(any(not torch.equal(x[k], y[k]) for k in x) for x, y in ((a1, a2), (a2, a3)))
    sel = [json.loads(line) for line in open(os.path.join(out, "stage2", "dasa_selected.jsonl"))]
    assert len(sel) == 24 and len({s["id"] for s in sel}) == 24
    assert "training 24 rows" in p.stdout and "stage 3 from stage 2: 24 selected + 24 id_train replay rows" in p.stdout
    assert "training 48 rows" in p.stdout
    cfg = json.load(open(os.path.join(out, "stage3", "darl_config.json"), encoding="utf-8"))
    assert cfg["grade_token_ids"] == [236771, 236770, 236778] and cfg["base_model"]["model_type"] == "gemma3_text"
    assert cfg["max_len"] == 64 and "{query}" in cfg["prompt"] and cfg["grades"] == ["irrelevant", "weak", "strong"]
    assert "whole run: about" in p.stdout


def test_eval_of_a_stage_dir_reproduces_its_stage(darl_run, tiny_gemma, qbqtc2kuake):
    """Catches an eval that loads the adapter wrongly (or not at all): same probabilities as the stage's own."""
    out, _ = darl_run
    p = run(["--stage", "eval", "--adapter", os.path.join(out, "stage3"), "--model", tiny_gemma, "--data", qbqtc2kuake,
             "--out", out, *FAST])
    assert p.returncode == 0, p.stderr
    tag = re.sub(r"[^0-9A-Za-z]+", "_", "eval:" + os.path.join(out, "stage3"))  # as train.evaluate names it
    for split in train.EVAL_SPLITS:
        mine, ev = preds(out, "3", split), preds(out, tag, split)
        assert (mine["ids"] == ev["ids"]).all() and np.array_equal(mine["probs"], ev["probs"]), split


def test_score_from_the_adapter_dir_alone_equals_eval_and_resumes(darl_run, tiny_gemma, qbqtc2kuake, tmp_path):
    """Catches score using another prompt, verbalizer or max_len than the adapter was trained with (it must
    need no --data), scores that differ from eval's, and a --resume that repeats or skips lines."""
    out, _ = darl_run
    rows = [json.loads(line) for line in open(os.path.join(qbqtc2kuake, "id_dev.jsonl"), encoding="utf-8")]
    ref = preds(out, "3", "id_dev")
    by_id = {r["id"]: r for r in rows}
    inp = tmp_path / "pairs.jsonl"
    inp.write_text("".join(json.dumps({"query": by_id[i]["query"], "item": by_id[i]["item"], "id": i}, ensure_ascii=False)
                           + "\n" for i in ref["ids"].tolist()), encoding="utf-8")
    outp = tmp_path / "scored.jsonl"
    cmd = ["--stage", "score", "--adapter", os.path.join(out, "stage3"), "--model", tiny_gemma, "--data", str(tmp_path / "none"),
           "--input", str(inp), "--output", str(outp), "--out", str(tmp_path / "o"), "--cpu", "--dtype", "float32",
           "--eval_batch_size", "16"]
    p = run(cmd)
    assert p.returncode == 0, p.stderr
    scored = [json.loads(line) for line in outp.read_text(encoding="utf-8").splitlines()]
    np.testing.assert_allclose([s["probs"] for s in scored], ref["probs"], atol=1e-6)
    assert all(s["grade"] == int(np.argmax(s["probs"])) for s in scored)
    # cut after 20 lines (one chunk of 20 written), then --resume: the same file as one go
    whole = outp.read_text(encoding="utf-8")
    partial = str(outp) + ".partial"
    open(partial, "w", encoding="utf-8").write("".join(whole.splitlines(keepends=True)[:20]))
    outp.unlink()
    p = run(cmd + ["--resume", "--score_chunk", "7"])
    assert p.returncode == 0 and "resuming" in p.stdout, p.stderr
    resumed = [json.loads(line) for line in outp.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in resumed] == [r["id"] for r in scored]
    np.testing.assert_allclose([r["probs"] for r in resumed], [r["probs"] for r in scored], atol=2e-6)


def test_adapter_on_another_base_model_is_refused(darl_run, tmp_path, tiny_gemma, qbqtc2kuake):
    """Catches an adapter silently applied to a base model it was not trained on."""
    out, _ = darl_run
    other = tmp_path / "other"
    shutil.copytree(tiny_gemma, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    p = run(["--stage", "eval", "--adapter", os.path.join(out, "stage1"), "--model", str(other), "--data", qbqtc2kuake,
             "--out", str(tmp_path / "o"), *FAST])
    assert p.returncode != 0 and "darl_config.json: the adapter was trained on" in p.stderr, p.stderr


def test_stage3_from_1_starts_from_stage_1(darl_run, tiny_gemma, qbqtc2kuake, tmp_path):
    """Catches --stage3_from ignored: with lr 0 nothing moves, so stage 3 must equal its starting adapter."""
    out, _ = darl_run
    new = tmp_path / "out"
    new.mkdir()
    for d in ("stage1", "stage2"):
        shutil.copytree(os.path.join(out, d), new / d)
    p = run(["--stage", "3", "--stage3_from", "1", "--lr", "0", "--model", tiny_gemma, "--data", qbqtc2kuake,
             "--out", str(new), *FAST, "--eval_on", ""])
    assert p.returncode == 0, p.stderr
    same_adapter(new / "stage1", new / "stage3")


def test_select_random_knn_and_default_budget(darl_run, tiny_gemma, qbqtc2kuake, tmp_path):
    """Catches --select random or --ood_score knn ignored (the selection must be what ood.random_select /
    knn_score give), and a budget default other than a fifth of the pool."""
    out, _ = darl_run
    for name, extra in (("random", ["--select", "random"]), ("knn", ["--ood_score", "knn"])):
        new = tmp_path / name
        shutil.copytree(os.path.join(out, "stage1"), new / "stage1")
        args = [a for a in FAST if a not in ("--budget", "24")]
        p = run(["--stage", "2", "--model", tiny_gemma, "--data", qbqtc2kuake, "--out", str(new), *args, "--limit", "100",
                 "--eval_on", "", *extra])
        assert p.returncode == 0, p.stderr
        sel = [json.loads(line)["id"] for line in open(new / "stage2" / "dasa_selected.jsonl")]
        assert len(sel) == 20  # 100 pool rows // 5
        pool = train.subsample(train.load_splits(qbqtc2kuake, 3, None, print)["pool"], 100, 0)
        groups = [r["query"] for r in pool]
        if name == "random":
            want = ood.random_select(np.zeros(100), 20, groups=groups, max_per_group=3, seed=0)
            assert sel == [pool[i]["id"] for i in want]
        else:
            rep = json.load(open(new / "stage2" / "ood_report.json"))
            assert rep["ood_score"] == "knn" and sel != [json.loads(line)["id"] for line in
                                                         open(os.path.join(out, "stage2", "dasa_selected.jsonl"))]


def test_changed_setting_in_the_same_out_is_refused(darl_run, tiny_gemma, qbqtc2kuake):
    """Catches --resume reusing finished stages and the selection after a result-changing argument changed."""
    out, _ = darl_run
    p = run(["--stage", "all", "--resume", "--model", tiny_gemma, "--data", qbqtc2kuake, "--out", out, *FAST,
             "--budget", "30"])
    assert p.returncode != 0 and "run_config.json: --budget is 30 now, but this OUT was made with 24" in p.stderr, p.stderr


def test_a_setting_the_schedule_never_reads_does_not_block_resume(darl_run, tiny_gemma, qbqtc2kuake):
    """Catches the refusal of a finished darl OUT because an lpft-only default (--lp_lr) changed since it was made."""
    out, _ = darl_run
    p = run(["--stage", "all", "--resume", "--model", tiny_gemma, "--data", qbqtc2kuake, "--out", out, *FAST,
             "--lp_lr", "0.5", "--eval_on", ""])
    assert p.returncode == 0 and "stage 3: " in p.stderr + p.stdout and "is finished, skipping" in p.stderr + p.stdout, p.stderr


# ----------------------------------------------------------------------------- the lpft schedule

def test_lpft_interpolation_ends_are_the_lp_and_ft_models(lpft_run, tiny_gemma, qbqtc2kuake, tmp_path):
    """Catches an interpolation whose alpha 0 is not the LP model (base + LP head) or alpha 1 not the FT
    model, and a wrong reuse of the earlier stages' dev scores: stage 3 run alone (nothing to reuse) gives
    --stage all's curve, whose ends equal stages 1 and 2, and stage 3 is the chosen alpha's model."""
    out, p = lpft_run
    alone = tmp_path / "alone"
    for d in ("stage1", "stage2"):
        shutil.copytree(os.path.join(out, d), alone / d)
    q = run(["--stage", "3", "--schedule", "lpft", "--model", tiny_gemma, "--data", qbqtc2kuake, "--out", str(alone),
             *FAST, "--lp_steps", "30", "--alphas", "0,0.5,1", "--eval_on", "id_dev,ood_dev"])
    assert q.returncode == 0, q.stderr
    assert "(stage 1's scores)" in p.stdout and "(stage 2's scores)" in p.stdout and "scores)" not in q.stdout
    res = results(out)
    curve = next(r for r in res if r["split"] == "interpolation")
    assert next(r for r in results(alone) if r["split"] == "interpolation")["curve"] == curve["curve"]
    f1 = {(r["stage"], r["split"]): r["macro_f1"] for r in res if "macro_f1" in r}
    ends = {c["alpha"]: c for c in curve["curve"]}
    for split in ("id_dev", "ood_dev"):
        assert ends[0.0][split] == f1[("1", split)] and ends[1.0][split] == f1[("2", split)]
        assert f1[("3", split)] == next(c for c in curve["curve"] if c["alpha"] == curve["chosen_alpha"])[split]
    assert curve["chosen_alpha"] == max(curve["curve"], key=lambda c: c["mean"])["alpha"]
    assert os.path.exists(os.path.join(out, "stage1", "grade_head.safetensors"))
    assert not os.path.exists(os.path.join(out, "stage1", "adapter_model.safetensors"))  # LP trains no LoRA
    assert "linear probe step 30/30" in p.stdout


def test_interpolate_is_linear_in_the_lora_delta_and_the_head(tiny_gemma, qbqtc2kuake, tmp_path):
    """Catches an interpolation that scales A and B both (quadratic in alpha) or moves the head non-linearly:
    every adapted projection's output is base + alpha * delta, and the head's logits are linear in alpha."""
    args, rt, judge, data = tiny_judge(tiny_gemma, qbqtc2kuake, tmp_path / "out")
    judge.new_lora()
    judge.new_head()
    for p in judge.trainable():
        p.data.normal_(0, 0.05)
    ft_b = {n: p.detach().clone() for n, p in judge.model.named_parameters() if ".lora_B." in n}
    ft_head, lp_head = judge.head.weight.detach().clone(), torch.randn_like(judge.head.weight)
    lora = judge.model.layers[0].self_attn.q_proj
    x, h = torch.randn(3, 32), torch.randn(5, 32)
    out = {}
    for alpha in (0.0, 0.3, 1.0):
        train.interpolate(judge, ft_b, lp_head, ft_head, alpha)
        with torch.no_grad():
            out[alpha] = (lora(x), judge.head(h))
    base = lora.base_layer(x)
    for alpha in (0.3, 1.0):
        torch.testing.assert_close(out[alpha][0] - base, alpha * (out[1.0][0] - base), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[alpha][1], (1 - alpha) * out[0.0][1] + alpha * out[1.0][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0.0][0], base, atol=0, rtol=0)


def test_head_adapter_scores_the_same_after_reload_and_its_peft_part_loads_in_peft(lpft_run, tiny_gemma, qbqtc2kuake):
    """Catches a head that is not saved, not loaded or not used (other probabilities after a reload), and a
    stage dir whose PEFT files peft cannot load once the head file sits beside them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out, _ = lpft_run
    args, rt, judge, data = tiny_judge(tiny_gemma, qbqtc2kuake, os.path.join(out, "reload"))
    judge.load(os.path.join(out, "stage2"))
    assert judge.head is not None
    rows = data["id_dev"]
    probs = judge.predict(rows).numpy()
    np.testing.assert_allclose(probs, preds(out, "2", "id_dev")["probs"], atol=1e-6)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gemma), os.path.join(out, "stage2")).eval()
    batch = darl.collate(judge.encode(rows[:8]), judge.tok.pad_id)
    with torch.no_grad():
        hs = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states[-1]
        last = batch["attention_mask"].sum(1) - 1
        theirs = judge.head(hs[torch.arange(8), last]).softmax(-1).numpy()
    np.testing.assert_allclose(theirs, preds(out, "2", "id_dev")["probs"][:8], atol=1e-5)


# ----------------------------------------------------------------------------- learning

def test_training_learns_a_separable_toy_task(tiny_gemma, tmp_path):
    """Catches a loop that does not learn (wrong sign, frozen parameters, lr never applied, labels shuffled
    against rows): the grade is the fruit that ends the item. From near chance zero-shot (<= 0.6), stage 1
    must reach 90% id_dev accuracy, and its loss must fall by 15% from the first logged steps to the last.
    (The tiny model's logits are small, so the loss floor is high: accuracy is the sharp check.)"""
    data = tmp_path / "toy"
    data.mkdir()
    fruit, rng = ["苹果", "香蕉", "西瓜"], np.random.default_rng(0)

    def rows(n, split):
        labels = rng.integers(3, size=n)
        return [{"id": f"{split}{i}", "query": f"查{rng.integers(100)}", "item": f"标题{rng.integers(1000)}{fruit[g]}",
                 "label": int(g)} for i, g in enumerate(labels)]
    for split, n in (("id_train", 240), ("id_dev", 60), ("id_test", 30), ("pool", 30), ("ood_test", 30)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows(n, split)),
                                             encoding="utf-8")
    (data / "meta.json").write_text(json.dumps({"grades": ["a", "b", "c"], "prompt": "查询：{query}\n标题：{item}\n等级："}),
                                    encoding="utf-8")
    out, common = str(tmp_path / "out"), ["--model", tiny_gemma, "--data", str(data), "--cpu", "--dtype", "float32",
                                          "--eval_on", "id_dev"]
    assert run(["--stage", "eval", "--out", out, *common]).returncode == 0
    p = run(["--stage", "1", "--out", out, *common, "--batch_size", "16", "--epochs", "6", "--lr", "1e-2",
             "--lora_rank", "16", "--log_every", "5"])
    assert p.returncode == 0, p.stderr
    losses = [float(line.split(" loss ")[1].split()[0]) for line in p.stdout.splitlines() if " loss " in line]
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:2]), losses
    zero_shot, trained = results(out)
    assert zero_shot["accuracy"] <= 0.6 and trained["accuracy"] >= 0.9, (zero_shot["accuracy"], trained["accuracy"])


# ----------------------------------------------------------------------------- resume, data parallel, NaN

KILLER = """
import os, signal, sys, train, judge
save = judge.atomic_save
def dying_save(obj, path):
    save(obj, path)
    if path.endswith("ckpt.pt") and obj["step"] == int(os.environ["DIE_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
train.atomic_save = dying_save
sys.argv = ["train.py"] + sys.argv[1:]
train.main()
"""


@pytest.mark.parametrize("schedule, stage, cut_stage", [("darl", "1", "1"), ("lpft", "all", "2")])
def test_kill9_then_resume_is_bit_identical(tiny_gemma, qbqtc2kuake, tmp_path, schedule, stage, cut_stage):
    """Catches a resume that forgets the optimizer state, the step, the RNG (dropout), the data order or (lpft)
    the grade head, or that redoes a finished stage: a run killed mid-stage and resumed ends where an uncut one does."""
    args = ["--stage", stage, "--schedule", schedule, "--model", tiny_gemma, "--data", qbqtc2kuake, *FAST,
            "--max_steps", "7", "--lora_dropout", "0.1", "--eval_on", "", "--lp_steps", "5", "--alphas", "0,1"]
    ref = str(tmp_path / "ref")
    assert run(args + ["--out", ref]).returncode == 0
    cut = str(tmp_path / "cut")
    p = subprocess.run([sys.executable, "-c", KILLER, *args, "--out", cut], env={**ENV, "DIE_AT": "4"},
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert os.path.exists(os.path.join(cut, f"stage{cut_stage}", "ckpt.pt"))
    assert not os.path.exists(os.path.join(cut, f"stage{cut_stage}", "darl_config.json"))
    p = run(args + ["--out", cut, "--resume"])
    assert p.returncode == 0, p.stderr
    assert "resumed" in p.stdout and "at step 4/7" in p.stdout
    for s in ("1", "2", "3") if stage == "all" else (stage,):
        assert os.path.exists(os.path.join(cut, f"stage{s}", "darl_config.json"))
        if os.path.exists(os.path.join(ref, f"stage{s}", "adapter_model.safetensors")):
            same_adapter(os.path.join(ref, f"stage{s}"), os.path.join(cut, f"stage{s}"))
        if os.path.exists(os.path.join(ref, f"stage{s}", "grade_head.safetensors")):
            assert torch.equal(load_file(os.path.join(ref, f"stage{s}", "grade_head.safetensors"))["weight"],
                               load_file(os.path.join(cut, f"stage{s}", "grade_head.safetensors"))["weight"])
    assert not os.path.exists(os.path.join(cut, f"stage{cut_stage}", "ckpt.pt"))


def test_refuses_to_overwrite_without_resume(darl_run, tiny_gemma, qbqtc2kuake):
    """Catches a rerun that silently retrains (and overwrites) a finished stage."""
    out, _ = darl_run
    before = adapter(os.path.join(out, "stage1"))
    p = run(["--stage", "1", "--model", tiny_gemma, "--data", qbqtc2kuake, "--out", out, *FAST])
    assert p.returncode != 0 and "--resume" in p.stderr
    after = adapter(os.path.join(out, "stage1"))
    assert all(torch.equal(before[k], after[k]) for k in before)


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
    """Catches a non-finite loss that reaches the optimizer (and the checkpoint)."""
    out = str(tmp_path / "out")
    p = subprocess.run([sys.executable, "-c", NAN, "--stage", "1", "--model", tiny_gemma, "--data", qbqtc2kuake,
                        "--out", out, *FAST], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    assert "loss is nan at step 2" in p.stderr and "last good checkpoint" in p.stderr
    state = torch.load(os.path.join(out, "stage1", "ckpt.pt"), weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["weights"])


def test_ddp_two_processes_match_one(tiny_gemma, qbqtc2kuake, tmp_path):
    """Catches gradients averaged instead of summed over ranks, or shards that overlap or drop rows."""
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
    for a, b in zip(results(one), results(two)):
        assert a["n"] == b["n"] == 60 and abs(a["accuracy"] - b["accuracy"]) < 1e-9


# ----------------------------------------------------------------------------- bad input

def test_annotation_round_trip_and_null_labels(tiny_gemma, qbqtc2kuake, tmp_path):
    """A pool whose labels are null (not absent): stage 2 writes the annotation file and stops, instead of
    a TypeError in training; filled in, it continues."""
    data = tmp_path / "data"
    shutil.copytree(qbqtc2kuake, data)
    pool = [json.loads(line) for line in open(data / "pool.jsonl", encoding="utf-8")]
    truth = {r["id"]: r["label"] for r in pool}
    (data / "pool.jsonl").write_text("".join(json.dumps({**r, "label": None}, ensure_ascii=False) + "\n" for r in pool),
                                     encoding="utf-8")
    out = str(tmp_path / "out")
    args = ["--model", tiny_gemma, "--data", str(data), "--out", out, *FAST, "--eval_on", "id_dev"]
    assert run(["--stage", "1", *args]).returncode == 0
    p = run(["--stage", "2", *args, "--resume"])
    todo = os.path.join(out, "stage2", "to_annotate.jsonl")
    assert p.returncode != 0 and todo in p.stderr and "annotated.jsonl" in p.stderr
    rows = [json.loads(line) for line in open(todo, encoding="utf-8")]
    assert len(rows) == 24 and all(r["label"] is None for r in rows)
    with open(os.path.join(out, "stage2", "annotated.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({**r, "label": truth[r["id"]]}, ensure_ascii=False) + "\n")
    p = run(["--stage", "2", *args, "--resume"])
    assert p.returncode == 0, p.stderr
    assert [r["stage"] for r in results(out)] == ["1", "2"]


@pytest.mark.parametrize("case", ["missing split", "empty split", "pool of k rows", "verbalizer", "bad score line"])
def test_bad_input_is_named_and_nothing_is_half_written(tiny_gemma, qbqtc2kuake, tmp_path, case, darl_run):
    """Each bad input ends in one error line naming the file (line, field) or the argument, never a
    traceback, and leaves no partial output."""
    data = tmp_path / "data"
    shutil.copytree(qbqtc2kuake, data)
    out = str(tmp_path / "out")
    cmd = ["--stage", "1", "--model", tiny_gemma, "--data", str(data), "--out", out, *FAST]
    if case == "missing split":
        (data / "ood_test.jsonl").unlink()
        want = f"{data / 'ood_test.jsonl'}: not found"
    elif case == "empty split":
        (data / "id_test.jsonl").write_text("\n")
        want = f"{data / 'id_test.jsonl'}: no rows"
    elif case == "pool of k rows":
        lines = (data / "pool.jsonl").read_text(encoding="utf-8").splitlines()[:5]
        (data / "pool.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        shutil.copytree(os.path.join(darl_run[0], "stage1"), os.path.join(out, "stage1"))
        cmd[1] = "2"
        want = f"{data / 'pool.jsonl'}: 5 rows (after --limit), but --k 5 needs at least 6"
    elif case == "verbalizer":
        meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
        (data / "meta.json").write_text(json.dumps({**meta, "verbalizer": ["0", "1"]}, ensure_ascii=False), encoding="utf-8")
        want = "meta.json: field 'verbalizer' must be 3 words"
    else:
        inp = tmp_path / "in.jsonl"
        inp.write_text('{"query": "q", "item": "t"}\n{"query": "q"}\n', encoding="utf-8")
        cmd = ["--stage", "score", "--adapter", os.path.join(darl_run[0], "stage1"), "--model", tiny_gemma,
               "--input", str(inp), "--output", str(tmp_path / "scored.jsonl"), "--out", out, "--cpu"]
        want = f"{inp}:2: missing field 'item'"
    p = run(cmd)
    assert p.returncode != 0 and want in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "scored.jsonl") and not os.path.exists(str(tmp_path / "scored.jsonl.partial"))
    assert not os.path.exists(os.path.join(out, "stage1", "darl_config.json")) or case == "pool of k rows"
