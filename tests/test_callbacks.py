"""The monitor as a Hugging Face Trainer callback and a Lightning callback, logged by each framework."""

import csv
import dataclasses

import pytest
import torch

from ofe import metrics as M
from ofe.callbacks import HFOutlierCallback, LightningOutlierCallback, scalars
from ofe.quant.probe import PROBE_FORMATS, QuantProbe


def test_scalars_flatten_and_summarise():
    out = scalars({"resid": {"kurtosis": [1.0, 3.0]}, "attn_probs": {"attention_entropy": [[1.0, 3.0], [2.0, 2.0]]}})
    assert out == {"ofe/resid/kurtosis/0": 1.0, "ofe/resid/kurtosis/1": 3.0, "ofe/resid/kurtosis/max": 3.0,
                   "ofe/attn_probs/attention_entropy/0": 2.0, "ofe/attn_probs/attention_entropy/1": 2.0,
                   "ofe/attn_probs/attention_entropy/max": 2.0}


def test_hugging_face_trainer_logs_outlier_metrics(tmp_path):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    data = [{"input_ids": x, "labels": x} for x in torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0))]
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                                logging_steps=1000, save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data)
    gen = torch.Generator().manual_seed(1)
    windows, calib = torch.randint(0, 256, (4, 17), generator=gen), [torch.randint(0, 256, (4, 16), generator=gen)]
    trainer.add_callback(HFOutlierCallback(trainer, every=2, metrics=("kurtosis", "max_abs"), quant_probe=2,
                                           probe_windows=windows, probe_calibration=calib))
    seen = []
    model.transformer.h[1].register_forward_hook(lambda m, i, o: seen.append(M.kurtosis(o[0] if isinstance(o, tuple) else o).item()))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "ofe/resid/kurtosis/1" in h]
    assert [h["step"] for h in logged] == [1, 3]  # observed before updates 0 and 2, logged after them
    assert logged[0]["ofe/resid/kurtosis/1"] == pytest.approx(seen[0], rel=1e-5)
    assert logged[0]["ofe/resid/kurtosis/max"] >= logged[0]["ofe/resid/kurtosis/0"]
    assert not model.transformer.h[1]._forward_hooks or len(model.transformer.h[1]._forward_hooks) == 1  # ours removed
    probed = [h for h in trainer.state.log_history if "ofe/quant/w8a8_probe_pct" in h]
    assert [h["step"] for h in probed] == [2, 4]  # after updates 2 and 4
    # the last probe saw the final weights: the same number as a probe of the trained model, computed
    # independently here (LM head in float, linear inputs and block outputs quantised, as ofe audit does)
    expected = _independent_hf_costs(model, windows, calib)
    for field in ("w8a8_probe_pct", "w4a4_probe_pct"):  # perplexities equal to ~1e-6 (float32, other batching)
        assert probed[-1][f"ofe/quant/{field}"] == pytest.approx(expected[field], abs=1e-4)
    assert probed[-1]["ofe/quant/w4a4_probe_pct"] > probed[-1]["ofe/quant/w8a8_probe_pct"]


def _independent_hf_costs(model, windows, calib):
    """W8A8 / W4A4 perplexity increase of a GPT-2 model through its labels loss (not ofe's perplexity)."""
    import math

    from ofe.quant import SimulatedQuantModel

    def ppl(m):
        with torch.no_grad():
            return math.exp(m(input_ids=windows, labels=windows).loss.item())

    out = {}
    for name, f in zip(("w8a8_probe_pct", "w4a4_probe_pct"), PROBE_FORMATS):
        sim = SimulatedQuantModel(model, dataclasses.replace(f, sites="linear-inputs"), float_modules=("lm_head",),
                                  output_modules=("transformer.h.0", "transformer.h.1"))
        sim.calibrate(calib)
        model.eval()
        out[name] = 100 * (ppl(sim.model) / ppl(model) - 1)
    return out


def test_lightning_logs_outlier_metrics(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from ofe.models import GPT, lm_loss, preset

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = GPT(preset("tiny"))

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return lm_loss(self.model(x[:, :-1]), x[:, 1:])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    data = torch.utils.data.TensorDataset(torch.randint(0, 256, (16, 17), generator=torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(1)
    windows, calib = torch.randint(0, 256, (4, 17), generator=gen), [torch.randint(0, 256, (4, 16), generator=gen)]
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = L.Trainer(max_steps=4, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        callbacks=[LightningOutlierCallback(every=2, metrics=("kurtosis",), quant_probe=2,
                                                            probe_windows=windows, probe_calibration=calib)])
    module = Module()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    logged = [r for r in rows if r.get("ofe/resid/kurtosis/0")]
    assert [int(r["step"]) for r in logged] == [1, 3]  # observed on batches 0 and 2, logged after their updates
    assert all(float(r["ofe/resid/kurtosis/1"]) >= 1.0 for r in logged)
    probed = [r for r in rows if r.get("ofe/quant/w4a4_probe_pct")]
    assert [int(r["step"]) for r in probed] == [2, 4]  # after updates 2 and 4
    # the GPT inside the LightningModule was probed at every protocol site: the final weights' costs again
    final = QuantProbe(windows, calib).measure(module.model)
    assert float(probed[-1]["ofe/quant/w4a4_probe_pct"]) == pytest.approx(final["w4a4_probe_pct"], rel=1e-5)
    assert final["w4a4_probe_pct"] > 0


def test_probe_needs_its_data():
    with pytest.raises(ValueError, match="probe_windows"):
        LightningOutlierCallback(quant_probe=10)
    with pytest.raises(ValueError, match="step interval"):
        LightningOutlierCallback(quant_probe=-1, probe_windows=torch.zeros(2, 3, dtype=torch.long), probe_calibration=[])
    with pytest.raises(ValueError, match="calibration"):
        LightningOutlierCallback(quant_probe=1, probe_windows=torch.zeros(2, 3, dtype=torch.long), probe_calibration=[])
