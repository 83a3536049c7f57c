"""Speed and memory: this project's model.py + darl vs transformers+peft, same checkpoint, LoRA, batch.

Three implementations of the same work on the same B x T batch:
  ours        model.Transformer + model.add_lora, darl.grade_logits (hidden state at the answer
              position times the C grade rows of the tied output matrix).
  peft_grade  transformers (attn_implementation="sdpa") + peft, the same recipe by hand: the decoder's
              last_hidden_state at the answer position times the grade rows of get_output_embeddings().
  peft_full   transformers + peft the usual way: model(...).logits, the full (B, T, V) logits, then the
              answer position (all grade columns for scoring, full-vocabulary CE for training = darl.sft_loss's
              objective).
Modes: train = forward + backward + AdamW step on the LoRA parameters (loss darl.darl_loss on the grade
logits; full-vocabulary CE for peft_full); score = no_grad forward to the (B, C) grade logits.
LoRA everywhere: r=8, alpha=16, dropout 0, the seven projections; LoRA weights stay fp32 in bf16 runs
(PEFT's autocast_adapter_dtype, matched by model.add_lora).

Method:
- The parent process runs every (implementation, mode, dtype) job, and a matmul-ceiling job per dtype,
  in its own subprocess of this script, round-robin over --rounds rounds (the job order rotates each
  round) so machine noise spreads evenly; each subprocess loads the model, runs --warmup untimed steps,
  then ceil(--steps / --rounds) timed steps. Tokens/s and FLOP/s are medians over all timed steps;
  the spread is the 10th-90th percentile of tokens/s. A subprocess per job isolates memory. Peak =
  resource.getrusage(RUSAGE_SELF).ru_maxrss (CPU) or torch.cuda.max_memory_allocated (CUDA) over the
  warmup and timed steps, weights included: the high-water mark is reset once the model is built
  (CPU: "5" into /proc/self/clear_refs, Linux >= 4.0; CUDA: reset_peak_memory_stats), because the
  loading transient (the mmap'd bf16 checkpoint, casts, the transformers import) would otherwise
  dominate and hide the steps; that loading peak is kept in the JSON (load_peak_mib). "loaded" is
  the resident set (/proc/self/statm) or memory_allocated right after building, so peak - loaded is
  what the steps add (activations, gradients, optimizer state). Memory: max over rounds. Weights that
  need no cast (bf16 runs) stay mmap'd from the checkpoint in both loaders, so pages never touched
  (most of the 262k-row embedding, unless the full-logit head reads it) are not resident.
- Inputs: the first --batch rows of data/qbqtc2kuake/id_train.jsonl with meta.json's prompt, encoded
  by darl.encode_pair(max_len=--seq) and right-padded to exactly --seq by darl.collate; grade ids from
  darl.grade_token_ids(["0","1","2"]), labels from the rows. Tokens/s counts B * seq (padded slots
  included: every implementation computes them); the real-token share is printed too. --seq must
  exceed the template (37 tokens for the QBQTC prompt with Gemma 3), or encode_pair says so.
- Correctness first: a check subprocess (fp32, the first 4 rows) gives ours' LoRA non-zero B (and
  fresh A), copies every LoRA weight into the peft model by name, and prints the max |difference|
  between ours' grade logits and peft_grade's / peft_full's grade columns (should be <= 1e-4).
  --check runs only this and exits 1 above 1e-4; a benchmark run warns and continues.
- AdamW (lr 1e-4) over the LoRA parameters only; its value does not change the timing.
- Ceiling: the median time of one torch.mm of two n x n matrices in the job's dtype (n=2048 on CPU as
  the issue suggests; n=8192 on CUDA, where 2048^3 is too small to fill the GPU).

FLOPs (analytic, per step; D dim, L layers, H/K query/kv heads, h head_dim, F mlp width, V vocab,
C grades, r LoRA rank, N = tokens = B*T):
  P  = L * (2*D*H*h + 2*D*K*h + 3*D*F)                  non-embedding matmul weights (q,o; k,v; mlp)
  Pl = L * r * (2*(D+H*h) + 2*(D+K*h) + 3*(D+F))          LoRA weights
  forward  = 2*P*N + 2*Pl*N + L*4*N*T*H*h + head
             (attention: QK^T and PV over all T keys, since SDPA with an explicit mask computes the
             full T x T; head = 2*B*D*C for the grade rows, 2*N*D*V for full logits)
  backward = 2*P*N + 4*Pl*N + L*8*N*T*H*h + head
             (frozen base: activation gradients only, no weight gradients, so the base costs one
             forward's worth, giving train ~= 2 x forward as the issue says; LoRA: input + weight
             gradients; attention: 4 matmuls; head: input gradient only, the tied embedding is frozen.
             Layer 0's unneeded input gradient and elementwise ops/norms/optimizer are not counted.)
  train = forward + backward; score = forward. Each implementation is charged the work it does, so
  peft_full's full-vocabulary head counts.

    python bench/speed.py [--model DIR] [--device cpu|cuda] [--dtypes float32,bfloat16] [--batch 8]
        [--seq 64] [--steps 10] [--warmup 2] [--rounds 2] [--threads N] [--check]
Prints a markdown table; writes bench/results/speed_<device>.json.
"""
import argparse
import datetime
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import darl  # noqa: E402
import model as model_lib  # noqa: E402
import tokenizer  # noqa: E402

