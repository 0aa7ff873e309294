"""``ofe zoo``: build every block variant and print its per-layer outlier metrics on one corpus sample."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ofe import config as C
from ofe.data import default_sample, random_windows
from ofe.io import atomic_write
from ofe.models import BLOCK_TYPES, GPT, PRESETS, expected_param_count, preset, preset_fields
from ofe.monitor import OutlierMonitor


@dataclass(frozen=True)
class ZooOptions:
    """Build every block variant and print its per-layer outlier metrics on a corpus sample."""

    preset: str = C.field("small-cpu", f"model preset ({', '.join(PRESETS)})")
    blocks: tuple[str, ...] = C.field(BLOCK_TYPES, "comma-separated block types")
    batch_size: int = C.field(8, "sequences in the sample batch")
    seed: int = C.field(0, "seed for weights and the batch")
    sample_bytes: int = C.field(1 << 20, "bytes of the standard-library corpus to sample from")
    json_out: str = C.field("", "also write the results to this JSON file")

    def __post_init__(self) -> None:
        preset_fields(self.preset)
        bad = [b for b in self.blocks if b not in BLOCK_TYPES]
        if bad or not self.blocks:
            raise C.ConfigError(f"config key 'blocks': unknown block {bad[0] if bad else '(none)'!r} (known: {', '.join(BLOCK_TYPES)})")
        for name in ("batch_size", "sample_bytes"):
            if getattr(self, name) <= 0:
                raise C.ConfigError(f"config key '{name}' must be positive, got {getattr(self, name)}")


def survey_blocks(cfg: ZooOptions, log=print) -> dict[str, Any]:
    """Per block: parameter count and the monitor's per-layer metrics on one seeded batch."""
    tokens = default_sample(cfg.sample_bytes)
    results: dict[str, Any] = {}
    for block in cfg.blocks:
        model_cfg = preset(cfg.preset, block=block)
        if model_cfg.vocab_size < 256:
            raise C.ConfigError(f"preset '{cfg.preset}' has vocab {model_cfg.vocab_size} < 256 bytes")
        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg).eval()
        idx = random_windows(tokens, cfg.batch_size, model_cfg.seq_len, cfg.seed)
        with OutlierMonitor(model) as monitor:
            stats = monitor.measure(idx)
        results[block] = {"params": model.num_params(), **stats}
        assert model.num_params() == expected_param_count(model_cfg)
        log(_format_block(block, results[block]))
    return results


def _format_block(block: str, r: dict[str, Any]) -> str:
    resid, ent = r["resid"], r["attn_probs"]["attention_entropy"]
    lines = [f"\n{block}  ({r['params'] / 1e6:.2f}M parameters)",
             f"{'layer':>5} {'kurtosis':>9} {'mmr':>8} {'in-corr':>8} {'max|x|':>8} {'attn-H':>7}"]
    for layer, k in enumerate(resid["kurtosis"]):
        mean_h = sum(ent[layer]) / len(ent[layer])
        lines.append(f"{layer:>5} {k:>9.3f} {resid['mmr'][layer]:>8.2f} {resid['input_correlation'][layer]:>8.3f} "
                     f"{resid['max_abs'][layer]:>8.3f} {mean_h:>7.3f}")
    return "\n".join(lines)


def zoo(cfg: ZooOptions, log=print) -> dict[str, Any]:
    """``ofe zoo``: the table per block, and the results as JSON if asked."""
    results = survey_blocks(cfg, log=log)
    if cfg.json_out:
        atomic_write(Path(cfg.json_out), lambda p: p.write_text(json.dumps(results, indent=1)))
    return results
