"""The transformer zoo: a GPT-style decoder with every block the paper compares."""

from ofe.models.blocks import BLOCKS, BlockSpec
from ofe.models.config import BLOCK_TYPES, PRESETS, GPTConfig, expected_param_count, preset, preset_fields, presets_table
from ofe.models.gpt import GPT, Tap, lm_loss

__all__ = ["BLOCKS", "BLOCK_TYPES", "BlockSpec", "preset_fields", "presets_table", "PRESETS", "GPT", "GPTConfig", "Tap", "expected_param_count", "lm_loss", "preset"]
