"""The fixed-shape decode step of :class:`ssb.engine.transformers_engine.TransformersEngine` and its CUDA graph.

Every step has the same shapes: ``rows`` one-token queries against the whole KV buffer of ``cap`` columns (a
multiple of 64). The new key/value column is written with ``index_copy_`` at a *device* index; tokens, positions,
each row's first live column and the current column arrive as one small ``[rows, 4]`` tensor; the attention mask
is built from it on the device and handed to the model as a 4D tensor, which transformers takes as prepared and
builds no mask of its own (unlike a ``{"full_attention": mask}`` mapping, this also works for models whose forward
takes no mapping, e.g. Llama). Attention is ``ssb_decode`` (registered with transformers at the first step, not at
import; switched in only while the step runs or is captured): SDPA with the query heads of each KV head on SDPA's
query-length axis, so grouped-query attention needs no ``repeat_kv``. Nothing in the step reads a host value, so
it can be captured once in a ``torch.cuda.CUDAGraph`` and replayed while the buffers stay the same tensors:
compaction and room-making move columns inside them (in place); only a reallocation (more columns, or fewer rows)
needs a new capture. The buffers, their layers (``StaticLayer``) and their moves are :mod:`ssb.engine.kv_buffer`'s.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

import torch
from transformers import AttentionInterface

from ssb.engine.windows import window_attention

ATTENTION = "ssb_decode"
COLUMNS = 64  # the KV capacity is rounded up to a multiple of this


def round_capacity(cap: int) -> int:
    return -(-cap // COLUMNS) * COLUMNS


def _decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """One query token per row: ``query`` [b, h, 1, d] against the whole ``key``/``value`` [b, kvh, cap, d] (one
    window over every row and column: :func:`ssb.engine.windows.window_attention`)."""
    return window_attention(module, query, key, value, attention_mask, scaling, windows=[(0, query.shape[0], 0)])


def supports_fixed_step(model) -> bool:
    """Attention through transformers' attention interface (so ours can be switched in; not e.g. Bloom, MPT,
    GPT-Neo, which take the mask as given and would misread a prepared 4D one) and full attention everywhere: no
    sliding-window layers, no attention-logit soft-capping. Also the condition of the CPU's windowed steps
    (:mod:`ssb.engine.windows`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model: its base
    cfg = model.config.get_text_config()
    return (getattr(type(base), "_supports_attention_backend", False)
            and set(getattr(cfg, "layer_types", None) or ["full_attention"]) == {"full_attention"}
            and getattr(cfg, "sliding_window", None) is None
            and getattr(cfg, "attn_logit_softcapping", None) is None)


@contextlib.contextmanager
def attention_as(model, name: str, fn):
    """Run ``model`` with ``fn`` registered as attention ``name`` and switched in for every module, for the duration of
    the block (a forward, or a CUDA-graph capture); the model's own attention setting is restored after."""
    AttentionInterface.register(name, fn)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None),
                                                                           "_attn_implementation_internal")}
    saved = {k: c._attn_implementation_internal for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation_internal = name
    try:
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation_internal = saved[k]


def with_cache(model, cache) -> dict:
    """The keyword under which ``model``'s forward takes a KV cache: ``cache`` in recent transformers,
    ``past_key_values`` before (deprecated there, to be removed in 5.40), whichever this version has."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model: its base
    return {_cache_kwarg(type(base)): cache}


@functools.lru_cache(maxsize=None)
def _cache_kwarg(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def fixed_forward(model, cache, inp: torch.Tensor) -> torch.Tensor:
    """Last-position logits of one decode step. ``inp`` [rows, 4]: token, position, first live column, current
    column (the same in every row)."""
    col = inp[:1, 3]
    for layer in cache.layers:
        layer.col = col
    cols = torch.arange(cache.layers[0].kbuf.shape[2], device=inp.device)
    mask = ((cols >= inp[:, 2:3]) & (cols <= inp[:, 3:4]))[:, None, None]  # [rows, 1, 1, cap]
    with attention_as(model, ATTENTION, _decode_attention):  # a 4D mask is taken as prepared: transformers builds none
        out = model(input_ids=inp[:, :1], position_ids=inp[:, 1:2], attention_mask=mask, use_cache=True,
                    logits_to_keep=1, **with_cache(model, cache))
    return out.logits[:, -1]


class CudaGraphStep:
    """``forward(inp)`` captured in a CUDA graph on first use, then replayed; ``reset()`` after the buffers it
    writes are reallocated. If capture fails it warns once and runs ``forward`` eagerly from then on."""

    def __init__(self, forward, on_capture=None):
        self.forward, self.on_capture, self.failed = forward, on_capture, False
        self.reset()

    def reset(self):
        self.graph = self.inp = self.out = None

    def __call__(self, inp: torch.Tensor) -> torch.Tensor:
        if self.graph is None and not self.failed:
            self._capture(inp)
        if self.graph is None:
            return self.forward(inp)
        self.inp.copy_(inp)
        self.graph.replay()
        return self.out

    def _capture(self, inp: torch.Tensor):
        static_inp = inp.clone()
        try:
            side = torch.cuda.Stream(inp.device)
            side.wait_stream(torch.cuda.current_stream(inp.device))
            with torch.cuda.stream(side):  # warm-up (lazy kernel/workspace set-up); rewrites this step's column
                self.forward(static_inp)
            torch.cuda.current_stream(inp.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # a private memory pool per graph (one shared pool tripped an assert)
                out = self.forward(static_inp)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to the same step without a graph
            warnings.warn(f"CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); running the "
                          "fixed-shape step without a graph", RuntimeWarning, stacklevel=3)
            self.failed = True
            return
        self.graph, self.inp, self.out = graph, static_inp, out
        if self.on_capture is not None:
            self.on_capture()
