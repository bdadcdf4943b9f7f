"""Peak memory and step time of the distillation loss: naive full-vocabulary logits vs the chunked loss.

For each reply length N, three loss implementations run forward + backward w.r.t. the student's final hidden states
(N, H) through a frozen lm_head (V, H), forward KL at T=2 scaled by T^2 (the paper's default):

- ``naive``:   student and teacher logits materialised as full (N, V) tensors, then ``ssb.losses.distill_loss``
               (upcast to fp32 inside);
- ``chunked``: ``ssb.chunked_losses.chunked_distill_loss`` (lm_head applied ``--chunk`` positions at a time,
               checkpointed);
- ``topk``:    ``ssb.chunked_losses.chunked_topk_distill_loss`` against a k=64 cached teacher
               (``teacher_tempered=True``; the cache is built outside the timed region, as the distill stage does
               before training).

Every case runs in a fresh subprocess so its peak is its own. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
minus the allocation before the step (after one warm-up step); on CPU the growth of the process's peak resident set
over the step (``VmHWM`` reset through ``/proc/self/clear_refs`` just before it, minus ``VmRSS`` then), measured on
the first step (tensors this large are mmap-allocated and returned to the OS when freed, so RSS follows the live
tensors). Naive and chunked write their loss and gradient; the parent compares
them. Also printed: bytes per token of the top-k teacher cache (k=64, as written by ``ssb.teacher_cache``) vs full
fp32 logits (V x 4).

    PYTHONPATH=src python benchmarks/distill_memory.py                     # CPU: H=256, fp32
    PYTHONPATH=src python benchmarks/distill_memory.py --device cuda       # Qwen2.5-3B lm_head: H=2048, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from ssb.chunked_losses import chunked_distill_loss, chunked_topk_distill_loss
from ssb.losses import distill_loss, topk_teacher

METHODS = ("naive", "chunked", "topk")
LOSS_KW = dict(kind="forward_kl", temperature=2.0, scale_t2=True)


def _inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(v, h, generator=g) / h ** 0.5).to(device, dtype)
    sh = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_(True)
    th = (torch.randn(n, h, generator=g) * 0.5).to(device, dtype) + sh.detach()  # a related teacher
    return sh, th, w


def _step(method, sh, th, w, chunk, cached):
    if method == "naive":
        s_logits = F.linear(sh, w)
        with torch.no_grad():
            t_logits = F.linear(th, w)
        loss = distill_loss(s_logits, t_logits, **LOSS_KW)
    elif method == "chunked":
        loss = chunked_distill_loss(sh, th, w, chunk_size=chunk, **LOSS_KW)
    else:
        loss = chunked_topk_distill_loss(sh, *cached, w, chunk_size=chunk, teacher_tempered=True, **LOSS_KW)
    loss.backward()
    return loss


def _rss(field: str) -> int:
    """VmRSS / VmHWM (peak since the last reset) of this process, in bytes (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs) and return that baseline."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss("VmRSS")


def run_case(a) -> dict:
    """One measurement (child process)."""
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sh, th, w = _inputs(a.n, a.hidden, a.vocab, dtype, device)
    cached = None
    if a.case == "topk":
        with torch.no_grad():  # as the distill stage's cache build: chunk by chunk, stored fp16 / int32
            parts = [topk_teacher(F.linear(th[i:i + a.chunk], w), 64, 2.0) for i in range(0, a.n, a.chunk)]
        cached = (torch.cat([p[0] for p in parts]).half(), torch.cat([p[1] for p in parts]).int(),
                  torch.cat([p[2] for p in parts]))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        _step(a.case, sh, th, w, a.chunk, cached)  # warm-up (kernels, allocator)
        sh.grad = None
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    t0 = time.perf_counter()
    loss = _step(a.case, sh, th, w, a.chunk, cached)
    sync()
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss("VmHWM") - base
    if a.out:
        torch.save({"loss": loss.detach().float().cpu(), "grad": sh.grad.float().cpu()}, a.out)
    return {"peak_bytes": peak, "seconds": seconds, "loss": float(loss)}


