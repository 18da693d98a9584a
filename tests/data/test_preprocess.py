"""Tests of dequantization, the logit transform and bits per dimension against hand-computed
answers: exact bits/dim of uniform densities, autograd Jacobians in float64, and the discrete
probabilities of a 1-pixel model computed from its CDF with scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from flowlab.data.preprocess import (
    Preprocess,
    bits_per_dim,
    dequantize,
    logit_inverse,
    logit_transform,
)
from flowlab.errors import ConfigError, DataError

F64 = torch.float64


def pixels(shape: tuple[int, ...], levels: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=generator, dtype=torch.uint8)


# --- dequantization ------------------------------------------------------------------------


def test_dequantize_stays_in_the_pixel_cell():
    x = pixels((5, 3, 4, 4), 256)
    x[0, 0, 0, :2] = torch.tensor([0, 255])
    z, ldj = dequantize(x, 256, torch.Generator().manual_seed(1))
    assert z.dtype == torch.get_default_dtype() and z.shape == x.shape
    assert bool((z >= 0).all()) and bool((z < 1).all())
    assert torch.equal(torch.floor(z * 256).to(torch.uint8), x)
    assert torch.equal(ldj, torch.full((5,), -48 * math.log(256)))
    again, _ = dequantize(x, 256, torch.Generator().manual_seed(1))
    assert torch.equal(z, again)
    z64, ldj64 = dequantize(x.double(), 256, noise=torch.full(x.shape, 0.25, dtype=F64))
    assert z64.dtype == F64 and torch.equal(z64, (x.double() + 0.25) / 256)
    assert ldj64.dtype == F64
    assert dequantize(x, 256, noise=torch.zeros(x.shape, dtype=F64))[0].dtype == F64


def test_dequantize_never_reaches_one():
    below_one = 1.0 - 2.0**-24  # the largest float32 below 1, the largest torch.rand draw
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.tensor([[255]], dtype=torch.uint8)
        z, _ = dequantize(x, 256, noise=torch.tensor([[below_one]]), dtype=dtype)
        assert z.dtype == dtype and float(z) < 1.0  # (255 + u) / 256 rounds to 1 unclamped
        y, ldj = logit_transform(z.float(), alpha=0.0)
        assert torch.isfinite(y).all() and torch.isfinite(ldj).all()


def test_dequantize_errors():
    x = pixels((2, 4), 17)
    for bad, message in ((x.long() + 1, r"0\.\.16 \(17 levels\), got values in 1\.\.17"),
                         (x.long() - 1, r"got values in -1"),
                         (x.double() + 0.5, "non-integer"),
                         (torch.full((2, 4), math.nan), "non-integer"),
                         (torch.zeros(4, dtype=torch.uint8), r"batch \(N, \.\.\.\)"),
                         (torch.zeros(2, 4, dtype=torch.bool), "integers")):
        with pytest.raises(DataError, match=message):
            dequantize(bad, 17)
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        dequantize(x, 17, noise=torch.ones(2, 4))
    with pytest.raises(DataError, match="noise of shape"):
        dequantize(x, 17, noise=torch.zeros(2, 3))
    with pytest.raises(ConfigError, match="not both"):
        dequantize(x, 17, torch.Generator(), noise=torch.zeros(2, 4))
    for levels in (1, 2.0, True):
        with pytest.raises(ConfigError, match="levels"):
            dequantize(x, levels)
    with pytest.raises(ConfigError, match="floating dtype"):
        dequantize(x, 17, dtype=torch.int32)


# --- the logit transform -------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.3])
def test_logit_log_det_against_autograd(alpha):
    x = torch.rand(3, 1, 2, 2, dtype=F64) * 0.98 + 0.01

    def flat_forward(v):  # one image, flattened: (4,) -> (4,)
        return logit_transform(v.reshape(1, 1, 2, 2), alpha)[0].reshape(4)

    def flat_inverse(v):
        return logit_inverse(v.reshape(1, 1, 2, 2), alpha)[0].reshape(4)

    y, ldj = logit_transform(x, alpha)
    x_back, ldj_inverse = logit_inverse(y, alpha)
    for i in range(3):
        jac = torch.func.jacrev(flat_forward)(x[i].reshape(4))
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign == 1
        torch.testing.assert_close(ldj[i], logabs, rtol=0, atol=1e-12)
        jac_inv = torch.func.jacrev(flat_inverse)(y[i].reshape(4))
        torch.testing.assert_close(ldj_inverse[i], torch.linalg.slogdet(jac_inv)[1], rtol=0,
                                   atol=1e-12)
    # values against scipy's logit, and the inverse
    expected = special.logit(alpha + (1 - 2 * alpha) * x.numpy())
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-14)
    torch.testing.assert_close(ldj + ldj_inverse, torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)


def test_logit_is_numerically_safe():
    x = torch.tensor([[0.0, 1.0, 0.5, 1e-30]])
    y, ldj = logit_transform(x, 0.05)
    assert torch.isfinite(y).all() and torch.isfinite(ldj).all()
    torch.testing.assert_close(y[0, :2], torch.tensor([-math.log(19), math.log(19)]))
    big = torch.tensor([[-200.0, 200.0, 0.0]])  # far outside what the forward map reaches
    x_back, ldj_back = logit_inverse(big, 0.05)
    assert torch.isfinite(x_back).all() and torch.isfinite(ldj_back).all()
    # -softplus(-y) - softplus(y) at |y| = 200 is -200 each, 0 at y = 0 is -2 log 2
    expected = -400.0 - 2 * math.log(2.0) - 3 * math.log(0.9)
    torch.testing.assert_close(ldj_back, torch.tensor([expected]))


def test_logit_errors():
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        logit_transform(torch.tensor([[1.5]]), 0.05)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        logit_transform(torch.tensor([[math.nan]]), 0.05)
    with pytest.raises(DataError, match="floating"):
        logit_transform(torch.tensor([[1]]), 0.05)
    for alpha in (0.5, -0.1, None, True):
        with pytest.raises(ConfigError, match="alpha"):
            logit_transform(torch.tensor([[0.5]]), alpha)


# --- bits per dimension --------------------------------------------------------------------


def log_uniform_in_logit_space(y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Log-density of y = logit(s), s uniform on [alpha, 1 - alpha]: the uniform density on the
    pixel cube written in logit coordinates (by hand: sigmoid'(y) / (1 - 2 alpha))."""
    per_pixel = torch.log(torch.sigmoid(y)) + torch.log(torch.sigmoid(-y)) - math.log(1 - 2 * alpha)
    return per_pixel.reshape(y.shape[0], -1).sum(dim=1)


