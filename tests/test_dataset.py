"""dataset.py: the data schema, its errors (file:line:field), dev carving and the annotation round trip."""
import json

import pytest

import dataset


def write_split(d, rows, name="id_train.jsonl"):
    (d / name).write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return str(d / name)


@pytest.mark.parametrize("line, message", [
    ('{"id": 1, "query": "q", "item": "t", "label": 0', "bad JSON"),
    ('{"id": 1, "item": "t", "label": 0}', "missing field 'query'"),
    ('{"id": 1, "query": "q", "item": "t"}', "missing field 'label'"),
    ('{"id": 1, "query": "q", "item": "t", "label": 3}', "field 'label' is 3"),
    ('{"id": 1, "query": "q", "item": "t", "label": "1"}', "field 'label' is '1'"),
    ('{"id": 1, "query": " ", "item": "t", "label": 0}', "field 'query' is empty"),
    ('{"query": "q", "item": "t", "label": 0}', "missing field 'id'"),
    ('{"id": 0, "query": "q", "item": "t", "label": 0}', "field 'id' 0 repeats line 1"),
])
def test_bad_input_names_file_line_and_field(tmp_path, line, message):
    path = write_split(tmp_path, ['{"id": 0, "query": "q0", "item": "t0", "label": 1}', line])
    with pytest.raises(dataset.DataError) as e:
        dataset.load_rows(path, n_grades=3)
    assert f"{path}:2: {message}" in str(e.value)


def test_pool_rows_need_an_id_but_no_label(tmp_path):
    path = write_split(tmp_path, ['{"id": "a", "query": "q", "item": "t"}'], "pool.jsonl")
    assert dataset.load_rows(path, 3, need_label=False)[0]["id"] == "a"
    path = write_split(tmp_path, ['{"query": "q", "item": "t"}'], "pool.jsonl")
    with pytest.raises(dataset.DataError, match=r"pool.jsonl:1: missing field 'id'"):
        dataset.load_rows(path, 3, need_label=False)


def test_bad_meta(tmp_path):
    (tmp_path / "meta.json").write_text('{"grades": ["only"]}')
    with pytest.raises(dataset.DataError, match="meta.json: field 'grades'"):
        dataset.load_meta(str(tmp_path))
    (tmp_path / "meta.json").write_text('{"grades": ["a", "b"], "prompt": "no slots"}')
    with pytest.raises(dataset.DataError, match="meta.json: field 'prompt'"):
        dataset.load_meta(str(tmp_path))


def test_subsample_is_seeded_and_keeps_file_order():
    rows = list(range(100))
    a, b = dataset.subsample(rows, 10, 0), dataset.subsample(rows, 10, 0)
    assert a == b == sorted(a) and len(set(a)) == 10 and dataset.subsample(rows, 10, 1) != a
    assert dataset.subsample(rows, None, 0) is rows


# ---------------------------------------------------------------- annotation round trip

def _rows(n=4):
    return [dict(id=f"p{i}", query=f"查询{i}", item=f"标题{i}") for i in range(n)]


def test_annotation_round_trip(tmp_path):
    rows, path = _rows(), tmp_path / "to_label.jsonl"
    dataset.write_annotation_file(path, rows, [0.5, 2.0, 1.0, 3.0])
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert lines[1] == dict(id="p1", query="查询1", item="标题1", score=2.0, label=None)
    assert "查询" in path.read_text(encoding="utf-8")  # readable for annotators, not \\u escapes
    for i, rec in enumerate(lines):
        rec["label"] = i % 3
    done = tmp_path / "labelled.jsonl"
    done.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines[::-1]) + "\n", encoding="utf-8")
    assert dataset.read_annotations(done, [r["id"] for r in rows], 3) == {r["id"]: i % 3 for i, r in enumerate(rows)}


