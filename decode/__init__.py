"""Checking drafts against the target model: tree attention, acceptance, the generation loop."""

from decode.generation import GenerationOutput, GenerationStats, generate
from decode.model import load_model, load_tokenizer

__all__ = ["generate", "load_model", "load_tokenizer", "GenerationOutput", "GenerationStats"]
