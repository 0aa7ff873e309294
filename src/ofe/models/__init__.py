"""The transformer zoo: a GPT-style decoder with every block the paper compares."""

from ofe.models.config import BLOCK_TYPES, PRESETS, GPTConfig, expected_param_count, preset
from ofe.models.gpt import GPT, Tap, lm_loss

__all__ = ["BLOCK_TYPES", "PRESETS", "GPT", "GPTConfig", "Tap", "expected_param_count", "lm_loss", "preset"]
