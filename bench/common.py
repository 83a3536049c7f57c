"""What every benchmark script shares: paths, JSON files written atomically, the git commit, the machine
(CPU model, bf16 units, measured matmul ceiling: timings mean little without it) and train.py runs."""
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rel(path):
    """A path relative to the repository when inside it, so settings compare across checkouts."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def append_jsonl(path, obj):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_commit():
    """HEAD, marked +uncommitted when tracked code differs from it; bench/results is left out, since a
    benchmark rewrites its own tables there while it runs and that says nothing about the code."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    return head + ("+uncommitted" if dirty else "")


def matmul_tflops(dtype, n=2048, reps=3):
    """Best of `reps` n x n x n torch.mm on this process's threads: the ceiling a timing is read against."""
    import torch
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def machine(threads=None):
    """CPU model, cores, bf16 matrix units and the measured fp32 / bf16 matmul ceiling (2048^3)."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    field = lambda name: next((line.split(":", 1)[1].strip() for line in info if line.startswith(name)), "")  # noqa: E731
    return dict(cpu=field("model name") or "unknown", cores=os.cpu_count(), threads=torch.get_num_threads(),
                bf16_units=[f for f in ("avx512_bf16", "amx_bf16") if f in field("flags").split()],
                matmul_tflops={d: round(matmul_tflops(getattr(torch, d)), 3) for d in ("float32", "bfloat16")},
                torch=torch.__version__, date=now())


def machine_line(m):
    """'AMD EPYC, 2 cores (2 threads), avx512_bf16, 2048^3 matmul 0.13 fp32 / 0.37 bf16 TFLOP/s'."""
    threads = f"{m['threads']} thread{'s' * (m['threads'] != 1)}"
    return (f"{m['cpu']}, {m['cores']} cores ({threads}), {'+'.join(m['bf16_units']) or 'no bf16 units'}, "
            f"2048^3 matmul {m['matmul_tflops']['float32']:.2f} fp32 / {m['matmul_tflops']['bfloat16']:.2f} bf16 TFLOP/s")


def run_train(args, log_prefix="    ", threads=None):
    """One `python train.py ARGS` from the repository root, its output streamed; (returncode, seconds, lines)."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    print("$ python train.py " + " ".join(args), flush=True)
    lines, t0 = [], time.time()
    with subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as p:
        for line in p.stdout:
            print(log_prefix + line, end="", flush=True)
            lines.append(line)
    return p.returncode, time.time() - t0, lines
