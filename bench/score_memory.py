"""Does `train.py --stage score` stream? Peak RSS for 10^4 and 10^5 input lines (flat = streaming).

    python bench/score_memory.py [--sizes 10000,100000]

The model is a tiny random Gemma 3 (hidden 64, Gemma's real 262k vocabulary and tokenizer; made with
transformers, bench-only): memory of the reading, batching and writing path is the point, not speed.
Input lines cycle the real id_test rows (unique ids). Each size runs in its own process; peak RSS is the
`done in ... peak RSS` line train.py prints. Writes bench/results/score_memory.json.
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, git_commit, machine, machine_line, now, run_train, write_json  # noqa: E402

WORK = ROOT / "out" / "score_memory"


def tiny_model():
    """A stage dir of a tiny random Gemma 3 with LoRA: what score needs (base + adapter + darl_config)."""
    path = WORK / "tiny"
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(vocab_size=262_144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                           sliding_window=512, layer_types=["sliding_attention", "full_attention"],
                           pad_token_id=0, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(0)
    Gemma3ForCausalLM(cfg).save_pretrained(path)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(ROOT / "data" / "gemma3_270m" / name, path / name)
    return path


def pairs(n):
    path = WORK / f"pairs_{n}.jsonl"
    if not path.exists():
        rows = [json.loads(line) for line in open(ROOT / "data" / "qbqtc2kuake" / "id_test.jsonl", encoding="utf-8")]
        with open(path, "w", encoding="utf-8") as f:
            for i in range(n):
                r = rows[i % len(rows)]
                f.write(json.dumps({"id": i, "query": r["query"], "item": r["item"]}, ensure_ascii=False) + "\n")
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    model = tiny_model()
    adapter = WORK / "stage"
    if not (adapter / "darl_config.json").exists():  # a few LoRA steps make the adapter dir (and its darl_config.json)
        rc, _, _ = run_train(["--stage", "1", "--model", str(model), "--out", str(WORK / "train"), "--max_steps", "2",
                              "--limit", "64", "--eval_on", "", "--cpu", "--dtype", "float32"], threads=args.threads)
        assert rc == 0
        shutil.copytree(WORK / "train" / "stage1", adapter)
    mach, rows = machine(args.threads), []
    for n in [int(x) for x in args.sizes.split(",")]:
        out = WORK / f"scored_{n}.jsonl"
        out.unlink(missing_ok=True)
        rc, seconds, lines = run_train(["--stage", "score", "--adapter", str(adapter), "--model", str(model), "--input",
                                        str(pairs(n)), "--output", str(out), "--out", str(WORK / "log"), "--cpu",
                                        "--dtype", "float32"], threads=args.threads, log_prefix="")
        assert rc == 0 and sum(1 for _ in open(out, encoding="utf-8")) == n
        peak = float(re.search(r"peak RSS ([\d.]+) GiB", "".join(lines)).group(1))
        rows.append({"lines": n, "peak_rss_gib": peak, "seconds": round(seconds, 1), "pairs_per_s": round(n / seconds)})
        print(rows[-1], flush=True)
    write_json(ROOT / "bench" / "results" / "score_memory.json",
               {"rows": rows, "chunk": 4096, "machine": machine_line(mach), "commit": git_commit(), "date": now()})


if __name__ == "__main__":
    main()
