"""
Build the benchmark qbqtc2kuake: relevance judged on Chinese web search (QBQTC), deployed on a pool
that secretly mixes in Chinese medical search (KUAKE-QTR). Writes into --out (default: this folder)
meta.json + id_train, id_dev, id_test, pool, ood_dev, ood_test .jsonl (schema: README, "Data schema").

    python data/qbqtc2kuake/prepare.py --src ../shared/data    # local copies of the upstream files
    python data/qbqtc2kuake/prepare.py                         # downloads them (needs internet)

Recipe (seed 0 everywhere, so the output is byte-identical on every run):
- QBQTC dev.json (20,000 rows) minus rows whose (query, title) pair is also in a test split
  (QBQTC's published dev and test_public share 1,153 rows after deduplication) or whose query is
  in ood_test, split BY QUERY: 4,500 rows -> pool (domain "web"), 1,000 rows -> id_dev (queries not in
  id_test either), the rest -> id_train. Splitting by query keeps the pool's web part new to the model
  in the same way the medical part is. Queries (not pairs) shared with test_public stay in id_train:
  id_test is meant to be in distribution.
- id_test = QBQTC test_public.json. ood_test = KUAKE-QTR dev.json.
- pool = the 4,500 web rows + 1,500 rows drawn from KUAKE-QTR train rows whose query is not in
  ood_test (domain "medical"): a 3:1 mix in which the shift must be found; OOD test queries are never
  annotated. The pool is shuffled so that any prefix of it holds both domains.
- ood_dev = 1,000 KUAKE-QTR train rows not in the pool, whole queries that are in neither the pool nor
  ood_test. The dev splits choose every setting (id_dev: ID quality, ood_dev: OOD quality); the test
  splits only report. Each dev split shares no query with any other split (asserted below).
- QBQTC's previous release (ranking-style, 791 queries) is left out entirely.
Grades: QBQTC as published (0 poor, 1 some, 2 very relevant). KUAKE's four levels
(0 irrelevant, 1 low relevance, 2 partial match, 3 full match) map 0->0, 1->1, 2->1, 3->2 so that one
3-way head covers both domains: only a full match is "strong"; a partial match answers part of the
query, like QBQTC's "some relevance", so it is the weak grade. Labels stay in the pool (oracle).
Cleaning, per upstream file, every drop counted in stdout and meta.json: surrounding whitespace is
stripped (380 KUAKE train titles start with a scraping-artefact space); rows with an empty query or
title are dropped; of exact duplicate (query, title) pairs the first is kept, and a pair published
with different labels is dropped altogether (no label is trustworthy). ids keep the upstream id,
prefixed by source ("qbqtc-dev-123", "kuake-train-s1") so they are unique across splits.
Every upstream file read must have the sha256 pinned in SOURCES (refused otherwise, before anything is
written); meta.json records them (the counts above hold for those bytes).
"""
import argparse
import hashlib
import json
import os
import random
import urllib.request
from collections import Counter, defaultdict

QBQTC = ("CLUEbenchmark/QBQTC", "37a90b8923ae3b23e55e16ed1e2a6389574d8837")
CBLUE = ("Sherlock-coder/CBLUE", "8f879e3624b06a184288a8770113da5fddcb61ff")
SOURCES = {  # local name -> (repo, commit, upstream path, sha256 of the file at that commit)
    "qbqtc/dev.json": (*QBQTC, "dataset/dev.json", "8f1bbc0d0aa1cefd9cfd5424d8e3060af81d8adfa15d2b0c6931417831f4e51b"),
    "qbqtc/test_public.json": (*QBQTC, "dataset/test_public.json",
                               "e42ffc317c746210accdadd7c40fc391e64c6a517cd5b9c035009076fd54435a"),
    "kuake_qtr/KUAKE-QTR_train.json": (*CBLUE, "data/KUAKE-QTR/KUAKE-QTR_train.json",
                                       "e6e7a9f0bd9d01a75eb90904c99ceb4bfed4dec1199632494f26e03ad96225fd"),
    "kuake_qtr/KUAKE-QTR_dev.json": (*CBLUE, "data/KUAKE-QTR/KUAKE-QTR_dev.json",
                                     "c698b3a00bbe7ef1e7e5b88c7370c55d6744e57dfbbcd5f705bd458e8f6efba9"),
}
GRADES = ["irrelevant", "weak", "strong"]
LABEL_MAPS = {"qbqtc": {0: 0, 1: 1, 2: 2}, "kuake": {0: 0, 1: 1, 2: 1, 3: 2}}
# Chinese like the data; the answer is one digit (one token in common tokenizers) right after the cue.
# Short on purpose: template tokens are paid on every row of every pass. A one-sentence instruction
# (37 Gemma tokens) made the template 60% of an average row (60 tokens); this one leaves rows at 38.
PROMPT = "搜索词：{query}\n标题：{item}\n相关度（0-2）："
POOL_WEB, POOL_MEDICAL, DEV, SEED = 4500, 1500, 1000, 0

parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
parser.add_argument("--src", help="folder holding qbqtc/*.json and kuake_qtr/*.json (default: download)")
parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)


def url(name):
    repo, commit, path, _ = SOURCES[name]
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


def write(path, data):
    """Atomic: readers never see a half-written file."""
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def fetch(name):
    """Bytes of one upstream file: from --src, else downloaded once into <out>/upstream/. Either way
    its sha256 must be the pinned one: the recipe's counts and splits hold for those bytes only."""
    path = os.path.join(args.src or os.path.join(args.out, "upstream"), name)
    if os.path.exists(path):
        data = open(path, "rb").read()
    elif args.src:
        raise SystemExit(f"{path}: missing (--src must hold {', '.join(SOURCES)})")
    else:
        try:
            data = urllib.request.urlopen(url(name), timeout=60).read()
        except OSError as e:
            raise SystemExit(f"download failed: {url(name)}: {e}\n"
                             f"fetch the files yourself and pass --src DIR (laid out as {', '.join(SOURCES)})")
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCES[name][3]:
        raise SystemExit(f"{path if os.path.exists(path) else url(name)}: sha256 {digest}, expected {SOURCES[name][3]} "
                         "(the file at the pinned commit); nothing was written")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(path, data)
    sha256[name] = digest
    return data


def load(name, prefix, label_map, dropped):
    """Upstream rows -> cleaned {id, query, item, label} in upstream order; drops counted by reason."""
    text = fetch(name).decode("utf-8")
    if name.startswith("qbqtc/"):  # JSON lines
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {line_no}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{name}: line {line_no}: not JSON ({e})")
    else:  # one JSON array
        records = [(f"row {i}", r) for i, r in enumerate(json.loads(text))]
    raw_rows[name] = len(records)
    rows = []
    for where, r in records:
        for field in ("id", "query", "title", "label"):
            if not isinstance(r.get(field), (str, int)):
                raise SystemExit(f"{name}: {where}: field {field!r} missing or not a string/int")
        if str(r["label"]) not in {str(k) for k in label_map}:
            raise SystemExit(f"{name}: {where}: field 'label' is {r['label']!r}, expected one of {list(label_map)}")
        rows.append({"id": f"{prefix}-{r['id']}", "query": r["query"].strip(), "item": r["title"].strip(),
                     "label": label_map[int(r["label"])]})
    n = len(rows)
    rows = [r for r in rows if r["query"] and r["item"]]
    dropped["empty query or title"] = n - len(rows)
    labels = defaultdict(set)
    for r in rows:
        labels[r["query"], r["item"]].add(r["label"])
    n = len(rows)
    rows = [r for r in rows if len(labels[r["query"], r["item"]]) == 1]
    dropped["pair published with conflicting labels (all copies)"] = n - len(rows)
    seen, kept = set(), []
    for r in rows:
        if (r["query"], r["item"]) not in seen:
            seen.add((r["query"], r["item"]))
            kept.append(r)
    dropped["duplicate pair (first kept)"] = len(rows) - len(kept)
    return kept


dropped, raw_rows, sha256 = {name: {} for name in SOURCES}, {}, {}
web = load("qbqtc/dev.json", "qbqtc-dev", LABEL_MAPS["qbqtc"], dropped["qbqtc/dev.json"])
id_test = load("qbqtc/test_public.json", "qbqtc-test", LABEL_MAPS["qbqtc"], dropped["qbqtc/test_public.json"])
medical = load("kuake_qtr/KUAKE-QTR_train.json", "kuake-train", LABEL_MAPS["kuake"],
               dropped["kuake_qtr/KUAKE-QTR_train.json"])
ood_test = load("kuake_qtr/KUAKE-QTR_dev.json", "kuake-dev", LABEL_MAPS["kuake"], dropped["kuake_qtr/KUAKE-QTR_dev.json"])
for r in web + id_test:
    r["domain"] = "web"
for r in medical + ood_test:
    r["domain"] = "medical"

# QBQTC dev minus anything a test split holds, split by query into pool (web) and id_train.
test_pairs = {(r["query"], r["item"]) for r in id_test + ood_test}
ood_queries = {r["query"] for r in ood_test}
n = len(web)
web = [r for r in web if (r["query"], r["item"]) not in test_pairs]
dropped["qbqtc/dev.json"]["pair also in id_test or ood_test"] = n - len(web)
n = len(web)
web = [r for r in web if r["query"] not in ood_queries]
dropped["qbqtc/dev.json"]["query in ood_test"] = n - len(web)


def whole_queries(rows, n, seed, exclude=()):
    """Queries of `rows`, in a seeded order, taken whole until exactly n rows (queries in `exclude`
    are never taken). Exact because most queries have one or a few rows."""
    queries = sorted({r["query"] for r in rows} - set(exclude))
    random.Random(seed).shuffle(queries)
    size, taken, count = Counter(r["query"] for r in rows), set(), 0
    for q in queries:
        if count + size[q] <= n:
            taken.add(q)
            count += size[q]
    assert count == n, (count, n)
    return taken


