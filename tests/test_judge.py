"""judge.py: Judge.predict / answer_features in row order, the self-contained adapter dir (LoRA + head +
darl_config.json) and evaluate's per-row predictions, on the tiny random Gemma 3 with the real tokenizer.

References: each row scored alone (a batch of one, so no padding or batching order is shared with Judge)."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

import darl
import judge
from dataset import DataError

torch.set_num_threads(min(2, torch.get_num_threads()))
ROWS = [("感冒吃什么药", "感冒了吃什么药好得快"), ("天气", "北京今天天气怎么样，明天会下雨吗，后天呢"), ("a", "b"),
        ("离婚申请之日起任何一方不同意离婚可以向", "依据民法典规定自婚姻登记机关收到离婚登记申请之日起"),
        ("淘宝轮播图", "淘宝店铺里的轮播图片宝贝怎么弄上去啊百度知道"), ("高血压", "高血压患者饮食注意事项有哪些"),
        ("x" * 30, "y"), ("猫", "狗")]


def rows():
    return [dict(id=f"r{i}", query=q, item=t, label=i % 3) for i, (q, t) in enumerate(ROWS)]


def make_judge(model_dir, out):
    args = argparse.Namespace(model=model_dir, out=str(out), cpu=True, dtype="float32", grad_ckpt=False, lora_rank=4,
                              lora_alpha=8.0, lora_dropout=0.0, eval_batch_size=3, layer=None, pooling="last",
                              eval_on=["id_test"])
    spec = {"grades": ["irrelevant", "weak", "strong"], "prompt": darl.DEFAULT_PROMPT, "verbalizer": ["0", "1", "2"],
            "max_len": 64}
    return judge.Judge(args, judge.Runtime(args), spec)


def perturb(j, seed=0):
    """Give LoRA B (and the head, if any) non-zero values, so that a lost adapter or head changes predictions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in j.model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if j.head is not None:
            j.head.weight.add_(torch.randn(j.head.weight.shape, generator=g))


def alone(j, rs):
    """Grade probabilities of each row run by itself."""
    out = []
    with torch.no_grad():
        for ids, content in j.encode(rs):
            b = darl.collate([(ids, content)], j.tok.pad_id)
            logits = darl.grade_logits(j.model, b["input_ids"], b["attention_mask"], j.grade_ids, j.head)
            out.append(logits.softmax(-1)[0])
    return torch.stack(out)


def test_predict_and_features_are_in_row_order(tiny_gemma, tmp_path):
    """predict and answer_features (length-sorted batches of 3) == each row run alone, in the input order.
    Catches results written in batch (length) order, a batch's padding leaking into the answer position, and
    features taken at the wrong token."""
    j = make_judge(tiny_gemma, tmp_path)
    j.new_lora()
    perturb(j)
    rs = rows()
    assert len({len(ids) for ids, _ in j.encode(rs)}) > 4  # lengths differ: sorting really reorders
    probs = j.predict(rs)
    torch.testing.assert_close(probs, alone(j, rs), atol=1e-5, rtol=1e-4)
    assert len({tuple(p.round(decimals=4).tolist()) for p in probs}) == len(rs)  # rows really differ
    feats = j.answer_features(rs)
    with torch.no_grad():
        ref = torch.stack([j.model(torch.tensor([ids]))[0, -1] for ids, _ in j.encode(rs)])
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-4)


def test_adapter_dir_round_trip_with_head(tiny_gemma, tmp_path):
    """A saved stage dir (LoRA, grade head, darl_config.json) loaded into a fresh Judge predicts exactly as the
    saved one. Catches the head not loaded (or not saved), LoRA not loaded, and a config without the grade ids."""
    j = make_judge(tiny_gemma, tmp_path)
    j.new_lora()
    j.new_head()
    perturb(j, seed=1)
    stage = tmp_path / "stage"
    stage.mkdir()
    j.save(str(stage))
    assert {p.name for p in stage.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json",
                                                 darl.HEAD_FILE, judge.CONFIG_FILE}
    config = json.loads((stage / judge.CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["grade_token_ids"] == j.grade_ids.tolist() and config["prompt"] == darl.DEFAULT_PROMPT
    fresh = make_judge(tiny_gemma, tmp_path)
    before = fresh.predict(rows())
    fresh.load(str(stage))
    assert fresh.head is not None
    after = fresh.predict(rows())
    torch.testing.assert_close(after, j.predict(rows()), atol=1e-6, rtol=0)
    assert (after - before).abs().max() > 1e-3  # the adapter changed the predictions


def test_load_refuses_an_adapter_of_another_base_model(tiny_gemma, tmp_path):
    """darl_config.json records the base model's config sha256: an adapter of another base is refused, naming the
    file. Catches LoRA silently loaded onto a model it was not trained for (shapes can match)."""
    j = make_judge(tiny_gemma, tmp_path)
    j.new_lora()
    stage = tmp_path / "stage"
    stage.mkdir()
    j.save(str(stage))
    config = json.loads((stage / judge.CONFIG_FILE).read_text(encoding="utf-8"))
    config["base_model"]["config_sha256"] = "0" * 64
    (stage / judge.CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(DataError, match=f"{judge.CONFIG_FILE}: the adapter was trained on"):
        make_judge(tiny_gemma, tmp_path).load(str(stage))


def test_evaluate_writes_metrics_and_predictions_row_by_row(tiny_gemma, tmp_path):
    """evaluate: results.jsonl carries relevance_metrics of the predictions, and predictions/*.npz holds ids,
    labels and probabilities row for row. Catches predictions saved in another order than their ids (the paired
    bootstrap would then pair different rows), and metrics computed on other rows than those saved."""
    j = make_judge(tiny_gemma, tmp_path)
    j.new_lora()
    perturb(j, seed=2)
    rs = rows()
    res = judge.evaluate(j, {"id_test": rs}, "1", j.args, j.rt)
    saved = np.load(tmp_path / "predictions" / "1_id_test.npz")
    assert saved["ids"].tolist() == [r["id"] for r in rs] and saved["labels"].tolist() == [r["label"] for r in rs]
    np.testing.assert_allclose(saved["probs"], alone(j, rs).numpy(), atol=1e-5)
    ref = darl.relevance_metrics(saved["probs"], saved["labels"])
    line = json.loads((tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert line == {k: v for k, v in res[0].items()} and line["split"] == "id_test"
    for key in ("accuracy", "macro_f1", "ece", "n"):
        assert line[key] == pytest.approx(ref[key], abs=1e-6)
    assert os.path.exists(tmp_path / "predictions")


def test_whole_run_estimate_leaves_out_the_work_done_before_the_first_step(tmp_path, capsys):
    """Catches an estimate that counts forward passes already made before the first training step (lpft's
    stage 1: DASA features, the probe's features, its scoring) or drops the stages after this one."""
    rt = judge.Runtime(argparse.Namespace(cpu=True, dtype="float32", out=str(tmp_path)))
    rt.work_left, rt.forward_tps, rt.stage = {"1": (0, 5000, 0), "2": (1000, 100, 200), "3": (0, 300, 0)}, 5.0, "2"
    rt.announce_total(train_tps=5.0, trained=400)
    line = capsys.readouterr().out
    # stage 2: 1,000 - 400 training tokens at 5/s and 200 forward after its training; stage 3: 300 forward at 5/s
    assert "600 training tokens" in line and "500 forward-only tokens" in line and "about 4 min left" in line, line
    rt.announce_total(train_tps=5.0, trained=400)
    assert capsys.readouterr().out == ""  # once
