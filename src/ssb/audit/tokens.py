"""What ``ssb prompts`` knows of a model without its weights: the tokenizer's special tokens, BOS, generation prompt
and end of an assistant turn (:func:`token_info`), and the context and generation config from its config files
(:func:`model_limits`)."""

from __future__ import annotations

from ssb.audit.checks import TokenInfo

_SENTINEL = "SSB-AUDIT-REPLY"


def token_info(tokenizer, stop_ids: list[int]) -> TokenInfo:
    """The :class:`TokenInfo` of a loaded tokenizer: its special tokens, BOS, the generation prompt and the end of an
    assistant turn as its chat template renders them."""
    from ssb.prompts import student_messages

    special = set(tokenizer.all_special_ids)
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("1", add_special_tokens=True)["input_ids"][:1] == [bos]

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def text(msgs, gen):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)

    msgs = student_messages("What is 1 + 1?")
    with_gp, without = ids(text(msgs, True)), ids(text(msgs, False))
    if with_gp[:len(without)] == without:
        gp = with_gp[len(without):]
    else:  # the header changed the tokenisation of what precedes it: take the header's own tokens
        t_with, t_without = text(msgs, True), text(msgs, False)
        gp = ids(t_with[len(t_without):]) if t_with.startswith(t_without) else []
    eot = None
    try:
        full = text(msgs + [{"role": "assistant", "content": _SENTINEL}], False)
        after = ids(full[full.rindex(_SENTINEL) + len(_SENTINEL):])[:3]  # e.g. <|im_end|> \n, or ▁ </s>
        eot = next((t for t in after if t in special or t in stop_ids), None)
    except Exception:  # a template that refuses this chat: no end-of-turn to check
        pass
    names = {i: tokenizer.convert_ids_to_tokens(i) for i in special | set(stop_ids)}
    return TokenInfo(frozenset(special), bos, adds_bos, frozenset(stop_ids), eot, tuple(gp), names)


def model_limits(path: str, kw: dict) -> tuple[int | None, object]:
    """(positions the model was trained for, a stand-in holding its generation config) from the model's config
    files only: no weights are loaded."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    try:
        conf = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError):
        return None, None
    context = None
    for c in (conf, getattr(conf, "text_config", None)):
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if context is None and isinstance(getattr(c, attr, None), int):
                context = getattr(c, attr)
    try:  # as from_pretrained sets a model's generation config: its file, else from the model's config
        if "gguf_file" in kw:
            raise OSError
        gen = GenerationConfig.from_pretrained(path, **kw)
    except (OSError, ValueError, TypeError):
        gen = SimpleNamespace(eos_token_id=getattr(conf, "eos_token_id", None))
    return context, SimpleNamespace(generation_config=gen)
