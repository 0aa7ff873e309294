"""Kurtosis-update decomposition: the exact identity, in isolation and as logged by training."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_model

from ofe.monitor import TERMS, KurtosisUpdateTracker, kurtosis_change_contributions, reconstructed_kurtosis
from ofe.models import GPT, lm_loss, preset
from ofe.run_dir import RunDir
from ofe.train import train
from ofe.train.config import build_train_config
from ofe.data import val_windows, prepare


def numpy_kurtosis(x: np.ndarray) -> float:
    s2 = (x.astype(np.float64) ** 2).mean(0)
    return float((s2**2).mean() / s2.mean() ** 2)


def test_tracker_terms_reconstruct_kurtosis_across_sgd_steps():
    torch.manual_seed(0)
    model = GPT(preset("tiny", block="pre-ln"))
    batch = torch.randint(0, 256, (3, 32))
    tracker = KurtosisUpdateTracker(model, batch)
    assert tracker.update() is None  # first call only records
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(3):
        lm_loss(model(batch), batch.roll(1, 1)).backward()
        opt.step()
        opt.zero_grad()
        terms = tracker.update()
        assert set(terms) == {"m2", "m4", *TERMS, "kurtosis"}
        assert np.allclose(reconstructed_kurtosis(terms), terms["kurtosis"], rtol=1e-9)
        captured = tracker.capture()  # independent float64 NumPy kurtosis of the same activations
        assert np.allclose([numpy_kurtosis(a.numpy()) for a in captured], terms["kurtosis"], rtol=1e-6)
        assert all(abs(k - 1) > 1e-6 for k in terms["kurtosis"])
        assert any(abs(u) > 0 for u in terms["u4_2"])  # the weights moved


def test_tracker_terms_vanish_without_an_update_and_contributions_sum_to_the_change():
    torch.manual_seed(1)
    model = GPT(preset("tiny", block="op"))
    batch = torch.randint(0, 256, (2, 32))
    tracker = KurtosisUpdateTracker(model, batch)
    tracker.update()
    terms = tracker.update()
    assert all(v == 0.0 for k in TERMS for v in terms[k])
    # doubling the change of a hand-made activation doubles u2_1 and quadruples u4_4
    x, dx = torch.randn(50, 8), torch.randn(50, 8)
    from ofe.metrics import kurtosis_update_terms
    t1, t2 = kurtosis_update_terms(x, x + dx), kurtosis_update_terms(x, x + 2 * dx)
    assert t2["u2_1"] == pytest.approx(2 * t1["u2_1"].item()) and t2["u4_4"] == pytest.approx(16 * t1["u4_4"].item())
    x_new = x.clone()
    x_new[:, 0] *= 4  # one neuron grows: kurtosis rises
    t = {k: [v.item()] for k, v in kurtosis_update_terms(x, x_new).items()}
    parts = kurtosis_change_contributions(t)
    change = numpy_kurtosis(x_new.numpy()) - numpy_kurtosis(x.numpy())
    assert change > 0.5 and sum(p[0] for p in parts.values()) == pytest.approx(change, rel=1e-9)
    scaled = {k: [v[0] * (9.0 if k.startswith("u4") or k == "m4" else 3.0)] for k, v in t.items()}  # x -> 3x
    rescaled = kurtosis_change_contributions(scaled)  # kurtosis units: scale-free
    assert all(rescaled[k][0] == pytest.approx(parts[k][0], rel=1e-9) for k in parts)


def test_training_logs_terms_that_reconstruct_the_logged_kurtosis(tmp_path, small_corpus):
    cfg = build_train_config({"out_dir": str(tmp_path / "run"), "preset": "tiny", "steps": 9, "batch_size": 8,
                              "eval_interval": 100, "eval_batches": 1, "monitor_interval": 3, "progress": False,
                              "decomposition_sequences": 4, "data": {"corpus": str(small_corpus)},
                              "optim": {"lr": 1e-2}})
    train(cfg, log=lambda *a: None)
    records = RunDir(tmp_path / "run").read_metrics()
    logged = [r for r in records if "kurtosis_update" in r]
    assert [r["step"] for r in logged] == [3, 6, 9]  # step 0 only records the starting activations
    for r in logged:
        terms = r["kurtosis_update"]
        assert len(terms["u4_2"]) == 2
        assert np.allclose(reconstructed_kurtosis(terms), terms["kurtosis"], rtol=1e-9)
    for prev, cur in zip(logged, logged[1:]):  # moments chain: m2 at t = m2 at t-1 + u2 terms
        m2 = np.array(prev["kurtosis_update"]["m2"]) + sum(np.array(prev["kurtosis_update"][k]) for k in ("u2_1", "u2_2"))
        assert np.allclose(m2, cur["kurtosis_update"]["m2"], rtol=1e-9)
    # the final kurtosis on the fixed inputs, recomputed from the saved weights
    import json
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    from ofe import config as C
    from ofe.models import GPTConfig
    model = GPT(C.from_dict(GPTConfig, saved["model"]))
    load_model(model, str(tmp_path / "run" / "model.safetensors"))
    data = prepare(cfg.data, log=lambda *a: None)
    probe = val_windows(data.val, 8, cfg.model.seq_len)[:4, :-1]
    acts = KurtosisUpdateTracker(model, probe).capture()
    assert np.allclose([numpy_kurtosis(a.numpy()) for a in acts], logged[-1]["kurtosis_update"]["kurtosis"], rtol=1e-5)


def test_decomposition_can_be_disabled(tmp_path, small_corpus):
    cfg = build_train_config({"out_dir": str(tmp_path / "run"), "preset": "tiny", "steps": 4, "batch_size": 4,
                              "eval_batches": 1, "monitor_interval": 2, "progress": False,
                              "decomposition_sequences": 0, "data": {"corpus": str(small_corpus)}})
    train(cfg, log=lambda *a: None)
    assert not any("kurtosis_update" in r for r in RunDir(tmp_path / "run").read_metrics())
