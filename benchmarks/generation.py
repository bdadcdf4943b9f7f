"""Generation throughput: the same prompts and lengths through
(a) one-at-a-time ``generate`` (the authors' way: one sequence per call),
(b) padded batched ``generate`` (left padding, ``num_return_sequences=K``),
(c) ssb's embedded engine (:class:`ssb.engine.transformers_engine.TransformersEngine`),
(d) optionally transformers' continuous batching ``generate_batch`` (``--generate-batch``),
on a random-weight Qwen2-shaped model, for two workloads:

- ``fixed``: every sequence generates exactly ``--new`` tokens (no stop token can be sampled);
- ``varied``: K samples per prompt stop when they sample one of a set of "stop" ids sized so that lengths are
  roughly geometric with mean ``--new`` (random weights sample almost uniformly), capped at ``4 * --new``.

Prints tokens/s per method, the ratios, and the decode roofline: a step must read every parameter once, so at
batch B the ceiling is ``B * bandwidth / parameter_bytes`` tokens/s (KV reads ignored). Bandwidth defaults to
an H100 SXM's 3.35e12 B/s on CUDA; on CPU it is measured with a large tensor copy.

    PYTHONPATH=src python benchmarks/generation.py --preset cpu-small
    PYTHONPATH=src python benchmarks/generation.py --preset qwen2.5-3b   # on a GPU
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from ssb.engine import SamplingParams

from ssb.engine.transformers_engine import Scheduler, TransformersEngine
from ssb.engine.kv_buffer import KVBuffer

PRESETS = {
    "cpu-small": dict(model=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                                 num_key_value_heads=2, vocab_size=32768, tie_word_embeddings=True),
                      prompts=16, k=4, new=64, one_prompts=2, min_len=32, max_len=160, batch=64),
    "qwen2.5-3b": dict(model=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                  num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                  tie_word_embeddings=True),
                       prompts=64, k=4, new=256, one_prompts=1, min_len=100, max_len=300, batch=256),
}


class _Tok:  # the engine only needs a pad id and decode
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return ""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_bandwidth() -> float:
    x = torch.empty(64 * 2**20, dtype=torch.float32).fill_(1)  # 256 MiB
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best  # read + write


def count_new(rows: list[list[int]], stops: set[int]) -> int:
    return sum(next((k + 1 for k, t in enumerate(r) if t in stops), len(r)) for r in rows)


def run_one_at_a_time(model, prompts, k, new, stops, fixed, device):
    n = 0
    for p in prompts:
        ids = torch.tensor([p], device=device)
        for _ in range(k):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=new, min_new_tokens=new if fixed else 0,
                                 eos_token_id=sorted(stops) or None, pad_token_id=0)
            n += count_new(out[:, len(p):].tolist(), stops)
    return n


def run_padded(model, prompts, k, new, stops, fixed, device, batch):
    n, per = 0, max(1, batch // k)
    for b in range(0, len(prompts), per):
        chunk = prompts[b: b + per]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=new, min_new_tokens=new if fixed else 0, num_return_sequences=k,
                             eos_token_id=sorted(stops) or None, pad_token_id=0)
        n += count_new(out[:, width:].tolist(), stops)
    return n


STEPS: list[tuple[int, float]] = []  # (rows, seconds) of every engine decode step (each ends in a device sync)


def _timed_step(real):
    def step(self):
        t0 = time.perf_counter()
        real(self)
        STEPS.append((len(self.rows), time.perf_counter() - t0))
    return step


Scheduler.step = _timed_step(Scheduler.step)


def run_engine(model, prompts, k, new, stops, batch, cuda_graphs=True):
    eng = TransformersEngine(model, _Tok(), sorted(stops) or [-1], max_batch_size=batch, cuda_graphs=cuda_graphs)
    outs = eng.generate(prompts, SamplingParams(k, 1.0, 0, 1.0, new), seed=0)
    return sum(len(s.token_ids) for samples in outs for s in samples)


def step_stats(batch: int) -> str:
    """Median ms of full-width decode steps (the steady state; a step that captured a graph is an outlier)."""
    if not STEPS:
        return "no steps"
    width = max(rows for rows, _ in STEPS)
    full = sorted(dt for rows, dt in STEPS if rows == width)
    return (f"{len(STEPS)} steps, {len(full)} at width {width}: median {full[len(full) // 2] * 1e3:.2f} ms, "
            f"min {full[0] * 1e3:.2f} ms; all steps {sum(dt for _, dt in STEPS):.2f} s")


def profile_engine(model, prompts, k, batch, device):
    """Where a steady decode step's time goes: the (captured) forward alone, synchronised on both sides, vs the
    whole step; then the top kernels of a few steps under torch.profiler."""
    real, fwd = KVBuffer.fixed_logits, []

    def timed_logits(self, inp):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = real(self, inp)
        torch.cuda.synchronize(device)
        fwd.append(time.perf_counter() - t0)
        return out

    KVBuffer.fixed_logits = timed_logits
    STEPS.clear()
    run_engine(model, prompts, k, 64, set(), batch)
    KVBuffer.fixed_logits = real
    fwd = sorted(fwd[1:])
    print(f"\n## profile: forward (graph replay) median {fwd[len(fwd) // 2] * 1e3:.2f} ms; {step_stats(batch)}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_engine(model, prompts, k, 16, set(), batch)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


def check_graphs(device):
    """The captured decode step against the eager one on a small random Qwen2 model (fp32 and bf16):
    greedy and sampled outputs, reproducibility, batch independence, greedy vs transformers' generate."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**PRESETS["cpu-small"]["model"], max_position_embeddings=4096)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, cfg.vocab_size, (int(torch.randint(8, 120, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(12)]
    stops = sorted(torch.randperm(cfg.vocab_size - 3, generator=g)[:600].add(3).tolist())  # mean length ~55

    def same(a, b):
        pairs = [(x.token_ids, y.token_ids) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
        return f"{sum(x == y for x, y in pairs)}/{len(pairs)} sequences identical"

    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
        graph = TransformersEngine(model, _Tok(), stops, max_batch_size=8)
        eager = TransformersEngine(model, _Tok(), stops, max_batch_size=8, cuda_graphs=False)
        wide = TransformersEngine(model, _Tok(), stops, max_batch_size=64)
        print(f"\n## check, {dtype}")
        for name, params in (("greedy", SamplingParams(2, 0.0, 0, 1.0, 150)),
                             ("T=1", SamplingParams(3, 1.0, 0, 1.0, 150)),
                             ("T=0.8 top-k 50", SamplingParams(2, 0.8, 50, 1.0, 100)),
                             ("T=0.7 top-p 0.9", SamplingParams(2, 0.7, 0, 0.9, 100))):
            a = graph.generate(prompts, params, seed=7)
            a2 = graph.generate(prompts, params, seed=7)
            rev = graph.generate(prompts[::-1], params, seed=7)[::-1]
            b = eager.generate(prompts, params, seed=7)
            w = wide.generate(prompts, params, seed=7)
            lens = [len(s.token_ids) for xs in a for s in xs]
            print(f"  {name:16s} graph vs eager: {same(a, b)}; graph twice: {same(a, a2)}; reversed order: "
                  f"{same(a, rev)}; batch 8 vs 64: {same(a, w)}; lengths {min(lens)}-{max(lens)}")
        ref = []
        for p in prompts:
            ids = torch.tensor([p], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=150, do_sample=False,
                                 eos_token_id=stops, pad_token_id=0)
            r = out[0, len(p):].tolist()
            ref.append(r[: next((k + 1 for k, t in enumerate(r) if t in stops), len(r))])
        a = graph.generate(prompts, SamplingParams(1, 0.0, 0, 1.0, 150), seed=0)
        b = eager.generate(prompts, SamplingParams(1, 0.0, 0, 1.0, 150), seed=0)
        print(f"  greedy == HF generate: graph {sum(x[0].token_ids == r for x, r in zip(a, ref))}/{len(ref)}, "
              f"eager {sum(x[0].token_ids == r for x, r in zip(b, ref))}/{len(ref)}; graphs captured "
              f"{graph.captures + wide.captures}, eager engine {eager.captures}")
        del model, graph, eager, wide


def run_generate_batch(model, prompts, k, new, stops, fixed):
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                           num_return_sequences=k, eos_token_id=sorted(stops) if stops else -1, pad_token_id=0)
    res = model.generate_batch(inputs=prompts, generation_config=cfg)
    return sum(len(r.generated_tokens) for r in res.values())


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    n = fn()
    sync(device)
    return n, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="cpu-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bandwidth", type=float, default=None, help="bytes/s (default: 3.35e12 on CUDA, measured on CPU)")
    ap.add_argument("--prompts", type=int), ap.add_argument("--new", type=int), ap.add_argument("--batch", type=int)
    ap.add_argument("--one-prompts", type=int, help="prompts (x K) run one at a time (a rate; a subset suffices)")
    ap.add_argument("--workloads", default="fixed,varied")
    ap.add_argument("--generate-batch", action="store_true", help="also time transformers' generate_batch")
    ap.add_argument("--skip", default="", help="comma-separated methods to skip: one,padded,engine")
    ap.add_argument("--engine-eager", action="store_true", help="also time the engine with cuda_graphs=False")
    ap.add_argument("--check", action="store_true", help="first compare graph and eager decoding (small model)")
    ap.add_argument("--profile", action="store_true", help="finally split a decode step's time (CUDA)")
    args = ap.parse_args()
    if args.check:
        check_graphs(torch.device(args.device))
    pre = PRESETS[args.preset]
    P, K, NEW = args.prompts or pre["prompts"], pre["k"], args.new or pre["new"]
    B, ONE = args.batch or pre["batch"], args.one_prompts or pre["one_prompts"]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(**pre["model"], max_position_embeddings=32768)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = args.bandwidth or (3.35e12 if device.type == "cuda" else cpu_bandwidth())
    g = torch.Generator().manual_seed(1)
    V = cfg.vocab_size
    prompts = [torch.randint(3, V, (int(torch.randint(pre["min_len"], pre["max_len"] + 1, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(P)]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# {args.preset}: {pbytes / 1e6:.0f} MB params ({dtype}), device {dev_name}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; {P} prompts x K={K}, prompt lengths {pre['min_len']}-{pre['max_len']}, "
          f"engine/padded batch {B} sequences")
    step = pbytes / bw
    print(f"# bandwidth {bw / 1e9:.1f} GB/s -> roofline {step * 1e3:.2f} ms/step, "
          f"{B / step:.0f} tok/s at batch {B}, {1 / step:.0f} tok/s at batch 1")
    skip = set(args.skip.split(","))
    # warm-up (allocator, kernels)
    run_engine(model, prompts[:2], 2, 4, set(), B)
    run_padded(model, prompts[:2], 2, 4, set(), True, device, B)
    for wl in args.workloads.split(","):
        fixed = wl == "fixed"
        cap = NEW if fixed else 4 * NEW
        stops = set() if fixed else set(torch.randperm(V - 3, generator=g)[: max(1, (V - 3) // NEW)].add(3).tolist())
        res = {}
        if "one" not in skip:
            res["a one-at-a-time generate"] = timed(
                lambda: run_one_at_a_time(model, prompts[:ONE], K, cap, stops, fixed, device), device)
        if "padded" not in skip:
            res["b padded batched generate"] = timed(
                lambda: run_padded(model, prompts, K, cap, stops, fixed, device, B), device)
        steps = {}
        if args.engine_eager:
            STEPS.clear()
            res["c0 ssb engine, eager steps"] = timed(
                lambda: run_engine(model, prompts, K, cap, stops, B, cuda_graphs=False), device)
            steps["c0 ssb engine, eager steps"] = step_stats(B)
        if "engine" not in skip:
            STEPS.clear()
            res["c ssb engine"] = timed(lambda: run_engine(model, prompts, K, cap, stops, B), device)
            steps["c ssb engine"] = step_stats(B) + f" (roofline {step * 1e3:.2f} ms)"
        if args.generate_batch:
            try:
                res["d transformers generate_batch"] = timed(
                    lambda: run_generate_batch(model, prompts, K, cap, stops, fixed), device)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"  generate_batch failed: {type(e).__name__}: {str(e)[:200]}")
        print(f"\n## workload {wl}: max_new_tokens {cap}" + ("" if fixed else f", {len(stops)} stop ids"))
        rates = {}
        for name, (n, s) in res.items():
            rates[name] = n / s
            print(f"  {name:32s} {n:7d} tokens {s:8.2f} s {n / s:9.1f} tok/s")
        for name, line in steps.items():
            print(f"  {name} decode steps: {line}")
        if "c ssb engine" in rates:
            for name, r in rates.items():
                if name != "c ssb engine":
                    print(f"  engine / {name.split(' ', 1)[1]}: {rates['c ssb engine'] / r:.2f}x")
            print(f"  engine vs roofline at batch {B}: {rates['c ssb engine'] / (B / step):.3f} of "
                  f"{B / step:.0f} tok/s ({(B / step) / rates['c ssb engine']:.1f}x from it)")
    if args.profile:
        profile_engine(model, prompts, K, B, device)


if __name__ == "__main__":
    main()
