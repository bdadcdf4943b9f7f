"""Generation engines: interface conformance (every available engine), reproducibility, independence from
batch-mates, and greedy equality with transformers' own ``generate`` (so batching, padding, refilling and prompt
sharing change nothing). vLLM tests run only where vLLM is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ssb.config import EngineConfig, ModelConfig
from ssb.engine import SamplingParams
from ssb.engine.transformers_engine import TransformersEngine, pick_tokens
from ssb.engine.factory import make_engine
from ssb.errors import SsbError
from ssb.models import render_chat
from ssb.prompts import student_messages

HAS_VLLM = importlib.util.find_spec("vllm") is not None
ENGINES = ["transformers", pytest.param("vllm", marks=pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed"))]
QUESTIONS = ["1+2=?", "What is 13*7?", "5-3", "A shop sells 12 apples and 7 pears. How many fruits in all?",
             "100+200+300=?", "9*9"]


def _model_cfg(tiny_model_dir):
    return ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, tiny_model_dir):
    return make_engine(_model_cfg(tiny_model_dir), engine_cfg=EngineConfig(backend=request.param))


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    return make_engine(_model_cfg(tiny_model_dir), engine_cfg=EngineConfig(max_batch_size=5))


def _prompts(engine):
    return [render_chat(engine.tokenizer, student_messages(q)) for q in QUESTIONS]


def _ids(outs):
    return [[s.token_ids for s in samples] for samples in outs]


@pytest.mark.parametrize("params", [SamplingParams(3, 1.0, 0, 1.0, 20), SamplingParams(2, 0.8, 50, 1.0, 12),
                                    SamplingParams(2, 0.7, 0, 0.9, 16), SamplingParams(1, 0.0, 0, 1.0, 24)])
def test_conformance(engine, params):
    prompts = _prompts(engine)
    outs = engine.generate(prompts, params, seed=3)
    assert len(outs) == len(prompts) and all(len(samples) == params.n for samples in outs)
    stops = set(engine.stop_ids)
    reasons = set()
    for samples in outs:
        for s in samples:
            reasons.add(s.finish_reason)
            assert 0 < len(s.token_ids) <= params.max_new_tokens
            assert (s.token_ids[-1] in stops) == (s.finish_reason == "stop")
            assert not stops & set(s.token_ids[:-1])
            if s.finish_reason == "length":
                assert len(s.token_ids) == params.max_new_tokens
            body = s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids
            assert s.text == engine.tokenizer.decode(body, skip_special_tokens=True)
    assert engine.generate([], params, seed=3) == []


def test_same_seed_same_samples_other_seed_others(engine):
    prompts, params = _prompts(engine), SamplingParams(3, 1.0, 0, 1.0, 16)
    a = engine.generate(prompts, params, seed=11)
    assert _ids(a) == _ids(engine.generate(prompts, params, seed=11))
    assert _ids(a) != _ids(engine.generate(prompts, params, seed=12))
    assert len({tuple(s.token_ids) for s in a[0]}) > 1  # the n samples of a prompt differ


def test_samples_do_not_depend_on_batch_mates(engine):
    prompts, params = _prompts(engine), SamplingParams(3, 1.0, 0, 1.0, 16)
    full = _ids(engine.generate(prompts, params, seed=5))
    assert _ids(engine.generate(prompts[::-1], params, seed=5)) == full[::-1]
    assert _ids(engine.generate(prompts[2:3], params, seed=5)) == full[2:3]
    dup = _ids(engine.generate([prompts[0], prompts[0]], params, seed=5))
    assert dup[0] == full[0] and dup[1] != dup[0]  # a repeated prompt gets fresh samples


def test_progress_hook_reports_tokens_and_finished_samples(engine):
    prompts, params = _prompts(engine), SamplingParams(3, 1.0, 0, 1.0, 20)
    calls = []
    outs = engine.generate(prompts, params, seed=4, progress=lambda tokens, finished: calls.append((tokens, finished)))
    lengths = [len(s.token_ids) for samples in outs for s in samples]
    assert calls[-1] == (sum(lengths), len(prompts) * params.n)  # the totals, at the end
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(calls, calls[1:]))  # cumulative
    assert _ids(outs) == _ids(engine.generate(prompts, params, seed=4))  # the hook changes nothing


def test_progress_hook_is_called_while_generating(hf_engine):
    """5 rows for 18 samples: a report per decode step, finished samples counted as they finish."""
    prompts, params = _prompts(hf_engine), SamplingParams(3, 1.0, 0, 1.0, 20)
    calls = []
    outs = hf_engine.generate(prompts, params, seed=4, progress=lambda *a: calls.append(a))
    lengths = [len(s.token_ids) for samples in outs for s in samples]
    assert len(calls) >= max(lengths) and len({f for _, f in calls}) > 3
    assert calls[0][0] == min(5, len(lengths)) and calls[0][1] <= calls[0][0]  # the admitted rows' first tokens
    assert calls[-1] == (sum(lengths), len(lengths))


def test_on_done_reports_every_prompt_once_with_its_samples(hf_engine):
    """``on_done(i, samples)``: once per prompt, with the samples the call returns (what generate_rows saves while
    a long call goes on)."""
    prompts = _prompts(hf_engine)
    seen = []
    outs = hf_engine.generate(prompts, SamplingParams(2, 0.8, 0, 1.0, 16), seed=3,
                              on_done=lambda i, samples: seen.append((i, [s.token_ids for s in samples])))
    assert sorted(i for i, _ in seen) == list(range(len(prompts)))
    assert dict(seen) == dict(enumerate(_ids(outs)))


def test_refilled_small_batch_equals_one_big_batch(hf_engine, tiny_model_dir, monkeypatch):
    """max_batch_size=5 (and 2) rows for 6 prompts x 3 samples: rows are refilled many times and the KV buffer is
    relaid; samples must equal those of one wide batch."""
    from ssb.engine.kv_buffer import KVBuffer

    calls = []
    real = KVBuffer.relayout
    monkeypatch.setattr(KVBuffer, "relayout", lambda self, lo, off, cap, rows=None: calls.append(
        "left-pad" if off else "compact" if rows is None else "drop-rows") or real(self, lo, off, cap, rows))
    wide = make_engine(_model_cfg(tiny_model_dir), engine_cfg=EngineConfig(max_batch_size=64, prefill_tokens=32))
    prompts = _prompts(hf_engine)
    # samples must end at different steps for rows to be dropped, and the tiny model's replies may all have the same
    # length (depending on the CPU it was trained on): also stop at the token whose first occurrence varies most
    replies = [ids for samples in _ids(wide.generate(prompts, SamplingParams(3, 1.0, 0, 1.0, 24), seed=1))
               for ids in samples]
    common = max(sorted({t for ids in replies for t in ids}),
                 key=lambda t: len({ids.index(t) if t in ids else -1 for ids in replies}))
    varied = hf_engine.stop_ids + [common]
    for stops, rows in ((hf_engine.stop_ids, 5), (varied, 5), (varied, 2)):
        narrow = TransformersEngine(hf_engine.model, hf_engine.tokenizer, stops, max_batch_size=rows)
        one = TransformersEngine(wide.model, wide.tokenizer, stops, max_batch_size=64, prefill_tokens=32)
        for params in (SamplingParams(3, 1.0, 0, 1.0, 24), SamplingParams(3, 0.0, 0, 1.0, 24)):
            assert _ids(narrow.generate(prompts, params, seed=1)) == _ids(one.generate(prompts, params, seed=1))
    assert {"left-pad", "compact", "drop-rows"} <= set(calls)  # every re-layout of the KV buffer was exercised


def test_fixed_shape_step_equals_the_eager_one(tiny_model_dir, monkeypatch):
    """The CUDA-graph decode step (static KV buffer written at a device index, mask as a tensor, grouped-query
    attention over the whole buffer), run here without a graph: same samples as the eager step, through
    refills, in-place re-layouts and reallocations."""
    from ssb.engine import kv_buffer as mod

    calls = []
    real = mod.KVBuffer.fixed_logits
    monkeypatch.setattr(mod.KVBuffer, "fixed_logits", lambda self, inp: calls.append(1) or real(self, inp))
    eager = make_engine(_model_cfg(tiny_model_dir), engine_cfg=EngineConfig(max_batch_size=5))
    fixed = make_engine(_model_cfg(tiny_model_dir), engine_cfg=EngineConfig(max_batch_size=5))
    monkeypatch.setattr(fixed, "uses_fixed_step", lambda device: True)
    moves = []
    real_move = mod.StaticLayer.relayout
    monkeypatch.setattr(mod.StaticLayer, "relayout", lambda self, lo, off, cap, rows=None: moves.append(
        "realloc" if rows is not None or cap != self.kbuf.shape[2] else "in place") or real_move(
        self, lo, off, cap, rows))
    prompts = _prompts(eager)
    for stops, params in ((None, SamplingParams(3, 1.0, 0, 1.0, 80)), (None, SamplingParams(2, 0.0, 0, 1.0, 24)),
                          ([-1], SamplingParams(3, 1.0, 0, 1.0, 40))):  # no stop: rows end together
        for eng in (eager, fixed):
            monkeypatch.setattr(eng, "stop_ids", stops or eager.stop_ids)
        want = _ids(eager.generate(prompts, params, seed=2))
        assert not calls
        assert _ids(fixed.generate(prompts, params, seed=2)) == want
        assert calls
        calls.clear()
    assert {"realloc", "in place"} <= set(moves)


GOLDEN = Path(__file__).parent / "data" / "engine_golden.json"
GOLDEN_CASES = {  # name: (params, seed)
    "T=1": (SamplingParams(3, 1.0, 0, 1.0, 40), 9),
    "T=0.8 top-k 20": (SamplingParams(3, 0.8, 20, 1.0, 40), 9),
    "T=0.7 top-p 0.9": (SamplingParams(3, 0.7, 0, 0.9, 40), 9),
    "greedy": (SamplingParams(2, 0.0, 0, 1.0, 40), 9),
    "T=1 seed per prompt": (SamplingParams(3, 1.0, 0, 1.0, 40), [5, 4, 3, 2, 1, 0, 5]),
}


class _StubTokenizer:  # the engine needs only a pad id and decode
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return ""


def _golden_case():
    """A random two-layer Qwen2 whose weights come from a seeded generator (not transformers' init, which may
    change), 7 prompts of 4-25 tokens and 8 stop ids of 96: 4 rows serve 21 or 14 samples, so rows are refilled,
    left-padded, compacted and dropped."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=512, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.3)
    prompts = [torch.randint(1, 96, (int(torch.randint(3, 31, (1,), generator=g)),), generator=g).tolist()
               for _ in range(7)]
    stops = sorted(torch.randperm(95, generator=g)[:8].add(1).tolist())
    return model, prompts, stops


