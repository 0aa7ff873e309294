"""OutlierMonitor: values equal independent computations, inactive steps do nothing, any model works."""

import math

import pytest
import torch
from torch import nn

from ofe import metrics as M
from ofe.models import GPT, lm_loss, preset
from ofe.monitor import ALL_METRICS, OutlierMonitor, find_block_stack, flatten_results


def tiny_model(block="pre-ln", **kw):
    torch.manual_seed(0)
    return GPT(preset("tiny", block=block, **kw)).eval()


def capture_block_outputs(model, idx):
    """Independent capture: hooks on the blocks themselves, not the model's taps."""
    outs = []
    handles = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach())) for b in model.blocks]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    return outs


def manual_attention_probs(model, idx, layer):
    """Attention probabilities recomputed from the weights with an explicit softmax."""
    inputs = []
    blk = model.blocks[layer]
    h = blk.attn.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    with torch.no_grad():
        model(idx)
        h.remove()
        x = inputs[0]
        B, T, C = x.shape
        q, k, _ = blk.attn.qkv(x).split(C, -1)
        q = q.view(B, T, 4, C // 4).transpose(1, 2)
        k = k.view(B, T, 4, C // 4).transpose(1, 2)
        if blk.attn.q_norm is not None:
            q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(C // 4)
        s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        return s.softmax(-1)


@pytest.mark.parametrize("block", ["pre-ln", "op", "post-ln"])
def test_ofe_model_values_match_independent_computation(block):
    model = tiny_model(block)
    idx = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    with OutlierMonitor(model, metrics="all", mmr_max_rows=None, probs_max_batch=None) as mon:
        r = mon.measure(idx)
    outs = capture_block_outputs(model, idx)
    assert len(r["resid"]["kurtosis"]) == 2
    for layer, h in enumerate(outs):
        assert r["resid"]["kurtosis"][layer] == pytest.approx(M.kurtosis(h).item(), rel=1e-6)
        assert r["resid"]["mmr"][layer] == pytest.approx(M.max_median_ratio(h).item(), rel=1e-6)
        assert r["resid"]["input_correlation"][layer] == pytest.approx(M.input_correlation(h).item(), rel=1e-5)
        assert r["resid"]["max_abs"][layer] == pytest.approx(h.abs().max().item(), rel=1e-6)
        assert r["resid"]["token_excess_kurtosis"][layer] == pytest.approx(M.token_excess_kurtosis(h).item(), rel=1e-6)
        ent = M.attention_entropy(manual_attention_probs(model, idx, layer))
        assert r["attn_probs"]["attention_entropy"][layer] == pytest.approx(ent.tolist(), rel=1e-4)
    assert r["resid"]["int8_outlier_dims"] == int(M.int8_outlier_dims(outs).sum())


@pytest.mark.parametrize("limit", [None, 2])
def test_attention_probs_batch_limit(limit):
    model = tiny_model("op")
    idx = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(2))
    with OutlierMonitor(model, probs_max_batch=limit) as mon:
        r = mon.measure(idx)
    probs = manual_attention_probs(model, idx, 1)[: limit or 6]
    assert r["attn_probs"]["attention_entropy"][1] == pytest.approx(M.attention_entropy(probs).tolist(), rel=1e-4)
    assert model.blocks[1].attn.probs_tap.max_batch is None  # close() leaves the model as it was


def test_all_sites_are_observed():
    model = tiny_model("op")
    mon = OutlierMonitor(model, sites=("resid", "attn_out", "mlp_hidden", "attn_probs"))
    r = mon.measure(torch.randint(0, 256, (2, 16)))
    assert set(r) == {"resid", "attn_out", "mlp_hidden", "attn_probs"}
    assert math.isinf(r["mlp_hidden"]["mmr"][0])  # ReLU: median |h| is 0 for most tokens
    flat = flatten_results(r)
    assert "resid/kurtosis/1" in flat and "attn_probs/attention_entropy/0/3" in flat


def test_inactive_steps_record_nothing_and_taps_stay_off():
    model = tiny_model()
    mon = OutlierMonitor(model, every=3)
    idx = torch.randint(0, 256, (2, 16))
    seen = []
    for step in range(7):
        with mon.observe(step) as active:
            assert all(t.enabled == active for t in model.taps()["resid"].values())
            model(idx)
        seen.append(mon.collect() is not None)
    assert seen == [True, False, False, True, False, False, True]
    assert not any(t.enabled for s in model.taps().values() for t in s.values())


def test_attention_probs_are_not_computed_when_inactive(monkeypatch):
    model = tiny_model()
    calls = []
    attn = model.blocks[0].attn
    original = attn._probs
    monkeypatch.setattr(attn, "_probs", lambda q, k: calls.append(1) or original(q, k))
    mon = OutlierMonitor(model, every=2)
    idx = torch.randint(0, 256, (1, 8))
    for step in range(4):
        with mon.observe(step):
            model(idx)
    assert len(calls) == 2


def test_training_with_monitor_is_unchanged():
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))

    def train(with_monitor):
        model = tiny_model()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mon = OutlierMonitor(model, every=1, metrics="all") if with_monitor else None
        for step in range(3):
            if mon:
                with mon.observe(step):
                    loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
                mon.collect()
            else:
                loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(False), train(True)):
        assert torch.equal(a, b)


