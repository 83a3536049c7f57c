"""DaRL multi-stage fine-tuning, one hand-written loop (nanoGPT's train.py is the model).

    python train.py --stage all                         # stages 1, 2, 3 of --schedule (default: darl)
    python train.py --stage all --schedule lpft         # linear probe, fine-tune, interpolate
    python train.py --stage 1|2|3 [--resume]            # one stage; --resume continues a cut one
    python train.py --stage eval [--adapter OUT/stage3] # without --adapter: the base model, zero-shot
    python train.py --stage score --adapter OUT/stage3 --input pairs.jsonl --output scored.jsonl
    torchrun --nproc_per_node 2 train.py ...            # data parallel (gloo on CPU, nccl on GPU)

Stages under --schedule darl (ours, from the paper's abstract):
  1  LoRA on id_train with darl_loss (--loss sft: next-token cross-entropy, the baseline)
  2  DASA: the stage-1 model's features score the pool, dasa_select picks --budget rows, their labels
     (oracle or annotators); then LoRA fine-tuning on them at --lr x --dasa_lr_scale
  3  the selected rows + --replay x as many id_train rows, from stage 2 (or 1: --stage3_from 1)
Stages under --schedule lpft (as a secondary summary describes the paper: LP-FT, Kumar et al. 2022,
then weight interpolation, WiSE-FT, Wortsman et al. 2022):
  1  DASA with the base model's features (the LP model's backbone IS the base model, so these are the LP
     model's features too), then a linear probe: only a grade head trains, on cached frozen features of
     id_train + the selected rows (--select none: id_train only)
  2  fine-tuning: LoRA and head together, from the LP head, on the same rows
  3  interpolation: LoRA delta x alpha, head (1 - alpha) LP + alpha FT; alpha from --alphas, the one
     with the best mean of id_dev and ood_dev macro-F1 (id_dev alone without ood_dev)
After each stage, each split of --eval_on is scored (OUT/results.jsonl, OUT/predictions/). A stage dir
is an adapter that scores on its own: PEFT files + darl_config.json (+ grade_head.safetensors).

Choices, each in a line (numbers and the bench files that measured them are in the README):
- Defaults chosen on the dev splits by bench/sweep.py: stage-1 lr / epochs, --batch_size, --dasa_lr_scale, --replay, --lp_lr.
- Balanced class weights n / (C n_c) for both losses: QBQTC is 63% "weak"; unweighted, stage 1 says "weak" too often (README: ce_w - ce).
- Data parallel by a hand all-reduce of the summed per-example gradients: exact for unequal shards (DDP averages means).
- The data order is a function of (seed, epoch): a checkpoint holds the step, weights, AdamW and RNG; resume is bit-identical.
- --dtype auto: bf16 only where bf16 matrix units exist (CUDA, AMX, AVX512-BF16); emulated bf16 is slower than fp32.
- Gradient accumulation by token budget (--micro_tokens): activation memory bounded whatever the row lengths.
- LoRA dropout 0 (PEFT's default): dropout keeps a copy of every adapted input for backward (+1.3 GB on CPU).
- DASA takes at most --max_per_query rows per query: repeated queries form dense clusters a density ratio also flags.
- CPU without --limit / --eval_limit: 1,000 rows per split, so that --stage all takes about 30 min on 2 cores.
"""
import argparse
import inspect
import json
import math
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

import darl
import ood
from dasa import select
from dataset import DEV_SEED, EVAL_SPLITS, DataError, load_meta, load_splits, read_jsonl, subsample, write_json
from judge import CONFIG_FILE, Judge, Runtime, adapter_spec, append_results, atomic_save, evaluate, score

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_LIMIT = 1000  # --limit and --eval_limit on CPU when not given
# Arguments that change what a training stage produces; OUT/run_config.json holds them (see check_run_config).
RESULT_ARGS = ("data", "model", "seed", "limit", "schedule", "budget", "max_steps", "epochs", "dasa_epochs", "loss",
               "class_weight", "ordinal_weight", "calibration_weight", "ood_score", "select", "k", "max_per_query",
               "layer", "pooling", "stage3_from", "replay", "dasa_lr_scale", "lr", "weight_decay", "warmup",
               "grad_clip", "batch_size", "max_len", "lora_rank", "lora_alpha", "lora_dropout", "lp_steps", "lp_lr",
               "alphas", "dtype")
