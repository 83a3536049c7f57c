"""The relevance judge at run time: where it runs (Runtime: device, dtype, ranks, the log) and what it is
(Judge: model, tokenizer, prompt, grade tokens, optional grade head). Rows in, grade probabilities or
features out; `evaluate` scores labelled splits, `score` streams new pairs from an adapter dir alone.

A stage dir is an adapter that scores on its own: the PEFT files (loadable by peft), the grade head when
there is one (grade_head.safetensors), and darl_config.json (prompt, verbalizer and its token ids, grades,
max_len, the base model's type and config.json sha256), written last.
"""
import json
import os
import re
import time

import numpy as np
import torch
import torch.distributed as dist

import darl
import ood
from dataset import DataError, atomic_path, check_row, load_meta, read_jsonl, write_json
from model import Transformer, add_lora, load_adapter, save_adapter
from tokenizer import Tokenizer

CONFIG_FILE = "darl_config.json"  # written last into a stage dir: its presence marks the stage finished


# ----------------------------------------------------------------------------- runtime

class Runtime:
    """Device, dtype, process group, the log and the whole-run clock, set up once."""

    def __init__(self, args):
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available() and not args.cpu
        self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("nccl" if cuda else "gloo")
        bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_has_bf16_units()
        self.dtype = (torch.bfloat16 if bf16 else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
        os.makedirs(args.out, exist_ok=True)
        self.log_path = os.path.join(args.out, "log.txt")
        self.work_left, self.forward_tps, self.stage = None, None, None  # set by run_stages: the whole-run estimate
        self.scored = {}  # (stage, split) -> probabilities evaluated in this process (lpft's interpolation reuses them)

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

    def announce_total(self, train_tps, trained):
        """Once, after the first logged steps (`trained` tokens so far) of this process: the ETA of all the
        run has left: this stage's training and later forward passes, and everything of the later stages."""
        if self.work_left is None or self.forward_tps is None:
            return
        now = list(self.work_left).index(self.stage)
        later = list(self.work_left.values())[now + 1:]
        train = self.work_left[self.stage][0] - trained + sum(t for t, _, _ in later)
        forward = self.work_left[self.stage][2] + sum(b + a for _, b, a in later)
        minutes = (train / train_tps + forward / self.forward_tps) / 60
        self.log(f"whole run: about {minutes:.0f} min left ({train:,} training tokens at {train_tps:,.0f} tok/s, "
                 f"{forward:,} forward-only tokens at {self.forward_tps:,.0f} tok/s); on a slow CPU pass --limit N")
        self.work_left = None


def cpu_has_bf16_units():
    """AMX or AVX512-BF16: bf16 matmuls then beat fp32; without them bf16 is emulated and slower."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def atomic_save(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ----------------------------------------------------------------------------- the judge

class Judge:
    """The model, its tokenizer, the prompt, the grade tokens and an optional grade head: rows in,
    grade probabilities out. `spec` (grades, prompt, verbalizer, max_len) comes from the data's
    meta.json when training and from the adapter's darl_config.json when scoring."""

    def __init__(self, args, rt, spec):
        self.args, self.rt, self.spec = args, rt, spec
        self.tok = Tokenizer(args.model)
        self.grade_ids = torch.tensor(darl.grade_token_ids(self.tok, spec["verbalizer"]), device=rt.device)
        self.model = Transformer.from_pretrained(args.model, dtype=rt.dtype, device=rt.device)
        self.model.gradient_checkpointing = args.grad_ckpt
        self.head = None

    def encode(self, rows):
        return [darl.encode_pair(self.tok, r["query"], r["item"], self.spec["prompt"], self.spec["max_len"]) for r in rows]

    def new_lora(self):
        add_lora(self.model, rank=self.args.lora_rank, alpha=self.args.lora_alpha, dropout=self.args.lora_dropout)

    def new_head(self):
        self.head = darl.GradeHead.from_model(self.model, self.grade_ids)

    def trainable(self):
        return [p for p in self.model.parameters() if p.requires_grad] + ([] if self.head is None else [self.head.weight])

    def base_identity(self):
        return {"model_type": self.model.args.model_type, "config_sha256": self.model.config_sha256,
                "name_or_path": self.model.name_or_path}

    def save(self, directory):
        """PEFT files (when there is LoRA), the head (when there is one), then darl_config.json."""
        if any(".lora_" in name for name, _ in self.model.named_parameters()):
            save_adapter(self.model, directory)
        if self.head is not None:
            self.head.save(directory)
        write_json(os.path.join(directory, CONFIG_FILE),
                   {**self.spec, "grade_token_ids": self.grade_ids.tolist(), "base_model": self.base_identity()})

    def load(self, directory):
        """LoRA and head of a stage dir (a plain PEFT dir works too); another base model is an error."""
        base = read_adapter_config(directory).get("base_model")
        if base and (base["model_type"], base["config_sha256"]) != (self.model.args.model_type, self.model.config_sha256):
            raise DataError(f"{directory}/{CONFIG_FILE}: the adapter was trained on {base['name_or_path']} "
                            f"({base['model_type']}, config sha256 {base['config_sha256'][:12]}), but --model is "
                            f"{self.args.model} ({self.model.args.model_type}, {self.model.config_sha256[:12]})")
        if os.path.exists(os.path.join(directory, "adapter_model.safetensors")):
            load_adapter(self.model, directory)
        self.head = darl.GradeHead.load(directory, self.rt.device)

    def batches(self, examples, idx):
        """Length-sorted batches over the examples at idx (padding waste and shape count stay small)."""
        for part in darl.sorted_chunks(idx, [len(e[0]) for e in examples], self.args.eval_batch_size):
            batch = darl.collate([examples[i] for i in part], self.tok.pad_id)
            yield part, {k: v.to(self.rt.device) for k, v in batch.items()}

    @torch.no_grad()
    def predict(self, rows):
        """Grade probabilities (N, C), in row order, sharded over ranks."""
        self.model.eval()
        examples = self.encode(rows)
        mine = [int(i) for i in self.rt.shard(len(examples))]
        probs, pos = torch.empty(len(mine), len(self.grade_ids)), {i: j for j, i in enumerate(mine)}
        for part, batch in self.batches(examples, mine):
            logits = darl.grade_logits(self.model, batch["input_ids"], batch["attention_mask"], self.grade_ids, self.head)
            probs[[pos[i] for i in part]] = logits.float().softmax(-1).cpu()
        return self.rt.gather(probs)

    @torch.no_grad()
    def answer_features(self, rows):
        """Final hidden states at the answer position (N, D), fp32 on CPU: the grade head's input."""
        self.model.eval()
        examples = self.encode(rows)
        mine = [int(i) for i in self.rt.shard(len(examples))]
        out, pos = torch.empty(len(mine), self.model.args.dim), {i: j for j, i in enumerate(mine)}
        for part, batch in self.batches(examples, mine):
            out[[pos[i] for i in part]] = darl.answer_hidden(self.model, batch["input_ids"], batch["attention_mask"]).float().cpu()
        return self.rt.gather(out)

    def features(self, rows):
        """L2-normalised OOD features (N, D) from the layer and pooling in args, sharded over ranks."""
        self.model.eval()
        examples = self.encode(rows)
        mine = self.rt.shard(len(examples))
        feats = ood.extract_features(self.model, [examples[i] for i in mine], self.tok.pad_id, layer=self.args.layer,
                                     pooling=self.args.pooling, batch_size=self.args.eval_batch_size)
        return self.rt.gather(feats)


def read_adapter_config(directory):
    """darl_config.json of a stage dir ({} for a plain PEFT adapter dir); a dir with neither is an error."""
    path = os.path.join(directory, CONFIG_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    if not os.path.exists(os.path.join(directory, "adapter_config.json")):
        raise DataError(f"{directory}: no {CONFIG_FILE} or adapter_config.json (not an adapter dir, or an unfinished stage)")
    return {}


# ----------------------------------------------------------------------------- evaluation

def evaluate(judge, data, stage, args, rt, known=None):
    """Metrics on each split of --eval_on that the data has: one results.jsonl line per split, and the
    per-row probabilities in OUT/predictions/ (the paired bootstrap in bench/ reads them). `known`: split ->
    this model's probabilities, already computed (not scored again)."""
    results = []
    for split in [s for s in args.eval_on if s in data]:
        rows, t0 = data[split], time.time()
        probs = known[split] if known and split in known else judge.predict(rows)
        rt.scored[(stage, split)] = probs
        groups = [r.get("group", r["query"]) for r in rows]  # the query unit of NDCG, as saved for the bootstrap
        m = darl.relevance_metrics(probs, torch.tensor([r["label"] for r in rows]), queries=groups)
        results.append({"stage": stage, "split": split, **m, "eval_seconds": round(time.time() - t0, 1)})
        rt.log(f"stage {stage} {split}: n={m['n']} acc={m['accuracy']:.4f} macro_f1={m['macro_f1']:.4f} ece={m['ece']:.4f}")
        if rt.main:
            tag = re.sub(r"[^0-9A-Za-z]+", "_", stage)
            save_predictions(os.path.join(args.out, "predictions", f"{tag}_{split}.npz"), rows, probs)
    append_results(args, rt, results)
    return results


def append_results(args, rt, results):
    if rt.main:
        with open(os.path.join(args.out, "results.jsonl"), "a", encoding="utf-8") as f:
            for res in results:
                f.write(json.dumps(res, ensure_ascii=False) + "\n")


def save_predictions(path, rows, probs):
    """ids, labels, groups (query) and float32 probabilities of one evaluated split, row for row."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, ids=np.array([str(r["id"]) for r in rows]), labels=np.array([r["label"] for r in rows]),
                 groups=np.array([r.get("group", r["query"]) for r in rows]), probs=probs.float().numpy())


# ----------------------------------------------------------------------------- score and eval

def adapter_spec(directory, meta, max_len):
    """What scoring needs, from the adapter's darl_config.json; from --data's meta.json (and --max_len)
    for a plain PEFT adapter. With both, the grades must agree."""
    config = read_adapter_config(directory)
    if config and meta and config["grades"] != meta["grades"]:
        raise DataError(f"{directory}/{CONFIG_FILE}: grades {config['grades']} differ from the data's {meta['grades']}")
    if not config and not meta:
        raise DataError(f"{directory}: a plain PEFT adapter (no {CONFIG_FILE}): pass --data with the meta.json it was "
                        "trained with (prompt, grades, verbalizer)")
    source = config or meta
    return {k: source[k] for k in ("grades", "prompt", "verbalizer")} | {"max_len": config.get("max_len", max_len)}


def score(args, rt):
    """Grade probabilities and the expected grade for each pair in --input (JSONL: query, item), streamed
    in chunks (flat memory); OUTPUT.partial grows chunk by chunk, --resume continues it, and OUTPUT
    appears only when complete. The input is checked whole first: a bad line stops before any scoring."""
    meta = load_meta(args.data) if os.path.exists(os.path.join(args.data, "meta.json")) else None
    judge = Judge(args, rt, adapter_spec(args.adapter, meta, args.max_len))
    judge.load(args.adapter)
    n_grades, total = len(judge.spec["grades"]), 0
    for where, row in read_jsonl(args.input):
        check_row(where, row, n_grades, need_label=False, need_id=False)
        total += 1
    partial = args.output + ".partial"
    done = sum(1 for _ in open(partial, encoding="utf-8")) if args.resume and os.path.exists(partial) else 0
    if rt.main and not done:
        open(partial, "w").close()
    rt.log(f"scoring {total - done:,} of {total:,} pairs" + (f" (resuming {partial} after {done:,})" if done else ""))
    t0, rows, seen = time.time(), [], 0
    for where, row in read_jsonl(args.input):
        seen += 1
        if seen > done:
            rows.append(check_row(where, row, n_grades, need_label=False, need_id=False))
        if len(rows) == args.score_chunk or (seen == total and rows):
            write_scored(partial, rows, judge.predict(rows), rt)
            rt.log(f"scored {seen:,}/{total:,} pairs, {(seen - done) / (time.time() - t0):,.0f} pairs/s, "
                   f"eta {(time.time() - t0) / (seen - done) * (total - seen) / 60:.1f} min")
            rows = []
    if rt.main:
        os.replace(partial, args.output)
    rt.log(f"scored {total:,} pairs -> {args.output}")


def write_scored(path, rows, probs, rt):
    if rt.main:
        relevance = darl.expected_grade(probs)
        with open(path, "a", encoding="utf-8") as f:
            for row, p, rel in zip(rows, probs.tolist(), relevance.tolist()):
                f.write(json.dumps({**row, "probs": [round(x, 6) for x in p], "grade": int(np.argmax(p)),
                                    "relevance": round(rel, 6)}, ensure_ascii=False) + "\n")
