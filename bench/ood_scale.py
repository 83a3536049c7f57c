"""OOD scoring at scale: what exact k-NN and the DASA step cost in time and memory, and how they grow.

Part 1, k-NN. ood.knn_score on a bank of N random unit-norm Gaussian rows (seeded; float32, and the
float16 rounding of the same rows) against Q float32 queries, next to faiss-cpu IndexFlatL2 /
IndexFlatIP and scikit-learn NearestNeighbors(algorithm="brute") on the float32 bank (faiss's flat
indexes take float32 only; both are bench-only dependencies). Check: the k-th distance of every
query equals ours on the float32 bank. faiss L2 gives squared distances (we take the root); IP gives
inner products, d = sqrt(max(0, 2 - 2 ip)) for unit-norm rows. Tolerance 1e-4 in float32 (the
q^2 + b^2 - 2qb of every exact method here loses ~1e-6 near d ~ 1.3); for the float16 bank 1e-4 +
2^-11: rounding moves each unit-norm row by at most 2^-11 (float16 unit roundoff) and the k-th
distance moves by no more than the rows do. scikit-learn upcasts float32 chunks to float64 for its
GEMM, so on a big bank it sees only the first 10^9 / N queries (all of them at N = 10^5); its time for all Q is that time
scaled by Q / (queries seen), marked "est" in the table.

Part 2, DASA on real rows: the pipeline train.py's stage 2 runs, timed per stage for pools of n rows.
Gemma 3 270M (model.Transformer.from_pretrained in --dtype, CPU; auto = bf16 where the CPU has bf16
matrix units, else float32, as train.py's --dtype auto), rows encoded with darl.encode_pair
and meta.json's prompt (max_len 128, as train.py), ood.extract_features at its defaults
(DEFAULT_LAYER, DEFAULT_POOLING, batch 32), coverage_score against an id_train bank of n rows
(k = --k), dasa_select with budget n // 10, the pool's features and its queries as groups (as
train.py). Pool rows: pool.jsonl, then ood_test, then id_test, each shuffled (seed 0); bank rows:
id_train, shuffled. qbqtc2kuake has 13,902 non-train and 14,282 id_train rows, so a bigger n repeats
rows from the start (counted in the table; the cost does not depend on which rows repeat). The bank's
features are extracted once, for the largest n, and each pool uses its first n rows: a training bank
is featurised once and reused. Real-model features are slow on a small CPU: a default size left out
of --pools is estimated from the largest measured one, scaling each stage by its complexity (n for
encode and features, n^2 for coverage_score and dasa_select); the growth exponents measured between
consecutive sizes are printed next to it (at tiny sizes fixed costs make them meaningless).

Memory: every measurement runs in its own subprocess of this script, so the numbers do not mix.
"peak" is the process's highest resident size during the measurement (inputs, libraries and work);
"extra" is that peak minus the resident size once the inputs are built, i.e. what the method itself
allocates (faiss's own copy of the bank counts). The high-water mark is reset with
/proc/self/clear_refs (Linux) just before the measurement: resource.getrusage's ru_maxrss cannot be
reset, so it would also count the transient of building the inputs and, after exec, the parent's peak.

    python bench/ood_scale.py [--banks 100000,1000000] [--queries 10000] [--dim 640] [--k 10]
        [--pools 1000,4000,16000] [--model DIR] [--dtype auto] [--threads 2]

Prints markdown tables; writes bench/results/ood_scale.json (settings, date, git commit, versions,
CPU, threads). Exits 1 when a k-th distance check fails, after writing the results.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "qbqtc2kuake"
DEFAULT_POOLS = (1000, 4000, 16000)
SKLEARN_PAIRS = 10**9  # query x bank pairs scikit-learn is given (see the docstring)
TOL32, TOL16 = 1e-4, 1e-4 + 2.0**-11
BLOCK = 65536  # rows generated at a time


# ---------------------------------------------------------------- measuring (inside a worker)

def rss_mb(field):
    """VmRSS (now) or VmHWM (high-water mark since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status: no {field} line")


def start_peak():
    """Reset the high-water mark to the current resident size; returns that size (MB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb("VmRSS")


def peak_since(base_mb):
    peak = rss_mb("VmHWM")
    return dict(peak_mb=round(peak, 1), extra_mb=round(peak - base_mb, 1))


def random_rows(n, dim, seed, dtype):
    """n unit-norm Gaussian rows (float32, then cast), built in blocks so the result is the only big array."""
    out = np.empty((n, dim), dtype)
    rng = np.random.default_rng(seed)
    for s in range(0, n, BLOCK):
        x = rng.standard_normal((min(BLOCK, n - s), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + len(x)] = x
    return out


def knn_worker(job):
    """One k-NN measurement; writes the k-th distances to job['out'] (.npy)."""
    method, k = job["method"], job["k"]
    if method == "ours":  # each worker imports only its own library, so "peak" is that library's
        import torch
        torch.set_num_threads(job["threads"])
        sys.path.insert(0, str(ROOT))
        import ood
    elif method in ("faiss_l2", "faiss_ip"):
        import faiss
        faiss.omp_set_num_threads(job["threads"])
    elif method == "sklearn":
        from sklearn.neighbors import NearestNeighbors
    bank = random_rows(job["bank"], job["dim"], 0, np.float16 if job["dtype"] == "float16" else np.float32)
    queries = random_rows(job["queries"], job["dim"], 1, np.float32)[:job["n_queries"]]
    base = start_peak()
    t0 = time.perf_counter()
    if method == "ours":
        build = time.perf_counter()
        d = ood.knn_score(torch.from_numpy(bank), torch.from_numpy(queries), k).numpy()
    elif method in ("faiss_l2", "faiss_ip"):
        index = faiss.IndexFlatL2(bank.shape[1]) if method == "faiss_l2" else faiss.IndexFlatIP(bank.shape[1])
        index.add(bank)
        build = time.perf_counter()
        D, _ = index.search(queries, k)
        kth = D[:, k - 1].astype(np.float64)
        d = np.sqrt(np.maximum(kth, 0) if method == "faiss_l2" else np.maximum(0, 2 - 2 * kth))
    else:
        nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(bank)
        build = time.perf_counter()
        d = nn.kneighbors(queries, return_distance=True)[0][:, k - 1]
    end = time.perf_counter()
    np.save(job["out"], np.asarray(d, np.float64))
    return dict(build_s=round(build - t0, 3), search_s=round(end - build, 3), **peak_since(base))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def take(rows, n):
    """The first n rows, starting over from the top when there are fewer (the count of repeats is returned)."""
    return [rows[i % len(rows)] for i in range(n)], max(0, n - len(rows))


def pool_rows(kind, n):
    rng = random.Random(0)
    splits = ("id_train",) if kind == "bank" else ("pool", "ood_test", "id_test")
    rows = []
    for s in splits:
        part = read_jsonl(DATA / f"{s}.jsonl")
        rng.shuffle(part)
        rows += part
    return take(rows, n)


def dasa_worker(job):
    """kind 'bank': featurise n id_train rows into job['bank_file']. kind 'pool': the timed DASA stages."""
    import torch
    torch.set_num_threads(job["threads"])
    sys.path.insert(0, str(ROOT))
    import darl
    import model as model_lib
    import ood
    import tokenizer
    from judge import cpu_has_bf16_units
    tok = tokenizer.Tokenizer(job["model"])
    bf16 = job["dtype"] == "bfloat16" or (job["dtype"] == "auto" and cpu_has_bf16_units())
    m = model_lib.Transformer.from_pretrained(job["model"], dtype=torch.bfloat16 if bf16 else torch.float32)
    meta = json.loads((DATA / "meta.json").read_text(encoding="utf-8"))
    template = meta.get("prompt", darl.DEFAULT_PROMPT)
    n = job["n"]
    rows, repeated = pool_rows(job["kind"], n)
    bank = None if job["kind"] == "bank" else torch.load(job["bank_file"])[:n]
    base = start_peak()
    t = {}
    t0 = time.perf_counter()
    examples = [darl.encode_pair(tok, r["query"], r["item"], template, 128) for r in rows]
    t["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    feats = ood.extract_features(m, examples, tok.pad_id, layer=ood.DEFAULT_LAYER, pooling=ood.DEFAULT_POOLING)
    t["features_s"] = time.perf_counter() - t0
    if job["kind"] == "bank":
        torch.save(feats, job["bank_file"])
    else:
        t0 = time.perf_counter()
        scores = ood.coverage_score(bank, feats, k=job["k"])
        t["score_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        picked = ood.dasa_select(scores, n // 10, features=feats, groups=[r["query"] for r in rows])
        t["select_s"] = time.perf_counter() - t0
        t["selected"] = len(picked)
    tokens = sum(len(ids) for ids, _ in examples)
    return dict(n=n, repeated=repeated, tokens=tokens, dtype="bfloat16" if bf16 else "float32", **{key: round(v, 3) for key, v in t.items()}, **peak_since(base))


# ---------------------------------------------------------------- orchestrating (the parent stays small)

def run_worker(job, threads):
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON result."""
    env = dict(os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"worker failed ({p.returncode}): {job}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    print(f"  {job.get('method', job.get('kind'))} {job.get('dtype', '')} n={job.get('bank', job.get('n'))}: "
          f"{time.perf_counter() - t0:.1f}s wall, {out}", file=sys.stderr, flush=True)
    return out


def knn_part(args, tmp):
    rows, failed = [], False
    for n in args.banks:
        plan = [("ours", "float32"), ("ours", "float16"), ("faiss_l2", "float32"), ("faiss_ip", "float32"),
                ("sklearn", "float32")]
        ref = None
        for method, dtype in plan:
            nq = min(args.queries, max(1, SKLEARN_PAIRS // n)) if method == "sklearn" else args.queries
            out = os.path.join(tmp, f"{method}_{dtype}_{n}.npy")
            job = dict(task="knn", method=method, dtype=dtype, bank=n, queries=args.queries, n_queries=nq,
                       dim=args.dim, k=args.k, threads=args.threads, out=out)
            r = dict(bank=n, dtype=dtype, method=method, queries=nq, **run_worker(job, args.threads))
            d = np.load(out)
            if ref is None:
                ref = d  # ours on the float32 bank: the reference
            else:
                r["max_abs_diff"] = float(np.abs(d - ref[:nq]).max())
                r["tol"] = TOL16 if dtype == "float16" else TOL32
                r["ok"] = r["max_abs_diff"] <= r["tol"]
                failed |= not r["ok"]
            if nq < args.queries:
                r["search_s_all_queries_est"] = round(r["search_s"] * args.queries / nq, 1)
            rows.append(r)
    return rows, failed


def dasa_part(args, tmp):
    bank_file = os.path.join(tmp, "bank.pt")
    common = dict(task="dasa", model=str(args.model), dtype=args.dtype, k=args.k, threads=args.threads, bank_file=bank_file)
    bank = run_worker(dict(common, kind="bank", n=max(args.pools)), args.threads)
    pools = [run_worker(dict(common, kind="pool", n=n), args.threads) for n in args.pools]
    stages = ("encode_s", "features_s", "score_s", "select_s")
    growth = [dict(sizes=[a["n"], b["n"]], **{s: round(float(np.log(max(b[s], 1e-3) / max(a[s], 1e-3)) / np.log(b["n"] / a["n"])), 2)
                                             for s in stages}) for a, b in zip(pools, pools[1:])]
    # encode and features are linear in n; coverage_score computes two n x n distance blocks, and
    # dasa_select's walk compares each candidate with up to n // 10 kept rows: n^2 (an upper bound
    # while fixed costs still dominate at the largest measured size)
    power = dict(encode_s=1, features_s=1, score_s=2, select_s=2)
    last = pools[-1]
    estimates = [dict(n=n, **{s: round(last[s] * (n / last["n"]) ** power[s], 1) for s in stages})
                 for n in DEFAULT_POOLS if n > last["n"]]
    return dict(dtype=bank["dtype"], bank=bank, pools=pools, growth=growth, estimates=estimates)


def environment(args):
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), None)
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=git("rev-parse", "HEAD"), uncommitted=git("status", "--porcelain", "--", "bench/ood_scale.py", "ood.py", "darl.py", "model.py").splitlines(),
                python=platform.python_version(),
                versions={p: version(p) for p in ("torch", "numpy", "faiss-cpu", "scikit-learn")},
                cpu=cpu, cpu_count=os.cpu_count(), threads=args.threads)