DATA = ROOT / "data" / "qbqtc2kuake"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 8, 16
IMPLS, MODES = ("ours", "peft_grade", "peft_full"), ("train", "score")
MARK = "RESULT "  # a worker's last stdout line: MARK + json
CHECK_ROWS, CHECK_TOL = 4, 1e-4


def load_batch(ckpt, batch, seq, device):
    """Real rows, identical for every implementation: ids and mask (B, seq), labels (B,), grade ids (C,)."""
    meta = json.loads((DATA / "meta.json").read_text(encoding="utf-8"))
    with open(DATA / "id_train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(batch), f)]
    if len(rows) < batch:
        raise ValueError(f"{DATA / 'id_train.jsonl'}: {len(rows)} rows, --batch {batch} needs more")
    tok = tokenizer.Tokenizer(ckpt)
    examples = [darl.encode_pair(tok, r["query"], r["item"], meta.get("prompt", darl.DEFAULT_PROMPT), max_len=seq)
                for r in rows]
    b = darl.collate(examples, tok.pad_id, multiple=seq)
    grade_ids = torch.tensor(darl.grade_token_ids(tok, ["0", "1", "2"]), device=device)
    labels = torch.tensor([r["label"] for r in rows], device=device)
    return b["input_ids"].to(device), b["attention_mask"].to(device), labels, grade_ids


def build_ours(ckpt, dtype, device):
    return model_lib.add_lora(model_lib.Transformer.from_pretrained(ckpt, dtype, device), RANK, ALPHA, 0.0)


def build_peft(ckpt, dtype, device):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0))


def answer_rows(x, mask):
    """(B, T, ...) -> (B, ...) at the last real token of each right-padded row (the answer position)."""
    return x[torch.arange(x.size(0), device=x.device), mask.sum(1) - 1]


def peft_grade_logits(peft, ids, mask, grade_ids):
    """darl.grade_logits done with transformers: decoder hidden state x the C grade rows (no full logits)."""
    causal_lm = peft.base_model.model
    h = answer_rows(causal_lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state, mask)
    logits = F.linear(h, causal_lm.get_output_embeddings().weight[grade_ids])
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    return (logits if cap is None else torch.tanh(logits / cap) * cap).float()


def peft_full_logits(peft, ids, mask):
    """(B, V) answer-position logits, computed the usual way from the full (B, T, V) logits."""
    return answer_rows(peft(input_ids=ids, attention_mask=mask, use_cache=False).logits, mask).float()


