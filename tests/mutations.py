"""Mutation check: do the tests fail when the code is wrong?

    python tests/mutations.py                 # every mutation; writes tests/mutations.txt
    python tests/mutations.py --only ece,knn  # mutations whose name contains one of these (no file written)
    python tests/mutations.py --only ood.py   # the mutations of one runtime file
    python tests/mutations.py --skip tests/test_train.py   # a quick pass without the end-to-end tests
    python tests/mutations.py --head          # the committed files, whatever the working tree holds
    python tests/mutations.py --list          # names, files and test files only

Copies the repository's files (tracked, plus untracked ones git does not ignore) into a temporary directory,
links the prepared data folders (gitignored) into it, then plants ONE plausible bug at a time in a runtime file
by exact string replacement and runs that mutation's test files there (pytest -x, OMP_NUM_THREADS=1, a timeout).
A target string that is not found exactly once stops the script before anything runs, so the list stays honest
as the code changes. Each test-file set is first run unmutated: a set that fails clean cannot judge a mutation.
Not part of the default pytest run (the file name does not start with test_).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_LINKS = ("data/gemma3_270m", "data/smollm2_135m", "data/qbqtc2kuake")  # prepared files, gitignored
from conftest import SHARED_DATA  # noqa: E402  (../shared/data or the download cache)

DARL, OOD, DATASET, MODEL, TRAIN = (["tests/test_darl.py"], ["tests/test_ood.py"], ["tests/test_dataset.py"],
                                    ["tests/test_model.py"], ["tests/test_train.py"])
JUDGE, DASA = ["tests/test_judge.py"] + TRAIN, ["tests/test_dasa.py"] + TRAIN  # unit tests first, then end to end
TOKENIZER = ["tests/test_model.py", "tests/test_model_real.py", "tests/test_darl.py"]

# (name, file, old, new, test files): `old` must occur exactly once in `file`.
MUTATIONS = [
    # ---- darl.py: answer position, losses, grade tokens, prompt
    ("answer position mask.sum()-2", "darl.py", "last = attention_mask.long().sum(1) - 1",
     "last = attention_mask.long().sum(1) - 2", DARL),
    ("answer position = last padded column", "darl.py", "last = attention_mask.long().sum(1) - 1",
     "last = torch.full_like(attention_mask[:, 0], attention_mask.shape[1] - 1)", DARL),
    ("left-padding check removed", "darl.py", "if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():",
     "if False:", DARL),
    ("ordinal target flipped (t >= c)", "darl.py", "target = (labels[:, None] <= torch.arange(C - 1",
     "target = (labels[:, None] >= torch.arange(C - 1", DARL),
    ("ordinal normalised by C not C-1", "darl.py", "((cdf - target) ** 2).sum(-1) / (C - 1)",
     "((cdf - target) ** 2).sum(-1) / C", DARL),
    ("ordinal CDF from the wrong end", "darl.py", "cdf = p.cumsum(-1)[:, :-1]", "cdf = p.cumsum(-1)[:, 1:]", DARL),
    ("calibration term sign (log C + H)", "darl.py", "math.log(C) + neg_entropy", "math.log(C) - neg_entropy", DARL),
    ("calibration term detached", "darl.py", "neg_entropy = (p * logits.log_softmax(-1)).sum(-1)",
     "neg_entropy = (p * logits.log_softmax(-1)).sum(-1).detach()", DARL),
    ("class weight: mean normalised by sum of weights", "darl.py",
     "        loss = loss * class_weight.to(loss.device)[labels]\n",
     "        w = class_weight.to(loss.device)[labels]\n        return (loss * w).sum() / w.sum()\n",
     DARL),
    ("sft_loss ignores row weights", "darl.py",
     "return (loss if weight is None else loss * weight.to(loss.device)).mean()", "return loss.mean()", DARL),
    ("grade word encoded with dummy prefix", "darl.py", "t = tokenizer.encode(w, start=False)",
     "t = tokenizer.encode(w)", DARL),
    ("bos always prepended", "darl.py", "bos = [tokenizer.bos_id] if tokenizer.add_bos else []",
     "bos = [tokenizer.bos_id]", DARL),
    ("truncation cuts the query first", "darl.py",
     'n_item = min(len(text["item"]), max(0, budget - len(text["query"])))', 'n_item = min(len(text["item"]), budget)',
     DARL),
    ("ECE bins [lo, hi) (floor)", "darl.py", "b = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)",
     "b = np.clip(np.floor(conf * bins).astype(np.int64), 0, bins - 1)", DARL),
    ("ECE |sum of gaps|", "darl.py", "return float(np.abs(gap).sum() / len(y))",
     "return float(np.abs(gap.sum()) / len(y))", DARL),
    ("METRICS macro-F1 over absent grades too", "darl.py",
     "float(np.mean((parts := _per_grade(p.argmax(1), y, p.shape[1]))[3][parts[4]]))",
     "float(np.mean((parts := _per_grade(p.argmax(1), y, p.shape[1]))[3]))", DARL),
    ("NDCG linear gain", "darl.py", "gain = 2.0 ** labels[idx] - 1", "gain = labels[idx].astype(float)", DARL),
    ("AUROC ties not averaged", "darl.py", "avg_rank = np.cumsum(counts) - (counts - 1) / 2.0",
     "avg_rank = np.cumsum(counts) - counts + 1.0", DARL + OOD),
    ("GradeHead init from input embeddings", "darl.py",
     'out = model.lm_head.weight if hasattr(model, "lm_head") else model.embed_tokens.weight',
     "out = model.embed_tokens.weight", DARL),
    ("GradeHead drops the softcap", "darl.py",
     "return cls(out[grade_ids.to(out.device)], model.args.final_logit_softcapping)",
     "return cls(out[grade_ids.to(out.device)])", DARL),
    ("GradeHead softcap lost on save", "darl.py", 'meta = {"softcap": json.dumps(self.softcap)}',
     'meta = {"softcap": "null"}', DARL),
    ("bootstrap: b not resampled (unpaired)", "darl.py",
     "stat = lambda s, idx: fn(a[s][idx], y[idx]) - fn(b[s][idx], y[idx])",
     "stat = lambda s, idx: fn(a[s][idx], y[idx]) - fn(b[s], y)", DARL),
    ("bootstrap: seeds paired wrongly (a_s, b_s+1)", "darl.py",
     "stat = lambda s, idx: fn(a[s][idx], y[idx]) - fn(b[s][idx], y[idx])",
     "stat = lambda s, idx: fn(a[s][idx], y[idx]) - fn(b[(s + 1) % len(b)][idx], y[idx])", DARL),
    ("bootstrap: seeds not resampled", "darl.py",
     "idx, seeds = rng.integers(n_units, size=n_units), rng.integers(len(a), size=len(a))",
     "idx, seeds = rng.integers(n_units, size=n_units), np.arange(len(a))", DARL),
    ("bootstrap: one-sided quantile levels", "darl.py",
     "lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])",
     "lo, hi = np.quantile(draws, [1 - level, level])", DARL),
    # ---- ood.py
    ("kNN (k-1)-th neighbour", "ood.py", "out[q0:q0 + chunk] = (best[:, -1] + (q * q).sum(1))",
     "out[q0:q0 + chunk] = (best[:, -2] + (q * q).sum(1))", OOD),
    ("kNN exclude_self column offset", "ood.py", "cols = rows + q0 - b0", "cols = rows + q0", OOD),
    ("coverage ratio inverted", "ood.py", "return d_bank / d_pool.clamp_min(1e-6)",
     "return d_pool / d_bank.clamp_min(1e-6)", OOD),
    ("coverage counts the row as its own neighbour", "ood.py",
     "d_pool = knn_score(pool, pool, k, chunk, exclude_self=True)", "d_pool = knn_score(pool, pool, k, chunk)", OOD),
    ("Mahalanobis pooled (not within-class) covariance", "ood.py",
     "centered = x - means[torch.searchsorted(classes, y)]", "centered = x - x.mean(0)", OOD),
    ("Mahalanobis shrinkage toward I", "ood.py",
     "cov = (1 - shrinkage) * cov + shrinkage * cov.trace() / D * torch.eye(D, dtype=cov.dtype)",
     "cov = cov + shrinkage * torch.eye(D, dtype=cov.dtype)", OOD),
    ("rank_mean: ties take their lowest rank", "ood.py", "average = np.cumsum(counts) - (counts + 1) / 2.0",
     "average = np.cumsum(counts) - counts", OOD),
    ("rank_mean: sort order as rank", "ood.py", "ranks.append(average[inverse.ravel()]",
     "ranks.append(np.argsort(np.asarray(score, np.float64)).astype(np.float64)", OOD),
    ("bootstrap ndcg: undefined queries resampled", "darl.py", "per_query = [[v[defined] for v in side] for side in per_query]",
     "per_query = [[np.where(defined, v, 0.0) for v in side] for side in per_query]", DARL),
    ("pool_scores maha_knn uses coverage", "ood.py",
     "return rank_mean(mahalanobis_score(bank, bank_labels, pool), knn_score(bank, pool, k))",
     "return rank_mean(mahalanobis_score(bank, bank_labels, pool), coverage_score(bank, pool, k))", OOD),
    ("DASA per-group cap off by one", "ood.py", "per_group.get(g, 0) >= max_per_group",
     "per_group.get(g, 0) > max_per_group", OOD),
    ("DASA duplicates: strict < min_distance", "ood.py", ".norm(dim=1).min() <= min_distance",
     ".norm(dim=1).min() < min_distance", OOD),
    ("DASA skip_top skips the bottom", "ood.py", "[int(skip_top * len(s)):]", "[:len(s) - int(skip_top * len(s))]",
     OOD),
    ("features: first content token for 'last'", "ood.py", "last = (content * positions).argmax(1)",
     "last = content.argmax(1)", OOD),
    ("features: negative layer off by one", "ood.py", "layer = model.args.n_layers + layer if",
     "layer = model.args.n_layers + layer + 1 if", OOD),
    ("features returned in length order", "ood.py", "        for j, i in enumerate(idx):\n            out[i] = pooled[j]",
     "        for j, i in enumerate(idx):\n            out[s + j] = pooled[j]", OOD),
    ("FPR@TPR strict threshold", "ood.py", "return float((id_s >= ood_s[k]).mean())",
     "return float((id_s > ood_s[k]).mean())", OOD),
    # ---- model.py
    ("LoRA scaling alpha/sqrt(r)", "model.py", "self.scaling = base_layer, alpha, alpha / rank",
     "self.scaling = base_layer, alpha, alpha / math.sqrt(rank)", MODEL),
    ("merge_lora without scaling", "model.py", "weight += (lora.lora_B.weight @ lora.lora_A.weight * lora.scaling)",
     "weight += (lora.lora_B.weight @ lora.lora_A.weight)", MODEL),
    ("rope rotate-half sign", "model.py", "torch.cat((-x2, x1), dim=-1)", "torch.cat((x2, -x1), dim=-1)", MODEL),
    ("rope: sliding layers use the global theta", "model.py",
     "rope_cos_sin(positions, rope_inv_freq(args.head_dim, args.rope_local_theta), x.dtype)",
     "rope_cos_sin(positions, rope_inv_freq(args.head_dim, args.rope_theta), x.dtype)", MODEL),
    ("rope inverse-frequency exponent", "model.py", "torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim",
     "torch.arange(0, head_dim, 2, dtype=torch.float) / (head_dim - 2)", MODEL),
    ("positions ignore the mask", "model.py", "positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)",
     "positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)", MODEL),
    ("sliding window one token wider", "model.py", "(i[:, None] - i[None, :] < sliding_window)",
     "(i[:, None] - i[None, :] <= sliding_window)", MODEL),
    ("bos prepended whenever there is one", "tokenizer.py", "self.add_bos = self.bos_id is not None and bool(prefix)",
     "self.add_bos = self.bos_id is not None", TOKENIZER),
    ("dummy prefix kept on continuing pieces", "tokenizer.py", "ids = (self.sp if start else self._sp_rest).encode(text)",
     "ids = self.sp.encode(text)", TOKENIZER),
    ("Gemma RMSNorm w instead of 1 + w", "model.py", "return (h * (1.0 + self.weight.float())).type_as(x)",
     "return (h * self.weight.float()).type_as(x)", MODEL),
    # ---- dataset.py
    ("carve_dev by row, not by query", "dataset.py", 'group = [r.get("group", r["query"]) for r in rows]',
     'group = [r["id"] for r in rows]', DATASET),
    ("carve_dev ignores the cap", "dataset.py",
     "collections.Counter(group), min(cap, int(share * len(rows))), set(), 0",
     "collections.Counter(group), int(share * len(rows)), set(), 0", DATASET),
    ("carve_dev stops at the first group too big", "dataset.py",
     "        if n + size[g] <= want:\n            chosen.add(g)\n            n += size[g]\n",
     "        if n + size[g] > want:\n            break\n        chosen.add(g)\n        n += size[g]\n", DATASET),
    ("verbalizer: shorter accepted", "dataset.py", "len(words) != len(grades)", "len(words) < len(grades)", DATASET),
    ("empty split accepted", "dataset.py", "    if not rows:\n        raise DataError(f\"{path}: no rows\")",
     "    if rows is None:\n        raise DataError(f\"{path}: no rows\")", DATASET),
    ("bool label accepted", "dataset.py", "if type(label) is not int or", "if not isinstance(label, int) or", DATASET),
    ("id_dev carved although present", "dataset.py", '    if "id_dev" not in data:\n',
     '    if "id_train" in data:\n', DATASET),
    # ---- train.py
    ("class weights by frequency (inverted)", "train.py",
     "len(labels) / (n_grades * counts.clamp_min(1))", "counts / len(labels)", TRAIN),
    ("warmup starts at lr 0 (step / warmup)", "train.py", "return lr * (step + 1) / warmup",
     "return lr * step / warmup", TRAIN),
    ("cosine decays to 0, not 10%", "train.py", "lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))",
     "lr * 0.5 * (1 + math.cos(math.pi * t))", TRAIN),
    ("resume: optimizer state not restored", "train.py", '    opt.load_state_dict(state["opt"])\n', "", TRAIN),
    ("resume: step not restored", "train.py", '    return state["step"]', "    return 0", TRAIN),
    ("resume: RNG not restored", "train.py", '    torch.set_rng_state(state["rng"])\n', "", TRAIN),
    ("grad accumulation: micro-batch means summed", "train.py",
     "weight, args) * len(part) / len(batch_rows)", "weight, args)", TRAIN),
    ("same batch order every epoch", "train.py", "torch.Generator().manual_seed(seed * 1000 + epoch)",
     "torch.Generator().manual_seed(seed * 1000)", TRAIN),
    ("no gradient clipping", "train.py", "        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)\n", "", TRAIN),
    ("DDP: gradients averaged, not summed", "train.py", "            dist.all_reduce(p.grad)\n",
     "            dist.all_reduce(p.grad)\n            p.grad /= rt.world\n", TRAIN),
    ("stage 3 replays one row", "train.py", 'int(args.replay * len(selected))', "int(args.replay)", TRAIN),
    ("interpolation reuses stage 2's scores for alpha 0", "train.py", '{0.0: "1", 1.0: "2"}', '{0.0: "2", 1.0: "1"}', TRAIN),
    # ---- judge.py
    ("predict: probabilities in length order", "judge.py",
     "probs, pos = torch.empty(len(mine), len(self.grade_ids)), {i: j for j, i in enumerate(mine)}",
     ("probs, pos = torch.empty(len(mine), len(self.grade_ids)), "
      "{i: j for j, i in enumerate(sorted(mine, key=lambda i: len(examples[i][0])))}"), JUDGE),
    ("adapter dir loads without its head", "judge.py", "self.head = darl.GradeHead.load(directory, self.rt.device)",
     "self.head = None", JUDGE),
    ("stage dir saved without its head", "judge.py",
     "        if self.head is not None:\n            self.head.save(directory)\n", "", JUDGE),
    # ---- dasa.py
    ("DASA bank = the pool itself", "dasa.py",
     'scores = ood.pool_scores(args.ood_score, bank, feats["pool"], args.k, bank_labels)',
     'scores = ood.pool_scores(args.ood_score, feats["pool"], feats["pool"], args.k, bank_labels)', DASA),
    ("DASA per-query cap not passed", "dasa.py", "max_per_group=args.max_per_query, seed=args.seed)",
     "max_per_group=None, seed=args.seed)", DASA),
    ("DASA features from the base model (stage-1 adapter not loaded)", "dasa.py",
     "        if adapter_dir:\n            judge.load(adapter_dir)\n", "", DASA),
    ("shift report AUROC reversed", "dasa.py", "ood.auroc(s[~is_shift], s[is_shift])",
     "ood.auroc(s[is_shift], s[~is_shift])", DASA),
    ("dev AUROC with ID and OOD swapped", "dasa.py", '"dev_auroc": ood.auroc(dev[:n], dev[n:])',
     '"dev_auroc": ood.auroc(dev[n:], dev[:n])', DASA),
    ("selection redone by every stage", "dasa.py", "    if not os.path.exists(path):\n", "    if True:\n", DASA),
]
TIMEOUT = {"tests/test_train.py": 2400}  # seconds for a set containing this file (others: DEFAULT_TIMEOUT)
DEFAULT_TIMEOUT = 600


def check_targets(mutations, base=ROOT):
    """Every `old` occurs exactly once in its file under `base` and differs from `new`; stop loudly otherwise."""
    bad = []
    for name, file, old, new, tests in mutations:
        n = (base / file).read_text(encoding="utf-8").count(old)
        if n != 1 or old == new:
            bad.append(f"  {name!r}: {file} contains the target {n} times (needs exactly 1): {old!r}")
        for t in tests:
            if not (base / t).exists():
                bad.append(f"  {name!r}: test file {t} does not exist")
    if bad:
        sys.exit("mutations.py: stale mutation targets (update MUTATIONS to the current code):\n" + "\n".join(bad))


def copy_repo(dst, head=False):
    """The working tree's files (tracked, and untracked ones git does not ignore), or with head=True the files as
    committed at HEAD (a report that others can reproduce while the working tree is being edited)."""
    if head:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
        files = []
    else:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               check=True, capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    for d in DATA_LINKS:  # the prepared weights and benchmark: every file but prepare.py / README.md, as links
        for src in (ROOT / d).iterdir():
            target = dst / d / src.name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(src)


def run_tests(work, tests, timeout):
    """(status, the test that failed or '', seconds): FAIL / PASS / TIMEOUT / ERROR (collection or crash)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "DARL_SHARED_DATA": str(SHARED_DATA),
           "PYTHONPATH": str(work)}
    t0 = time.time()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests],
                           cwd=work, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", "", time.time() - t0
    seconds, out = time.time() - t0, p.stdout + p.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", out, re.MULTILINE)
    if p.returncode == 0:
        return "PASS", "", seconds
    if p.returncode == 1 and failed:
        return "FAIL", failed[0], seconds
    last = out.strip().splitlines()[-1] if out.strip() else f"rc {p.returncode}"
    return "ERROR", failed[0] if failed else last, seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated substrings of mutation names, or file names such as ood.py "
                    "(no report file is written)")
    ap.add_argument("--skip", default="", help="comma-separated test files to leave out (e.g. tests/test_train.py "
                    "for a quick pass; mutations left with no test file are dropped; no report file is written)")
    ap.add_argument("--head", action="store_true", help="test the files as committed at HEAD, not the working tree")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "tests" / "mutations.txt"), help="report file (full runs only)")
    args = ap.parse_args()
    if not args.head:
        check_targets(MUTATIONS)
    todo = MUTATIONS
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",")]
        todo = [m for m in MUTATIONS if any(k in m[0].lower() or k == m[1] for k in keys)]
    if args.skip:
        skip = set(filter(None, args.skip.split(",")))
        todo = [(n, f, o, w, [t for t in ts if t not in skip]) for n, f, o, w, ts in todo]
        todo = [m for m in todo if m[4]]
    if args.list:
        for name, file, _, _, tests in todo:
            print(f"{file:11s} {name:55s} {' '.join(tests)}")
        return
    for d in DATA_LINKS:
        if not (ROOT / d).is_dir():
            sys.exit(f"{ROOT / d} is missing: run python {d}/prepare.py first")
    lines = []
    with tempfile.TemporaryDirectory(prefix="darl_mutations_") as tmp:
        work = Path(tmp)
        copy_repo(work, head=args.head)
        check_targets(todo, work)
        baseline = {}  # per test file, unmutated
        for t in sorted({t for m in todo for t in m[4]}):
            status, test, sec = run_tests(work, [t], TIMEOUT.get(t, DEFAULT_TIMEOUT))
            baseline[t] = status
            print(f"baseline {t}: {status} {test} ({sec:.0f}s)", file=sys.stderr, flush=True)
        for k, (name, file, old, new, tests) in enumerate(todo, 1):
            path = work / file
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(old, new, 1), encoding="utf-8")
            try:
                if any(baseline[t] != "PASS" for t in tests):
                    status, test, sec = "BASELINE-FAILS", "", 0.0
                else:
                    status, test, sec = run_tests(work, tests, max(TIMEOUT.get(t, DEFAULT_TIMEOUT) for t in tests))
            finally:
                path.write_text(original, encoding="utf-8")
            verdict = {"FAIL": "CAUGHT", "ERROR": "CAUGHT", "PASS": "MISSED"}.get(status, status)
            if status == "ERROR":
                test = f"(error) {test}"
            line = f"{verdict:8s} | {file:10s} | {name:55s} | {test or '-'} | {sec:.0f}s"
            lines.append(line)
            print(f"[{k}/{len(todo)}] {line}", file=sys.stderr, flush=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    counts = {v: sum(x.startswith(v) for x in lines) for v in ("CAUGHT", "MISSED", "TIMEOUT", "BASELINE-FAILS")}
    tree = "the files committed at" if args.head else "the working tree at"
    report = [f"# python tests/mutations.py{' --head' if args.head else ''}: {tree} {head}"
              + (" (which differs from HEAD)" if dirty and not args.head else "")
              + f", {time.strftime('%Y-%m-%d')}",
              "# " + ", ".join(f"{v} {n}" for v, n in counts.items() if n) + f" of {len(lines)} mutations",
              "# baseline (unmutated): " + "; ".join(f"{t} {s}" for t, s in sorted(baseline.items())),
              "# verdict | file | mutation | first failing test | seconds", *lines]
    print("\n".join(report))
    if not args.only and not args.skip:
        Path(args.out).write_text("\n".join(report) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