# Of those, the ones a schedule never reads (check_run_config does not compare them).
NOT_READ_BY = {"darl": ("lp_steps", "lp_lr", "alphas"), "lpft": ("dasa_epochs", "stage3_from", "replay", "dasa_lr_scale")}

# ----------------------------------------------------------------------------- the loop

def lr_at(step, steps, warmup, lr):
    """Linear warmup, then cosine decay to 10% (nanoGPT's get_lr)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def epoch_batches(lengths, batch_size, seed, epoch):
    """The global batches of one epoch, a function of (seed, epoch) only, so a checkpoint stores just
    the step. A seeded shuffle, rows of similar length grouped into batches within windows of 50
    batches, then the batches shuffled: ~1.4x less padding than random batches on our data."""
    n, g = len(lengths), torch.Generator().manual_seed(seed * 1000 + epoch)
    perm, window = torch.randperm(n, generator=g).tolist(), 50 * batch_size
    perm = [i for s in range(0, n, window) for i in sorted(perm[s:s + window], key=lambda i: lengths[i])]
    batches = [perm[b * batch_size:(b + 1) * batch_size] for b in range(n // batch_size)]
    return [batches[b] for b in torch.randperm(len(batches), generator=g).tolist()]


def padded_len(n):
    """A row's length as darl.collate pads it."""
    return -(-n // darl.PAD_MULTIPLE) * darl.PAD_MULTIPLE


def micro_batches(idx, lengths, micro_tokens):
    """Gradient accumulation by token budget: rows, shortest first, cut into micro-batches of at most
    micro_tokens padded tokens, so activation memory is bounded whatever the lengths."""
    parts = [[]]
    for i in sorted(idx, key=lambda i: lengths[i]):
        padded = padded_len(lengths[i])
        if parts[-1] and (len(parts[-1]) + 1) * padded > micro_tokens:
            parts.append([])
        parts[-1].append(i)
    return [p for p in parts if p]


def class_weights(labels, n_grades, how, log):
    """'balanced': n / (C n_c) per grade, as sklearn's; grades absent from the rows get 0. 'none': None."""
    if how == "none":
        return None
    counts = torch.bincount(labels, minlength=n_grades).float()
    weight = torch.where(counts > 0, len(labels) / (n_grades * counts.clamp_min(1)), 0.0)
    log(f"class weights {[round(x, 3) for x in weight.tolist()]} from counts {counts.int().tolist()}")
    return weight


def row_loss(judge, batch, y, weight, args):
    """The training loss of one micro-batch: darl_loss on the grade logits, or sft_loss (full vocabulary)."""
    if args.loss == "sft":
        return darl.sft_loss(judge.model, batch["input_ids"], batch["attention_mask"], judge.grade_ids[y],
                             None if weight is None else weight.to(y.device)[y])
    logits = darl.grade_logits(judge.model, batch["input_ids"], batch["attention_mask"], judge.grade_ids, judge.head)
    return darl.darl_loss(logits, y, ordinal_weight=args.ordinal_weight, calibration_weight=args.calibration_weight,
                          class_weight=weight)


def train_step(judge, examples, labels, weight, batch_rows, params, args, rt):
    """Forward and backward over this rank's share of one global batch, in micro-batches; gradients are
    summed over ranks. Each micro-batch's mean loss is scaled by its share of the global batch, so the
    gradient is the global batch mean under any split. Returns (loss, real tokens)."""
    lengths = [len(e[0]) for e in examples]
    loss_sum, tokens = torch.zeros((), device=rt.device), 0
    for part in micro_batches([batch_rows[i] for i in rt.shard(len(batch_rows))], lengths, args.micro_tokens):
        batch = {k: v.to(rt.device) for k, v in darl.collate([examples[i] for i in part], judge.tok.pad_id).items()}
        loss = row_loss(judge, batch, labels[part].to(rt.device), weight, args) * len(part) / len(batch_rows)
        loss.backward()
        loss_sum += loss.detach()
        tokens += int(batch["attention_mask"].sum())
    if rt.world > 1:
        dist.all_reduce(loss_sum)
        for p in params:
            dist.all_reduce(p.grad)
    return loss_sum, tokens * rt.world


def load_checkpoint(path, params, opt, rt):
    """The step to continue from (0 without a checkpoint); weights, AdamW and RNG state restored."""
    if not os.path.exists(path):
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    for p, v in zip(params, state["weights"], strict=True):
        p.data.copy_(v)
    opt.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return state["step"]


def save_checkpoint(path, params, opt, step, rt):
    if rt.main:
        atomic_save({"weights": [p.detach().cpu() for p in params], "opt": opt.state_dict(), "step": step,
                     "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state() if "cuda" in rt.device else None}, path)
    rt.barrier()


def fit(judge, rows, out_dir, lr, epochs, args, rt):
    """AdamW on the trainable parameters (LoRA, and the head when there is one), warmup + cosine,
    clipping. Resumable from out_dir/ckpt.pt; a non-finite loss stops before the update."""
    examples = judge.encode(rows)
    lengths, labels = [len(e[0]) for e in examples], torch.tensor([r["label"] for r in rows])
    weight, params = class_weights(labels, len(judge.grade_ids), args.class_weight, rt.log), judge.trainable()
    if len(rows) < args.batch_size:
        raise DataError(f"{out_dir}: {len(rows)} training rows, fewer than one batch; lower --batch_size ({args.batch_size})")
    per_epoch = len(rows) // args.batch_size  # the few rows left over differ from epoch to epoch
    steps = args.max_steps or max(1, math.ceil(epochs * per_epoch))
    warmup = max(1, int(args.warmup * steps))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    ckpt = os.path.join(out_dir, "ckpt.pt")
    step = start = load_checkpoint(ckpt, params, opt, rt)
    rt.log((f"resumed {ckpt} at step {step}/{steps}; " if step else "")
           + f"training {len(rows):,} rows: {steps} steps of {args.batch_size} rows, lr {lr:g}, warmup {warmup}")
    judge.model.train()
    t0, tokens = time.time(), 0
    while step < steps:
        epoch, i = divmod(step, per_epoch)
        if i == 0 or step == start:
            batches = epoch_batches(lengths, args.batch_size, args.seed, epoch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, warmup, lr)
        loss, n = train_step(judge, examples, labels, weight, batches[i], params, args, rt)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{out_dir}: loss is {loss.item()} at step {step}; stopped before the update. The last good "
                f"checkpoint is {ckpt if os.path.exists(ckpt) else '(none yet)'}: lower --lr or check the data, "
                "then rerun with --resume.")
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + n
        if step % args.log_every == 0 or step == steps:
            tps = tokens / (time.time() - t0)
            rt.log(f"step {step}/{steps} loss {loss.item():.4f} lr {lr_at(step - 1, steps, warmup, lr):.2e} {tps:,.0f} tok/s "
                   f"eta {(time.time() - t0) / (step - start) * (steps - step) / 60:.1f} min")
            rt.announce_total(tps, tokens)
        if step % args.ckpt_every == 0 and step < steps:
            save_checkpoint(ckpt, params, opt, step, rt)
    finish_stage(judge, out_dir, rt, ckpt)


def finish_stage(judge, out_dir, rt, ckpt=None):
    """The stage's adapter dir, complete (darl_config.json last); then its checkpoint is not needed."""
    if rt.main:
        judge.save(out_dir)
        if ckpt and os.path.exists(ckpt):
            os.remove(ckpt)
    rt.barrier()
    judge.model.eval()


# ----------------------------------------------------------------------------- stages: --schedule darl

def stage1(judge, data, out_dir, args, rt):
    judge.new_lora()
    fit(judge, data["id_train"], out_dir, args.lr, args.epochs, args, rt)
    evaluate(judge, data, "1", args, rt)


def stage2(judge, data, out_dir, args, rt):
    selected = select(judge, data, args, rt, adapter_dir=os.path.join(args.out, "stage1"))
    judge.load(os.path.join(args.out, "stage1"))
    fit(judge, selected, out_dir, args.lr * args.dasa_lr_scale, args.dasa_epochs, args, rt)
    evaluate(judge, data, "2", args, rt)


def replay_rows(id_train, n, args):
    """The id_train rows stage 3 replays: a seeded sample, drawn apart from --limit's (seed + 3)."""
    return subsample(id_train, n, args.seed + 3)


def stage3(judge, data, out_dir, args, rt):
    selected = select(judge, data, args, rt, adapter_dir=os.path.join(args.out, "stage1"))
    replay = replay_rows(data["id_train"], int(args.replay * len(selected)), args)
    rt.log(f"stage 3 from stage {args.stage3_from}: {len(selected)} selected + {len(replay)} id_train replay rows")
    judge.load(os.path.join(args.out, f"stage{args.stage3_from}"))
    fit(judge, selected + replay, out_dir, args.lr * args.dasa_lr_scale, args.dasa_epochs, args, rt)
    evaluate(judge, data, "3", args, rt)


# ----------------------------------------------------------------------------- stages: --schedule lpft

def lpft_rows(judge, data, args, rt):
    """id_train + the DASA rows (none with --select none): the rows of both LP and FT."""
    return data["id_train"] + ([] if args.select == "none" else select(judge, data, args, rt))


def lp_fit(head, feats, labels, args, rt):
    """Linear probing: the head alone, full-batch AdamW on cached features with darl_loss (the same
    loss, weights and class weighting as fine-tuning), warmup + cosine; seconds on a CPU."""
    weight = class_weights(labels, head.weight.shape[0], args.class_weight, rt.log)
    feats, labels = feats.to(head.weight.device), labels.to(head.weight.device)
    opt = torch.optim.AdamW([head.weight], lr=args.lp_lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    warmup = max(1, int(args.warmup * args.lp_steps))
    for step in range(args.lp_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lp_steps, warmup, args.lp_lr)
        loss = darl.darl_loss(head(feats), labels, ordinal_weight=args.ordinal_weight,
                              calibration_weight=args.calibration_weight, class_weight=weight)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 0 or step + 1 == args.lp_steps:
            rt.log(f"linear probe step {step + 1}/{args.lp_steps} loss {loss.item():.4f}")


def lp_stage(judge, data, out_dir, args, rt):
    """lpft stage 1: DASA on base-model features, then the linear probe on cached answer features."""
    rows = lpft_rows(judge, data, args, rt)
    cache = os.path.join(out_dir, "lp_features.pt")
    if os.path.exists(cache):
        feats = torch.load(cache, weights_only=True)
    else:
        feats = judge.answer_features(rows)
        if rt.main:
            atomic_save(feats, cache)
    judge.new_head()
    lp_fit(judge.head, feats, torch.tensor([r["label"] for r in rows]), args, rt)
    finish_stage(judge, out_dir, rt)
    evaluate(judge, data, "1", args, rt)


def ft_stage(judge, data, out_dir, args, rt):
    """lpft stage 2: LoRA and the LP head fine-tuned together on the LP rows (--lp_steps 0: FT only)."""
    rows = lpft_rows(judge, data, args, rt)
    judge.load(os.path.join(args.out, "stage1"))
    judge.new_lora()
    fit(judge, rows, out_dir, args.lr, args.epochs, args, rt)
    evaluate(judge, data, "2", args, rt)


def interpolate(judge, ft_lora_b, lp_head, ft_head, alpha):
    """WiSE-FT (Wortsman et al. 2022) for LoRA: W0 + alpha * (B A s), by scaling B; the head moves
    linearly. alpha 0 is the LP model (base backbone, LP head) exactly, alpha 1 the FT model."""
    with torch.no_grad():
        for name, p in judge.model.named_parameters():
            if name in ft_lora_b:
                p.copy_(alpha * ft_lora_b[name])
        judge.head.weight.copy_((1 - alpha) * lp_head + alpha * ft_head)


def interpolation_stage(judge, data, out_dir, args, rt):
    """lpft stage 3: alpha in --alphas chosen on the dev splits (mean of id_dev and ood_dev macro-F1).
    alpha 0 and 1 are the stage-1 and stage-2 models exactly (tests/test_train.py), so their dev scores
    from earlier stages of this process are reused, as are the chosen alpha's in its evaluation."""
    judge.load(os.path.join(args.out, "stage2"))
    ft_lora_b = {n: p.detach().clone() for n, p in judge.model.named_parameters() if ".lora_B." in n}
    ft_head, lp_head = judge.head.weight.detach().clone(), darl.GradeHead.load(os.path.join(args.out, "stage1"), rt.device).weight
    dev = [s for s in ("id_dev", "ood_dev") if s in data]
    curve, probs = [], {}
    for alpha in args.alphas:
        interpolate(judge, ft_lora_b, lp_head, ft_head, alpha)
        stage = {0.0: "1", 1.0: "2"}.get(alpha)
        reused = all((stage, s) in rt.scored for s in dev)
        probs[alpha] = {s: rt.scored[(stage, s)] if reused else judge.predict(data[s]) for s in dev}
        f1 = {s: darl.relevance_metrics(p, torch.tensor([r["label"] for r in data[s]]))["macro_f1"] for s, p in probs[alpha].items()}
        curve.append({"alpha": alpha, **f1, "mean": sum(f1.values()) / len(f1)})
        rt.log(f"interpolation alpha {alpha:g}: " + " ".join(f"{s} macro_f1 {v:.4f}" for s, v in f1.items())
               + (f" (stage {stage}'s scores)" if reused else ""))
    best = max(curve, key=lambda c: c["mean"])
    interpolate(judge, ft_lora_b, lp_head, ft_head, best["alpha"])
    finish_stage(judge, out_dir, rt)
    append_results(args, rt, [{"stage": "3", "split": "interpolation", "chosen_alpha": best["alpha"], "chosen_on": dev,
                               "curve": curve}])
    evaluate(judge, data, "3", args, rt, known=probs[best["alpha"]])


STAGES = {"darl": {"1": stage1, "2": stage2, "3": stage3},
          "lpft": {"1": lp_stage, "2": ft_stage, "3": interpolation_stage}}


def summary(args, rt):
    """The results table: one row per (stage, split), last result wins."""
    path = os.path.join(args.out, "results.jsonl")
    if not rt.main or not os.path.exists(path):
        return
    last = {(r["stage"], r["split"]): r for _, r in read_jsonl(path) if "macro_f1" in r}
    rt.log("| stage | split | n | accuracy | macro-F1 | ECE |")
    rt.log("|---|---|---|---|---|---|")
    for (stage, split), r in last.items():
        rt.log(f"| {stage} | {split} | {r['n']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['ece']:.4f} |")


# ----------------------------------------------------------------------------- runs

def load_data(args, rt, n_grades):
    """The splits, capped: id_train and pool by --limit (seeded by --seed), dev and test splits by
    --eval_limit with a fixed seed, so that runs with different seeds are scored on the same rows."""
    data = load_splits(args.data, n_grades, args.out if rt.main else None, rt.log)
    for split, rows in data.items():
        limit, seed = (args.limit, args.seed) if split in ("id_train", "pool") else (args.eval_limit, DEV_SEED)
        data[split] = subsample(rows, limit, seed)
        rt.log(f"{split}: {len(data[split]):,} rows" + (f" (of {len(rows):,}, seed {seed})" if len(rows) > len(data[split]) else ""))
    return data


def check_run_config(args, rt):
    """One OUT, one configuration: the first training run writes OUT/run_config.json (RESULT_ARGS); a later
    one with any of them changed stops, naming the argument and both values (finished stages and the
    DASA selection in OUT were made with the old ones). Arguments the schedule never reads are not compared:
    a darl OUT made before a --lp_lr default changed still resumes."""
    path, now = os.path.join(args.out, "run_config.json"), {k: getattr(args, k) for k in RESULT_ARGS}
    now |= {"data": os.path.realpath(args.data), "model": os.path.realpath(args.model), "dtype": str(rt.dtype)[6:]}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        for key in RESULT_ARGS:
            if old.get(key) != now[key] and key not in NOT_READ_BY[args.schedule]:
                raise DataError(f"{path}: --{key} is {now[key]!r} now, but this OUT was made with {old.get(key)!r}; "
                                "rerun with that value, or choose another --out (copy OUT/stageN there to start from a finished stage)")
    elif rt.main:
        write_json(path, now)


def stage_dir(args, stage, rt):
    """OUT/stageN and whether it is finished; a finished or cut stage is refused unless --resume."""
    directory = os.path.join(args.out, f"stage{stage}")
    done = os.path.exists(os.path.join(directory, CONFIG_FILE))
    cut = os.path.exists(os.path.join(directory, "ckpt.pt"))
    if (done or cut) and not args.resume:
        raise DataError(f"{directory}: a {'finished' if done else 'cut'} stage {stage} is already there; "
                        "pass --resume to keep it (or continue it), or choose another --out")
    if rt.main:
        os.makedirs(directory, exist_ok=True)
    rt.barrier()
    return directory, done


def padded_tokens(judge, rows):
    return sum(padded_len(len(ids)) for ids, _ in judge.encode(rows))


def work_left(args, data, judge, stages):
    """stage -> (training tokens, forward-only tokens before its training, after it) for the stages still to
    run, from the rows' padded lengths: steps x batch x mean row length; features, evaluations, the
    interpolation grid. The split lets the estimate printed at the first step leave out what is done."""
    tokens = {s: padded_tokens(judge, rows) for s, rows in data.items()}
    row = lambda s: tokens[s] / max(1, len(data[s]))  # noqa: E731
    steps = lambda n, epochs: args.max_steps or max(1, math.ceil(epochs * (n // args.batch_size)))  # noqa: E731
    evals = sum(tokens[s] for s in args.eval_on if s in data)
    dev_splits = [s for s in ("id_dev", "ood_dev") if s in data]
    dev = sum(tokens[s] for s in dev_splits)
    dev_evals = sum(tokens[s] for s in dev_splits if s in args.eval_on)  # the chosen alpha's, reused by stage 3
    # alpha 0 / 1 reuse stage 1 / 2's dev scores when those stages run here and score every dev split
    ends = sum(a in args.alphas and s in stages for a, s in ((0.0, "1"), (1.0, "2")))
    ends *= all(s in args.eval_on for s in dev_splits)
    select = tokens["id_train"] + tokens["pool"] + dev if args.select != "none" else 0
    budget = 0 if args.select == "none" else args.budget
    if args.schedule == "darl":
        work = {"1": (steps(len(data["id_train"]), args.epochs) * args.batch_size * row("id_train"), 0, evals),
                "2": (steps(budget, args.dasa_epochs) * args.batch_size * row("pool"), select, evals),
                "3": (steps(budget * (1 + args.replay), args.dasa_epochs) * args.batch_size * row("pool"), 0, evals)}
    else:
        lp_rows = len(data["id_train"]) + budget
        work = {"1": (0, select + lp_rows * row("id_train") + evals, 0),
                "2": (steps(lp_rows, args.epochs) * args.batch_size * row("id_train"), 0, evals),
                "3": (0, (len(args.alphas) - ends) * dev + evals - dev_evals, 0)}
    return {s: tuple(int(x) for x in work[s]) for s in stages}


def forward_speed(judge, data):
    """Forward-only (padded) tokens/s, timed on 64 id_dev rows (a few seconds): half of the whole-run estimate."""
    rows = data["id_dev"][:64]
    judge.predict(rows)  # warm-up: first-call allocations for these shapes
    t0 = time.time()
    judge.predict(rows)
    return padded_tokens(judge, rows) / (time.time() - t0)


# ----------------------------------------------------------------------------- CLI

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--stage", required=True, choices=["1", "2", "3", "all", "eval", "score"])
    a("--schedule", default="darl", choices=sorted(STAGES), help="what stages 1-3 are (see the top of train.py)")
    a("--data", default=os.path.join(HERE, "data", "qbqtc2kuake"))
    a("--model", default=os.path.join(HERE, "data", "gemma3_270m"))
    a("--out", default=os.path.join(HERE, "out"))
    a("--seed", type=int, default=0)
    a("--resume", action="store_true", help="skip finished stages, continue a cut one (or a cut --stage score)")
    a("--limit", type=int, default=None, help=f"cap id_train and pool at N rows (seeded); default {CPU_LIMIT} on CPU, none on GPU; 0: no cap")
    a("--eval_limit", type=int, default=None, help=f"cap each dev and test split at N rows (fixed seed); default {CPU_LIMIT} on CPU, none on GPU; 0: no cap")
    a("--eval_on", default=",".join(EVAL_SPLITS), help="splits scored after each stage (those the data has; '': none)")
    a("--adapter", help="--stage eval/score: a stage dir (eval without it: zero-shot)")
    a("--input", help="--stage score: JSONL with query and item per line")
    a("--output", help="--stage score: where to write the scored JSONL")
    a("--score_chunk", type=int, default=4096, help="--stage score: rows read, scored and written at a time")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    a("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    a("--log_every", type=int, default=10)
    a("--ckpt_every", type=int, default=50)
    add_method_args(p)
    args = p.parse_args(argv)
    if args.stage == "score" and not (args.adapter and args.input and args.output):
        p.error("--stage score needs --adapter, --input and --output")
    args.eval_on = [s for s in args.eval_on.split(",") if s]  # "": none
    if bad := sorted(set(args.eval_on) - set(EVAL_SPLITS)):
        p.error(f"--eval_on: {bad} not among {', '.join(EVAL_SPLITS)}")
    args.alphas = [float(x) for x in args.alphas.split(",")]
    if not all(0 <= x <= 1 for x in args.alphas):
        p.error(f"--alphas: {args.alphas} must lie in [0, 1]")
    if args.select == "none" and args.schedule != "lpft":
        p.error("--select none: only with --schedule lpft (darl stages 2 and 3 train on the selected rows)")
    return args


def add_method_args(p):
    """The arguments of the method itself: loss, DASA, the stages' schedule, optimizer and LoRA."""
    a = p.add_argument
    a("--loss", default="darl", choices=["darl", "sft"])
    a("--class_weight", default="balanced", choices=["balanced", "none"], help="weight rows by grade (both losses)")
    a("--ordinal_weight", type=float, default=None, help="default: darl_loss's own")
    a("--calibration_weight", type=float, default=None, help="default: darl_loss's own")
    a("--budget", type=int, default=None, help="DASA annotation budget in pool rows (default: a fifth of the pool)")
    a("--ood_score", default="coverage", choices=ood.SCORES)
    a("--select", default="dasa", choices=["dasa", "random", "none"], help="none: no pool rows (lpft only)")
    a("--k", type=int, default=10)
    a("--max_per_query", type=int, default=3, help="DASA: at most this many selected rows per query")
    a("--layer", type=int, default=None, help="feature layer (default: ood.extract_features' own)")
    a("--pooling", default=None, choices=["last", "mean"])
    a("--epochs", type=float, default=4.0, help="stage 1 (lpft: stage 2) epochs")
    a("--max_steps", type=int, default=None, help="steps per training stage (default: from the epochs)")
    a("--dasa_epochs", type=float, default=2.0, help="darl stages 2 and 3: epochs over their rows")
    a("--stage3_from", type=int, default=2, choices=[1, 2])
    a("--replay", type=float, default=1.0, help="darl stage 3: id_train replay rows per selected row")
    a("--dasa_lr_scale", type=float, default=0.1, help="darl stages 2 and 3: learning rate = --lr times this")
    a("--lp_steps", type=int, default=300, help="lpft stage 1: full-batch steps of the linear probe (0: FT only)")
    a("--lp_lr", type=float, default=3e-3, help="lpft stage 1: the linear probe's learning rate")
    a("--alphas", default="0,0.25,0.5,0.75,1", help="lpft stage 3: interpolation weights tried on the dev splits")
    a("--lr", type=float, default=4e-4)
    a("--weight_decay", type=float, default=0.0)
    a("--warmup", type=float, default=0.05, help="fraction of steps")
    a("--grad_clip", type=float, default=1.0)
    a("--batch_size", type=int, default=16, help="rows per optimizer step (over all ranks)")
    a("--micro_tokens", type=int, default=None, help="padded tokens per forward pass, the rest accumulated (default 512 on CPU, 8192 on CUDA)")
    a("--eval_batch_size", type=int, default=32)
    a("--max_len", type=int, default=128)
    a("--lora_rank", type=int, default=8)
    a("--lora_alpha", type=float, default=16)
    a("--lora_dropout", type=float, default=0.0)
    a("--grad_ckpt", action="store_true", help="activation checkpointing (less memory, ~30%% more compute)")


def resolve_defaults(args, rt):
    """Defaults that depend on the device or on library functions (None on the command line)."""
    for name in ("limit", "eval_limit"):  # CPU: sized for ~30 min; 0 = the full splits, also on CPU
        value = getattr(args, name)
        setattr(args, name, (CPU_LIMIT if value is None and rt.device == "cpu" else value) or None)
    args.micro_tokens = args.micro_tokens or (512 if rt.device == "cpu" else 8192)
    for fn, names in ((darl.darl_loss, ("ordinal_weight", "calibration_weight")), (ood.extract_features, ("layer", "pooling"))):
        for name in names:
            if getattr(args, name) is None:
                setattr(args, name, inspect.signature(fn).parameters[name].default)


def run_stages(judge, data, args, rt):
    """The requested stages of the schedule in order; finished ones are skipped (with --resume)."""
    check_run_config(args, rt)
    todo = [s for s in STAGES[args.schedule] if args.stage in (s, "all")]
    dirs = {s: stage_dir(args, s, rt) for s in todo}
    left = [s for s in todo if not dirs[s][1]]
    rt.work_left, rt.forward_tps = work_left(args, data, judge, left), forward_speed(judge, data) if left else None
    for s in todo:
        directory, done = dirs[s]
        if done:
            rt.log(f"stage {s}: {directory} is finished, skipping (--resume)")
            continue
        rt.stage = s
        STAGES[args.schedule][s](judge, data, directory, args, rt)


def main(argv=None):
    args = get_args(argv)
    rt = Runtime(args)
    resolve_defaults(args, rt)
    torch.manual_seed(args.seed)
    rt.log(f"train.py {' '.join(sys.argv[1:])} | device {rt.device} x{rt.world} dtype {str(rt.dtype)[6:]} "
           f"threads {torch.get_num_threads()}")
    t0 = time.time()
    if args.stage == "score":
        score(args, rt)
    else:
        train_or_eval(args, rt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
    rt.log(f"done in {(time.time() - t0) / 60:.1f} min, peak RSS {peak:.2f} GiB" + (" (this rank)" if rt.world > 1 else ""))
    if rt.world > 1:
        dist.destroy_process_group()


def train_or_eval(args, rt):
    """--stage 1/2/3/all (the schedule's stages) or eval (one adapter, or zero-shot), then the results table."""
    meta = load_meta(args.data)
    data = load_data(args, rt, len(meta["grades"]))
    args.budget = len(data["pool"]) // 5 if args.budget is None else args.budget
    spec = {"grades": meta["grades"], "prompt": meta["prompt"], "verbalizer": meta["verbalizer"], "max_len": args.max_len}
    if args.stage == "eval" and args.adapter:
        spec = adapter_spec(args.adapter, meta, args.max_len)
    judge = Judge(args, rt, spec)
    if args.stage == "eval":  # without --adapter: the base model, zero-shot
        if args.adapter:
            judge.load(args.adapter)
        evaluate(judge, data, f"eval:{args.adapter or 'zero-shot'}", args, rt)
    else:
        run_stages(judge, data, args, rt)
    summary(args, rt)


if __name__ == "__main__":
    try:
        main()
    except (DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
