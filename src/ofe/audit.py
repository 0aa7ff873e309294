"""``ofe audit MODEL_DIR``: outlier features and their int8 cost for a Hugging Face checkpoint on disk.

Per layer (the hidden state leaving each block, before any final norm): kurtosis in the literature's
three meanings (He et al.'s Eq. 1, Bondarenko et al.'s per-sequence Pearson kurtosis, OSP's per-token
excess kurtosis; each also summarised as its paper reports it), MMR, max |x|, input correlation, the largest |x| over the median |x|, the share of the 50 largest |x| at position 0, and
the positions and tokens that carry the largest |x| (massive activations sit on the first token or
a delimiter), on a sample of the standard-library corpus tokenised by the model's own tokenizer;
plus the W8A8 cost: perplexity for causal LMs, cosine similarity of the float and quantised final
hidden states for encoders. Written as ``audit.json``, ``audit.md`` and ``audit.png`` in an output
directory, and printed. Nothing is downloaded: the model must be a local directory.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ofe import config as C
from ofe.data import ByteTokenizer, stdlib_files
from ofe.data.corpus import read_bytes_sample
from ofe.errors import OfeError
from ofe.io import LockHeld, atomic_write, clean_stale_temporaries, exclusive_lock, output_folder_problem
from ofe.monitor import capture, find_block_stack
from ofe.monitor.measure import Costs, site_metrics
from ofe.quant import QuantConfig, SimulatedQuantModel
from ofe.quant.probe import model_sites

SUPPORTED: dict[str, str] = {
    "gpt2": "causal", "opt": "causal", "gpt_neox": "causal", "llama": "causal", "mistral": "causal",
    "qwen2": "causal", "bert": "encoder", "roberta": "encoder",
}
METRICS = ("kurtosis", "seq_kurtosis", "token_excess_kurtosis", "mmr", "max_abs", "input_correlation",
           "abs_max_median", "position0_share")
# "Kurtosis" means three things in the literature; the audit reports all three, each as its paper does
KURTOSES = (("kurtosis", "He et al. 2024 (Eq. 1: kurtosis of the neurons' RMS), largest layer", max),
            ("seq_kurtosis", "Bondarenko et al. 2023 (Pearson kurtosis of each sequence's activations), largest layer",
             max),
            ("token_excess_kurtosis", "OSP, Park et al. 2025 (per-token excess kurtosis across channels, clamped at 0), "
             "mean over every hidden state including the embedding output", lambda v: sum(v) / len(v)))
TOP_TOKENS = 5  # per layer: where the largest |activations| sit


class AuditError(OfeError):
    """A user-facing problem with the model directory."""


@dataclass(frozen=True)
class AuditOptions:
    out_dir: str = C.field("", "output directory; empty: audit-<model directory name> in the current directory")
    seq_len: int = C.field(128, "tokens per sequence (at most the model's maximum)")
    sequences: int = C.field(16, "evaluation sequences")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = C.field(
        "auto", "weights' dtype: auto keeps the checkpoint's (config torch_dtype / dtype), or convert to this one")
    special_tokens: bool = C.field(True, "start (and end) each sequence as the model's tokenizer does: BOS, or "
                                         "[CLS] ... [SEP]; false: plain text windows")
    quant: QuantConfig = QuantConfig(sites="linear-inputs")

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.sequences < 1:
            raise C.ConfigError("config keys 'seq_len' (>= 2) and 'sequences' (>= 1) must be positive")
        if self.quant.sites != "linear-inputs":
            raise C.ConfigError("quant.sites must be 'linear-inputs' for Hugging Face models")


def _transformers():
    # torch logs a deprecation warning per enum that torchao (imported by transformers) registers, and
    # torchao one line per GPU kernel library it cannot load: noise before ofe's own output
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("torchao").setLevel(logging.ERROR)  # optional GPU kernels it cannot load on this machine
    try:
        import transformers
    except ImportError:
        raise AuditError("ofe audit needs transformers: pip install 'ofe[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar is not ofe's output
    return transformers


def check_model_dir(model_dir: Path) -> Path:
    """A model directory has a Hugging Face config (returned); anything else is refused before any work."""
    hf_config = model_dir / _transformers().utils.CONFIG_NAME  # Hugging Face's model config, not an ofe run's
    if not model_dir.is_dir() or not hf_config.is_file():
        raise AuditError(f"{model_dir} is not a model directory (no {hf_config.name})")
    return hf_config


def load_model(model_dir: Path, dtype: str = "auto"):
    """``(model, kind, tokenizer or None)`` from a local Hugging Face directory, its weights in
    ``dtype`` (auto: as the checkpoint stores them)."""
    tf = _transformers()
    hf_config = check_model_dir(model_dir)
    try:
        config = tf.AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise AuditError(f"{hf_config} cannot be read: {str(e).splitlines()[0]}") from None
    if getattr(config, "auto_map", None):  # code shipped in the directory: never run it
        raise AuditError(f"{model_dir} asks to run its own Python code (auto_map in {hf_config.name}); "
                         "ofe audit only loads architectures built into transformers")
    kind = SUPPORTED.get(config.model_type)
    if kind is None:
        raise AuditError(f"unsupported architecture '{config.model_type}'; supported: {', '.join(SUPPORTED)}")
    _check_config(config, model_dir)
    cls = tf.AutoModelForCausalLM if kind == "causal" else tf.AutoModel
    # a config may ask for FlashAttention or another kernel that needs a GPU package: the audit's numbers
    # are the model's, whatever attention kernel computes them, so it uses PyTorch's own
    attention = getattr(config, "_attn_implementation", None) or getattr(config, "attn_implementation", None)
    options = {} if attention in (None, "eager", "sdpa") else {"attn_implementation": "eager"}
    try:
        model = cls.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False,
                                    dtype=dtype if dtype == "auto" else getattr(torch, dtype), **options).eval()
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        raise AuditError(f"cannot load the weights in {model_dir}: {str(e).splitlines()[0]}") from None
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        # transformers may build an empty tokenizer from a config alone: it must encode real text
        if len(tokenizer) < 2 or not tokenizer("def f(x):\n    return x", add_special_tokens=False)["input_ids"]:
            tokenizer = None
    except (OSError, ValueError, TypeError):
        tokenizer = None
    if tokenizer is None:
        warnings.warn(f"{model_dir} has no usable tokenizer: falling back to bytes (ids modulo the vocabulary)", stacklevel=2)
    return model, kind, tokenizer


def _check_config(config, model_dir: Path) -> None:
    """Refuse, in one line, a config the audit cannot measure: an already quantised checkpoint (its
    weights are not the float model's), or one without blocks."""
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else getattr(quantization, "quant_method", "?")
        raise AuditError(f"{model_dir} holds an already quantised checkpoint (quant_method {method}); ofe audit measures "
                         "float checkpoints: audit the model it was quantised from")
    layers = next((getattr(config, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(config, k)), None)
    if isinstance(layers, int) and layers < 1:
        raise AuditError(f"{model_dir}: the config has {layers} layers; there is no block to measure")


def max_positions(config) -> int | None:
    """The longest sequence the model takes. RoBERTa-style models number positions from
    ``pad_token_id + 1``, so they take ``max_position_embeddings - pad_token_id - 1`` tokens."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= (config.pad_token_id or 0) + 1
    return limit


def sequence_template(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the model's tokenizer puts around one text, ``(prefix ids, suffix ids)``:
    ``([BOS], [])`` for Llama / OPT style, ``([CLS], [SEP])`` for BERT style, ``([], [])`` for GPT-2 or
    without a tokenizer. Read off the tokenizer's own template by encoding a probe text with and
    without special tokens."""
    if tokenizer is None:
        return [], []
    probe = "def f(x):\n    return x"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []  # a template that rewrites the text itself: feed it plain


def corpus_windows(tokenizer, vocab_size: int, n: int, seq_len: int, files: list[Path] | None = None,
                   template: tuple[list[int], list[int]] = ([], [])) -> torch.Tensor:
    """``n`` consecutive windows of ``seq_len`` tokens from ``files`` (default: the standard-library
    corpus in order), int64 ``(n, T)``; each window is ``prefix + text + suffix`` (``template``: the
    tokenizer's special tokens, :func:`sequence_template`), as the model saw sequences in training."""
    prefix, suffix = template
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise AuditError(f"seq_len {seq_len} leaves no room for text beside the {len(prefix) + len(suffix)} special "
                         "tokens of each sequence: raise --seq_len or pass --special_tokens false")
    text = read_bytes_sample(stdlib_files() if files is None else files, n * body * 8).decode("utf-8", errors="replace")
    ids = ByteTokenizer().encode(text) if tokenizer is None else tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = np.asarray(ids, dtype=np.int64)
    largest = max([int(ids.max()) if ids.size else -1, *prefix, *suffix])
    if largest >= vocab_size:
        source = "the byte fallback (no usable tokenizer)" if tokenizer is None else "the model's tokenizer"
        raise AuditError(f"{source} produces token id {largest}, outside the model's vocabulary of {vocab_size}")
    if len(ids) < n * body:
        ids = np.resize(ids, n * body)  # a very coarse tokenizer: repeat the sample
    rows = ids[: n * body].reshape(n, body)
    edges = lambda t: np.broadcast_to(np.asarray(t, dtype=np.int64), (n, len(t)))  # noqa: E731
    return torch.from_numpy(np.concatenate([edges(prefix), rows, edges(suffix)], axis=1))


def split_files(n_bytes: int, seed: int) -> tuple[list[Path], list[Path]]:
    """Evaluation files (the corpus's first files, until ``n_bytes``) and calibration files (all the
    others, in an order drawn from ``seed``): the two never share text."""
    files = stdlib_files()
    total, used = 0, 0
    for path in files:
        used += 1
        try:
            total += path.stat().st_size
        except OSError:
            continue
        if total >= n_bytes:
            break
    rest = files[used:]
    order = np.random.default_rng(seed).permutation(len(rest))
    return files[:used], [rest[i] for i in order]


@torch.no_grad()
def _causal_ppl(model, windows: torch.Tensor) -> float:
    losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


@torch.no_grad()
def hidden_states(model, stack, windows: torch.Tensor, tokenizer,
                  k: int = TOP_TOKENS) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """The hidden states of ``hidden_states`` indexing (0: the embedding output, the first block's
    input; i: block i-1's output) on ``windows`` ``(B, T)``, and for each the ``k`` largest ``|x|``
    as ``{"position", "token", "channel", "value"}`` (largest first; a position may repeat)."""
    with capture([stack[0]], inputs=True) as first, capture(list(stack)) as blocks:
        model(input_ids=windows)
    outputs = [*first, *blocks]
    return outputs, [_largest(hidden, windows, tokenizer, k) for hidden in outputs]


def _largest(hidden: torch.Tensor, windows: torch.Tensor, tokenizer, k: int) -> list[dict[str, Any]]:
    """The ``k`` largest ``|x|`` of ``hidden`` ``(B, T, d)`` with their position, token and channel."""
    B, T, d = hidden.shape
    rows = []
    for i in hidden.abs().reshape(-1).topk(min(k, hidden.numel())).indices.tolist():
        b, t, c = i // (T * d), (i // d) % T, i % d
        token_id = int(windows[b, t])
        text = tokenizer.decode([token_id]) if tokenizer is not None else ByteTokenizer().decode([token_id])
        rows.append({"position": t, "token": text, "channel": c, "value": float(hidden[b, t, c])})
    return rows


def massive_activations(tops: list[list[dict[str, Any]]], k: int = 10) -> dict[str, Any]:
    """The ``k`` largest ``|x|`` over every layer (Sun et al. 2024's table: layer, position, token,
    channel, value), and the channels among the per-layer largest that recur in several layers
    (``{"channel", "layers"}``, most layers first): a massive activation lives in fixed channels."""
    rows = [{"layer": layer, **row} for layer, top in enumerate(tops) for row in top]
    rows.sort(key=lambda r: -abs(r["value"]))
    layers_of: dict[int, set[int]] = {}
    for r in rows:
        layers_of.setdefault(r["channel"], set()).add(r["layer"])
    recurring = [{"channel": c, "layers": sorted(ls)} for c, ls in layers_of.items() if len(ls) >= 2]
    recurring.sort(key=lambda r: (-len(r["layers"]), r["channel"]))
    return {"top": rows[:k], "recurring_channels": recurring}


@torch.no_grad()
def check_hidden_states(model, states: list[torch.Tensor], windows: torch.Tensor) -> dict[str, Any]:
    """Whether the block outputs the audit captured are what the model itself returns as
    ``output_hidden_states`` (a metric placed on the wrong tensor is a known trap): the largest
    relative difference over layers 0..L-1, and whether the model's last hidden state is the last
    block's output or (as in GPT-2, Llama, ...) that output after the final norm."""
    out = model(input_ids=windows[:1], output_hidden_states=True)
    theirs = [h.float() for h in out.hidden_states]
    ours = [h[:1].float() for h in states]
    if len(theirs) != len(ours):
        return {"matches": False, "reason": f"the model returns {len(theirs)} hidden states, the audit captured {len(ours)}"}
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))  # noqa: E731
    inner = max((rel(a, b) for a, b in zip(ours[:-1], theirs[:-1])), default=0.0)
    last = rel(ours[-1], theirs[-1])
    return {"matches": inner < 1e-4, "max_rel_diff": inner,
            "last": "the last block's output" if last < 1e-4 else "after the final norm (the table shows the block's output)"}