def _golden_samples(eng, prompts) -> dict:
    return {name: _ids(eng.generate(prompts, params, seed=seed)) for name, (params, seed) in GOLDEN_CASES.items()}


def test_samples_are_the_recorded_ones(monkeypatch):
    """The exact token ids sampled for fixed seeds, recorded once (tests/data/engine_golden.json): a change to
    the engine's scheduling or KV handling must not change a single sample: eager steps over the whole buffer, eager
    steps attending per chunk of rows (chunks of 2 of the 4 rows, reordered by age as they go), fixed-shape steps."""
    from ssb.engine import transformers_engine, windows

    model, prompts, stops = _golden_case()
    want = json.loads(GOLDEN.read_text())
    eng = TransformersEngine(model, _StubTokenizer(), stops, max_batch_size=4, windowed=False)
    assert not eng.uses_windows(torch.device("cpu"))
    assert _golden_samples(eng, prompts) == want
    reorders = []
    keep = transformers_engine.Scheduler._keep
    monkeypatch.setattr(transformers_engine.Scheduler, "_keep", lambda self, rows: reorders.append(
        len(rows) == len(self.rows)) or keep(self, rows))
    monkeypatch.setattr(windows, "CHUNK", 2)
    monkeypatch.setattr(windows, "RESORT", 1.01)  # reorder at any gain: 4 rows seldom gain 1.25x
    eng.windowed = True
    assert eng.uses_windows(torch.device("cpu"))
    assert _golden_samples(eng, prompts) == want
    assert any(reorders)  # rows were reordered by age, not only dropped
    monkeypatch.setattr(eng, "uses_fixed_step", lambda device: True)
    assert _golden_samples(eng, prompts) == want


