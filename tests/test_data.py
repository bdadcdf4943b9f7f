"""Tests for ssb.data: offline only (the hub is monkeypatched)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ssb.data import DataError, DatasetConfig, Problem, arith_problems, load_problems

DATA = Path(os.environ.get("SSB_TEST_DATA", "/work/shared/data"))
needs_data = pytest.mark.skipif(not (DATA / "gsm8k" / "train.jsonl").is_file(), reason="offline data missing")


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv("SSB_DATA_DIR", raising=False)


@pytest.fixture
def no_hub(monkeypatch):
    """Fail loudly if anything reaches for the hub."""
    import datasets

    def boom(*a, **k):
        raise AssertionError(f"hub access attempted: {a} {k}")

    monkeypatch.setattr(datasets, "load_dataset", boom)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the offline copies


LOCAL = [  # (known name, split, file, rows, grader)
    ("gsm8k", "train", "gsm8k/train.jsonl", 7473, "gsm8k"),
    ("gsm8k", "test", "gsm8k/test.jsonl", 1319, "gsm8k"),
    ("math500", None, "math500/test.jsonl", 500, "math500"),
    ("aime24", None, "aime24/test.jsonl", 30, "aime"),
]


@needs_data
@pytest.mark.parametrize("name,split,rel,n,grader", LOCAL)
def test_local_copies_both_paths(name, split, rel, n, grader, no_hub):
    by_name = load_problems(DatasetConfig(name=name, split=split), data_dir=DATA)
    by_path = load_problems(DatasetConfig(name=str(DATA / rel)))
    assert len(by_name) == len(by_path) == n
    assert by_name == by_path
    assert all(p.grader == grader and p.question and p.answer for p in by_name)
    assert len({p.id for p in by_name}) == n


@needs_data
def test_first_rows(no_hub):
    g = load_problems(DatasetConfig("gsm8k"), data_dir=DATA)[0]
    assert g == Problem("gsm8k-0", g.question, "72", "gsm8k")
    assert g.question.startswith("Natalia sold clips to 48 of her friends")
    t = load_problems(DatasetConfig("gsm8k", split="test"), data_dir=DATA)[0]
    assert t.answer == "18" and t.question.startswith("Janet")
    m = load_problems(DatasetConfig("math500"), data_dir=DATA)[0]
    assert m.id == "test/precalculus/807.json"
    assert m.answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert m.question.startswith("Convert the point $(0,3)$")
    a = load_problems(DatasetConfig("aime24"), data_dir=DATA)
    assert (a[0].id, a[0].answer) == ("60", "204")
    assert a[0].question.startswith("Every morning Aya")
    assert "025" in {p.answer for p in a}  # leading zeros kept as written


@needs_data
def test_gsm8k_commas_kept(no_hub):
    train = load_problems(DatasetConfig("gsm8k"), data_dir=DATA)
    test = load_problems(DatasetConfig("gsm8k", split="test"), data_dir=DATA)
    assert train[345].answer == "1,080"
    assert test[146].answer == "2,125"
    assert not any("####" in p.answer or p.answer != p.answer.strip() for p in train + test)


@needs_data
def test_env_data_dir(monkeypatch, no_hub):
    monkeypatch.setenv("SSB_DATA_DIR", str(DATA))
    assert len(load_problems(DatasetConfig("aime24"))) == 30


@needs_data
def test_limit_shuffle_deterministic(no_hub):
    def ids(**kw):
        return [p.id for p in load_problems(DatasetConfig("math500", **kw), data_dir=DATA)]

    full = ids()
    assert ids(limit=5) == full[:5]
    a, b, c = ids(limit=20, shuffle=True, seed=1), ids(limit=20, shuffle=True, seed=1), ids(limit=20, shuffle=True, seed=2)
    assert a == b and a != c and a != full[:20]
    assert set(ids(shuffle=True, seed=3)) == set(full)


# ---------------------------------------------------------------- custom files


def test_jsonl_custom_mapping(tmp_path, no_hub):
    f = _write_jsonl(tmp_path / "mine.jsonl", [
        {"q": "1+1?", "gold": 2, "key": "a"},
        {"q": "2+2?", "gold": "4", "key": "b"},
    ])
    probs = load_problems(DatasetConfig(name=str(f), question_field="q", answer_field="gold", id_field="key"))
    assert probs == [Problem("a", "1+1?", "2", "math"), Problem("b", "2+2?", "4", "math")]


def test_jsonl_defaults_problem_fallback_and_row_ids(tmp_path, no_hub):
    f = _write_jsonl(tmp_path / "set.jsonl", [{"problem": "x?", "answer": 3.0}, "", {"problem": "y?", "answer": "0.5"}])
    probs = load_problems(DatasetConfig(name=str(f), grader="aime"))
    assert [(p.id, p.question, p.answer, p.grader) for p in probs] == [
        ("set-0", "x?", "3", "aime"), ("set-1", "y?", "0.5", "aime")]


def test_json_list_and_jsonl_in_json(tmp_path, no_hub):
    rows = [{"question": "a?", "answer": "1", "id": 7}]
    (tmp_path / "l.json").write_text(json.dumps(rows))
    _write_jsonl(tmp_path / "j.json", rows * 2)
    assert load_problems(DatasetConfig(str(tmp_path / "l.json")))[0].id == "7"
    assert len(load_problems(DatasetConfig(str(tmp_path / "j.json")))) == 2


def test_parquet_custom_mapping(tmp_path, no_hub):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"Q": ["what?", "why?"], "A": [12, 5], "uid": ["u1", "u2"]}), f)
    probs = load_problems(DatasetConfig(str(f), question_field="Q", answer_field="A", id_field="uid", grader="gsm8k"))
    assert probs == [Problem("u1", "what?", "12", "gsm8k"), Problem("u2", "why?", "5", "gsm8k")]


# ---------------------------------------------------------------- errors


def _err(cfg: DatasetConfig, **kw) -> str:
    with pytest.raises(DataError) as ei:
        load_problems(cfg, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path, no_hub):
    f = tmp_path / "nope.jsonl"
    assert _err(DatasetConfig(str(f))) == f"{f}: file not found"


def test_malformed_jsonl_line(tmp_path, no_hub):
    f = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "answer": "1"}, "", '{"question": "b", "answer": '])
    msg = _err(DatasetConfig(str(f)))
    assert msg.startswith(f"{f}:3: invalid JSON line")
    f2 = _write_jsonl(tmp_path / "arr.jsonl", [[1, 2]])
    assert _err(DatasetConfig(str(f2))).startswith(f"{f2}:1: expected a JSON object")


def test_missing_column(tmp_path, no_hub):
    f = _write_jsonl(tmp_path / "c.jsonl", [{"question": "a", "answer": "1"}, {"question": "b", "sol": "2"}])
    msg = _err(DatasetConfig(str(f)))
    assert msg == f"{f}:2: missing column 'answer' (available: question, sol)"
    msg = _err(DatasetConfig(str(f), question_field="prompt"))
    assert msg == f"{f}:1: missing column 'prompt' (available: question, answer)"
    msg = _err(DatasetConfig(str(f), id_field="uid"))
    assert msg == f"{f}:1: missing column 'uid' (available: question, answer)"


def test_empty_dataset(tmp_path, no_hub):
    f = _write_jsonl(tmp_path / "e.jsonl", [])
    assert "no problems" in _err(DatasetConfig(str(f)))
    g = _write_jsonl(tmp_path / "g.jsonl", [{"question": "a", "answer": "1"}])
    assert "limit=0" in _err(DatasetConfig(str(g), limit=0))


def test_empty_answer(tmp_path, no_hub):
    f = _write_jsonl(tmp_path / "ea.jsonl", [{"question": "a", "answer": "1"}, {"question": "b", "answer": "  "}])
    msg = _err(DatasetConfig(str(f)))
    assert msg.startswith(f"{f}:2: empty answer") and '"question": "b"' in msg
    f2 = _write_jsonl(tmp_path / "none.jsonl", [{"question": "b", "answer": None}])
    assert _err(DatasetConfig(str(f2))).startswith(f"{f2}:1: empty answer")


def test_gsm8k_without_hashes(tmp_path, no_hub):
    d = tmp_path / "gsm8k"
    d.mkdir()
    _write_jsonl(d / "train.jsonl", [{"question": "a", "answer": "x\n#### 3"}, {"question": "b", "answer": "so 4"}])
    want = f"{d / 'train.jsonl'}:2: GSM8K answer has no '#### <final answer>' line"
    assert _err(DatasetConfig("gsm8k"), data_dir=tmp_path).startswith(want)
    assert _err(DatasetConfig(str(d / "train.jsonl"))).startswith(want)  # recognised as a gsm8k copy by folder


def test_bad_names(no_hub):
    assert "unknown dataset 'gsm8K'" in _err(DatasetConfig("gsm8K"))
    assert "unknown grader" in _err(DatasetConfig("arith", grader="exact"))


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub\n(more detail)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    msg = _err(DatasetConfig("gsm8k"))
    assert "'openai/gsm8k'" in msg and "ConnectionError" in msg and "SSB_DATA_DIR" in msg


# ---------------------------------------------------------------- hub (monkeypatched)


HUB_ROWS = {
    "openai/gsm8k": [{"question": "Q1", "answer": "work\n#### 1,000"}, {"question": "Q2", "answer": "#### 7"}],
    "HuggingFaceH4/MATH-500": [{"problem": "P", "solution": "s", "answer": "\\frac12", "subject": "x", "level": 1,
                                "unique_id": "test/algebra/1.json"}],
    "Maxwell-Jia/AIME_2024": [{"ID": "2024-I-1", "Problem": "Aya", "Solution": "s", "Answer": 204}],
    "math-ai/aime25": [{"problem": "P25", "answer": "70", "id": "0"}],
    "math-ai/amc23": [{"id": 0, "question": "A?", "answer": 27.0, "url": "u"}],
    "someone/custom": [{"prompt": "hi?", "target": "3"}],
}


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls = []

    def fake(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(HUB_ROWS[path])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


def test_hub_known_benchmarks(fake_hub):
    g = load_problems(DatasetConfig("gsm8k"))
    assert [(p.id, p.question, p.answer, p.grader) for p in g] == [
        ("gsm8k-0", "Q1", "1,000", "gsm8k"), ("gsm8k-1", "Q2", "7", "gsm8k")]
    assert load_problems(DatasetConfig("math500")) == [Problem("test/algebra/1.json", "P", "\\frac12", "math500")]
    assert load_problems(DatasetConfig("aime24")) == [Problem("2024-I-1", "Aya", "204", "aime")]
    assert load_problems(DatasetConfig("aime25")) == [Problem("0", "P25", "70", "aime")]
    assert load_problems(DatasetConfig("amc23")) == [Problem("0", "A?", "27", "math")]
    assert fake_hub == [("openai/gsm8k", "main", "train"), ("HuggingFaceH4/MATH-500", None, "test"),
                        ("Maxwell-Jia/AIME_2024", None, "train"), ("math-ai/aime25", None, "test"),
                        ("math-ai/amc23", None, "test")]


def test_hub_split_and_fallback_when_local_missing(fake_hub, tmp_path):
    load_problems(DatasetConfig("gsm8k", split="test"), data_dir=tmp_path)  # no local copy -> hub
    assert fake_hub == [("openai/gsm8k", "main", "test")]


def test_hub_custom_id(fake_hub):
    probs = load_problems(DatasetConfig("someone/custom", split="validation", question_field="prompt",
                                        answer_field="target"))
    assert probs == [Problem("custom-0", "hi?", "3", "math")]
    assert fake_hub == [("someone/custom", None, "validation")]
    msg = _err(DatasetConfig("someone/custom"))
    assert msg == "hub someone/custom[train] row 0: missing column 'question' (available: prompt, target)"


# ---------------------------------------------------------------- arith


def test_arith_deterministic_and_correct(no_hub):
    a, b = arith_problems(200, seed=5), arith_problems(200, seed=5)
    assert a == b and a != arith_problems(200, seed=6)
    assert [p.id for p in a[:3]] == ["arith-0", "arith-1", "arith-2"]
    ops = set()
    for p in a:
        x, op, y = p.question.removeprefix("What is ").removesuffix("?").split()
        x, y = int(x), int(y)
        assert 0 <= x <= 9 and 0 <= y <= 9 and p.grader == "gsm8k"
        assert p.answer == str(x + y if op == "+" else x - y) and int(p.answer) >= 0
        ops.add(op)
    assert ops == {"+"}  # the tiny smoke model is fitted on additions only


def test_arith_via_config(no_hub):
    assert len(load_problems(DatasetConfig("arith"))) == 64
    probs = load_problems(DatasetConfig("arith", limit=10, seed=3))
    assert probs == arith_problems(10, seed=3)