@torch.no_grad()
def _final_hidden(model, windows: torch.Tensor) -> torch.Tensor:
    return model(input_ids=windows).last_hidden_state.float()


def fix_malloc_mmap_threshold(nbytes: int = 1 << 17) -> bool:
    """Keep freed activation buffers from staying resident (glibc only; True if set).

    glibc serves blocks above a threshold with their own mappings, returned to the system when freed,
    but raises that threshold up to 32 MiB each time such a block is freed; after that, the audit's
    large temporaries come from the heap, whose freed space fragments and stays resident: a 1.1B bf16
    audit grew by 0.7 GiB during calibration alone. A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``,
    as ``MALLOC_MMAP_THRESHOLD_`` would set) stops the growth (measured: docs/results/performance/audit_1b.md)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, nbytes))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def audit(model_dir: str | Path, cfg: AuditOptions, log=print) -> dict[str, Any]:
    fix_malloc_mmap_threshold()
    model_dir = Path(model_dir)
    model, kind, tokenizer = load_model(model_dir, cfg.dtype)
    config = model.config
    max_len = max_positions(config) or cfg.seq_len
    T = min(cfg.seq_len, max_len)
    if T < cfg.seq_len:
        log(f"seq_len {cfg.seq_len} is more than {config.model_type} takes: using {T}")
    q = cfg.quant
    eval_files, calib_files = split_files(cfg.sequences * T * 8, q.seed)
    template = sequence_template(tokenizer) if cfg.special_tokens else ([], [])
    windows = corpus_windows(tokenizer, config.vocab_size, cfg.sequences, T, eval_files, template)
    calib = list(corpus_windows(tokenizer, config.vocab_size, q.calib_batches * q.calib_batch_size, T,
                                calib_files, template).split(q.calib_batch_size))

    stack_name, stack = find_block_stack(model)
    states, tops = hidden_states(model, stack, windows, tokenizer)
    checked = check_hidden_states(model, states, windows)
    costs = Costs(max_tokens=None, mmr_max_rows=None)
    layers = []
    for i, (x, top) in enumerate(zip(states, tops)):  # i: Hugging Face's hidden_states index
        values = {name: float(v) for name, v in site_metrics("resid", x, METRICS, costs)}
        module = "embeddings" if i == 0 else f"{stack_name}.{i - 1}"
        layers.append({"layer": i, "module": module, **values, "top": top})

    parameters, dtype = sum(p.numel() for p in model.parameters()), str(next(model.parameters()).dtype).removeprefix("torch.")
    # the float model's numbers first: then it is quantised in place (one set of weights in memory)
    reference = _causal_ppl(model, windows) if kind == "causal" else _final_hidden(model, windows)
    sim = SimulatedQuantModel(model, q, **model_sites(model), inplace=True)  # head in float, block outputs quantised
    sim.calibrate(calib)
    if kind == "causal":
        fp, quant = reference, _causal_ppl(sim.model, windows)
        cost = {"metric": "perplexity", "float": fp, "quantized": quant, "increase_pct": 100 * (quant / fp - 1)}
    else:
        cos = torch.nn.functional.cosine_similarity(reference, _final_hidden(sim.model, windows), dim=-1).mean().item()
        cost = {"metric": "cosine similarity of final hidden states", "float": 1.0, "quantized": cos}
    kurtoses = {key: summary([row[key] for row in layers]) for key, _, summary in KURTOSES}
    return {
        "kurtoses": kurtoses,
        "model_dir": str(model_dir), "model_type": config.model_type, "kind": kind,
        "name": getattr(config, "_name_or_path", "") or model_dir.name,
        "parameters": parameters, "dtype": dtype,
        "tokenizer": "model's own" if tokenizer is not None else "bytes (fallback)",
        "sequences": cfg.sequences, "seq_len": T, "quant": C.to_dict(q), "quant_format": q.label,
        "special_tokens": {"prefix": _token_names(tokenizer, template[0]), "suffix": _token_names(tokenizer, template[1]),
                           "position_0": _token_names(tokenizer, windows[0, :1].tolist())[0]},
        "evaluation_text": f"the first {len(eval_files)} files of the corpus",
        "calibration_text": f"{q.calib_batches} x {q.calib_batch_size} windows from the other files, in an order drawn "
                            f"from quant.seed {q.seed} (no text shared with the evaluation)",
        "w8a8": cost, "layers": layers, "massive_activations": massive_activations(tops),
        "hidden_states_check": checked,
    }


def _token_names(tokenizer, ids: list[int]) -> list[str]:
    """Each id as the tokenizer spells it (bytes without a tokenizer)."""
    if tokenizer is None:
        return [repr(bytes([i]))[2:-1] if i < 256 else str(i) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(list(ids))]


def write_audit(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """``audit.json``, ``audit.md`` and ``audit.png`` in ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    layers = result["layers"]
    x = [r["layer"] for r in layers]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    panels = (("kurtosis", "kurtosis of neuron RMS"), ("max_abs", "max |activation|"),
              ("abs_max_median", "max |activation| / median |activation|"), ("input_correlation", "input correlation"))
    for ax, (key, label) in zip(axes.flat, panels):
        values = [r[key] for r in layers]
        ax.plot(x, values, marker="o", color="tab:red" if key == "kurtosis" else "tab:blue")
        if key == "kurtosis":
            ax.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="1: no outlier neurons")
            ax.legend(fontsize=8, frameon=False)
        ax.set_xlabel("layer (hidden_states index; 0 = embeddings)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        if key != "input_correlation" and max(values) / max(min(values), 1e-12) > 30:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    w = result["w8a8"]
    name = result.get("name") or Path(result["model_dir"]).name
    params = f", {result['parameters'] / 1e6:.1f}M parameters" if result.get("parameters") else ""
    fig.suptitle(f"{name} ({result['model_type']}{params}): {result['quant_format']} "
                 f"{w['metric']} {w['float']:.6g} -> {w['quantized']:.6g}")
    fig.tight_layout()
    png = out_dir / "audit.png"
    atomic_write(png, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    md = out_dir / "audit.md"
    atomic_write(md, lambda p: p.write_text(format_summary(result) + "\n\n![per-layer metrics](audit.png)\n"))
    js = out_dir / "audit.json"
    atomic_write(js, lambda p: p.write_text(json.dumps(result, indent=1)))
    return [js, md, png]


def _size(result: dict[str, Any]) -> str:
    """``, 1100.0M parameters in bfloat16`` (what an older audit.json records of it)."""
    params = f", {result['parameters'] / 1e6:.1f}M parameters" if result.get("parameters") else ""
    return params + (f" in {result['dtype']}" if result.get("dtype") else "")


def format_summary(result: dict[str, Any]) -> str:
    w = result["w8a8"]
    change = f" ({w['increase_pct']:+.2f}%)" if "increase_pct" in w else ""
    lines = [f"# Outlier audit: {result['model_dir']}", "",
             f"{result['model_type']} ({result['kind']}{_size(result)}), {result['sequences']} x {result['seq_len']} tokens of the "
             f"standard-library corpus, tokenizer: {result['tokenizer']}; {_fed(result)}.", "",
             f"{result['quant_format']} ({result['quant']['sites']}): {w['metric']} {w['float']:.6g} -> "
             f"{w['quantized']:.6g}{change}; evaluated on {result.get('evaluation_text', '?')}, calibrated on "
             f"{result.get('calibration_text', '?')}.", "",
             "Kurtosis three ways (the literature's three meanings, side by side):", "",
             *[f"- {text}: {result['kurtoses'][key]:.4g}" for key, text, _ in KURTOSES if key in result.get("kurtoses", {})],
             "",
             "Layers are Hugging Face's `hidden_states` indices: 0 is the embedding output, i the output of "
             "block i - 1 (before any final norm).", "",
             "| layer | module | kurtosis | Pearson kurt. | token excess kurt. | MMR | max abs | max/median | "
             "top-50 at pos. 0 | input corr. | largest (position: token) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['layer']} | `{r.get('module', '')}` | {r['kurtosis']:.3f} | {r.get('seq_kurtosis', math.nan):.3g} | "
              f"{r.get('token_excess_kurtosis', math.nan):.3g} | {r['mmr']:.2f} | {r['max_abs']:.3g} | {r['abs_max_median']:.3g} | "
              f"{r['position0_share']:.2f} | {r['input_correlation']:.3f} | {_tops(r.get('top', []))} |"
              for r in result["layers"]]
    lines += _massive_lines(result)
    return "\n".join(lines)


def _massive_lines(result: dict[str, Any]) -> list[str]:
    """The massive-activation table and the hidden-state check, as markdown lines."""
    out = []
    massive = result.get("massive_activations")
    if massive:
        out += ["", "Largest activations over all layers (Sun et al. 2024's view: massive activations sit on a few "
                "tokens, in a few fixed channels):", "", "| layer | position | token | channel | value |",
                "| --- | --- | --- | --- | --- |"]
        out += [f"| {r['layer']} | {r['position']} | {_token_cell(r['token'])} | {r['channel']} | {r['value']:.4g} |"
                for r in massive["top"]]
        rec = massive["recurring_channels"]
        out += ["", "Channels among each layer's largest that recur across layers: " + (
            ", ".join(f"{r['channel']} (layers {', '.join(map(str, r['layers']))})" for r in rec[:10]) if rec else "none") + "."]
    check = result.get("hidden_states_check")
    if check:
        verdict = (f"equal to the model's `output_hidden_states` (largest relative difference {check['max_rel_diff']:.1e}); "
                   f"its last hidden state is {check['last']}") if check.get("matches") else (
            f"**not** equal to the model's `output_hidden_states`: {check.get('reason', check.get('max_rel_diff'))}")
        out += ["", f"Measured tensors: the captured block outputs are {verdict}."]
    return out


def _fed(result: dict[str, Any]) -> str:
    """How each sequence was framed, in words (audit.json's ``special_tokens``)."""
    sp = result.get("special_tokens")
    if not sp:
        return "plain text windows"
    frame = " ".join([*sp["prefix"], "<text>", *sp["suffix"]]) if sp["prefix"] or sp["suffix"] else "no special tokens"
    return f"each sequence as the tokenizer frames it ({frame}; position 0 is {json.dumps(sp['position_0'])})"


def _token_cell(token: str) -> str:
    """A token as a markdown table cell: escapes shown (\\n), a pipe escaped."""
    return json.dumps(token)[1:-1].replace("|", "\\|")


def _tops(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['position']}: {_token_cell(r['token'])}" for r in rows)


AUDIT_FILES = ("audit.json", "audit.md", "audit.png")
AUDIT_LOCK = ".audit.lock"


def check_audit_dir(out: Path) -> None:
    """Before any work: ``out`` may be new, empty, or an audit this command wrote (its audit.json has an
    audit's keys); none of the audit's files may be a symbolic link."""
    problem = output_folder_problem(out, [out / n for n in AUDIT_FILES], "audit.json",
                                    {"model_dir", "layers", "w8a8", "kurtoses"}, AUDIT_LOCK, "audit")
    if problem:
        raise AuditError(problem)


def run_audit(model_dir: str | Path, cfg: AuditOptions, log=print) -> list[Path]:
    """``ofe audit``: audit, write the report (default ``audit-<model directory name>``), print the summary.
    The output folder is checked first and locked for the whole audit."""
    out = Path(cfg.out_dir or f"audit-{Path(model_dir).resolve().name}")
    check_model_dir(Path(model_dir))
    check_audit_dir(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(out / AUDIT_LOCK):
            clean_stale_temporaries(out)
            try:
                result = audit(model_dir, cfg, log=log)
            except BaseException:
                if created:  # a folder this audit made and nothing written yet: leave no trace
                    (out / AUDIT_LOCK).unlink(missing_ok=True)
                    out.rmdir()
                raise
            paths = write_audit(result, out)
    except LockHeld as e:
        raise AuditError(f"another ofe audit (pid {e.pid}) is writing into {out}; wait for it") from None
    log(format_summary(result))
    log(f"\nwrote {', '.join(str(p) for p in paths)}")
    return paths
