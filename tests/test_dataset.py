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
