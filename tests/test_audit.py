"""ofe audit on tiny randomly initialised Hugging Face models of every supported family."""

import json

import pytest
import torch

from ofe.cli import main
from ofe.quant import QuantConfig

from hf_families import FAMILIES, SMALL, build as _build

tf = pytest.importorskip("transformers")

# Each family's sequence template, as its real tokenizers frame one text: GPT-2 none, OPT and Llama a
# start token, BERT [CLS] ... [SEP].
TEMPLATES = {"gpt2": ([], []), "opt": (["</s>"], []), "llama": (["<s>"], []), "bert": (["[CLS]"], ["[SEP]"])}


def _save_tokenizer(directory, family: str = "gpt2"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    prefix, suffix = TEMPLATES.get(family, ([], []))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
                                  special_tokens=[*prefix, *suffix])
    tok.train_from_iterator([f"def f{i}(x):\n    return x + {i}\n" for i in range(200)], trainer=trainer)
    if prefix or suffix:
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*prefix, "$A", *suffix]), special_tokens=[(t, tok.token_to_id(t)) for t in (*prefix, *suffix)])
    tf.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(directory)


@pytest.mark.parametrize("family", FAMILIES)
def test_audit_every_family(family, tmp_path, capsys):
    model_dir, out = tmp_path / family, tmp_path / "report"
    _build(family).save_pretrained(model_dir)
    with_tokenizer = family in ("gpt2", "bert", "roberta")
    if with_tokenizer:
        _save_tokenizer(model_dir)
    args = ["audit", str(model_dir), "--out_dir", str(out), "--sequences", "4", "--seq_len", "32",
            "--quant.calib_batches", "2", "--quant.calib_batch_size", "2"]
    if with_tokenizer:
        assert main(args) == 0
    else:
        with pytest.warns(UserWarning, match="no usable tokenizer"):
            assert main(args) == 0
    result = json.loads((out / "audit.json").read_text())
    assert result["tokenizer"] == ("model's own" if with_tokenizer else "bytes (fallback)")
    assert len(result["layers"]) == 4 and all(r["kurtosis"] >= 1 for r in result["layers"])  # embeddings + 3 blocks
    # the three kurtoses of the literature, side by side: He et al.'s and Bondarenko et al.'s largest layer, OSP's
    # mean over every hidden state (the embedding output included), each from the per-layer values
    k = result["kurtoses"]
    assert k["kurtosis"] == max(r["kurtosis"] for r in result["layers"])
    assert k["seq_kurtosis"] == max(r["seq_kurtosis"] for r in result["layers"])
    assert k["token_excess_kurtosis"] == pytest.approx(sum(r["token_excess_kurtosis"] for r in result["layers"]) / 4)
    assert result["layers"][0]["module"] == "embeddings" and result["layers"][1]["module"].endswith(".0")
    # what the audit measures is what the model returns as output_hidden_states (all but the last, which
    # GPT-2 / OPT / NeoX / Llama return after their final norm; BERT has none)
    check = result["hidden_states_check"]
    assert check["matches"] and check["max_rel_diff"] < 1e-6, check
    assert check["last"].startswith("the last block" if family in ("bert", "roberta") else "after the final norm"), check
    w = result["w8a8"]
    if family in ("bert", "roberta"):
        assert w["metric"].startswith("cosine") and 0.9 < w["quantized"] <= 1.0 + 1e-6
    else:
        assert w["metric"] == "perplexity" and abs(w["increase_pct"]) < 5
    assert (out / "audit.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "audit.md").read_text()
    assert "| layer | module | kurtosis | Pearson kurt. | token excess kurt. |" in md and "Kurtosis three ways" in md
    assert "W8A8" in capsys.readouterr().out


def test_audit_errors_are_one_line(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    t5 = tmp_path / "t5"
    tf.T5Config(vocab_size=100, d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8).save_pretrained(t5)
    assert main(["audit", str(t5)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unsupported architecture 't5'" in err and "llama" in err and len(err.splitlines()) == 1


def test_roberta_positions_are_clamped_and_remote_code_is_refused(tmp_path, capsys):
    """RoBERTa numbers positions from pad_token_id + 1: 66 embeddings with pad 1 take 64 tokens."""
    torch.manual_seed(0)
    model = tf.RobertaModel(tf.RobertaConfig(**{**SMALL, "max_position_embeddings": 66}, intermediate_size=64,
                                             pad_token_id=1))
    model.save_pretrained(tmp_path / "roberta")
    _save_tokenizer(tmp_path / "roberta")
    args = ["audit", str(tmp_path / "roberta"), "--out_dir", str(tmp_path / "r"), "--sequences", "2", "--seq_len", "65",
            "--quant.calib_batches", "1", "--quant.calib_batch_size", "2"]
    assert main(args) == 0
    assert "seq_len 65 is more than roberta takes: using 64" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "audit.json").read_text())["seq_len"] == 64
    remote = tmp_path / "remote"
    _build("gpt2").save_pretrained(remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    assert main(["audit", str(remote)]) == 2
    assert "asks to run its own Python code" in capsys.readouterr().err


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, capsys):
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4))
    model.save_pretrained(tmp_path / "small-vocab")  # no tokenizer: bytes up to 255 do not fit 100 ids
    with pytest.warns(UserWarning):
        assert main(["audit", str(tmp_path / "small-vocab"), "--out_dir", str(tmp_path / "o")]) == 2
    assert "outside the model's vocabulary of 100" in capsys.readouterr().err


