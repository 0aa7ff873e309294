"""ofe.metrics against closed forms, invariances and independent float64 NumPy computations."""

import math

import numpy as np
import pytest
import torch

from ofe import metrics as M


def np_kurtosis(x: np.ndarray, center: bool = False) -> float:
    x = x.astype(np.float64).reshape(-1, x.shape[-1])
    if center:
        x = x - x.mean(-1, keepdims=True)
    s = np.sqrt((x**2).mean(0))
    return float((s**4).mean() / (s**2).mean() ** 2)


def heavy_tailed(shape, seed=0, df=3.0):
    rng = np.random.default_rng(seed)
    return rng.standard_t(df, size=shape)


def signs(n, d, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, d)))


# ---- kurtosis ---------------------------------------------------------------------------------
def test_kurtosis_equal_rms_is_one():
    assert M.kurtosis(signs(50, 64)).item() == pytest.approx(1.0, abs=1e-6)


def test_kurtosis_one_neuron_carrying_everything_is_d():
    x = torch.zeros(20, 48)
    x[:, 7] = torch.randn(20)
    assert M.kurtosis(x).item() == pytest.approx(48.0, rel=1e-6)


@pytest.mark.parametrize("c", [2.0, 10.0, 300.0])
def test_kurtosis_single_outlier_closed_form(c):
    d = 32
    x = signs(40, d, seed=1)
    x[:, 5] *= c
    expected = d * (d - 1 + c**4) / (d - 1 + c**2) ** 2
    assert M.kurtosis(x).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("center", [False, True])
def test_kurtosis_matches_float64_numpy_on_heavy_tails(center):
    x = heavy_tailed((4, 33, 96), seed=2)
    got = M.kurtosis(torch.from_numpy(x).float(), center=center).item()
    assert got == pytest.approx(np_kurtosis(x, center), rel=1e-5)


def test_kurtosis_float64_input_stays_float64():
    x = torch.from_numpy(heavy_tailed((64, 16), seed=3))
    out = M.kurtosis(x)
    assert out.dtype == torch.float64
    assert out.item() == pytest.approx(np_kurtosis(x.numpy()), rel=1e-12)


