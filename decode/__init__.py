"""Checking drafts against the target model: tree attention, acceptance, the generation loop."""

from decode.generation import GenerationOutput, GenerationStats, generate, online_state
from decode.model import load_model, load_tokenizer

__all__ = ["generate", "online_state", "load_model", "load_tokenizer", "GenerationOutput", "GenerationStats"]
