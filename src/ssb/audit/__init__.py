"""The prompt audit (``ssb prompts``): see what the student, the teacher and the evaluation see, before a GPU runs.

Two halves, one module each:

- **Checks** (:mod:`ssb.audit.checks`; pure: no I/O, no tokenizer object): functions of token id lists and a :class:`TokenInfo` (what they
  need to know about the tokenizer and its chat template), each returning :class:`Finding`\\ s (name, severity,
  message, where). Every check is something ssb's options can actually produce:

  ``double-bos``            the prompt starts with BOS twice: a chat template that writes it twice (ssb adds none
                            itself: it tokenises rendered chats with ``add_special_tokens=False``);
  ``missing-bos``           the tokenizer puts BOS in front of text but the rendered prompt has none, for the same
                            reason: a template without ``bos_token``, or the paper's plain-text student;
  ``prompt-past-context``   a prompt as long as the context (``max_position_embeddings``, or vLLM's
                            ``engine.max_model_len``): it would be cut or refused, and leaves no room for a reply;
  ``reply-past-context``    prompt + ``max_new_tokens`` (or prompt + reply, in distill) longer than the context:
                            long replies run past the positions the model was trained on;
  ``prompt-cut``            a prompt that does not end with the template's assistant header (the generation
                            prompt): cut mid-template, or rendered without ``add_generation_prompt``;
  ``no-generation-prompt``  the chat template adds nothing for ``add_generation_prompt``;
  ``end-of-turn-not-stop``  the token the template closes an assistant turn with is not a stop token: generation
                            would run on to ``max_new_tokens`` and every teacher reply be rejected as truncated;
  ``missing-end-of-turn``   the reply targets do not end with an end-of-turn token: the student never learns to stop
                            (a warning under ``distill.paper_student_format``, which drops it on purpose);
  ``template-mismatch``     the student's and the teacher's prompts differ outside the user turn (other special
                            tokens, another system turn): the KL target is conditioned on a different wrapper than
                            the student's (a warning under ``distill.paper_student_format``: the authors' choice);
  ``prompt-mismatch``       two prompts that should be the same ids are not (the student's training prompt and the
                            rollout / evaluation prompt; a stored teacher prompt and the one the config renders now);
  ``benchmark-unavailable`` an evaluation benchmark that cannot be loaded (the evaluate stage would fail on it).

- **The command** (:func:`ssb.audit.command.audit_prompts`): loads the tokenizer (and the model's config, never its weights), renders
  for the first problems what each stage renders (the student prompt through :func:`ssb.stages.distill.build_examples`,
  the teacher prompt as :mod:`ssb.stages.teach` does, or under ``distill.targets=on_policy`` as ``distill.hint`` picks it,
  the evaluation prompt of each benchmark), prints text and ids, runs the checks and returns the exit status: 1 if
  any finding is an error, else 0.
"""