def test_gradient_accumulation_measures_both_micro_batches_together():
    """A layer observed on two micro-batches reports the kurtosis of their activations together (the
    step's whole batch), not the mean of two kurtoses."""
    model = tiny_model()
    mon = OutlierMonitor(model, metrics=("kurtosis",), sites=("resid",))
    a, b = torch.randint(0, 256, (2, 2, 16), generator=torch.Generator().manual_seed(3))
    with mon.observe(0), torch.no_grad():
        model(a)
        model(b)
    r = mon.collect()
    both = torch.cat([capture_block_outputs(model, a)[1], capture_block_outputs(model, b)[1]]).double()
    ka, kb = (M.kurtosis(capture_block_outputs(model, x)[1]).item() for x in (a, b))
    assert r["resid"]["kurtosis"][1] == pytest.approx(M.kurtosis(both).item(), rel=1e-6)  # float32 sums of squares
    assert abs(r["resid"]["kurtosis"][1] - (ka + kb) / 2) > 1e-3  # which differs from the mean of the two


def test_close_removes_hooks():
    model = tiny_model()
    mon = OutlierMonitor(model)
    mon.close()
    with mon.observe(0):
        model(torch.randint(0, 256, (1, 8)))
    assert mon.collect() is None
    assert all(not t._forward_hooks for s in model.taps().values() for t in s.values())


def test_generic_module_by_names_and_pattern():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 10, 8)
    by_name = OutlierMonitor(net, modules=["0", "2"], metrics=("kurtosis", "input_correlation")).measure(x)
    by_pattern = OutlierMonitor(net, pattern=r"[024]", metrics=("kurtosis",)).measure(x)
    with torch.no_grad():
        h0 = net[0](x)
        h2 = net[2](net[1](h0))
    assert by_name["output"]["kurtosis"] == pytest.approx([M.kurtosis(h0).item(), M.kurtosis(h2).item()], rel=1e-6)
    assert by_name["output"]["input_correlation"][0] == pytest.approx(M.input_correlation(h0).item(), rel=1e-5)
    assert len(by_pattern["output"]["kurtosis"]) == 3
    flat_net = nn.Sequential(nn.Linear(8, 16))
    r = OutlierMonitor(flat_net, modules=["0"]).measure(torch.randn(5, 8))  # 2-D output: no sequence metrics
    assert "input_correlation" not in r["output"] and "kurtosis" in r["output"]


EXACT = tuple(m for m in ALL_METRICS if m not in ("abs_max_median", "int8_sqnr_db"))  # ofe.monitor.reduce


def _observed(monitor, model, x):
    """The partials one forward pass of ``x`` leaves in the monitor (what one rank would gather)."""
    with torch.no_grad(), monitor.observe():
        model(x)
    pending, monitor._pending = monitor._pending, []
    return pending


