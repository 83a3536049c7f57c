"""Tests for data/qbqtc2kuake/prepare.py, run as a subprocess on the real upstream files in
../shared/data (missing folder -> failure, not a skip: the benchmark cannot be checked without it)."""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data" / "qbqtc2kuake" / "prepare.py"
SRC = SHARED_DATA
SPLITS = ("id_train", "id_dev", "id_test", "pool", "ood_dev", "ood_test")
FILES = ("meta.json",) + tuple(f"{s}.jsonl" for s in SPLITS)


def prepare(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def upstream():
    """Prefixed id -> (source, raw upstream row), read independently of prepare.py."""
    rows = {}
    for name, prefix in [("qbqtc/dev.json", "qbqtc-dev"), ("qbqtc/test_public.json", "qbqtc-test"),
                         ("kuake_qtr/KUAKE-QTR_train.json", "kuake-train"), ("kuake_qtr/KUAKE-QTR_dev.json", "kuake-dev")]:
        text = (SRC / name).read_text(encoding="utf-8")
        records = json.loads(text) if name.startswith("kuake") else [json.loads(l) for l in text.splitlines()]
        rows.update({f"{prefix}-{r['id']}": (prefix.split("-")[0], r) for r in records})
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    assert SRC.is_dir(), f"{SRC} is missing: the upstream QBQTC / KUAKE-QTR files are needed (see its README)"
    outs = []
    for run in range(2):
        out = tmp_path_factory.mktemp(f"run{run}")
        p = prepare("--src", SRC, "--out", out)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip().splitlines()[-1] == str(out)  # last line = output directory
        outs.append(out)
    out = outs[0]
    splits = {s: [json.loads(l) for l in (out / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()] for s in SPLITS}
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    return outs, splits, meta


def test_deterministic(built):
    (a, b), _, _ = built
    for f in FILES:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert not list(a.glob("*.tmp"))


def test_counts_and_accounting(built):
    _, splits, meta = built
    n = {s: len(rows) for s, rows in splits.items()}
    assert meta["counts"] == n
    domains = Counter(r["domain"] for r in splits["pool"])
    assert domains == {"web": 4500, "medical": 1500} == meta["pool_domains"]
    assert 13_000 <= n["id_train"] <= 13_600 and n["id_dev"] == n["ood_dev"] == 1000
    raw = {s["file"]: s["rows"] for s in meta["sources"]}
    assert raw == {"qbqtc/dev.json": 20000, "qbqtc/test_public.json": 5000,
                   "kuake_qtr/KUAKE-QTR_train.json": 24174, "kuake_qtr/KUAKE-QTR_dev.json": 2913}
    gone = {f: sum(reasons.values()) for f, reasons in meta["dropped"].items()}
    # every upstream row is either in a split or counted under a reason
    assert n["id_train"] + n["id_dev"] + domains["web"] + gone["qbqtc/dev.json"] == 20000
    assert n["id_test"] + gone["qbqtc/test_public.json"] == 5000
    assert domains["medical"] + n["ood_dev"] + gone["kuake_qtr/KUAKE-QTR_train.json"] == 24174
    assert n["ood_test"] + gone["kuake_qtr/KUAKE-QTR_dev.json"] == 2913
    assert 1100 <= meta["dropped"]["qbqtc/dev.json"]["pair also in id_test or ood_test"] <= 1200
    assert n["id_test"] >= 4980 and n["ood_test"] >= 2900


def test_no_leaks(built):
    _, s, _ = built
    pairs = {k: {(r["query"], r["item"]) for r in rows} for k, rows in s.items()}
    queries = {k: {r["query"] for r in rows} for k, rows in s.items()}
    for k, rows in s.items():  # within a split: no duplicate pair, no empty text
        assert len(pairs[k]) == len(rows), k
        assert all(r["query"] and r["item"] and r["query"] == r["query"].strip() for r in rows), k
    for seen in ("id_train", "id_dev", "pool", "ood_dev"):
        assert not pairs[seen] & pairs["id_test"] and not pairs[seen] & pairs["ood_test"], seen
        assert not queries[seen] & queries["ood_test"], seen  # OOD test queries are never annotated
    web = {r["query"] for r in s["pool"] if r["domain"] == "web"}
    assert web and not queries["id_train"] & web  # split by query
    assert all(r["group"] == r["query"] for rows in s.values() for r in rows)
    assert {r["domain"] for r in s["id_train"] + s["id_dev"] + s["id_test"]} == {"web"}
    assert {r["domain"] for r in s["ood_dev"] + s["ood_test"]} == {"medical"}


def test_dev_splits_share_no_query_with_any_other_split(built):
    """Catches a dev split carved by row instead of by query (the same query in dev and train or test
    would make dev scores optimistic and the choices they make biased)."""
    _, s, _ = built
    queries = {k: {r["query"] for r in rows} for k, rows in s.items()}
    for dev in ("id_dev", "ood_dev"):
        for other in set(s) - {dev}:
            assert not queries[dev] & queries[other], (dev, other)


def test_ids_labels_and_mapping(built):
    _, s, _ = built
    ids = [r["id"] for rows in s.values() for r in rows]
    assert len(ids) == len(set(ids))
    for rows in s.values():
        assert all(list(r) == ["id", "query", "item", "label", "group", "domain"] for r in rows)
        assert all(type(r["label"]) is int for r in rows)
        assert Counter(r["label"] for r in rows).keys() == {0, 1, 2}
    raw, seen_kuake = upstream(), Counter()
    for r in (r for rows in s.values() for r in rows):
        source, up = raw[r["id"]]
        if source == "kuake":
            assert r["label"] == {"0": 0, "1": 1, "2": 1, "3": 2}[up["label"]], r["id"]
            seen_kuake[up["label"]] += 1
        else:
            assert r["label"] == int(up["label"]), r["id"]
        assert (r["query"], r["item"]) == (up["query"].strip(), up["title"].strip()), r["id"]
    assert seen_kuake.keys() == {"0", "1", "2", "3"}  # every KUAKE level was compared


def test_meta(built):
    _, _, meta = built
    assert meta["grades"] == ["irrelevant", "weak", "strong"]
    prompt = meta["prompt"]
    assert prompt.count("{query}") == 1 and prompt.count("{item}") == 1
    assert prompt.index("{query}") < prompt.index("{item}")
    tail = prompt.split("{item}")[1]
    assert tail and "{" not in tail and tail == tail.rstrip()  # answer position right after the template
    assert "0" in prompt and "2" in prompt  # the answer is a grade digit
    assert prompt.format(query="q", item="t").endswith(tail)
    assert meta["label_maps"]["kuake"]["map"] == {"0": 0, "1": 1, "2": 1, "3": 2}
    for src in meta["sources"]:
        assert len(src["commit"]) == 40 and src["url"].startswith("https://raw.githubusercontent.com/")
        assert src["commit"] in src["url"] and len(src["sha256"]) == 64
    assert all(type(v) is int for reasons in meta["dropped"].values() for v in reasons.values())


def test_edited_upstream_file_is_refused_by_sha256(tmp_path):
    """Catches prepare.py building the benchmark from bytes other than the pinned upstream file (a
    different release or an edited copy would silently change every split and count)."""
    src = tmp_path / "src"
    shutil.copytree(SRC, src)
    dev = src / "qbqtc" / "dev.json"
    dev.chmod(0o644)
    lines = dev.read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[6])
    row["label"] = "0" if row["label"] != "0" else "1"
    lines[6] = json.dumps(row, ensure_ascii=False)
    dev.write_text("\n".join(lines) + "\n", encoding="utf-8")
    p = prepare("--src", src, "--out", tmp_path / "out")
    assert p.returncode != 0
    assert f"{dev}: sha256" in p.stderr and "expected 8f1bbc0d" in p.stderr, p.stderr
    assert not (tmp_path / "out" / "meta.json").exists() and not list((tmp_path / "out").glob("*.jsonl"))


def test_download_failure_names_url_and_src(tmp_path):
    env = dict(os.environ, HTTPS_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")  # refused at once
    p = prepare("--out", tmp_path, env=env)
    assert p.returncode != 0
    assert "https://raw.githubusercontent.com/CLUEbenchmark/QBQTC/" in p.stderr and "--src" in p.stderr, p.stderr
