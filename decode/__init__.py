"""Checking drafts against the target model: tree attention, acceptance, the generation loop."""

from retrodraft.decode.generation import GenerationOutput, GenerationStats, generate, online_state
from retrodraft.decode.hf import SpeculativeOutput, speculative
from retrodraft.decode.model import load_model, load_tokenizer

__all__ = ["generate", "speculative", "online_state", "load_model", "load_tokenizer", "GenerationOutput",
           "GenerationStats", "SpeculativeOutput"]
