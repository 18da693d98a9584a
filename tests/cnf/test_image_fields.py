"""Tests of the image vector fields: FFJORD's ConvVectorField and the flow-matching U-Net.

Shapes on digits (1x8x8), MNIST (1x28x28) and CIFAR (3x32x32) sizes; time dependence; per-sample
times against one call per sample; gradients to every parameter; the exact divergence against
the trace of an independent autograd Jacobian (torch.func.jacrev) in float64, and Hutchinson's
estimate against that trace and against the closed-form variance of the estimator.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowlab.cnf import divergence_exact, divergence_hutchinson, sample_probe
from flowlab.cnf.conv import (
    CONV_LAYERS,
    ConcatConv2d,
    ConcatSquashConv2d,
    ConvVectorField,
)
from flowlab.errors import ConfigError, DataError
from flowlab.nets.unet import UNetVectorField, norm_groups, sinusoidal_time_embedding

F64 = torch.float64
SIZES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
TINY = (1, 4, 4)


def randomize(field: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Perturb every parameter, so that the U-Net's zero output layer and the biases that
    start at zero all become generic."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in field.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return field


def small_fields(shape):
    """Small float64 fields of every kind on images of ``shape``, weights randomized."""
    fields = {
        f"conv-{layer}": ConvVectorField(shape, (8, 8), layer=layer, activation="tanh")
        for layer in ("concat", "concatsquash")
    }
    fields["conv-hourglass"] = ConvVectorField(shape, (8, 8, 8), strides=(1, 2, -2, 1))
    fields["unet"] = UNetVectorField(shape, channels=8, res_blocks=2, attention=True)
    return {name: randomize(f.to(F64), seed=i) for i, (name, f) in enumerate(fields.items())}


def images(n, shape, seed=1, dtype=F64):
    return torch.randn(n, *shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# -- shapes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SIZES)
def test_default_fields_keep_the_shape(shape):
    z = images(2, shape, dtype=torch.float32)
    fields = [
        ConvVectorField(shape),
        ConvVectorField(shape, strides=(1, 2, 1, -2)),
        UNetVectorField(shape),
        # three halvings: 28 is padded to 32 and cropped back
        UNetVectorField(shape, channels=8, channel_mult=(1, 2, 2, 2), attention=True),
    ]
    with torch.no_grad():
        for field in fields:
            for t in (torch.tensor(0.3), torch.rand(2)):
                assert field(t, z).shape == z.shape


def test_unet_pads_odd_sides_and_crops_back():
    field = randomize(UNetVectorField((2, 7, 5), channels=8, channel_mult=(1, 2, 2)).to(F64))
    z = images(3, (2, 7, 5))
    out = field(torch.tensor(0.4, dtype=F64), z)
    assert out.shape == z.shape
    # Cropping keeps samples apart: each row equals its own call.
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], field(torch.tensor(0.4, dtype=F64),
                                                         z[i : i + 1]), rtol=0, atol=1e-12)


def test_building_blocks_shapes():
    z = torch.randn(3, 4, 6, 6)
    t = torch.rand(3)
    assert ConcatSquashConv2d(4, 5)(t, z).shape == (3, 5, 6, 6)
    assert ConcatConv2d(4, 5)(t, z).shape == (3, 5, 6, 6)
    assert ConcatSquashConv2d(4, 5, 4, 2, 1)(t, z).shape == (3, 5, 3, 3)
    assert ConcatSquashConv2d(4, 5, 4, 2, 1, transpose=True)(t, z).shape == (3, 5, 12, 12)
    assert sinusoidal_time_embedding(t, 7).shape == (3, 7)
    assert [norm_groups(c) for c in (1, 3, 8, 12, 32, 96, 7)] == [1, 3, 8, 6, 8, 8, 7]


# -- time ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", list(CONV_LAYERS))
def test_conv_field_time_dependence(layer):
    field = ConvVectorField((1, 8, 8), (8, 8), layer=layer).to(F64)
    z = images(2, (1, 8, 8))
    a, b = field(torch.tensor(0.1, dtype=F64), z), field(torch.tensor(0.9, dtype=F64), z)
    if layer == "ignore":
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max() > 1e-3


def test_unet_starts_at_zero_then_depends_on_time():
    field = UNetVectorField((1, 8, 8), channels=8).to(F64)
    z = images(4, (1, 8, 8))
    for t in (torch.tensor(0.0), torch.tensor(1.0), torch.rand(4)):
        assert torch.equal(field(t, z), torch.zeros_like(z))
    randomize(field)
    a, b = field(torch.tensor(0.1, dtype=F64), z), field(torch.tensor(0.9, dtype=F64), z)
    assert (a - b).abs().max() > 1e-3
    # ... and on close times: the embedding resolves small time steps.
    c = field(torch.tensor(0.11, dtype=F64), z)
    assert (a - c).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["conv-concat", "conv-concatsquash", "conv-hourglass", "unet"])
def test_per_sample_time_equals_one_call_per_sample(name):
    shape = (1, 8, 8)
    field = small_fields(shape)[name]
    z = images(5, shape)
    t = torch.linspace(0.05, 0.95, 5, dtype=F64)
    batched = field(t, z)
    for i in range(5):
        torch.testing.assert_close(batched[i : i + 1], field(t[i], z[i : i + 1]),
                                   rtol=0, atol=1e-6)
    # Per-sample times are not silently replaced by one of them.
    assert (batched - field(t[0], z)).abs().max() > 1e-3


@pytest.mark.parametrize("make", [
    lambda: ConvVectorField((1, 8, 8), (8, 8)),
    lambda: UNetVectorField((1, 8, 8), channels=8),
])
def test_bad_time_shape_and_bad_images_raise(make):
    field = make()
    z = torch.randn(3, 1, 8, 8)
    with pytest.raises(ConfigError, match="time"):
        field(torch.rand(2), z)
    with pytest.raises(DataError, match="shape"):
        field(torch.tensor(0.5), torch.randn(3, 1, 8, 9))
    with pytest.raises(DataError, match="shape"):
        field(torch.tensor(0.5), torch.randn(3, 64))


# -- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["conv-concat", "conv-concatsquash", "conv-hourglass", "unet"])
def test_gradients_reach_every_parameter(name):
    field = small_fields((1, 8, 8))[name]
    z = images(3, (1, 8, 8))
    weights = images(3, (1, 8, 8), seed=2)
    (field(torch.tensor([0.2, 0.5, 0.8], dtype=F64), z) * weights).sum().backward()
    for pname, p in field.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, pname


# -- divergence ----------------------------------------------------------------------------------


def jacobians(field, t, z):
    """Per-sample Jacobians ``(batch, D, D)`` of the flattened field, from jacrev of the field on
    the whole flattened batch; also checks that samples do not interact."""
    n, d = z.shape[0], z[0].numel()
    full = torch.func.jacrev(lambda x: field(t, x.view(z.shape)).reshape(-1))(z.reshape(-1))
    full = full.reshape(n, d, n, d)
    idx = torch.arange(n)
    blocks = full[idx, :, idx, :]
    off = full.clone()
    off[idx, :, idx, :] = 0
    assert off.abs().max() == 0, "samples must not interact"
    return blocks


@pytest.fixture(scope="module")
def tiny_fields():
    return small_fields(TINY)


@pytest.mark.parametrize("name", ["conv-concat", "conv-concatsquash", "conv-hourglass", "unet"])
def test_exact_divergence_is_jacrev_trace(tiny_fields, name):
    field = tiny_fields[name]
    z = images(3, TINY, seed=3)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    zf = z.flatten(1).requires_grad_(True)
    f = field(t, zf.view(z.shape)).flatten(1)
    div, frob = divergence_exact(f, zf, create_graph=False, with_frobenius=True)
    J = jacobians(field, t, z)
    trace = J.diagonal(dim1=1, dim2=2).sum(-1)
    assert trace.abs().min() > 1e-3  # a nontrivial answer for every sample
    torch.testing.assert_close(div, trace, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(frob, J.pow(2).sum((1, 2)), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("name", ["conv-concatsquash", "conv-hourglass", "unet"])
def test_hutchinson_mean_approaches_exact_divergence(tiny_fields, name, kind):
    field = tiny_fields[name]
    t = torch.tensor(0.3, dtype=F64)
    # Of 64 random images keep the one whose trace is largest relative to the estimator's
    # spread, so that a modest number of probes can detect a biased estimate.
    candidates = images(64, TINY, seed=4)
    Js = torch.func.vmap(
        torch.func.jacrev(lambda x: field(t, x.view(1, *TINY)).reshape(-1))
    )(candidates.flatten(1))
    spread = (Js + Js.transpose(1, 2)).pow(2).sum((1, 2)).sqrt()
    best = int((Js.diagonal(dim1=1, dim2=2).sum(-1).abs() / spread).argmax())
    z = candidates[best : best + 1]
    J = jacobians(field, t, z)[0].detach()
    exact = J.trace()
    # Var[eps^T J eps] = 2||S||_F^2 for Gaussian and 2||S||_F^2 - 2 sum_i J_ii^2 for Rademacher
    # probes, S the symmetric part of J.
    S = (J + J.T) / 2
    var = 2 * S.pow(2).sum() - (2 * J.diagonal().pow(2).sum() if kind == "rademacher" else 0)
    n = 8000
    zr = z.repeat(n, 1, 1, 1).requires_grad_(True)
    probe = sample_probe(zr, kind, torch.Generator().manual_seed(5))
    div = divergence_hutchinson(field(t, zr), zr, probe, create_graph=False)[0].detach()
    se = math.sqrt(float(var) / n)
    # Two-sided: within 4 standard errors of the exact trace, on either side ...
    assert abs(float(div.mean() - exact)) < 4 * se, (float(div.mean()), float(exact), se)
    # ... the sample spread is the estimator's theoretical one ...
    assert 0.8 < float(div.var()) / float(var) < 1.25
    # ... and the test has power: a 20% error in the trace would be rejected.
    assert 4 * se < 0.2 * abs(float(exact)), (se, float(exact))


# -- options and sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: ConvVectorField((28, 28)),
    lambda: ConvVectorField((0, 8, 8)),
    lambda: ConvVectorField((1, 8, 8), hidden=(8, 0)),
    lambda: ConvVectorField((1, 8, 8), layer="hyper"),
    lambda: ConvVectorField((1, 8, 8), activation="relu"),
    lambda: ConvVectorField((1, 8, 8), hidden=(8, 8), strides=(1, 1)),
    lambda: ConvVectorField((1, 8, 8), hidden=(8,), strides=(1, 3)),
    lambda: ConvVectorField((1, 7, 7), hidden=(8, 8, 8, 8), strides=(1, 2, 1, -2, 1)),
    lambda: ConvVectorField((1, 8, 8), hidden=(8,), strides=(1, 2)),
    lambda: ConvVectorField((1, 8, 8), hidden=(8, 8, 8, 8), strides=(2, 2, 2, 2, 1)),
    lambda: ConcatSquashConv2d(0, 4),
    lambda: ConcatConv2d(0, 4),
    lambda: UNetVectorField((1, 28)),
    lambda: UNetVectorField((1, 8, 8), channels=0),
    lambda: UNetVectorField((1, 8, 8), channel_mult=()),
    lambda: UNetVectorField((1, 8, 8), channel_mult=(1, 0)),
    lambda: UNetVectorField((1, 8, 8), res_blocks=0),
    lambda: UNetVectorField((1, 8, 8), time_dim=0),
    lambda: UNetVectorField((1, 8, 8), dropout=1.0),
    lambda: UNetVectorField((1, 8, 8), dropout=-0.1),
    lambda: sinusoidal_time_embedding(torch.rand(3), 0),
])
def test_bad_options_raise_config_error(make):
    with pytest.raises(ConfigError):
        make()


def test_hourglass_on_mnist_and_cifar_sides():
    # 28 -> 14 -> 7 -> 14 -> 28 and 32 -> 16 -> 8 -> 16 -> 32 restore the sides.
    for shape in ((1, 28, 28), (3, 32, 32)):
        ConvVectorField(shape, (8, 8, 8, 8), strides=(1, 2, 2, -2, -2))
    with pytest.raises(ConfigError, match="not back"):
        ConvVectorField((1, 28, 28), (8, 8, 8, 8, 8), strides=(2, 2, 2, -2, -2, -2))


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts():
    # concatsquash 3x3: 9 c_in c_out weights, c_out biases, 2 c_out gate and c_out shift.
    def concatsquash(c_in, c_out):
        return 9 * c_in * c_out + 4 * c_out

    for c in (1, 3):
        widths = [c, 64, 64, 64, c]
        expected = sum(concatsquash(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        assert count(ConvVectorField((c, 8, 8))) == expected
        assert count(ConvVectorField((c, 32, 32))) == expected  # fully convolutional
    unet = {shape: count(UNetVectorField(shape)) for shape in SIZES}
    assert unet[(1, 8, 8)] == unet[(1, 28, 28)]  # independent of the image size
    assert all(2e5 < n < 2e6 for n in unet.values()), unet