@pytest.mark.parametrize("levels", [256, 17, 2])
@pytest.mark.parametrize("alpha", [None, 0.05])
def test_uniform_density_scores_log2_levels(levels, alpha):
    x = pixels((6, 3, 5, 5), levels)
    prep = Preprocess(levels, alpha=alpha)
    y, ldj = prep.forward(x, torch.Generator().manual_seed(2), dtype=F64)
    log_prob = torch.zeros(6, dtype=F64) if alpha is None else log_uniform_in_logit_space(y, alpha)
    bpd = prep.bits_per_dim(log_prob, ldj, num_dims=75)
    tol = 1e-15 if alpha is None else 1e-12
    torch.testing.assert_close(bpd, torch.full((6,), math.log2(levels), dtype=F64), rtol=0,
                               atol=tol)
    if levels == 256:
        assert abs(float(bpd[0]) - 8.0) < tol


def test_bits_per_dim_by_hand():
    # one pixel, 4 levels; a density 2 on [0, 1/2): P(x) = 1/2 for x in {0, 1}, so 1 bit
    x = torch.tensor([[0], [1]])
    z, ldj = Preprocess(4, alpha=None)(x, torch.Generator().manual_seed(0), dtype=F64)
    assert bool((z < 0.5).all())
    bpd = bits_per_dim(torch.full((2,), math.log(2.0), dtype=F64), ldj, num_dims=1)
    torch.testing.assert_close(bpd, torch.ones(2, dtype=F64), rtol=0, atol=1e-15)
    with pytest.raises(DataError, match="same shape"):
        bits_per_dim(torch.zeros(2), torch.zeros(3), 1)
    for num_dims in (0, 1.0):
        with pytest.raises(ConfigError, match="num_dims"):
            bits_per_dim(torch.zeros(2), torch.zeros(2), num_dims)