def test_audit_finds_a_planted_position0_spike_and_names_its_token(tmp_path):
    """A massive activation planted on the first position (GPT-2's position embedding 0, channel 5):
    in every layer the largest |x| of each of the 4 sequences sits at position 0 in that channel;
    max/median and the position-0 share of the top 50 agree with a float64 computation."""
    from ofe.audit import AuditOptions, audit
    from ofe.quant import QuantConfig

    model = _build("gpt2")
    with torch.no_grad():
        model.transformer.wpe.weight[0, 5] = 300.0
    model_dir = tmp_path / "spiky"
    model.save_pretrained(model_dir)
    _save_tokenizer(model_dir)
    cfg = AuditOptions(sequences=4, seq_len=32, quant=QuantConfig(sites="linear-inputs", calib_batches=1, calib_batch_size=2))
    result = audit(model_dir, cfg, log=lambda *a: None)
    reloaded = tf.GPT2LMHeadModel.from_pretrained(model_dir).double().eval()
    from ofe.audit import corpus_windows, load_model, split_files
    _, _, tokenizer = load_model(model_dir)
    eval_files, calib_files = split_files(4 * 32 * 8, 1234)
    assert not set(eval_files) & set(calib_files)  # calibration never sees the evaluation text
    assert calib_files != split_files(4 * 32 * 8, 7)[1]  # quant.seed picks the calibration text
    windows = corpus_windows(tokenizer, 300, 4, 32, eval_files)
    with torch.no_grad():
        hidden = reloaded(input_ids=windows, output_hidden_states=True).hidden_states
    assert len(result["layers"]) == len(hidden) == 4  # labelled as hidden_states: 0 = the embedding output
    for layer, row in enumerate(result["layers"][:-1]):  # GPT-2's last hidden state has ln_f applied
        a = hidden[layer].abs()
        assert row["abs_max_median"] == pytest.approx((a.max() / a.median()).item(), rel=1e-3)
        top50 = a.reshape(-1).topk(50).indices
        assert row["position0_share"] == pytest.approx(((top50 // 32) % 32 == 0).double().mean().item())
    for row in result["layers"]:
        assert [(t["position"], t["channel"]) for t in row["top"][:4]] == [(0, 5)] * 4
        assert {t["token"] for t in row["top"][:4]} <= {tokenizer.decode([int(w)]) for w in windows[:, 0]}
    # Sun et al.'s table: the largest over all layers sit at position 0, channel 5, and channel 5 recurs in every layer
    massive = result["massive_activations"]
    assert all((r["position"], r["channel"]) == (0, 5) for r in massive["top"][:4])
    assert massive["recurring_channels"][0] == {"channel": 5, "layers": [0, 1, 2, 3]}
    values = [abs(r["value"]) for r in massive["top"]]
    assert values == sorted(values, reverse=True)
    assert values[0] == pytest.approx(max(row["max_abs"] for row in result["layers"]), rel=1e-6)  # the per-layer metric
    assert values[0] == pytest.approx(max(h.abs().max().item() for h in hidden[:-1]), rel=1e-4)  # float64 reference


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "bert"])
def test_sequences_start_and_end_as_the_tokenizer_frames_them(family, tmp_path):
    """Each audit window is the tokenizer's own template around the text (a BOS for OPT / Llama,
    [CLS] ... [SEP] for BERT, nothing for GPT-2); audit.json records it and the report names position 0;
    ``--special_tokens false`` feeds plain text."""
    from ofe.audit import AuditOptions, audit, corpus_windows, load_model, sequence_template, split_files
    model_dir = tmp_path / family
    _build(family).save_pretrained(model_dir)
    _save_tokenizer(model_dir, family)
    _, _, tokenizer = load_model(model_dir)
    prefix, suffix = TEMPLATES[family]
    template = sequence_template(tokenizer)
    assert tokenizer.convert_ids_to_tokens(template[0]) == prefix and tokenizer.convert_ids_to_tokens(template[1]) == suffix
    windows = corpus_windows(tokenizer, 300, 3, 16, split_files(2000, 0)[0], template)
    assert windows.shape == (3, 16)
    for row in windows.tolist():
        tokens = tokenizer.convert_ids_to_tokens(row)
        assert tokens[: len(prefix)] == prefix and tokens[len(tokens) - len(suffix):] == suffix
        assert not set(tokens[len(prefix): len(tokens) - len(suffix)]) & set(prefix + suffix)  # text between
    opts = dict(sequences=2, seq_len=16, quant=QuantConfig(sites="linear-inputs", calib_batches=1, calib_batch_size=2))
    framed = audit(model_dir, AuditOptions(**opts), log=lambda *a: None)
    assert framed["special_tokens"]["prefix"] == prefix and framed["special_tokens"]["suffix"] == suffix
    assert framed["special_tokens"]["position_0"] == (prefix[0] if prefix else tokenizer.convert_ids_to_tokens(windows[0, :1].tolist())[0])
    plain = audit(model_dir, AuditOptions(special_tokens=False, **opts), log=lambda *a: None)
    assert plain["special_tokens"]["prefix"] == [] and plain["special_tokens"]["position_0"] not in ("<s>", "</s>", "[CLS]")
    from ofe.audit import format_summary
    assert f"position 0 is {json.dumps(framed['special_tokens']['position_0'])}" in format_summary(framed)


def test_the_audit_prints_nothing_of_third_party_libraries(tmp_path):
    """In a fresh process (imports included): no torchao kernel-loading lines, torch pytree deprecations
    or transformers progress bars before or around ofe's own output."""
    import subprocess
    import sys
    model_dir = tmp_path / "gpt2"
    _build("gpt2").save_pretrained(model_dir)
    _save_tokenizer(model_dir)
    done = subprocess.run([sys.executable, "-m", "ofe", "audit", str(model_dir), "--out_dir", str(tmp_path / "out"),
                           "--sequences", "2", "--seq_len", "16", "--quant.calib_batches", "1",
                           "--quant.calib_batch_size", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


@pytest.mark.parametrize("change,needle", [
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, "already quantised checkpoint (quant_method bitsandbytes)"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "already quantised checkpoint (quant_method gptq)"),
    ({"n_layer": 0}, "the config has 0 layers"),
    ({"n_positions": 1}, "cannot load the weights"),
    ({"attn_implementation": "flash_attention_2", "_attn_implementation": "flash_attention_2"}, None),  # audited with PyTorch's attention
])
def test_configs_that_change_loading_are_refused_or_handled_in_one_line(tmp_path, capsys, change, needle):
    model_dir = tmp_path / "model"
    _build("gpt2").save_pretrained(model_dir)
    _save_tokenizer(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, **change}))
    code = main(["audit", str(model_dir), "--out_dir", str(tmp_path / "out"), "--sequences", "2", "--seq_len", "16",
                 "--quant.calib_batches", "1", "--quant.calib_batch_size", "2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ofe audit")]  # not the save's bar
    if needle is None:
        assert code == 0 and (tmp_path / "out" / "audit.json").is_file()
    else:
        assert code == 2 and len(err) == 1 and needle in err[0], err