def test_models_that_take_the_mask_as_given_keep_the_plain_step():
    """Bloom computes attention itself (no attention interface to switch, ALiBi from a 2D mask): neither the windowed
    nor the fixed-shape step applies, and greedy samples equal transformers' own generate, prompt by prompt."""
    from transformers import AutoModelForCausalLM, BloomConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=96),
                                             dtype=torch.float32).eval()
    eng = TransformersEngine(model, _StubTokenizer(), [7], max_batch_size=3)
    assert not eng.uses_windows(torch.device("cpu")) and not eng.uses_fixed_step(torch.device("cuda"))
    prompts = [[5, 9, 11], [3, 4, 5, 6, 8, 10, 12, 14], [20, 21], [30, 31, 32, 33, 34]]
    outs = eng.generate(prompts, SamplingParams(1, 0.0, 0, 1.0, 12), seed=0)
    for p, samples in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, eos_token_id=[7], pad_token_id=0)[0, len(p):].tolist()
        cut = next((k + 1 for k, t in enumerate(ref) if t == 7), len(ref))
        assert samples[0].token_ids == ref[:cut]


def test_chunk_windows_cost_and_reorder():
    from ssb.engine import windows

    starts = [0, 9, 8, 1, 9, 9]
    assert windows.chunk_windows(starts, 2) == [(0, 2, 0), (2, 4, 1), (4, 6, 9)]
    assert windows.window_cost(starts, 9, 2) == 2 * 10 + 2 * 9 + 2 * 1
    assert windows.window_cost(starts, 9, 6) == 6 * 10
    order = windows.resort_order(starts, 9, 2)  # sorted: chunks (0, 1), (8, 9), (9, 9): 20 + 4 + 2 pairs, not 40
    assert order == [0, 3, 2, 1, 4, 5]
    assert windows.resort_order([starts[r] for r in order], 9, 2) is None  # already sorted
    assert windows.resort_order([0, 5, 2, 6], 9, 2) is None  # sorted costs 20 + 10 against 20 + 16: under 1.25x
    assert windows.resort_order(starts, 9, 6) is None  # one chunk: order changes nothing