def gb(mb):
    return f"{mb / 1024:.2f}"


def table_lines(res):
    """The markdown tables of a run (also what bench/readme_tables.py puts in the README)."""
    out = ["k-th nearest-neighbour distance: time and memory", "",
           "| bank rows | bank dtype | method | queries | build s | search s | peak GiB | extra GiB | max abs diff vs ours fp32 | tol | check |",
           "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["knn"]:
        search = f"{r['search_s']:.1f}"
        if "search_s_all_queries_est" in r:
            search += f" ({r['search_s_all_queries_est']:.0f} est. all {res['settings']['queries']})"
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "reference"
        tol = f"{r['tol']:.1e}" if "tol" in r else "-"
        check = ("ok" if r["ok"] else "FAIL") if "ok" in r else "-"
        out.append(f"| {r['bank']:,} | {r['dtype']} | {r['method']} | {r['queries']:,} | {r['build_s']:.1f} | {search} "
                   f"| {gb(r['peak_mb'])} | {gb(r['extra_mb'])} | {diff} | {tol} | {check} |")
    if "dasa" not in res:
        return out
    d, b = res["dasa"], res["dasa"]["bank"]
    out += ["", f"DASA stages on real rows (Gemma 3 270M, {d['dtype']}, CPU): seconds", "",
            "| pool rows | repeated rows | tokens | encode | features | coverage_score | dasa_select | peak GiB | extra GiB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| bank: {b['n']:,} id_train | {b['repeated']:,} | {b['tokens']:,} | {b['encode_s']:.1f} | {b['features_s']:.1f} "
            f"| - | - | {gb(b['peak_mb'])} | {gb(b['extra_mb'])} |"]
    for r in d["pools"]:
        out.append(f"| {r['n']:,} | {r['repeated']:,} | {r['tokens']:,} | {r['encode_s']:.2f} | {r['features_s']:.1f} "
                   f"| {r['score_s']:.2f} | {r['select_s']:.2f} | {gb(r['peak_mb'])} | {gb(r['extra_mb'])} |")
    for r in d["estimates"]:
        out.append(f"| {r['n']:,} (estimate) | - | - | {r['encode_s']:.1f} | {r['features_s']:.1f} | {r['score_s']:.1f} "
                   f"| {r['select_s']:.1f} | - | - |")
    for g in d["growth"]:
        out += ["", f"growth exponent p (time ~ n^p), {g['sizes'][0]:,} -> {g['sizes'][1]:,} rows: encode {g['encode_s']}, "
                    f"features {g['features_s']}, coverage_score {g['score_s']}, dasa_select {g['select_s']}"]
    return out


def sizes(text):
    return [int(x) for x in text.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--banks", type=sizes, default=[100_000, 1_000_000], help="k-NN bank rows (comma separated)")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--pools", type=sizes, default=list(DEFAULT_POOLS), help="DASA pool rows; empty: skip the part")
    ap.add_argument("--model", type=Path, default=ROOT / "data" / "gemma3_270m")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="model dtype for the DASA part")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP / BLAS threads in every worker")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement, JSON job
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(knn_worker(job) if job["task"] == "knn" else dasa_worker(job)))
        return
    args.pools.sort()
    if args.k > min(args.banks, default=args.k):
        ap.error(f"--k {args.k} is larger than the smallest bank")
    if args.pools:
        for p in (args.model, DATA):
            if not p.exists():
                sys.exit(f"{p} is missing: run its prepare.py first (or pass --pools '' to skip the DASA part)")
    settings = dict(banks=args.banks, queries=args.queries, dim=args.dim, k=args.k, pools=args.pools, dtype=args.dtype,
                    model=os.path.relpath(args.model, ROOT), sklearn_pairs=SKLEARN_PAIRS, tol_float32=TOL32, tol_float16=TOL16)
    res = dict(settings=settings, environment=environment(args))
    with tempfile.TemporaryDirectory() as tmp:
        res["knn"], failed = knn_part(args, tmp)
        if args.pools:
            res["dasa"] = dasa_part(args, tmp)
    out = ROOT / "bench" / "results" / "ood_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(table_lines(res)))
    print(f"\n{out}")
    if failed:
        sys.exit("a k-th distance check failed (see the table)")


if __name__ == "__main__":
    main()