def test_tokens_in_the_markdown_tables_cannot_break_a_row():
    from ofe.audit import _massive_lines, _tops
    rows = [{"layer": 0, "position": 3, "token": "a|b\n", "channel": 1, "value": 2.0}]
    line = _massive_lines({"massive_activations": {"top": rows, "recurring_channels": []}})[5]
    assert line == "| 0 | 3 | a\\|b\\n | 1 | 2 |" and line.count("|") - line.count("\\|") == 6
    assert _tops(rows) == "3: a\\|b\\n"


def test_audit_keeps_the_checkpoints_dtype_unless_asked(tmp_path):
    """A bf16 checkpoint is audited in bf16 (no float32 copy: half the memory); --dtype converts."""
    model_dir = tmp_path / "bf16"
    _build("llama").to(torch.bfloat16).save_pretrained(model_dir)
    for dtype, expected in (("auto", "bfloat16"), ("float32", "float32")):
        out = tmp_path / f"audit-{dtype}"
        with pytest.warns(UserWarning, match="no usable tokenizer"):
            assert main(["audit", str(model_dir), "--out_dir", str(out), "--sequences", "2", "--seq_len", "16",
                         "--dtype", dtype, "--quant.calib_batches", "1", "--quant.calib_batch_size", "2"]) == 0
        result = json.loads((out / "audit.json").read_text())
        assert result["dtype"] == expected
        assert f"parameters in {expected}" in (out / "audit.md").read_text()