def test_window_attention_equals_attention_over_the_whole_buffer():
    """Per-chunk windows against a float64 reference over every column (grouped-query: 6 query heads, 2 KV heads)."""
    from ssb.engine import windows

    g = torch.Generator().manual_seed(0)
    b, h, kvh, n, d = 7, 6, 2, 23, 8
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in
               ((b, h, 1, d), (b, kvh, n, d), (b, kvh, n, d)))
    starts = torch.randint(0, n, (b,), generator=g).tolist()
    mask = (torch.arange(n)[None] >= torch.tensor(starts)[:, None])[:, None, None]
    out, _ = windows.window_attention(None, q, k, v, mask, scaling=0.3, windows=windows.chunk_windows(starts, 3))
    kk, vv = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
    scores = (q @ kk.transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    ref = (scores.softmax(-1) @ vv).transpose(1, 2)  # [b, 1, h, d]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_greedy_equals_transformers_generate_alone(hf_engine):
    prompts = _prompts(hf_engine)
    model, stops = hf_engine.model, hf_engine.stop_ids
    outs = hf_engine.generate(prompts, SamplingParams(2, 0.0, 0, 1.0, 40), seed=0)
    for p, samples in zip(prompts, outs):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=40, do_sample=False, eos_token_id=stops,
                             pad_token_id=hf_engine.pad_id)[0, len(p):].tolist()
        cut = next((k + 1 for k, t in enumerate(ref) if t in stops), len(ref))
        assert samples[0].token_ids == samples[1].token_ids == ref[:cut]


def test_pick_tokens_matches_the_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 7) * 2
    u = 1 - torch.rand(20000, dtype=torch.float64)
    params = SamplingParams(temperature=0.5)
    toks = pick_tokens(logits.expand(len(u), -1), u, params)
    freq = torch.bincount(toks, minlength=7).double() / len(u)
    assert torch.allclose(freq, (logits[0] / 0.5).double().softmax(-1), atol=0.015)
    top2 = pick_tokens(logits.expand(len(u), -1), u, SamplingParams(top_k=2))
    assert set(top2.tolist()) == set(logits[0].topk(2).indices.tolist())
    nucleus = pick_tokens(logits.expand(len(u), -1), u, SamplingParams(top_p=1e-6))
    assert set(nucleus.tolist()) == {int(logits.argmax())}


def test_a_tiny_token_of_a_whole_vocabulary_can_be_drawn():
    """Full-vocabulary sampling: a token of probability 2e-8 after 0.6 of the mass (under half an fp32 ulp there)
    keeps its own slice of the cumulative distribution, so the uniform that falls in it draws it."""
    n = 151_936
    probs = torch.full((n,), 0.4 / (n - 2), dtype=torch.float64)
    probs[0], probs[1] = 0.6, 2e-8
    logits = probs.log().float()[None]
    p = logits.softmax(-1)[0].double()  # what pick_tokens computes, at T=1
    u = torch.tensor([(p[0] + p[1] / 2) / p.sum()], dtype=torch.float64)
    assert pick_tokens(logits, u, SamplingParams(temperature=1.0, top_k=0)).tolist() == [1]