pool_queries = whole_queries(web, POOL_WEB, SEED)
id_dev_queries = whole_queries([r for r in web if r["query"] not in pool_queries], DEV, SEED,
                               exclude={r["query"] for r in id_test})  # no query shared with id_test
id_train = [r for r in web if r["query"] not in pool_queries | id_dev_queries]
id_dev = [r for r in web if r["query"] in id_dev_queries]
pool_web = [r for r in web if r["query"] in pool_queries]

# KUAKE train rows whose query is not an OOD test query; POOL_MEDICAL of them drawn at random.
n = len(medical)
medical = [r for r in medical if r["query"] not in ood_queries]
dropped["kuake_qtr/KUAKE-QTR_train.json"]["query in ood_test"] = n - len(medical)
drawn = sorted(random.Random(SEED).sample(range(len(medical)), POOL_MEDICAL))
pool_medical = [medical[i] for i in drawn]
pool = pool_web + pool_medical
random.Random(SEED).shuffle(pool)

# ood_dev: KUAKE train rows never drawn into the pool, whole queries that are in neither the pool nor ood_test.
pool_medical_queries = {r["query"] for r in pool_medical}
rest = [r for r in medical if r["query"] not in pool_medical_queries]
ood_dev_queries = whole_queries(rest, DEV, SEED)
ood_dev = [r for r in rest if r["query"] in ood_dev_queries]
dropped["kuake_qtr/KUAKE-QTR_train.json"]["in neither the pool nor ood_dev"] = len(medical) - POOL_MEDICAL - DEV

splits = {"id_train": id_train, "id_dev": id_dev, "id_test": id_test, "pool": pool, "ood_dev": ood_dev,
          "ood_test": ood_test}
ids = [r["id"] for rows in splits.values() for r in rows]
assert len(ids) == len(set(ids)), "ids are not unique across splits"
seen_pairs = {(r["query"], r["item"]) for r in id_train + id_dev + pool + ood_dev}
assert len(seen_pairs) == len(id_train) + len(id_dev) + len(pool) + len(ood_dev) and not seen_pairs & test_pairs
for dev in ("id_dev", "ood_dev"):  # dev splits share no query with any other split
    other = {r["query"] for split, rows in splits.items() if split != dev for r in rows}
    assert not other & {r["query"] for r in splits[dev]}, dev
for rows in splits.values():
    for r in rows:
        r["group"] = r["query"]  # the unit for per-query caps in selection and for NDCG
        r.update({k: r.pop(k) for k in ("id", "query", "item", "label", "group", "domain")})  # key order

for split, rows in splits.items():
    write(os.path.join(args.out, f"{split}.jsonl"),
          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
counts = {split: len(rows) for split, rows in splits.items()}
label_counts = {split: [sum(r["label"] == g for r in rows) for g in range(len(GRADES))] for split, rows in splits.items()}
meta = {
    "name": "qbqtc2kuake",
    "description": "train on Chinese web search relevance (QBQTC), deploy on a pool mixing in medical "
                   "search (KUAKE-QTR), 3 web : 1 medical; ood_test is KUAKE-QTR dev. Recipe: data/qbqtc2kuake/prepare.py",
    "grades": GRADES,
    "prompt": PROMPT,
    "label_maps": {
        "qbqtc": {"map": LABEL_MAPS["qbqtc"], "upstream": ["poor relevance", "some relevance", "very relevant"],
                  "why": "as published"},
        "kuake": {"map": LABEL_MAPS["kuake"], "upstream": ["irrelevant", "low relevance", "partial match", "full match"],
                  "why": "4 levels collapse onto QBQTC's 3 so one 3-way head covers both domains: only a full "
                         "match is strong; a partial match, like QBQTC's 'some relevance', is the weak grade"},
    },
    "sources": [{"file": name, "repo": repo, "commit": commit, "path": path, "url": url(name),
                 "sha256": sha256[name], "rows": raw_rows[name]} for name, (repo, commit, path, _) in SOURCES.items()],
    "seed": SEED,
    "counts": counts,
    "pool_domains": dict(Counter(r["domain"] for r in pool)),
    "label_counts": label_counts,
    "dropped": dropped,
}
write(os.path.join(args.out, "meta.json"), (json.dumps(meta, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))

for name, reasons in dropped.items():
    for reason, n in reasons.items():
        print(f"dropped {n:6d}  {name}: {reason}")
print(f"{'split':10s} {'rows':>6s}  " + " ".join(f"{g:>10s}" for g in GRADES))
for split in splits:
    print(f"{split:10s} {counts[split]:6d}  " + " ".join(f"{c:10d}" for c in label_counts[split]))
print(f"pool domains: {meta['pool_domains']}")
print(os.path.abspath(args.out))