def test_the_output_folder_is_checked_before_the_audit_and_locked_during_it(tmp_path, capsys, monkeypatch):
    """A folder of the user's (here holding their audit.md), an audit file that is a link out of the folder,
    and a folder another audit holds are each refused in one line before any work; nothing there changes.
    A folder an earlier audit wrote is re-used."""
    import fcntl

    model_dir = tmp_path / "model"
    _build("llama").save_pretrained(model_dir)
    args = [str(model_dir), "--sequences", "2", "--seq_len", "16", "--quant.calib_batches", "1", "--quant.calib_batch_size", "2"]
    audited = []
    import ofe.audit as A
    real = A.audit
    monkeypatch.setattr(A, "audit", lambda *a, **k: audited.append(1) or real(*a, **k))

    users = tmp_path / "users"
    users.mkdir()
    (users / "audit.md").write_text("my notes")
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("keep")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "audit.json").symlink_to(elsewhere)
    capsys.readouterr()  # save_pretrained's own progress bar
    for out, needle in ((users, "is not an ofe audit"), (linked, "is a symbolic link")):
        assert main(["audit", *args, "--out_dir", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert (users / "audit.md").read_text() == "my notes" and sorted(p.name for p in users.iterdir()) == ["audit.md"]
    assert elsewhere.read_text() == "keep" and not audited

    out = tmp_path / "mine"
    with pytest.warns(UserWarning, match="no usable tokenizer"):
        assert main(["audit", *args, "--out_dir", str(out)]) == 0
    first = json.loads((out / "audit.json").read_text())
    with open(out / ".audit.lock", "r+") as held:  # another process's lock (flock: per open file)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate()
        held.write("4242")
        held.flush()
        assert main(["audit", *args, "--out_dir", str(out)]) == 2
        assert "another ofe audit (pid 4242)" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="no usable tokenizer"):
        assert main(["audit", *args, "--out_dir", str(out)]) == 0  # an audit's own folder: written again
    assert json.loads((out / "audit.json").read_text())["layers"] == first["layers"] and len(audited) == 2
