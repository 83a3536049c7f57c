"""The data schema, read and written in one place: every problem names file:line and field, and no row
is dropped silently.

A data folder holds meta.json (`grades`, optional `prompt` and `verbalizer`) and JSONL splits; a row is
{"id", "query", "item", "label"} (label optional in the pool; extra keys such as `group` and `domain` are
kept). Dev splits choose settings, test splits only report. DASA's annotation round trip (a file of
selected rows with empty labels out, the labelled copy back in) uses the same reader.
"""
import collections
import contextlib
import json
import os
import random

from darl import DEFAULT_PROMPT

SPLITS = ("id_train", "id_dev", "id_test", "pool", "ood_dev", "ood_test")
OPTIONAL = ("id_dev", "ood_dev")  # without id_dev, one is carved from id_train; without ood_dev, none
EVAL_SPLITS = ("id_dev", "ood_dev", "id_test", "ood_test")
DEV_SEED = 0  # the carved id_dev and the eval subsamples do not change with --seed: every run is scored on the same rows


class DataError(ValueError):
    """Bad input: the message names the file, the line and the field (or the argument)."""


def read_jsonl(path):
    """(where, object) for each non-blank line; `where` is 'path:line' for error messages."""
    if not os.path.exists(path):
        raise DataError(f"{path}: not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: bad JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: a row must be a JSON object")
            yield where, obj


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path`, moved onto it when the block ends without an error: readers (and
    a run resumed after a kill) never see half a file."""
    tmp = f"{path}.tmp"
    yield tmp
    os.replace(tmp, path)


def write_jsonl(path, rows):
    """One JSON object per line, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)


def check_label(where, label, n_grades):
    if type(label) is not int or not 0 <= label < n_grades:
        raise DataError(f"{where}: field 'label' is {label!r}, not a grade in 0..{n_grades - 1}")


def load_meta(data_dir):
    """meta.json with `grades` checked, and `prompt` / `verbalizer` filled in when absent."""
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
    meta.setdefault("prompt", DEFAULT_PROMPT)
    if not isinstance(meta["prompt"], str) or "{query}" not in meta["prompt"] or "{item}" not in meta["prompt"]:
        raise DataError(f"{path}: field 'prompt' must be a string with {{query}} and {{item}} slots")
    words = meta.setdefault("verbalizer", [str(i) for i in range(len(grades))])
    if not isinstance(words, list) or len(words) != len(grades) or not all(isinstance(w, str) for w in words):
        raise DataError(f"{path}: field 'verbalizer' must be {len(grades)} words, one per grade in 'grades'; got {words!r}")
    return meta


def check_row(where, row, n_grades, need_label=True, need_id=True):
    """One row of the schema: query and item non-empty strings, label a grade (when needed or present), id."""
    if "id" not in row:
        if need_id:
            raise DataError(f"{where}: missing field 'id'")
        row["id"] = int(where.rsplit(":", 1)[1])  # the line number
    for key in ("query", "item"):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}'")
        if not isinstance(row[key], str) or not row[key].strip():
            raise DataError(f"{where}: field '{key}' is empty or not a string")
    if row.get("label") is None and need_label:
        raise DataError(f"{where}: missing field 'label'")
    if row.get("label") is not None:
        check_label(where, row["label"], n_grades)
    return row


def load_rows(path, n_grades, need_label=True, need_id=True):
    """One JSONL split, checked row by row; repeated ids and an empty split are errors."""
    rows, seen = [], {}
    for where, row in read_jsonl(path):
        check_row(where, row, n_grades, need_label, need_id)
        if row["id"] in seen:
            raise DataError(f"{where}: field 'id' {row['id']!r} repeats line {seen[row['id']]}")
        seen[row["id"]] = where.rsplit(":", 1)[1]
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def subsample(rows, n, seed):
    """A seeded subset of n rows in file order (--limit, --eval_limit)."""
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


def load_splits(data_dir, n_grades, out_dir, log):
    """Every split in the folder; a missing required one names the file; id_dev carved when absent
    (logged, and written to out_dir/id_dev.jsonl when out_dir is given, so the run can be reproduced)."""
    data = {}
    for split in SPLITS:
        path = os.path.join(data_dir, f"{split}.jsonl")
        if split in OPTIONAL and not os.path.exists(path):
            continue
        if not os.path.exists(path):
            raise DataError(f"{path}: not found (a data folder holds "
                            f"{', '.join(s for s in SPLITS if s not in OPTIONAL)}; {', '.join(OPTIONAL)} are optional)")
        data[split] = load_rows(path, n_grades, need_label=split != "pool")
    if "id_dev" not in data:
        data["id_train"], data["id_dev"] = carve_dev(data["id_train"], DEV_SEED)
        log(f"no id_dev.jsonl in {data_dir}: carved {len(data['id_dev']):,} id_train rows (whole queries, "
            f"seed {DEV_SEED}) as id_dev" + (f", written to {out_dir}/id_dev.jsonl" if out_dir else ""))
        if out_dir:
            write_jsonl(os.path.join(out_dir, "id_dev.jsonl"), data["id_dev"])
    return data


def write_annotation_file(path, rows, scores):
    """One JSON line per selected row for annotators: id, query, item, score, and the label (None to fill in)."""
    write_jsonl(path, [dict(id=row["id"], query=row["query"], item=row["item"], score=float(score),
                            label=row.get("label")) for row, score in zip(rows, scores, strict=True)])


def read_annotations(path, ids, n_grades):
    """{id: label} from a labelled annotation file: every id in `ids` exactly once, labels grades."""
    wanted, labels = set(ids), {}
    for where, rec in read_jsonl(path):
        if "id" not in rec:
            raise DataError(f"{where}: missing field 'id'")
        i = rec["id"]
        if i not in wanted:
            raise DataError(f"{where}: field 'id': unknown id {i!r}")
        if i in labels:
            raise DataError(f"{where}: field 'id': id {i!r} appears twice")
        check_label(where, rec.get("label"), n_grades)
        labels[i] = rec["label"]
    if missing := [i for i in ids if i not in labels]:
        raise DataError(f"{path}: field 'id': {len(missing)} selected ids have no line, e.g. {missing[:5]}")
    return labels
