"""Where the largest activations of a finished run sit: per layer on 16 validation windows.

Usage: python scripts/where.py RUN_DIR (the tables of docs/results/studies/headline-search.md)."""
import sys
import torch
from ofe.data import prepare, val_windows
from ofe.metrics import abs_max_median, kurtosis, position0_share, sink_score
from ofe.monitor import OutlierMonitor
from ofe.quant import load_trained

cfg, model = load_trained(sys.argv[1])
data = prepare(cfg.data, log=lambda *a: None)
x = val_windows(data.val, 16, cfg.model.seq_len, bos_id=data.bos_id)[:, :-1]
with OutlierMonitor(model, metrics=("kurtosis", "max_abs", "abs_max_median", "position0_share", "sink_score"),
                    probs_max_batch=None, mmr_max_rows=None) as mon:
    stats = mon.measure(x)
r, p = stats["resid"], stats["attn_probs"]
print(f"{'layer':>5} {'kurt':>6} {'max|x|':>7} {'max/med':>8} {'top50@pos0':>10} {'sink(max head)':>14}")
for i in range(len(r["kurtosis"])):
    print(f"{i:>5} {r['kurtosis'][i]:>6.1f} {r['max_abs'][i]:>7.1f} {r['abs_max_median'][i]:>8.1f} {r['position0_share'][i]:>10.2f} {max(p['sink_score'][i]):>14.2f}")