def test_partials_of_two_ranks_give_the_global_batch_metrics():
    """Two 'ranks' holding halves of a batch, combined through a gather of their partials, give the
    metrics of the whole batch in one process: exactly for the decomposable metrics (to 1e-6: the
    per-neuron sums of squares are accumulated in float32)."""
    from ofe.monitor.measure import combine

    model = tiny_model().eval()
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # a few large channels, so the top-k and the outlier counts are not trivial
        model.pos_emb.weight[0, :3] = 40.0
    monitor = OutlierMonitor(model, metrics="all", mmr_max_rows=None, probs_max_batch=None)
    whole = combine(_observed(monitor, model, x))
    rank0, rank1 = _observed(monitor, model, x[:2]), _observed(monitor, model, x[2:])
    flat1 = torch.cat([v.reshape(-1) for *_, v in rank1])
    both = combine(rank0, gather=lambda flat0: torch.stack([flat0, flat1]))
    for site, by_metric in whole.items():
        for name, value in by_metric.items():
            if name in EXACT:
                flat = lambda v: [x for row in v for x in (row if isinstance(row, list) else [row])] if isinstance(v, list) else [v]  # noqa: E731
                assert flat(both[site][name]) == pytest.approx(flat(value), rel=1e-6, abs=1e-9), (site, name)
    # and the whole-batch values are the metric functions' (float32) on the whole batch
    with torch.no_grad():
        resid = [o for o in _block_outputs(model, x)]
    for layer, h in enumerate(resid):
        assert whole["resid"]["kurtosis"][layer] == pytest.approx(M.kurtosis(h).item(), rel=1e-5)
        assert whole["resid"]["seq_kurtosis"][layer] == pytest.approx(M.sequence_kurtosis(h).item(), rel=1e-5)
        assert whole["resid"]["position0_share"][layer] == pytest.approx(M.position0_share(h).item())
        assert whole["resid"]["token_excess_kurtosis"][layer] == pytest.approx(M.token_excess_kurtosis(h).item(), rel=1e-5)
        assert whole["resid"]["mmr"][layer] == pytest.approx(M.max_median_ratio(h).item(), rel=1e-5)
    assert whole["resid"]["position0_share"][0] >= 12 / 50  # the 3 planted channels of 4 sequences are in the top 50


# Metrics that are sums (or maxima) over tokens: a sequence-parallel split of the tokens combines exactly.
TOKEN_DECOMPOSABLE = ("kurtosis", "kurtosis_centered", "max_abs", "token_excess_kurtosis", "mmr", "int8_outlier_dims")


def test_partials_of_token_shards_give_the_whole_sequences_metrics():
    """Sequence parallelism: two 'ranks' holding the first and second half of every sequence's tokens,
    combined through the same gather, give the whole activation's metrics for every metric that is a
    sum or maximum over tokens (to 1e-6)."""
    from ofe.monitor.measure import Costs, combine, site_partials

    h = torch.randn(3, 24, 32, generator=torch.Generator().manual_seed(5))
    h[:, 0, :2] = 60.0  # a first-token spike in two channels
    h[1, 17, 5] = -45.0
    costs = Costs(mmr_max_rows=None)

    def partials(x):
        return [("resid", 0, name, v) for name, v in site_partials("resid", x, TOKEN_DECOMPOSABLE, costs)]

    whole = combine(partials(h))
    first, second = partials(h[:, :12]), partials(h[:, 12:])
    flat1 = torch.cat([v.reshape(-1) for *_, v in second])
    both = combine(first, gather=lambda flat0: torch.stack([flat0, flat1]))
    for name in TOKEN_DECOMPOSABLE:
        assert both["resid"][name] == pytest.approx(whole["resid"][name], rel=1e-6), name
    assert whole["resid"]["kurtosis"][0] == pytest.approx(M.kurtosis(h).item(), rel=1e-5)
    assert whole["resid"]["max_abs"][0] == pytest.approx(60.0)


def _block_outputs(model, x):
    outs = []
    handles = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in model.blocks]
    model(x)
    for h in handles:
        h.remove()
    return outs