def step_flops(args, batch, seq, impl, mode, n_grades):
    """Analytic FLOPs of one step (formula in the module docstring)."""
    D, L, H, K, h, Fw, V = args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim, \
        args.vocab_size
    N = batch * seq
    P = L * (2 * D * H * h + 2 * D * K * h + 3 * D * Fw)
    Pl = L * RANK * (2 * (D + H * h) + 2 * (D + K * h) + 3 * (D + Fw))
    attn = L * 4 * N * seq * H * h
    head = 2 * N * D * V if impl == "peft_full" else 2 * batch * D * n_grades
    forward = 2 * P * N + 2 * Pl * N + attn + head
    return forward if mode == "score" else forward + 2 * P * N + 4 * Pl * N + 2 * attn + head


def memory_mib(device, peak):
    if device == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak(device):
    """Forget the loading peak so the reported peak is that of the steps (weights included).
    CPU: writing 5 to /proc/self/clear_refs resets the high-water RSS that ru_maxrss reads (Linux >= 4.0)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, steps):
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run_check(cli):
    """fp32: ours' grade logits vs peft_grade's and vs peft_full's grade columns, same non-zero LoRA."""
    ids, mask, _, grade_ids = load_batch(cli.model, CHECK_ROWS, cli.seq, cli.device)
    ours, peft = build_ours(cli.model, torch.float32, cli.device), build_peft(cli.model, torch.float32, cli.device)
    ours_lora = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    peft_lora = {n.removeprefix("base_model.model.model.").replace(".default.", "."): p
                 for n, p in peft.named_parameters() if p.requires_grad}
    if set(ours_lora) != set(peft_lora) or not ours_lora:
        raise RuntimeError(f"LoRA parameters differ: ours-only {sorted(set(ours_lora) - set(peft_lora))[:3]}, "
                           f"peft-only {sorted(set(peft_lora) - set(ours_lora))[:3]}")
    with torch.no_grad():
        for name, p in ours_lora.items():  # B non-zero so the LoRA path matters; A re-drawn at the same scale
            p.copy_(torch.randn_like(p) * (0.02 if "lora_B" in name else 1 / math.sqrt(p.shape[1])))
            peft_lora[name].copy_(p)
        ref = darl.grade_logits(ours, ids, mask, grade_ids)
        grade = peft_grade_logits(peft, ids, mask, grade_ids)
        full = peft_full_logits(peft, ids, mask)[:, grade_ids]
        with peft.disable_adapter():  # how far the LoRA moves the logits: the check is not vacuous
            base = peft_grade_logits(peft, ids, mask, grade_ids)
    return dict(rows=CHECK_ROWS, seq=cli.seq, n_lora_tensors=len(ours_lora),
                max_diff_peft_grade=(ref - grade).abs().max().item(),
                max_diff_peft_full=(ref - full).abs().max().item(),
                lora_effect=(ref - base).abs().max().item(), max_abs_logit=ref.abs().max().item())


