"""ssb: Semantic Soft Bootstrapping — post-train an LLM for long chain-of-thought math by distilling it into
itself from a hinted view of its own rollouts, without reinforcement learning."""

__version__ = "0.1.0"