def test_pick_tokens_in_bf16_picks_what_the_fp32_path_picks():
    """bf16 logits are ranked in bf16 (top-k) and reduced with max (greedy): the same tokens as through fp32 copies,
    and a greedy tie goes to the first maximum, as argmax's."""
    torch.manual_seed(0)
    logits = torch.randn(64, 5000).bfloat16()
    u = 1 - torch.rand(64, dtype=torch.float64)
    for params in (SamplingParams(temperature=0.8, top_k=50), SamplingParams(temperature=0.0)):
        assert torch.equal(pick_tokens(logits, u, params), pick_tokens(logits.float(), u, params))
    tied = torch.zeros(3, 10, dtype=torch.bfloat16)
    tied[:, [2, 7]] = 1
    assert pick_tokens(tied, u[:3], SamplingParams(temperature=0.0)).tolist() == [2, 2, 2]


def _prefill_bytes(engine, prompts) -> int:
    """Bytes allocated by one prefill forward of ``prompts`` (every op's own allocations, summed)."""
    from torch.profiler import profile

    from ssb.engine.transformers_engine import Scheduler

    with torch.inference_mode(), profile(profile_memory=True) as prof:
        Scheduler(engine, prompts, SamplingParams(1, 0.0, 0, 1.0, 4), 0).prefill(0)
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())


def test_a_merged_adapters_prefill_allocates_no_more_than_the_base_models(tiny_model_dir, tmp_path):
    """After merge_and_unload no parameter requires grad, and torch.matmul then turned the prefill's last-position
    lm_head product into a batched one that copies the weight once per prompt (mkldnn's bf16 path on CPU: 50 GB
    for 184 prompts of the testbed): the engine must not make that copy."""
    from peft import LoraConfig, get_peft_model

    from ssb.models import load_model

    cfg = ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", dtype="bfloat16")
    peft = get_peft_model(load_model(cfg), LoraConfig(r=4, target_modules="all-linear"))
    peft.save_pretrained(tmp_path / "adapter")
    base, merged = make_engine(cfg), make_engine(cfg, adapter=tmp_path / "adapter")
    assert not any(p.requires_grad for p in merged.model.parameters())
    prompts = _prompts(base) * 4
    copy = len(prompts) * merged.model.config.hidden_size * merged.model.config.vocab_size * 2  # one bf16 copy
    assert _prefill_bytes(merged, prompts) <= _prefill_bytes(base, prompts) + copy // 4


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_vllm_backend_without_vllm_is_a_clear_error(tiny_model_dir):
    with pytest.raises(SsbError, match="ssb\\[vllm\\]"):
        make_engine(_model_cfg(tiny_model_dir), engine_cfg=EngineConfig(backend="vllm"))


@pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")
def test_vllm_prompt_topk_logprobs(tiny_model_dir):
    eng = make_engine(_model_cfg(tiny_model_dir), engine_cfg=EngineConfig(backend="vllm"))
    seqs = [p + [5, 6, 7] for p in _prompts(eng)[:2]]
    out = eng.prompt_topk_logprobs(seqs, k=4)
    assert [len(rows) for rows in out] == [len(s) - 1 for s in seqs]
    for rows in out:
        for top in rows:
            assert len(top) == 4 and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_prefill_budget_defaults_by_device(hf_engine):
    """engine.prefill_tokens=None (the default) is 2048 prompt tokens per forward on a CPU, 16384 on a GPU; a value
    given is kept."""
    from ssb.engine.transformers_engine import default_prefill_tokens

    assert EngineConfig().prefill_tokens is None
    assert hf_engine.prefill_tokens == default_prefill_tokens(torch.device("cpu")) == 2048
    assert default_prefill_tokens(torch.device("cuda")) == 16384
    eng = TransformersEngine(hf_engine.model, hf_engine.tokenizer, hf_engine.stop_ids, prefill_tokens=32)
    assert eng.prefill_tokens == 32


def test_engine_is_the_transformers_one_by_default(hf_engine):
    assert isinstance(hf_engine, TransformersEngine)