def cache_bytes_per_token(k: int = 64, n: int = 4096, vocab: int = 151_936) -> tuple[int, float]:
    """(payload bytes/token by the schema, measured shard bytes on disk / token) for a k=64 cache of n tokens."""
    from ssb.teacher_cache import TopkCacheReader, TopkCacheWriter, bytes_per_token

    with tempfile.TemporaryDirectory() as d:
        w = TopkCacheWriter(d, k, 2.0)
        lp = torch.randn(n, k).sort(-1, descending=True).values
        w.write_shard(["x"], [lp], [torch.randint(0, vocab, (n, k))], [torch.full((n,), -3.0)])
        w.finish()
        return bytes_per_token(k), TopkCacheReader(d).stored_bytes() / n


def _child(a, method, n, out) -> dict:
    cmd = [sys.executable, __file__, "--case", method, "--n", str(n), "--device", a.device, "--hidden",
           str(a.hidden), "--vocab", str(a.vocab), "--chunk", str(a.chunk), "--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode != 0:
        return {"error": f"exit {r.returncode}: {(r.stderr.strip().splitlines() or ['?'])[-1][:120]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--hidden", type=int, default=None, help="default: 256 on CPU, 2048 (Qwen2.5-3B) on CUDA")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--max-naive-gb", type=float, default=None,
                   help="skip naive cases estimated above this (default: 8 on CPU, none on CUDA)")
    p.add_argument("--case", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.hidden = a.hidden or (2048 if a.device.startswith("cuda") else 256)
    if a.case:
        print(json.dumps(run_case(a)))
        return
    limit = a.max_naive_gb if a.max_naive_gb is not None else (None if a.device.startswith("cuda") else 8.0)
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{platform.processor() or 'cpu'}, " \
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"# distill loss memory: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {dev}")
    print(f"# V={a.vocab}, H={a.hidden}, {'bf16' if a.device.startswith('cuda') else 'fp32'} hidden/lm_head, "
          f"chunk={a.chunk}, forward KL T=2, forward+backward w.r.t. student hidden states")
    print("| N | method | peak MB | step s | naive/this peak | this/naive time | loss rel diff | grad max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    per_token = None  # naive bytes per token, from the first naive case, to estimate the next ones
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.lengths:
            res = {}
            for m in METHODS:
                if m == "naive" and limit is not None:
                    est = (per_token or 10 * a.vocab * 4) * n
                    if est > limit * 2 ** 30:
                        res[m] = {"error": f"skipped: estimated {est / 2 ** 30:.1f} GB > {limit} GB limit"}
                        continue
                res[m] = _child(a, m, n, os.path.join(tmp, f"{m}-{n}.pt"))
                if m == "naive" and "peak_bytes" in res[m]:
                    per_token = per_token or res[m]["peak_bytes"] / n
            naive = res["naive"]
            ref = torch.load(os.path.join(tmp, f"naive-{n}.pt")) if "peak_bytes" in naive else None
            for m in METHODS:
                r = res[m]
                if "error" in r:
                    print(f"| {n} | {m} | - | - | - | - | - | {r['error']} |")
                    continue
                ratio = f"{naive['peak_bytes'] / r['peak_bytes']:.1f}x" if ref is not None else "-"
                tratio = f"{r['seconds'] / naive['seconds']:.2f}" if ref is not None else "-"
                diff = gdiff = "-"
                if ref is not None and m == "chunked":
                    got = torch.load(os.path.join(tmp, f"{m}-{n}.pt"))
                    diff = f"{abs(float(got['loss'] - ref['loss'])) / abs(float(ref['loss'])):.1e}"
                    gdiff = f"{(got['grad'] - ref['grad']).abs().max().item():.1e} " \
                            f"(max |g| {ref['grad'].abs().max().item():.1e})"
                print(f"| {n} | {m} | {r['peak_bytes'] / 2 ** 20:.0f} | {r['seconds']:.2f} | {ratio} | {tratio} | "
                      f"{diff} | {gdiff} |", flush=True)
    payload, stored = cache_bytes_per_token(vocab=a.vocab)
    print(f"\ntop-k teacher cache, k=64: {payload} B/token by schema ({stored:.1f} B/token measured on disk, 4096 "
          f"tokens in one shard) vs full fp32 logits {a.vocab * 4:,} B/token: {a.vocab * 4 / payload:.0f}x smaller")


if __name__ == "__main__":
    main()
