"""The names some config values choose from, one list each. Defined here, in a module that imports nothing, so that
the config schema (:mod:`ssb.config`) can offer them without importing torch; the modules that implement the names
import their list from here."""

LOSSES = ("forward_kl", "reverse_kl", "jsd")  # distill.loss: the divergences ssb.losses computes
TEACHER_CONTEXTS = ("both", "correct_only", "none")  # teach.context: which attempts the teacher sees (ssb.prompts)
TEACHER_PROMPTS = ("guided", "paper", "resolve")  # teach.prompt: the teacher's instructions (ssb.prompts)
GRADERS = ("gsm8k", "math500", "aime", "math")  # a dataset's grader: which grading rules apply (ssb.grading)
HINTS = ("pair", "correct", "reference")  # distill.hint: the on-policy teacher's context (ssb.stages.on_policy)
# distill.report_to / grpo.report_to: the experiment trackers accelerate's tracking layer offers (ssb.tracking)
TRACKERS = ("none", "tensorboard", "wandb", "trackio", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab")
