"""The generation progress bar: moves inside a generation call (tokens, tok/s, finished samples, ETA), redraws
on a timer rather than on every engine step, and is what generate_rows shows. No sleeps: the clock is injected."""

from __future__ import annotations

import io
import subprocess
import sys
from types import SimpleNamespace

from ssb.progress import GenerationBar


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_bar_moves_inside_a_call_and_redraws_on_a_timer():
    clock, out = Clock(), io.StringIO()
    bar = GenerationBar(10, "rollout", "problem", interval=1.0, clock=clock, file=out)
    hook = bar.begin(samples=8, items=4)
    hook(100, 0)  # the first report draws
    assert bar.renders == 1 and bar.bar.n == 0
    for k in range(1000):  # many engine steps within the interval: no redraw
        clock.t = 0.5 + k * 1e-4
        hook(150 + k, 1)
    assert bar.renders == 1
    clock.t = 1.0
    hook(200, 4)
    assert bar.renders == 2 and bar.bar.n == 2.0  # half the samples done: half the call's items
    assert "tok/s=200" in bar.postfix() and "samples=4/8" in bar.postfix() and "tok=200" in bar.postfix()
    assert "tok/s" in str(bar.bar) and str(bar.bar).startswith("rollout:") and " 2/10 " in str(bar.bar)
    clock.t = 2.0
    bar.end(tokens=300)
    assert bar.bar.n == 4 and bar.totals() == (300, 2.0) and "samples" not in bar.postfix()
    assert "tok/s=150" in bar.postfix()
    bar.note(accepted=3)
    bar.advance(1)
    assert bar.bar.n == 5 and "accepted=3" in bar.postfix()
    bar.close()
    assert "tok/s=150" in out.getvalue()


def test_bar_before_any_token():
    bar = GenerationBar(3, "teach", "pair", clock=Clock(), file=io.StringIO())
    assert "tok/s=?" in bar.postfix()
    bar.hook(5, 0)  # outside a call: ignored
    bar.end()
    assert bar.totals() == (0, 0.0)
    bar.close()


def test_progress_module_is_light():
    code = ("import sys; import ssb.progress, ssb.train, ssb.stages.distill; "
            "bad = [m for m in ('ssb.engine', 'ssb.stages.generate', 'ssb.engine.kv_buffer', 'ssb.engine.fixed_step') "
            "if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys; import ssb.progress; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


class FakeEngine:
    """Reports progress the way the embedded engine does; every sample is 3 tokens."""

    tokenizer = None

    def __init__(self):
        self.reports = []

    def generate(self, prompts, params, seed, progress=None, on_done=None):
        from ssb.engine import Sample

        total = len(prompts) * params.n
        for k in range(1, total + 1):
            if progress is not None:
                progress(3 * k, k)
                self.reports.append((3 * k, k))
        outs = [[Sample([1, 2, 3], "x", "length") for _ in range(params.n)] for _ in prompts]
        for i in reversed(range(len(prompts))):  # the last prompt finishes first
            on_done(i, outs[i])
        return outs


def test_generate_rows_shows_tokens_per_second(tmp_path, capsys):
    from ssb.stages.generate import generate_rows
    from ssb.engine import SamplingParams
    from ssb.rows import read_rows
    from ssb.rundir import Stage

    stage = Stage(tmp_path, "rollout", "fp")
    stage.dir.mkdir()
    items = [SimpleNamespace(id=f"p{i}") for i in range(5)]
    eng = FakeEngine()
    rows, stats = generate_rows(stage, "rows.jsonl", items, prompt_of=lambda tok, it: [1],
                                row_of=lambda it, s: {"id": it.id}, engine_factory=lambda: eng,
                                params=SamplingParams(n=2), seed=0, batch_size=2, desc="rollout")
    assert [r["id"] for r in rows] == [it.id for it in items] and stats["generated_tokens"] == 5 * 2 * 3
    assert eng.reports[-1] == (30, 10) and len(eng.reports) == 10  # one call: its rows stay full to the end
    assert [r["id"] for r in read_rows(stage.path("rows.jsonl"))] == [it.id for it in items]  # back in item order
    err = capsys.readouterr().err
    assert "rollout" in err and "tok/s=" in err and "5/5" in err
