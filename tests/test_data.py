"""Tests for ssb.data: offline only (the hub is monkeypatched)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssb.config import DatasetConfig
from ssb.data import BUILTIN_DIR, DataError, Problem, arith_problems, load_problems


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


# ---------------------------------------------------------------- the full offline copies (tests/conftest.py)


LOCAL = [  # (known name, split, file, rows, grader)
    ("gsm8k", "train", "gsm8k/train.jsonl", 7473, "gsm8k"),
    ("gsm8k", "test", "gsm8k/test.jsonl", 1319, "gsm8k"),
    ("math500", None, "math500/test.jsonl", 500, "math500"),
    ("aime24", None, "aime24/test.jsonl", 30, "aime"),
]


@pytest.mark.full_data
@pytest.mark.parametrize("name,split,rel,n,grader", LOCAL)
def test_local_copies_both_paths(name, split, rel, n, grader, no_hub, full_data_dir):
    by_name = load_problems(DatasetConfig(name=name, split=split), data_dir=full_data_dir)
    by_path = load_problems(DatasetConfig(name=str(full_data_dir / rel)))
    assert len(by_name) == len(by_path) == n
    assert by_name == by_path
    assert all(p.grader == grader and p.question and p.answer for p in by_name)
    assert len({p.id for p in by_name}) == n


@pytest.mark.parametrize("data", ["builtin", pytest.param("full", marks=pytest.mark.full_data)])
def test_first_rows(no_hub, data, request):
    data_dir = "builtin" if data == "builtin" else request.getfixturevalue("full_data_dir")
    g = load_problems(DatasetConfig("gsm8k", limit=1), data_dir=data_dir)[0]
    assert g == Problem("gsm8k-0", g.question, "72", "gsm8k", "Natalia sold 48/2 = 24 clips in May.\nNatalia sold "
                                                             "48+24 = 72 clips altogether in April and May.")
    assert g.question.startswith("Natalia sold clips to 48 of her friends")
    t = load_problems(DatasetConfig("gsm8k", split="test", limit=1), data_dir=data_dir)[0]
    assert t.answer == "18" and t.question.startswith("Janet")
    m = load_problems(DatasetConfig("math500", limit=1), data_dir=data_dir)[0]
    assert m.id == "test/precalculus/807.json"
    assert m.answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert m.question.startswith("Convert the point $(0,3)$")


@pytest.mark.full_data
def test_aime24_first_rows(no_hub, full_data_dir):
    a = load_problems(DatasetConfig("aime24"), data_dir=full_data_dir)
    assert (a[0].id, a[0].answer) == ("60", "204")
    assert a[0].question.startswith("Every morning Aya")
    assert "025" in {p.answer for p in a}  # leading zeros kept as written


@pytest.mark.full_data
def test_gsm8k_commas_kept(no_hub, full_data_dir):
    train = load_problems(DatasetConfig("gsm8k"), data_dir=full_data_dir)
    test = load_problems(DatasetConfig("gsm8k", split="test"), data_dir=full_data_dir)
    assert train[345].answer == "1,080"
    assert test[146].answer == "2,125"
    assert not any("####" in p.answer or p.answer != p.answer.strip() for p in train + test)


@pytest.mark.full_data
def test_env_data_dir(monkeypatch, no_hub, full_data_dir):
    monkeypatch.setenv("SSB_DATA_DIR", str(full_data_dir))
    assert len(load_problems(DatasetConfig("aime24"))) == 30


@pytest.mark.full_data
def test_limit_shuffle_deterministic(no_hub, full_data_dir):
    def ids(**kw):
        return [p.id for p in load_problems(DatasetConfig("math500", **kw), data_dir=full_data_dir)]

    full = ids()
    assert ids(limit=5) == full[:5]
    a, b, c = ids(limit=20, shuffle=True, seed=1), ids(limit=20, shuffle=True, seed=1), ids(limit=20, shuffle=True, seed=2)
    assert a == b and a != c and a != full[:20]
    assert set(ids(shuffle=True, seed=3)) == set(full)


# ---------------------------------------------------------------- the bundled slices (data_dir=builtin)


SLICES = [  # (known name, split, file, rows)
    ("gsm8k", "train", "gsm8k/train.jsonl", 100),
    ("gsm8k", "test", "gsm8k/test.jsonl", 100),
    ("math500", None, "math500/test.jsonl", 20),
]


@pytest.mark.parametrize("name,split,rel,n", SLICES)
def test_builtin_slices_serve_requests_inside_them(name, split, rel, n, no_hub):
    got = load_problems(DatasetConfig(name, split=split, limit=n), data_dir="builtin")
    assert got == load_problems(DatasetConfig(str(BUILTIN_DIR / rel)))
    assert len(got) == n and len({p.id for p in got}) == n and all(p.question and p.answer for p in got)
    assert load_problems(DatasetConfig(name, split=split, skip=n - 3, limit=3), data_dir="builtin") == got[-3:]
    assert load_problems(DatasetConfig(name, split=split, limit=5), data_dir=BUILTIN_DIR) == got[:5]  # by path


@pytest.mark.parametrize("data_dir", ["builtin", str(BUILTIN_DIR)])
@pytest.mark.parametrize("cfg, why", [
    (DatasetConfig("gsm8k", split="test"), "got no limit (that means the whole benchmark)"),
    (DatasetConfig("math500"), "got no limit"),
    (DatasetConfig("math500", limit=21), "got skip 0 + limit 21 > 20"),
    (DatasetConfig("gsm8k", skip=90, limit=11), "got skip 90 + limit 11 > 100"),
    (DatasetConfig("gsm8k", limit=5, shuffle=True), "got shuffle=true"),
])
def test_builtin_never_stands_in_for_a_full_benchmark(cfg, why, data_dir, no_hub):
    msg = _err(cfg, data_dir=data_dir)
    assert msg.startswith("data_dir=builtin holds only the first ") and why in msg and "SSB_DATA_DIR" in msg


def test_builtin_has_nothing_else_and_never_falls_back_to_the_hub(no_hub):
    msg = _err(DatasetConfig("aime24", limit=1), data_dir="builtin")
    assert msg.startswith("data_dir=builtin has no aime24/test.jsonl for aime24 (bundled slices: gsm8k/test.jsonl, "
                          "gsm8k/train.jsonl, math500/test.jsonl)")
    assert "gsm8k/validation.jsonl" in _err(DatasetConfig("gsm8k", split="validation", limit=1), data_dir="builtin")


def test_builtin_via_env(monkeypatch, no_hub):
    monkeypatch.setenv("SSB_DATA_DIR", "builtin")
    assert len(load_problems(DatasetConfig("gsm8k", split="test", limit=8))) == 8


def test_builtin_is_package_data_with_licenses_and_readme():
    files = sorted(p.relative_to(BUILTIN_DIR).as_posix() for p in BUILTIN_DIR.rglob("*") if p.is_file()
                   and "__pycache__" not in p.parts)
    assert files == ["README.md", "gsm8k/LICENSE", "gsm8k/test.jsonl", "gsm8k/train.jsonl",
                     "math500/LICENSE.simplerl_math_eval", "math500/test.jsonl"]
    readme = (BUILTIN_DIR / "README.md").read_text(encoding="utf-8")
    for _, _, rel, n in SLICES:
        assert f"| {rel} | {n} |" in readme
        assert len((BUILTIN_DIR / rel).read_text(encoding="utf-8").splitlines()) == n
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():  # a source checkout: every file is installed as package data
        import fnmatch
        import re

        globs = re.search(r"^ssb = \[(.*)\]$", pyproject.read_text(encoding="utf-8"), re.M).group(1)
        patterns = [g.strip().strip('"') for g in globs.split(",")]
        for f in files:
            assert any(fnmatch.fnmatch(f"builtin_data/{f}", pat) for pat in patterns), f


@pytest.mark.full_data
@pytest.mark.parametrize("rel", [rel for _, _, rel, _ in SLICES])
def test_builtin_slices_are_byte_for_byte_prefixes_of_the_full_copies(rel, full_data_dir):
    part, full = (BUILTIN_DIR / rel).read_bytes(), (full_data_dir / rel).read_bytes()
    assert part.endswith(b"\n") and full.startswith(part) and len(full) > len(part)
    lic = [p.name for p in (BUILTIN_DIR / rel).parent.glob("LICENSE*")]
    assert lic and all((BUILTIN_DIR / rel).parent.joinpath(n).read_bytes()
                       == (full_data_dir / rel).parent.joinpath(n).read_bytes() for n in lic)


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
    assert load_problems(DatasetConfig("math500")) == [Problem("test/algebra/1.json", "P", "\\frac12", "math500", "s")]
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