def test_standard_normal_in_logit_space_one_pixel():
    """A standard normal on y for 1-pixel images with 4 levels: bits/dim against the density
    and the discrete probabilities of v = x + u computed from the CDF with scipy."""
    levels, alpha = 4, 0.05
    prep = Preprocess(levels, alpha)

    def cdf(v):  # P(V <= v) for v in [0, K]: V is the pixel-unit preimage of y ~ N(0, 1)
        return stats.norm.cdf(special.logit(alpha + (1 - 2 * alpha) * np.asarray(v) / levels))

    n = 4000
    u = (torch.arange(n, dtype=F64) + 0.5) / n  # midpoint rule over the cell
    probabilities = []
    for value in range(levels):
        x = torch.full((n, 1, 1, 1), value)
        y, ldj = prep(x, noise=u.reshape(n, 1, 1, 1))
        log_prob = torch.distributions.Normal(0.0, 1.0).log_prob(y).reshape(n)
        bpd = prep.bits_per_dim(log_prob, ldj, num_dims=1)
        # the density of v by a central difference of the CDF (pixel units, D = 1)
        v = value + u.numpy()
        h = 1e-5
        density = (cdf(v + h) - cdf(v - h)) / (2 * h)
        np.testing.assert_allclose(bpd.numpy(), -np.log2(density), rtol=0, atol=1e-6)
        # P(x) = integral of p_v over the cell = E_u[2^-bpd]; Jensen: E_u[bpd] >= -log2 P(x)
        exact = cdf(value + 1.0) - cdf(float(value))
        np.testing.assert_allclose(float(torch.exp2(-bpd).mean()), exact, rtol=1e-6)
        assert float(bpd.mean()) >= -math.log2(exact)
        probabilities.append(exact)
    # the four cells hold the normal's mass inside [logit(alpha), logit(1 - alpha)]
    inside = stats.norm.cdf(special.logit(1 - alpha)) - stats.norm.cdf(special.logit(alpha))
    np.testing.assert_allclose(sum(probabilities), inside, rtol=1e-12)


# --- Preprocess ----------------------------------------------------------------------------


def test_preprocess_chain_and_pixels_round_trip():
    x = pixels((4, 3, 6, 6), 256)
    x[0, 0, 0, :2] = torch.tensor([0, 255])
    prep = Preprocess(256, alpha=0.05)
    y, ldj = prep.forward(x, torch.Generator().manual_seed(3), dtype=F64)
    z, ldj_deq = dequantize(x, 256, torch.Generator().manual_seed(3), dtype=F64)
    y_chain, ldj_logit = logit_transform(z, 0.05)
    assert torch.equal(y, y_chain) and torch.equal(ldj, ldj_deq + ldj_logit)
    assert torch.equal(prep.to_pixels(y), x)
    assert prep.to_pixels(y).dtype == torch.uint8
    centre = Preprocess(256, alpha=0.05, dequantize=False)
    y_c, ldj_c = centre(x)  # float32, deterministic: (x + 1/2) / 256
    assert y_c.dtype == torch.float32 and torch.equal(centre(x)[0], y_c)
    assert torch.equal(centre.to_pixels(y_c), x)
    expected = logit_transform((x.double() + 0.5) / 256, 0.05)[1] - 108 * math.log(256)
    torch.testing.assert_close(ldj_c, expected.float())
    # model samples far outside the image of [0, 1] land on the end pixels
    assert prep.to_pixels(torch.tensor([[-50.0, 50.0]])).tolist() == [[0, 255]]
    assert Preprocess(17, alpha=None).to_pixels(torch.tensor([[0.0, 0.999, 1.5]])).tolist() == \
        [[0, 16, 16]]


def test_preprocess_options():
    for kwargs in ({"levels": 1}, {"levels": 256, "alpha": 0.5},
                   {"levels": 256, "dequantize": 1}):
        with pytest.raises(ConfigError):
            Preprocess(**kwargs)
    with pytest.raises(ConfigError, match="does not dequantize"):
        Preprocess(256, dequantize=False)(pixels((2, 3), 256), torch.Generator())
    assert "alpha=0.05" in repr(Preprocess(256))