def test_kurtosis_invariances():
    x = torch.from_numpy(heavy_tailed((128, 40), seed=4)).float()
    base = M.kurtosis(x).item()
    assert M.kurtosis(x * 1e3).item() == pytest.approx(base, rel=1e-5)
    assert M.kurtosis(x * 1e-4).item() == pytest.approx(base, rel=1e-5)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    assert M.kurtosis(x[:, perm]).item() == pytest.approx(base, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kurtosis_low_precision_large_values_no_overflow(dtype):
    x = torch.from_numpy(heavy_tailed((64, 128), seed=5)).float()
    x = x / x.abs().max() * 1e4  # values up to 1e4: x^4 ~ 1e16 overflows fp16, stresses bf16
    x[:, 3] *= 6.0  # an outlier neuron up to 6e4
    xl = x.to(dtype)
    got = M.kurtosis(xl)
    assert got.dtype == torch.float32
    assert math.isfinite(got.item())
    assert got.item() == pytest.approx(np_kurtosis(xl.double().numpy()), rel=1e-5)


def test_kurtosis_degenerate_inputs():
    assert math.isnan(M.kurtosis(torch.zeros(8, 16)).item())
    x = torch.randn(8, 16)
    x[2, 3] = float("nan")
    assert math.isnan(M.kurtosis(x).item())
    x[2, 3] = float("inf")
    assert math.isnan(M.kurtosis(x).item())
    with pytest.raises(ValueError):
        M.kurtosis(torch.zeros(0, 16))
    with pytest.raises(ValueError):
        M.kurtosis(torch.tensor(3.0))


def test_kurtosis_single_row_and_single_neuron():
    row = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    assert M.kurtosis(row).item() == pytest.approx(np_kurtosis(row.numpy()), rel=1e-6)
    assert M.kurtosis(torch.randn(10, 1)).item() == pytest.approx(1.0)


def test_keep_dims_equals_per_group_computation():
    x = torch.from_numpy(heavy_tailed((3, 5, 7, 24), seed=6)).float()
    grouped = M.kurtosis(x, keep_dims=1)
    assert grouped.shape == (3,)
    for g in range(3):
        assert grouped[g].item() == pytest.approx(M.kurtosis(x[g]).item(), rel=1e-6)
    corr = M.input_correlation(x, keep_dims=1)
    for g in range(3):
        assert corr[g].item() == pytest.approx(M.input_correlation(x[g]).item(), rel=1e-5, abs=1e-7)


# ---- max-median ratio ---------------------------------------------------------------------------
def test_mmr_constant_magnitudes_is_one():
    assert M.max_median_ratio(signs(10, 17) * 3).item() == pytest.approx(1.0)


def test_mmr_matches_numpy_even_and_odd_widths():
    for d in (31, 32):
        x = heavy_tailed((2, 9, d), seed=d)
        a = np.abs(x).reshape(-1, d)
        expected = (a.max(-1) / np.median(a, -1)).mean()
        assert M.max_median_ratio(torch.from_numpy(x).float()).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("d", [1, 2, 3, 4, 7, 8, 64, 65])
def test_median_matches_numpy_with_ties(d):
    g = torch.Generator().manual_seed(d)
    for _ in range(20):
        a = torch.randint(0, 4, (16, d), generator=g).float()  # heavy ties around the middle
        np.testing.assert_allclose(M._median_last(a).numpy(), np.median(a.numpy(), -1))
    a = torch.rand(16, d, generator=g)
    np.testing.assert_allclose(M._median_last(a).numpy(), np.median(a.numpy(), -1), rtol=1e-7)


def test_mmr_row_subsampling_uses_evenly_spaced_rows():
    x = torch.from_numpy(heavy_tailed((4, 25, 16), seed=12)).float()
    rows = x.reshape(-1, 16)
    idx = torch.linspace(0, 99, 30).round().long()
    assert M.max_median_ratio(x, max_rows=30).item() == pytest.approx(M.max_median_ratio(rows[idx]).item(), rel=1e-6)
    assert M.max_median_ratio(x, max_rows=1000).item() == M.max_median_ratio(x).item()


def test_mmr_zero_median_is_inf_and_zero_row_is_nan():
    x = torch.zeros(2, 5)
    x[0, 0] = 1.0
    assert math.isinf(M.max_median_ratio(x[:1]).item())
    assert math.isnan(M.max_median_ratio(x[1:]).item())


# ---- input correlation --------------------------------------------------------------------------
def np_correlation(x: np.ndarray) -> float:
    x = x.astype(np.float64).reshape(-1, x.shape[-2], x.shape[-1])
    vals = []
    for seq in x:
        u = seq / np.linalg.norm(seq, axis=-1, keepdims=True)
        g = u @ u.T
        T = len(seq)
        vals.append((g.sum() - np.trace(g)) / (T * (T - 1)))
    return float(np.mean(vals))


def test_correlation_identical_tokens_is_one_and_orthogonal_is_zero():
    v = torch.randn(1, 1, 16)
    assert M.input_correlation(v.expand(3, 10, 16)).item() == pytest.approx(1.0, abs=1e-6)
    assert M.input_correlation(torch.eye(16)[None, :12]).item() == pytest.approx(0.0, abs=1e-7)


def test_correlation_matches_numpy_gram_matrix():
    x = heavy_tailed((3, 20, 24), seed=7) + 0.5  # a shared offset gives positive correlation
    got = M.input_correlation(torch.from_numpy(x).float()).item()
    assert got == pytest.approx(np_correlation(x), rel=1e-5)


def test_correlation_token_subsampling_uses_evenly_spaced_positions():
    x = torch.from_numpy(heavy_tailed((2, 50, 8), seed=8) + 1.0).float()
    idx = torch.linspace(0, 49, 11).round().long()
    assert M.input_correlation(x, max_tokens=11).item() == pytest.approx(M.input_correlation(x[:, idx]).item(), rel=1e-6)
    assert M.input_correlation(x, max_tokens=100).item() == pytest.approx(M.input_correlation(x).item())


def test_correlation_degenerate_inputs():
    with pytest.raises(ValueError):
        M.input_correlation(torch.randn(4, 1, 8))
    with pytest.raises(ValueError):
        M.input_correlation(torch.randn(8))
    x = torch.randn(2, 5, 8)
    x[1, 2] = 0.0
    assert math.isnan(M.input_correlation(x).item())


# ---- attention entropy ----------------------------------------------------------------------------
def test_entropy_uniform_is_log_t_and_one_hot_is_zero():
    T = 12
    uniform = torch.full((2, 3, T, T), 1.0 / T)
    assert torch.allclose(M.attention_entropy(uniform), torch.full((3,), math.log(T)))
    one_hot = torch.eye(T).expand(2, 3, T, T)
    assert torch.allclose(M.attention_entropy(one_hot), torch.zeros(3))


def test_entropy_causal_uniform_and_numpy():
    T = 9
    causal = torch.tril(torch.ones(T, T))
    causal = causal / causal.sum(-1, keepdim=True)
    expected = np.mean([math.log(t + 1) for t in range(T)])
    assert M.attention_entropy(causal[None, None]).item() == pytest.approx(expected, rel=1e-6)
    logits = torch.from_numpy(heavy_tailed((2, 4, T, T), seed=9))
    p = logits.softmax(-1).numpy()
    ref = (-(p * np.log(p)).sum(-1)).mean(-1).mean(0)
    np.testing.assert_allclose(M.attention_entropy(torch.from_numpy(p).float()).numpy(), ref, rtol=1e-5)


# ---- comparison metrics ------------------------------------------------------------------------------
def test_max_abs_and_sequence_max_abs():
    x = heavy_tailed((3, 6, 10), seed=10)
    t = torch.from_numpy(x).float()
    assert M.max_abs(t).item() == pytest.approx(np.abs(x).max(), rel=1e-6)
    assert M.sequence_max_abs(t).item() == pytest.approx(np.abs(x).reshape(3, -1).max(-1).mean(), rel=1e-6)


def test_sequence_kurtosis_matches_pearson_and_gaussian_is_three():
    x = heavy_tailed((4, 16, 32), seed=11)
    v = x.reshape(4, -1)
    v = v - v.mean(-1, keepdims=True)
    expected = ((v**4).mean(-1) / (v**2).mean(-1) ** 2).mean()
    assert M.sequence_kurtosis(torch.from_numpy(x).float()).item() == pytest.approx(expected, rel=1e-5)
    g = torch.randn(2, 256, 256, generator=torch.Generator().manual_seed(0))
    assert M.sequence_kurtosis(g).item() == pytest.approx(3.0, abs=0.05)
    assert math.isnan(M.sequence_kurtosis(torch.ones(1, 4, 4)).item())


def test_int8_outlier_dims_thresholds():
    L, n, d = 4, 100, 10
    x = torch.zeros(L, n, d)
    x[:2, :10, 3] = 7.0  # 10% of tokens, in 2 of 4 layers: an outlier dimension
    x[:, :3, 5] = 7.0  # 3% of tokens in every layer: below 6%
    x[:1, :50, 7] = -9.0  # half the tokens in 1 of 4 layers: exactly 25% of layers is enough
    x[:, :6, 8] = 6.0  # exactly 6% of tokens at exactly the threshold, every layer
    mask = M.int8_outlier_dims(x)
    assert mask.tolist() == [False, False, False, True, False, False, False, True, True, False]
    assert torch.equal(mask, M.int8_outlier_dims(list(x)))
    assert M.int8_outlier_dims(x, min_layer_frac=0.5).sum().item() == 2


# ---- kurtosis update decomposition (REFERENCE 4) -----------------------------------------------------
def test_update_terms_reconstruct_the_new_kurtosis_exactly():
    x = torch.from_numpy(heavy_tailed((3, 20, 24), seed=13))
    x_new = x + 0.3 * torch.from_numpy(heavy_tailed((3, 20, 24), seed=14))
    x_new[..., 5] *= 4.0  # grow an outlier neuron
    t = M.kurtosis_update_terms(x, x_new)
    m2_new = t["m2"] + t["u2_1"] + t["u2_2"]
    m4_new = t["m4"] + t["u4_1"] + t["u4_2"] + t["u4_3"] + t["u4_4"]
    assert (m4_new / m2_new**2).item() == pytest.approx(np_kurtosis(x_new.numpy()), rel=1e-12)
    assert (t["m4"] / t["m2"] ** 2).item() == pytest.approx(np_kurtosis(x.numpy()), rel=1e-12)
    s_new = (x_new.reshape(-1, 24) ** 2).mean(0)
    assert m2_new.item() == pytest.approx(s_new.mean().item(), rel=1e-12)


def test_update_terms_closed_forms():
    x = torch.randn(50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = M.kurtosis_update_terms(x, x)  # no change: every term is zero
    assert all(abs(t[k].item()) == 0 for k in ("u2_1", "u2_2", "u4_1", "u4_2", "u4_3", "u4_4"))
    t = M.kurtosis_update_terms(x, 2 * x)  # dX = X: a = 2 s^2, b = s^2
    s2 = (x**2).mean(0)
    assert t["u2_1"].item() == pytest.approx((2 * s2).mean().item()) and t["u4_2"].item() == pytest.approx((6 * s2**2).mean().item())
    with pytest.raises(ValueError, match="shapes differ"):
        M.kurtosis_update_terms(x, x[:, :4])


def test_per_token_outlier_metrics_against_float64_on_a_planted_spike():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 32, generator=g)
    x[1, 0, 5] = 80.0  # a massive activation on the first token
    x[2, 0, 7] = -60.0
    ref = np.abs(x.double().numpy())
    assert M.abs_max_median(x).item() == pytest.approx(ref.max() / np.median(ref), rel=1e-6)
    sub = M.abs_max_median(x, max_elements=101)  # the median on an evenly spaced subset; the max stays exact
    assert sub.item() == pytest.approx(ref.max() / np.median(ref.reshape(-1)[np.linspace(0, ref.size - 1, 101).round().astype(int)]), rel=1e-6)
    assert M.top_positions(x, k=2).tolist() == [0, 0]
    order = np.argsort(-ref.reshape(-1))[:10]
    assert M.top_positions(x, k=10).tolist() == [int(i % (16 * 32)) // 32 for i in order]
    assert M.position0_share(x, k=2).item() == 1.0
    assert M.position0_share(x, k=10).item() == pytest.approx(np.mean([(i % (16 * 32)) // 32 == 0 for i in order]))


def test_sink_score_is_the_mass_on_the_first_key():
    T = 6
    uniform = torch.tril(torch.ones(T, T))
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(2, 3, T, T)
    expected = np.mean([1.0 / (t + 1) for t in range(1, T)])
    assert M.sink_score(uniform).tolist() == pytest.approx([expected] * 3)
    sink = torch.zeros(1, 2, T, T)
    sink[..., 0] = 1.0
    assert M.sink_score(sink).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        M.sink_score(torch.ones(1, 1, 1, 1))


def test_token_excess_kurtosis_matches_a_float64_reference_and_closed_forms():
    """OSP's per-token excess kurtosis: scipy-free float64 reference, a Gaussian (about 0), a one-hot row
    (d - 3 - 1/(d - 1) ... computed exactly below), clamping at 0 and constant rows left out."""
    from ofe.metrics import token_excess_kurtosis

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 64, generator=g)
    x[1, 3, 5] = 80.0  # one massive activation
    ref = x.double().reshape(-1, 64)
    c = ref - ref.mean(-1, keepdim=True)
    per_token = ((c**4).mean(-1) / (c**2).mean(-1) ** 2 - 3).clamp(min=0)
    assert token_excess_kurtosis(x).item() == pytest.approx(per_token.mean().item(), rel=1e-5)
    assert token_excess_kurtosis(torch.randn(256, 4096, generator=g)).item() < 0.05  # Gaussian rows
    d = 64
    one_hot = torch.zeros(1, d)
    one_hot[0, 7] = 3.0  # centred: (d-1)/d at one channel, -1/d elsewhere; kurtosis (d^2 - 3d + 3)/(d - 1)
    assert token_excess_kurtosis(one_hot).item() == pytest.approx((d * d - 3 * d + 3) / (d - 1) - 3, rel=1e-5)
    flat = torch.tensor([[1.0, -1.0] * 32])  # kurtosis 1: excess -2, clamped to 0
    assert token_excess_kurtosis(flat).item() == 0.0
    with_constant = torch.cat([one_hot, torch.full((1, d), 2.0)])  # the constant row is left out
    assert token_excess_kurtosis(with_constant).item() == pytest.approx(token_excess_kurtosis(one_hot).item())
    assert math.isnan(token_excess_kurtosis(torch.ones(3, d)).item())
    assert token_excess_kurtosis(x.bfloat16(), keep_dims=1).shape == (4,)


def test_int8_sqnr_matches_a_float64_reference_and_falls_with_an_outlier():
    """Per-tensor symmetric int8 round-to-nearest SQNR, against numpy in float64; about 39-40 dB for
    Gaussian values (6 dB per bit: 20 log10(127 / 4.7) + 10 log10(12)), and a planted massive activation
    (300 on one channel of each sequence's first token) costs it over 20 dB."""
    import numpy as np
    from ofe.metrics import int8_sqnr_db
    torch.manual_seed(0)
    x = torch.randn(16, 32, 64)
    ref = x.double().numpy().reshape(-1)
    scale = np.abs(ref).max() / 127
    q = np.clip(np.round(ref / scale), -127, 127) * scale
    expected = 10 * np.log10((ref ** 2).sum() / ((ref - q) ** 2).sum())
    assert int8_sqnr_db(x).item() == pytest.approx(expected, abs=1e-3)
    assert 38 < expected < 41
    grouped = int8_sqnr_db(x, keep_dims=1)  # one value per leading group
    assert grouped.shape == (16,) and grouped[3].item() == pytest.approx(int8_sqnr_db(x[3]).item(), abs=1e-4)
    spiked = x.clone()
    spiked[:, 0, 5] = 300.0  # a massive activation: one channel of the first token of each sequence
    assert int8_sqnr_db(spiked).item() < expected - 20  # the bulk now rounds to a few grid levels
    assert int8_sqnr_db(x, bits=4).item() == pytest.approx(expected - 24, abs=2.0)  # ~6 dB per bit