def run_job(cli, job):
    """One measurement in this (fresh) process: build, warm up, time job["steps"] steps, report memory."""
    dtype, device = getattr(torch, job["dtype"]), cli.device
    if job["impl"] == "matmul":
        n = 8192 if device == "cuda" else 2048
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        times = timed(lambda: torch.mm(a, b), device, cli.warmup, job["steps"])
        name = torch.cuda.get_device_name() if device == "cuda" else None
        return dict(times=times, flops=2 * n**3, n=n, device_name=name)
    ids, mask, labels, grade_ids = load_batch(cli.model, cli.batch, cli.seq, device)
    torch.manual_seed(0)
    net = build_ours(cli.model, dtype, device) if job["impl"] == "ours" else build_peft(cli.model, dtype, device)
    grades = {"ours": lambda: darl.grade_logits(net, ids, mask, grade_ids),
              "peft_grade": lambda: peft_grade_logits(net, ids, mask, grade_ids),
              "peft_full": lambda: peft_full_logits(net, ids, mask)[:, grade_ids]}[job["impl"]]
    if job["mode"] == "score":
        net.eval()
        step = torch.no_grad()(grades)
    else:
        net.train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)

        def step():
            if job["impl"] == "peft_full":  # the naive objective: full-vocabulary CE at the answer position
                loss = F.cross_entropy(peft_full_logits(net, ids, mask), grade_ids[labels])
            else:
                loss = darl.darl_loss(grades(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    gc.collect()
    load_peak, loaded, peak_reset = memory_mib(device, peak=True), memory_mib(device, peak=False), reset_peak(device)
    times = timed(step, device, cli.warmup, job["steps"])
    flops = step_flops(model_lib.ModelArgs.from_hf_config(json.loads((Path(cli.model) / "config.json").read_text())),
                       cli.batch, cli.seq, job["impl"], job["mode"], len(grade_ids))
    return dict(times=times, flops=flops, load_peak_mib=load_peak, loaded_mib=loaded,
                peak_mib=memory_mib(device, peak=True), peak_reset=peak_reset, real_tokens=int(mask.sum()))


def launch(cli, job):
    """Run one job in a subprocess of this script; its last stdout line carries the result."""
    cmd = [sys.executable, __file__, "--model", str(cli.model), "--device", cli.device, "--batch", str(cli.batch),
           "--seq", str(cli.seq), "--warmup", str(cli.warmup), "--threads", str(cli.threads), "--worker", json.dumps(job)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith(MARK)]
    if p.returncode != 0 or not lines:
        return dict(error=(p.stderr.strip().splitlines() or ["no output"])[-1], returncode=p.returncode)
    return json.loads(lines[-1][len(MARK):])


def summarize(cli, results):
    """Merge rounds per job: medians, tokens/s spread, max memory, % of the same-dtype matmul ceiling."""
    ceiling = {}
    for key, runs in results.items():
        if key[0] == "matmul" and all("times" in r for r in runs):
            times = np.concatenate([r["times"] for r in runs])
            ceiling[key[2]] = runs[0]["flops"] / np.median(times)
    rows = []
    for (impl, mode, dtype), runs in results.items():
        if impl == "matmul":
            continue
        row = dict(impl=impl, mode=mode, dtype=dtype)
        errors = [r["error"] for r in runs if "error" in r]
        if errors:
            rows.append(dict(row, error=errors[0]))
            continue
        times = np.concatenate([r["times"] for r in runs])
        tps = cli.batch * cli.seq / times
        flops = runs[0]["flops"] / np.median(times)
        rows.append(dict(row, steps=len(times), tokens_per_s=float(np.median(tps)),
                         tokens_per_s_p10=float(np.percentile(tps, 10)), tokens_per_s_p90=float(np.percentile(tps, 90)),
                         step_s_median=float(np.median(times)), flops_per_step=runs[0]["flops"],
                         achieved_tflops=flops / 1e12,
                         pct_of_ceiling=100 * flops / ceiling[dtype] if dtype in ceiling else None,
                         peak_mib=max(r["peak_mib"] for r in runs), loaded_mib=max(r["loaded_mib"] for r in runs),
                         load_peak_mib=max(r["load_peak_mib"] for r in runs),
                         peak_reset=all(r["peak_reset"] for r in runs),
                         real_tokens=runs[0]["real_tokens"]))
    return rows, {d: c / 1e12 for d, c in ceiling.items()}


def table_lines(device, rows, ceiling):
    """The markdown table of a run (also what bench/readme_tables.py puts in the README)."""
    mem = "RSS" if device == "cpu" else "CUDA alloc"
    lines = [f"| impl | mode | dtype | tokens/s (median) | p10-p90 | peak {mem} MiB (steps) | loaded MiB | TFLOP/s | % of mm |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['mode']} | {r['dtype']} | failed: {r['error'][:80]} | | | | | |")
            continue
        pct = "" if r["pct_of_ceiling"] is None else f"{r['pct_of_ceiling']:.1f}"
        lines.append(f"| {r['impl']} | {r['mode']} | {r['dtype']} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s_p10']:.0f}-{r['tokens_per_s_p90']:.0f} | {r['peak_mib']:.0f} | "
                     f"{r['loaded_mib']:.0f} | {r['achieved_tflops']:.4f} | {pct} |")
    lines += [""] + [f"matmul ceiling {dtype}: {c:.4f} TFLOP/s (one n x n torch.mm)" for dtype, c in ceiling.items()]
    return lines


def machine_info(cli):
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=git("rev-parse", "HEAD"),
                git_dirty=git("status", "--porcelain", "--", "model.py", "darl.py", "bench/speed.py").splitlines(),
                torch=torch.__version__, transformers=version("transformers"), peft=version("peft"),
                python=sys.version.split()[0], cpu_model=cpu, cpu_count=os.cpu_count(), threads=cli.threads,
                cpu_bf16_matmul_flags=[f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "data" / "gemma3_270m")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per job, over all rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps in every subprocess")
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per job, interleaved with the other jobs")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--check", action="store_true", help="only the correctness check (exit 1 if over 1e-4)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one job's JSON, run in this process
    cli = p.parse_args()
    torch.set_num_threads(cli.threads)
    if cli.worker:
        job = json.loads(cli.worker)
        print(MARK + json.dumps(run_check(cli) if job["impl"] == "check" else run_job(cli, job)), flush=True)
        return

    check = launch(cli, dict(impl="check"))
    if "error" in check:
        raise SystemExit(f"check failed: {check['error']}")
    worst = max(check["max_diff_peft_grade"], check["max_diff_peft_full"])
    print(f"check (fp32, {check['rows']} rows x {check['seq']}, LoRA B != 0 copied into peft; "
          f"|logit| up to {check['max_abs_logit']:.1f}): max |ours - peft_grade| = {check['max_diff_peft_grade']:.2e}, "
          f"max |ours - peft_full[:, grades]| = {check['max_diff_peft_full']:.2e}, "
          f"(LoRA moves them by {check['lora_effect']:.2e}) -> {'ok' if worst <= CHECK_TOL else 'MISMATCH'}")
    if cli.check:
        raise SystemExit(0 if worst <= CHECK_TOL else 1)
    if worst > CHECK_TOL:
        print(f"WARNING: implementations differ by more than {CHECK_TOL}; timings compare different computations")

    dtypes = cli.dtypes.split(",")
    for d in dtypes:
        if not isinstance(getattr(torch, d, None), torch.dtype):
            raise SystemExit(f"--dtypes: {d!r} is not a torch dtype")
    per_round = math.ceil(cli.steps / cli.rounds)
    jobs = [dict(impl="matmul", mode="-", dtype=d) for d in dtypes]
    jobs += [dict(impl=i, mode=m, dtype=d) for d in dtypes for m in MODES for i in IMPLS]
    results = {(j["impl"], j["mode"], j["dtype"]): [] for j in jobs}
    t_start = time.perf_counter()
    for rnd in range(cli.rounds):
        for k in range(len(jobs)):
            job = jobs[(k + rnd) % len(jobs)]
            t0 = time.perf_counter()
            out = launch(cli, dict(job, steps=per_round))
            results[(job["impl"], job["mode"], job["dtype"])].append(out)
            status = out.get("error") or f"median step {np.median(out['times']):.3f} s"
            print(f"round {rnd + 1}/{cli.rounds} {job['impl']:10s} {job['mode']:5s} {job['dtype']:8s} "
                  f"{time.perf_counter() - t0:6.1f} s wall: {status}", flush=True)
    rows, ceiling = summarize(cli, results)
    print(f"\n{cli.batch} x {cli.seq} tokens per step ({rows[0].get('real_tokens', '?')} real), "
          f"{per_round * cli.rounds} timed steps per row over {cli.rounds} rounds, {cli.threads} threads, {cli.device}")
    print("\n" + "\n".join(table_lines(cli.device, rows, ceiling)))
    out = dict(settings=dict(model=str(cli.model), device=cli.device, dtypes=dtypes, batch=cli.batch, seq=cli.seq,
                             steps=cli.steps, warmup=cli.warmup, rounds=cli.rounds, lora=dict(r=RANK, alpha=ALPHA,
                             dropout=0.0, targets=list(TARGETS))),
               machine=machine_info(cli), check=check, matmul_ceiling_tflops=ceiling, rows=rows,
               raw={"|".join(k): v for k, v in results.items()}, wall_s=time.perf_counter() - t_start)
    path = ROOT / "bench" / "results" / f"speed_{cli.device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main()
