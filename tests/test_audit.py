"""The prompt audit: the pure checks on hand-made token lists, and ``ssb prompts`` end to end on the tiny model
(tokenizer only), on the smoke config and on deliberately broken setups."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO
from ssb.audit.checks import (ERROR, WARNING, TokenInfo, check_bos, check_context, check_generation_prompt,
                              check_reply_targets, check_same_prompt, check_same_template, check_template, exit_status)
from ssb.cli import main

# a hand-made chat tokenizer: 1 <|im_start|>, 2 <|im_end|>, 0 <|endoftext|>, 3 <s> (BOS); 7 8 = "assistant\n"
INFO = TokenInfo(special_ids=frozenset({0, 1, 2, 3}), bos_id=3, adds_bos=True, stop_ids=frozenset({2}),
                 end_of_turn_id=2, generation_prompt=(1, 7, 8),
                 names={0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 3: "<s>"})
SYSTEM, OTHER_SYSTEM = [50, 51, 52], [50, 51, 53]


def chat(user: list[int], system: list[int] = SYSTEM, bos: int = 1) -> list[int]:
    """<s> <|im_start|>system… <|im_end|>\\n <|im_start|>user… <|im_end|>\\n <|im_start|>assistant\\n"""
    return [3] * bos + [1, 40, *system, 2, 9, 1, 41, *user, 2, 9, 1, 7, 8]


def names(findings) -> list[str]:
    return [f.name for f in findings]


# ------------------------------------------------------------------------------------------- the pure checks


def test_bos_doubled_missing_and_fine():
    assert names(check_bos(chat([60]), INFO, "p")) == []
    (f,) = check_bos(chat([60], bos=2), INFO, "p")
    assert (f.name, f.severity) == ("double-bos", ERROR) and "2 BOS" in f.message and "<s>=3" in f.message
    (f,) = check_bos(chat([60], bos=0), INFO, "p")
    assert (f.name, f.severity) == ("missing-bos", ERROR)
    assert check_bos(chat([60], bos=0), INFO, "p", missing=WARNING)[0].severity == WARNING
    # a tokenizer that adds no BOS to text does not expect one; no BOS id at all: nothing to check
    assert check_bos(chat([60], bos=0), TokenInfo(bos_id=3), "p") == []
    assert check_bos([3, 3, 5], TokenInfo(), "p") == []
    # the BOS id further on (SmolLM2's BOS is <|im_start|>, which opens every turn) is not a doubled BOS
    assert check_bos([3, 5, 3, 6, 3], INFO, "p") == []


def test_context_prompt_past_it_and_replies_that_would_run_past_it():
    assert check_context(100, 50, 4096, "p", "teach.max_new_tokens") == []
    assert check_context(100, 10**6, None, "p", "x") == []  # context unknown: nothing to say
    (f,) = check_context(4096, 1, 4096, "p", "teach.max_new_tokens")
    assert (f.name, f.severity) == ("prompt-past-context", ERROR)
    (f,) = check_context(3000, 2048, 4096, "teacher", "teach.max_new_tokens", "engine.max_model_len")
    assert (f.name, f.severity, f.where) == ("reply-past-context", WARNING, "teacher")
    assert "1096 tokens" in f.message and "engine.max_model_len (4096)" in f.message


def test_prompt_cut_mid_template():
    assert check_generation_prompt(chat([60]), INFO, "p") == []
    (f,) = check_generation_prompt(chat([60])[:-1], INFO, "p")  # the header's last token cut off
    assert (f.name, f.severity) == ("prompt-cut", ERROR)
    assert names(check_generation_prompt(chat([60])[:8], INFO, "p")) == ["prompt-cut"]  # cut inside the user turn


def test_template_opens_the_assistant_turn_and_stops_at_its_end():
    assert check_template(INFO) == []
    no_header = TokenInfo(**{**INFO.__dict__, "generation_prompt": ()})
    assert [(f.name, f.severity) for f in check_template(no_header)] == [("no-generation-prompt", ERROR)]
    not_a_stop = TokenInfo(**{**INFO.__dict__, "end_of_turn_id": 0})  # turns end with <|endoftext|>, stop is <|im_end|>
    (f,) = check_template(not_a_stop)
    assert (f.name, f.severity) == ("end-of-turn-not-stop", ERROR) and "<|endoftext|>=0" in f.message


def test_reply_targets_end_with_end_of_turn():
    assert check_reply_targets([70, 71, 2], INFO, "r") == []
    (f,) = check_reply_targets([70, 71], INFO, "r")  # the end-of-turn stripped
    assert (f.name, f.severity) == ("missing-end-of-turn", ERROR) and "<|im_end|>=2" in f.message
    (f,) = check_reply_targets([70, 71], INFO, "r", paper_format=True)
    assert f.severity == WARNING and "paper_student_format" in f.message
    assert names(check_reply_targets([], INFO, "r")) == ["missing-end-of-turn"]


def test_student_and_teacher_under_one_template():
    student, teacher = chat([60]), chat([61, 62, 60, 63])
    assert check_same_template(student, teacher, INFO, "p", ("student", "teacher")) == []
    # another system prompt (e.g. a template that stamps today's date, rendered on another day)
    (f,) = check_same_template(chat([60], OTHER_SYSTEM), teacher, INFO, "p", ("student", "teacher"))
    assert (f.name, f.severity) == ("template-mismatch", ERROR) and "outside the user's turn" in f.message
    # the paper's student: plain text, no chat template: a warning when it is the configured choice
    plain = [50, 51, 52, 9, 60, 9]
    (f,) = check_same_template(plain, teacher, INFO, "p", ("student", "teacher"))
    assert f.severity == ERROR and "0 special tokens" in f.message
    (f,) = check_same_template(plain, teacher, INFO, "p", ("student", "teacher"), expected="the authors' choice")
    assert (f.name, f.severity) == ("template-mismatch", WARNING) and "the authors' choice" in f.message
    # a doubled BOS on one side only is another wrapper too
    assert names(check_same_template(chat([60], bos=2), teacher, INFO, "p", ("a", "b"))) == ["template-mismatch"]


def test_same_prompt_and_exit_status():
    assert check_same_prompt(chat([60]), chat([60]), "p", ("a", "b")) == []
    (f,) = check_same_prompt(chat([60]), chat([61]), "p", ("training", "evaluation"))
    assert f.severity == ERROR and "first at token 10" in f.message
    (w,) = check_same_prompt([1], [2], "p", ("a", "b"), expected="paper")
    assert w.severity == WARNING
    assert exit_status([]) == 0 and exit_status([w]) == 0 and exit_status([w, f]) == 1


# ------------------------------------------------------------------------------------------- ssb prompts


@pytest.fixture
def cli(capsys, monkeypatch, tiny_model_dir):
    """Runs ``ssb prompts`` in the repository root, offline, where loading a model's weights is an error."""
    import datasets
    import transformers

    monkeypatch.chdir(REPO)
    monkeypatch.delenv("SSB_DATA_DIR", raising=False)

    def boom(*a, **k):
        raise AssertionError(f"ssb prompts reached for model weights or the hub: {a} {k}")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    monkeypatch.setattr("ssb.models.load_model", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)

    def run(*argv):
        code = main(["prompts", *map(str, argv)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _findings(out: str) -> list[str]:
    """The finding lines: 'SEVERITY name [where] message'."""
    return out.split("=== findings ===\n", 1)[1].splitlines()[:-1]


def test_smoke_config_renders_every_prompt_and_passes(cli):
    code, out, err = cli("--config", "configs/smoke.yaml", "--n", "2")
    assert code == 0, out + err
    assert "tokenizer and config only, no weights" in out
    assert out.count("=== training problem") == 2 and "training problem 2 of 2: arith-1" in out
    assert "attempts and replies: PLACEHOLDERS" in out and "[PLACEHOLDER: a sampled attempt" in out
    for title in ("student prompt (distill; rollout, evaluate and grpo render the same ids)",
                  "teacher prompt (teach.prompt=", "reply targets (distill trains on these; PLACEHOLDER", "evaluate arith (arith-0)",
                  "evaluate gsm8k_test (gsm8k-0)"):
        assert title in out, title
    # text with the special tokens and newlines visible, and the ids
    assert "  │ <|im_start|>system⏎\n" in out and "  │ <|im_start|>assistant⏎" in out
    assert "\\boxed{12}<|im_end|>" in out and "ids: [1, 578, 201," in out
    assert "end of an assistant turn: <|im_end|>=2" in out and "context: 4096 positions;" in out
    assert _findings(out) == ["none"] and "0 errors, 0 warnings" in out


def test_paper_student_format_is_flagged_as_a_warning(cli):
    code, out, _ = cli("--config", "configs/smoke.yaml", "--n", "1", "distill.paper_student_format=true")
    assert code == 0
    lines = _findings(out)
    assert {line.split()[1] for line in lines} == {"template-mismatch", "missing-end-of-turn", "prompt-mismatch"}
    assert all(line.startswith("WARNING") and "the authors' choice" in line for line in lines)
    assert "rollout prompt (the base model is sampled on this; evaluate and grpo render the same way)" in out
    # which stage renders what comes from the registry
    assert ("what each stage renders: rollout: sampled; teach: teacher; distill: student, teacher, targets; "
            "evaluate: sampled; grpo: sampled") in out


def _tokenizer_only_model(tiny_model_dir: Path, out: Path, template: str | None = None, bos: str | None = None) -> Path:
    """A copy of the tiny model without its weights (tokenizer and config files only), its chat template or BOS
    changed."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    if bos:
        tok.bos_token = bos
    if template:
        tok.chat_template = template
    tok.save_pretrained(out)
    for f in ("config.json", "generation_config.json"):
        shutil.copy(tiny_model_dir / f, out / f)
    return out


@pytest.mark.parametrize("change, bos, expected", [
    # a template that writes BOS on its own and once more
    (lambda t: "{{- bos_token }}{{- bos_token }}" + t, "<|endoftext|>", "double-bos"),
    # a template without the add_generation_prompt branch
    (lambda t: t.split("{%- if add_generation_prompt")[0], None, "no-generation-prompt"),
    # a template that closes turns with a token generation does not stop at
    (lambda t: t.replace("'<|im_end|>'", "'<|endoftext|>'"), None, "end-of-turn-not-stop"),
])
def test_broken_chat_templates_are_errors(cli, tiny_model_dir, tmp_path, change, bos, expected):
    from ssb.tiny import CHAT_TEMPLATE

    model = _tokenizer_only_model(tiny_model_dir, tmp_path / "m", change(CHAT_TEMPLATE), bos)
    assert not list(model.glob("*.safetensors"))  # no weights to load
    code, out, err = cli("--config", "configs/smoke.yaml", "--n", "1", f"model.name_or_path={model}")
    assert code == 1, out + err
    errors = [line for line in _findings(out) if line.startswith("ERROR")]
    assert expected in {line.split()[1] for line in errors}, errors
    assert not out.splitlines()[-1].startswith("ssb prompts: 0 errors")


def _run_dir(tmp_path: Path, tiny_model_dir: Path, *, strip_end: bool = False, system: str | None = None) -> Path:
    """A run directory as curate and teach leave it, written by hand: two pairs and their teacher examples (replies
    as sampled, end-of-turn included unless ``strip_end``; teacher prompts under ``system`` if given)."""
    from transformers import AutoTokenizer

    from ssb.models import render_chat
    from ssb.prompts import SYSTEM_PROMPT, teacher_messages
    from ssb.tiny import reply

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    d = tmp_path / "run"
    (d / "curate").mkdir(parents=True)
    (d / "teach").mkdir()
    pairs, examples = [], []
    for i, (a, b) in enumerate([(6, 6), (0, 4)]):
        good, bad = reply(a, b, a + b), reply(a, b, a + b + 1)
        pairs.append({"id": f"arith-{i}", "question": f"What is {a} + {b}?", "answer": str(a + b), "grader": "gsm8k",
                      "correct": good, "incorrect": bad, "correct_answer": str(a + b),
                      "incorrect_answer": str(a + b + 1)})
        msgs = teacher_messages(pairs[-1]["question"], good, bad, "both", system or SYSTEM_PROMPT, "guided",
                                str(a + b))
        ids = tok(reply(a, b, a + b), add_special_tokens=False)["input_ids"] + ([] if strip_end else [2])
        examples.append({"id": f"arith-{i}", "question": pairs[-1]["question"], "answer": str(a + b),
                         "grader": "gsm8k", "teacher_prompt_ids": render_chat(tok, msgs), "reply_ids": ids,
                         "reply_text": reply(a, b, a + b), "attempt": 0})
    (d / "curate" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (d / "teach" / "examples.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    return d


def _stamps(d: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in d.rglob("*")}


def test_run_dir_supplies_real_attempts_and_replies(cli, tiny_model_dir, tmp_path):
    d = _run_dir(tmp_path, tiny_model_dir)
    before = _stamps(d)
    code, out, err = cli("--config", "configs/smoke.yaml", "--run-dir", d)
    assert code == 0, out + err
    assert f"attempts and replies: {d}/teach/examples.jsonl" in out and "PLACEHOLDER" not in out
    assert "teacher prompt (teach.prompt=guided, context=both; as stored in teach/examples.jsonl)" in out
    assert "6 + 6 = 13.⏎" in out and "The answer is \\boxed{12}.<|im_end|>" in out  # the attempts, the reply
    assert _findings(out) == ["none"]
    assert _stamps(d) == before  # the audit writes nothing

    # the same with only the curated pairs: real attempts, a placeholder reply
    (d / "teach" / "examples.jsonl").unlink()
    code, out, _ = cli("--config", "configs/smoke.yaml", "--run-dir", d, "--n", "1")
    assert code == 0 and f"attempts and replies: {d}/curate/pairs.jsonl" in out
    assert "context=both; attempts: curate/pairs.jsonl)" in out
    assert "reply targets (distill trains on these; PLACEHOLDER" in out


def test_reply_without_end_of_turn_is_an_error(cli, tiny_model_dir, tmp_path):
    d = _run_dir(tmp_path, tiny_model_dir, strip_end=True)
    code, out, _ = cli("--config", "configs/smoke.yaml", "--run-dir", d)
    assert code == 1
    (line,) = _findings(out)
    assert line.startswith("ERROR   missing-end-of-turn [problem arith-0: reply targets (and 1 more)]")
    assert out.splitlines()[-1] == "ssb prompts: 2 errors, 0 warnings"


def test_teacher_prompt_under_another_system_prompt_is_an_error(cli, tiny_model_dir, tmp_path):
    """What a template stamping today's date does when teach and distill run on different days: the stored teacher
    prompt and the student's prompt differ outside the user's turn."""
    d = _run_dir(tmp_path, tiny_model_dir, system="You are a helpful assistant. Today is 1 Jan 2026.")
    code, out, _ = cli("--config", "configs/smoke.yaml", "--run-dir", d, "--n", "1")
    assert code == 1
    errors = {line.split()[1] for line in _findings(out) if line.startswith("ERROR")}
    assert errors == {"template-mismatch", "prompt-mismatch"}
    assert "the teacher replied to another prompt" in out


def test_prompts_and_replies_past_the_context(cli):
    # the tiny model has 4096 positions: attempts of up to 1900 tokens leave the teacher too little room for 1000
    code, out, _ = cli("--config", "configs/smoke.yaml", "--n", "1", "rollout.max_new_tokens=1900",
                       "teach.max_new_tokens=1000")
    assert code == 0
    (line,) = _findings(out)
    assert line.startswith("WARNING reply-past-context [teacher prompt] at worst (its 2 attempt(s) as long as "
                           "rollout.max_new_tokens=1900)")
    # vLLM told to hold 200 tokens: the teacher prompt (279 tokens) and GSM8K's (221) do not fit, arith's (52) does
    code, out, _ = cli("--config", "configs/smoke.yaml", "--n", "1", "engine.backend=vllm", "engine.max_model_len=200")
    assert code == 1
    errors = [line for line in _findings(out) if line.startswith("ERROR")]
    assert [line.split(" [")[1].split("]")[0] for line in errors] == [
        "problem arith-0: teacher prompt", "evaluate gsm8k_test (gsm8k-0)"]
    assert all("prompt-past-context" in line and "engine.max_model_len is 200" in line for line in errors)


def test_bad_n_is_a_user_error(cli):
    code, _, err = cli("--config", "configs/smoke.yaml", "--n", "0")
    assert code == 2 and err == "ssb: error: --n: must be >= 1; got 0\n"


# ------------------------------------------------------------------------------------ distill.targets=on_policy


def test_on_policy_checks_student_and_teacher_templates_and_shows_the_hint(cli, tiny_model_dir, tmp_path):
    """On-policy the student's samples are read by the teacher under the hinted prompt: the two prompts must share a
    template as for SSB. hint=pair: the teach stage's prompt, as stored."""
    d = _run_dir(tmp_path, tiny_model_dir)
    code, out, err = cli("--config", "configs/smoke.yaml", "--run-dir", d, "--n", "1", "distill.targets=on_policy")
    assert code == 0, out + err
    assert "distill.targets=on_policy, distill.hint=pair\n" in out
    assert "teacher prompt (teach.prompt=guided, context=both; as stored in teach/examples.jsonl)" in out
    assert ("reply targets (distill.targets=on_policy trains on the student's own sampled replies, which end with the "
            "stop token when finished; shown: the teacher's reply from teach/examples.jsonl)") in out
    assert _findings(out) == ["none"]

    d = _run_dir(tmp_path / "dated", tiny_model_dir, system="You are a helpful assistant. Today is 1 Jan 2026.")
    code, out, _ = cli("--config", "configs/smoke.yaml", "--run-dir", d, "--n", "1", "distill.targets=on_policy")
    assert code == 1
    errors = {line.split()[1] for line in _findings(out) if line.startswith("ERROR")}
    assert errors == {"template-mismatch", "prompt-mismatch"}
    assert "[problem arith-0: student vs teacher prompt]" in out
    # the authors' plain-text student: the same check, as a warning; and the mix shows on the targets
    code, out, _ = cli("--config", "configs/smoke.yaml", "--n", "1", "distill.targets=on_policy",
                       "distill.paper_student_format=true", "distill.mix=0.5")
    assert code == 0
    assert "template-mismatch" in {line.split()[1] for line in _findings(out) if line.startswith("WARNING")}
    assert "a fraction distill.mix=0.5 of them are the teacher's replies; shown: a PLACEHOLDER" in out


def test_on_policy_correct_hint_renders_the_teacher_prompt_as_distill_does(cli, tiny_model_dir, tmp_path):
    """hint=correct: distill renders the teacher's prompt now, from the correct attempt only; the stored prompt of
    teach (here under a dated system prompt) is not what the teacher reads, so it is not held against the run."""
    d = _run_dir(tmp_path, tiny_model_dir, system="You are a helpful assistant. Today is 1 Jan 2026.")
    code, out, err = cli("--config", "configs/smoke.yaml", "--run-dir", d, "--n", "1", "distill.targets=on_policy",
                         "distill.hint=correct")
    assert code == 0, out + err
    assert "distill.targets=on_policy, distill.hint=correct\n" in out
    assert ("teacher prompt (distill.hint=correct: the correct attempt only, teach.prompt=guided; attempts: "
            "curate/pairs.jsonl)") in out
    teacher = out.split("--- teacher prompt", 1)[1].split("--- reply targets", 1)[0]
    assert "6 + 6 = 12." in teacher and "6 + 6 = 13." not in teacher and "Today is" not in teacher
    assert _findings(out) == ["none"]


def test_on_policy_reference_hint_reads_the_training_sets_solutions(cli):
    code, out, err = cli("--config", "configs/smoke.yaml", "--n", "1", "distill.targets=on_policy",
                         "distill.hint=reference", "rollout.data={name: gsm8k, split: train, limit: 4}")
    assert code == 0, out + err
    assert "distill.targets=on_policy, distill.hint=reference\n" in out
    assert "teacher prompt (distill.hint=reference: the training set's reference solution, rollout.data gsm8k)" in out
    teacher = out.split("--- teacher prompt", 1)[1].split("--- reply targets", 1)[0]
    assert "<reference_solution>⏎\n  │ Natalia sold 48/2 = 24 clips in May." in teacher
    assert _findings(out) == ["none"]
    # a training set without reference solutions: refused as distill refuses it, before anything is printed
    code, out, err = cli("--config", "configs/smoke.yaml", "--n", "1", "distill.targets=on_policy",
                         "distill.hint=reference")
    assert code == 2 and out == ""
    assert err.startswith("ssb: error: distill.hint=reference: the training set has no reference solution for "
                          "'arith-0'")