@pytest.mark.parametrize("line,match", [
    ('{"id": "p1", "label": 1', r"labelled\.jsonl:2: bad JSON"),
    ('{"query": "x", "label": 1}', r"labelled\.jsonl:2: missing field 'id'"),
    ('{"id": "zz", "label": 1}', r"labelled\.jsonl:2: field 'id': unknown id 'zz'"),
    ('{"id": "p0", "label": 1}', r"labelled\.jsonl:2: field 'id': id 'p0' appears twice"),
    ('{"id": "p1", "label": 3}', r"labelled\.jsonl:2: field 'label' is 3, not a grade in 0\.\.2"),
    ('{"id": "p1", "label": null}', r"labelled\.jsonl:2: field 'label' is None"),
    ('{"id": "p1", "label": "1"}', r"labelled\.jsonl:2: field 'label' is '1'"),
    ('{"id": "p1", "label": true}', r"labelled\.jsonl:2: field 'label' is True"),
])
def test_annotation_errors_name_file_line_field(tmp_path, line, match):
    path = tmp_path / "labelled.jsonl"
    path.write_text('{"id": "p0", "label": 0}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        dataset.read_annotations(path, ["p0", "p1"], 3)


def test_annotation_missing_id_is_named(tmp_path):
    path = tmp_path / "labelled.jsonl"
    path.write_text('{"id": "p0", "label": 0}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"labelled\.jsonl: field 'id': 1 selected ids have no line, e\.g\. \['p1'\]"):
        dataset.read_annotations(path, ["p0", "p1"], 3)


# ---------------------------------------------------------------- meta, empty splits, row ids

def test_meta_verbalizer_must_match_the_grades(tmp_path):
    """A verbalizer with fewer (or more) words than grades is refused, naming meta.json and the field. Catches
    zip() silently dropping a grade (a 3-grade benchmark trained as 2 grades) and a default verbalizer that
    ignores the number of grades."""
    (tmp_path / "meta.json").write_text('{"grades": ["a", "b", "c"], "verbalizer": ["0", "1"]}')
    with pytest.raises(dataset.DataError) as e:
        dataset.load_meta(str(tmp_path))
    assert str(tmp_path / "meta.json") in str(e.value) and "'verbalizer'" in str(e.value)
    (tmp_path / "meta.json").write_text('{"grades": ["a", "b", "c"], "verbalizer": ["0", "1", "2", "3"]}')
    with pytest.raises(dataset.DataError, match="meta.json: field 'verbalizer'"):
        dataset.load_meta(str(tmp_path))
    (tmp_path / "meta.json").write_text('{"grades": ["a", "b", "c", "d"]}')
    meta = dataset.load_meta(str(tmp_path))
    assert meta["verbalizer"] == ["0", "1", "2", "3"] and meta["prompt"] == dataset.DEFAULT_PROMPT


def test_empty_split_is_refused_naming_the_file(tmp_path):
    """A split with no rows (empty, or blank lines only) stops the run naming the file. Catches training or
    scoring on nothing (a NaN metric, or a crash far from the cause)."""
    for text in ("", "\n  \n\n"):
        path = tmp_path / "ood_test.jsonl"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(dataset.DataError, match=f"{path}: no rows"):
            dataset.load_rows(str(path), 3)


def test_missing_id_is_the_line_number_when_allowed(tmp_path):
    """need_id=False (scoring new pairs): a row without an id gets its file line number (blank lines counted).
    Catches an id off by one, and ids counted over non-blank rows only."""
    path = write_split(tmp_path, ['{"query": "q", "item": "t"}', "", '{"query": "q2", "item": "t2"}'], "pairs.jsonl")
    rows = dataset.load_rows(path, 3, need_label=False, need_id=False)
    assert [r["id"] for r in rows] == [1, 3]


# ---------------------------------------------------------------- carve_dev and load_splits

def _grouped_rows(n_queries=60, seed=0):
    import random
    rng = random.Random(seed)
    rows = []
    for q in range(n_queries):
        for j in range(rng.randint(1, 9)):
            rows.append(dict(id=f"{q}-{j}", query=f"query {q}", item=f"item {j}", label=rng.randint(0, 2)))
    return rows


@pytest.mark.parametrize("share,cap", [(0.1, 1000), (0.3, 40), (0.5, 1000), (0.02, 5)])
def test_carve_dev_is_deterministic_query_disjoint_and_bounded(share, cap):
    """carve_dev: the same split for the same seed (another seed, another split), no query on both sides, every
    row kept exactly once in input order, dev size <= min(cap, share x rows) and close to it (no group that
    would still fit is left out). Catches carving by row (a query on both sides: optimistic dev scores), an
    unseeded shuffle, the cap or share ignored, and a greedy loop that stops at the first group that does not fit."""
    rows = _grouped_rows()
    train, dev = dataset.carve_dev(rows, seed=0, share=share, cap=cap)
    again = dataset.carve_dev(rows, seed=0, share=share, cap=cap)
    assert (train, dev) == again and dataset.carve_dev(rows, seed=1, share=share, cap=cap)[1] != dev
    assert not {r["query"] for r in train} & {r["query"] for r in dev}
    assert sorted(r["id"] for r in train + dev) == sorted(r["id"] for r in rows)
    order = {r["id"]: i for i, r in enumerate(rows)}
    assert [order[r["id"]] for r in train] == sorted(order[r["id"]] for r in train)
    want = min(cap, int(share * len(rows)))
    assert 0 < len(dev) <= want
    sizes = {q: sum(r["query"] == q for r in rows) for q in {r["query"] for r in train}}
    assert min(sizes.values()) > want - len(dev), "a train query would still have fit into dev"


def test_carve_dev_groups_by_the_group_field_over_the_query():
    """Rows with a `group` (e.g. a normalised query) are carved by it, not by the raw query string. Catches a
    group whose spellings land on both sides."""
    rows = [dict(id=i, query=f"Query {i}" if i % 2 else f"query {i - 1}", item="t", label=0, group=f"g{i // 2}")
            for i in range(200)]
    train, dev = dataset.carve_dev(rows, seed=0, share=0.2)
    assert len(dev) == 40 and not {r["group"] for r in train} & {r["group"] for r in dev}


def _data_dir(d, with_dev=False):
    line = '{{"id": "{s}{i}", "query": "q{q}", "item": "t{i}", "label": {l}}}'
    for split in ("id_train", "id_test", "pool", "ood_test") + (("id_dev",) if with_dev else ()):
        text = "\n".join(line.format(s=split, i=i, q=i // 3, l=i % 3) for i in range(60))
        (d / f"{split}.jsonl").write_text(text + "\n")


def test_load_splits_carves_id_dev_only_when_absent_and_writes_it(tmp_path):
    """Without id_dev.jsonl, id_dev is carved from id_train (logged, and written to out_dir for reruns);
    with one, it is read and id_train is left whole; a missing required split names its file. Catches carving
    over a given id_dev, a carved dev not written (the run cannot be reproduced), and a bare KeyError."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    _data_dir(data)
    logs = []
    splits = dataset.load_splits(str(data), 3, str(out), logs.append)
    assert set(splits) == {"id_train", "id_dev", "id_test", "pool", "ood_test"}
    assert len(splits["id_train"]) + len(splits["id_dev"]) == 60 and 0 < len(splits["id_dev"]) <= 6
    written = [json.loads(x)["id"] for x in (out / "id_dev.jsonl").read_text().splitlines()]
    assert written == [r["id"] for r in splits["id_dev"]]
    assert any("carved" in m for m in logs)
    _data_dir(data, with_dev=True)
    splits = dataset.load_splits(str(data), 3, None, logs.append)
    assert len(splits["id_train"]) == 60 and splits["id_dev"][0]["id"] == "id_dev0"
    (data / "pool.jsonl").unlink()
    with pytest.raises(dataset.DataError, match=f"{data / 'pool.jsonl'}: not found"):
        dataset.load_splits(str(data), 3, None, logs.append)