def test_bad_arguments_are_clear():
    model = tiny_model()
    with pytest.raises(ValueError, match="unknown metric"):
        OutlierMonitor(model, metrics=("kurtosis", "nope"))
    with pytest.raises(ValueError, match="unknown site"):
        OutlierMonitor(model, sites=("resid", "bogus"))
    with pytest.raises(ValueError, match="no module named"):
        OutlierMonitor(model, modules=["blocks.9"])
    with pytest.raises(ValueError, match="matches no module"):
        OutlierMonitor(model, pattern=r"nothing\.here")
    with pytest.raises(ValueError, match="every"):
        OutlierMonitor(model, every=0)
    assert "attention_entropy" in ALL_METRICS


# ---- Hugging Face models ---------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
from hf_families import FAMILIES, NO_FINAL_NORM, build as build_hf  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_hugging_face_hidden_states(family):
    """The monitor's residual stream of every supported family is what the model returns as
    ``output_hidden_states``: block i's output is ``hidden_states[i + 1]``, except the last block of a
    family with a final norm (GPT-2, OPT, NeoX with its parallel residual, Llama, Mistral, Qwen2), whose
    last entry is taken after that norm; the monitor observes the block's own output there."""
    model = build_hf(family).eval()
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    stack_name, stack = find_block_stack(model)
    assert len(stack) == 3
    r = OutlierMonitor(model, metrics=("kurtosis", "max_abs", "mmr"), mmr_max_rows=None).measure(idx)
    with torch.no_grad():
        hidden = model(idx, output_hidden_states=True).hidden_states
        outs = []
        handle = stack[2].register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o))
        model(idx)
        handle.remove()
    compared = [hidden[1], hidden[2], hidden[3] if family in NO_FINAL_NORM else outs[0]]
    if family not in NO_FINAL_NORM:
        assert not torch.allclose(hidden[3], outs[0])  # the last entry really is after the final norm
    for layer, h in enumerate(compared):
        h64 = h.double()
        rms2 = h64.square().flatten(0, -2).mean(0)
        kurt = (rms2.square().mean() / rms2.mean().square()).item()  # Eq. 1 in float64
        assert r["resid"]["kurtosis"][layer] == pytest.approx(kurt, rel=1e-6), (family, layer)
        assert r["resid"]["max_abs"][layer] == pytest.approx(h64.abs().max().item(), rel=1e-6), (family, layer)
    assert len(r["resid"]["kurtosis"]) == 3


def test_monitor_works_under_torch_compile():
    """Hooks are registered before compiling; the compiled model still reports the eager values."""
    model = tiny_model("op")
    model.train()
    mon = OutlierMonitor(model, every=2, metrics=("kurtosis",), sites=("resid",))
    compiled = torch.compile(model)
    idx = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for step in range(3):
        with mon.observe(step):
            loss = lm_loss(compiled(idx[:, :-1]), idx[:, 1:])
        loss.backward()
        results.append(mon.collect())
    assert results[1] is None and results[0] is not None and results[2] is not None
    eager = [M.kurtosis(h).item() for h in capture_block_outputs(model, idx[:, :-1])]
    assert results[0]["resid"]["kurtosis"] == pytest.approx(eager, rel=1e-5)


def test_capture_records_outputs_and_inputs_and_removes_its_hooks_even_on_error():
    from ofe.monitor import capture

    class Block(torch.nn.Module):
        def forward(self, hidden_states, scale=1.0):
            return (hidden_states * scale + 1.0, "extra")  # a Hugging Face style tuple

    a, b, unused = Block(), Block(), Block()
    x = torch.randn(2, 3, 4)
    with capture([a, b, unused]) as outs, capture([a], inputs=True) as ins:
        h, _ = a(x)
        b(hidden_states=h, scale=2.0)  # keyword input
    assert torch.equal(outs[0], x + 1.0) and torch.equal(outs[1], (x + 1.0) * 2.0 + 1.0) and outs[2] is None
    assert torch.equal(ins[0], x)
    with capture([b], inputs=True) as kw:
        b(hidden_states=x)
    assert torch.equal(kw[0], x)
    with pytest.raises(ZeroDivisionError), capture([a]):
        a(x)
        1 / 0
    assert not a._forward_hooks and not a._forward_pre_hooks and not b._forward_hooks and not b._forward_pre_hooks
