"""One battery over every registered transform example and every registered flow family.

A transform joins by ``register_example`` in its module, a flow family by ``register_family``:
nothing here names them. Checks are against independent answers: log-determinants against
``torch.func.jacrev`` + ``slogdet`` in float64, densities against a grid integral.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from flowlab.models import FAMILIES, Flow, build_model
from flowlab.train import load_model, save_model
from flowlab.transforms import EXAMPLES, Example
from flowlab.transforms.base import randomize_

NAMES = sorted(EXAMPLES)


def _instance(name: str) -> tuple[torch.nn.Module, Example]:
    torch.manual_seed(abs(hash(name)) % 2**31)
    example = EXAMPLES[name]
    transform = example.build().double()
    transform.eval()
    return transform, example


def _inputs(example: Example, n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = example.scale * torch.randn(n, *example.event_shape, generator=gen, dtype=torch.float64)
    context = None
    if example.context_dim is not None:
        context = torch.randn(n, example.context_dim, generator=gen, dtype=torch.float64)
    return x, context


def _jacobian_logdet(fn, x_row: torch.Tensor, c_row: torch.Tensor | None) -> torch.Tensor:
    """log|det| of the Jacobian of ``fn`` at one point, by autograd, flattened."""
    shape = x_row.shape

    def flat(v):
        out, _ = fn(v.reshape(1, *shape), None if c_row is None else c_row[None])
        return out.reshape(-1)

    jac = torch.func.jacrev(flat)(x_row.reshape(-1))
    assert jac.shape[0] == jac.shape[1], f"non-square Jacobian {tuple(jac.shape)}"
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("name", NAMES)
def test_inverse_undoes_forward_both_ways(name):
    transform, example = _instance(name)
    x, c = _inputs(example)
    with torch.no_grad():
        y, _ = transform(x, c)
        x_back, _ = transform.inverse(y, c)
        torch.testing.assert_close(x_back, x, atol=1e-8, rtol=1e-8)
        # and from the noise side: a point that no forward pass produced
        y2 = example.scale * torch.randn(y.shape, dtype=torch.float64,
                                         generator=torch.Generator().manual_seed(5))
        x2, _ = transform.inverse(y2, c)
        y2_back, _ = transform(x2, c)
        torch.testing.assert_close(y2_back, y2, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_log_determinants_match_autograd_jacobians(name):
    transform, example = _instance(name)
    x, c = _inputs(example, n=4)
    with torch.no_grad():
        y, ladj_forward = transform(x, c)
        x_back, ladj_inverse = transform.inverse(y, c)
    assert ladj_forward.shape == (x.shape[0],) and ladj_inverse.shape == (x.shape[0],)
    torch.testing.assert_close(ladj_inverse, -ladj_forward, atol=1e-8, rtol=1e-8)
    for i in range(x.shape[0]):
        ci = None if c is None else c[i]
        expected = _jacobian_logdet(transform, x[i], ci)
        torch.testing.assert_close(ladj_forward[i], expected, atol=1e-7, rtol=1e-7)
        expected_inv = _jacobian_logdet(transform.inverse, y[i], ci)
        torch.testing.assert_close(ladj_inverse[i], expected_inv, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    transform, example = _instance(name)
    transform.train(example.train_eval_differ)  # batch norm trains on batch statistics
    if not any(True for _ in transform.parameters()):
        pytest.skip("no parameters")
    x, c = _inputs(example, n=16)
    y, ladj = transform(x, c)
    (y.pow(2).sum() + ladj.sum()).backward()
    for pname, param in transform.named_parameters():
        assert param.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_modes_agree(name):
    transform, example = _instance(name)
    if example.train_eval_differ:
        pytest.skip("batch norm uses batch statistics in training mode (tested on its own)")
    x, c = _inputs(example)
    with torch.no_grad():
        transform.eval()
        y_eval, l_eval = transform(x, c)
        transform.train()
        y_train, l_train = transform(x, c)
    torch.testing.assert_close(y_train, y_eval, atol=0, rtol=0)
    torch.testing.assert_close(l_train, l_eval, atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_safetensors_round_trip_gives_identical_outputs(name):
    transform, example = _instance(name)
    blob = st_save({k: v.contiguous() for k, v in transform.state_dict().items()})
    torch.manual_seed(12345)  # a fresh instance with other random parameters
    fresh = example.build().double()
    fresh.load_state_dict(st_load(blob))
    fresh.eval()
    x, c = _inputs(example)
    with torch.no_grad():
        a, la = transform(x, c)
        b, lb = fresh(x, c)
    assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("name", [n for n in NAMES if EXAMPLES[n].context_dim is not None])
def test_conditional_transforms_depend_on_the_context(name):
    transform, example = _instance(name)
    x, c = _inputs(example)
    with torch.no_grad():
        y1, _ = transform(x, c)
        y2, _ = transform(x, c + 1.0)
    assert not torch.allclose(y1, y2)


def test_batch_norm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    from flowlab.transforms.linear import BatchNorm

    layer = BatchNorm(2, momentum=0.5).double()
    x = torch.randn(400, 2, dtype=torch.float64) * torch.tensor([3.0, 0.5]) + 4.0
    layer.train()
    y, ladj = layer(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-10,
                               rtol=0)
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(2, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    expected = -0.5 * torch.log(x.var(0, unbiased=False) + layer.eps).sum()
    torch.testing.assert_close(ladj, expected.expand(400))
    torch.testing.assert_close(layer.running_mean, 0.5 * x.mean(0))  # from 0, momentum 0.5
    layer.eval()
    y_eval, _ = layer(x)
    assert not torch.allclose(y_eval, y)  # running statistics differ from the batch's


def test_actnorm_initializes_from_the_first_batch_only():
    from flowlab.transforms.linear import ActNorm

    layer = ActNorm(3)
    x = torch.randn(256, 3, 4, 4) * torch.tensor([2.0, 0.5, 1.0])[None, :, None, None] + 3.0
    y, _ = layer(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    before = layer.bias.detach().clone()
    layer(x * 10)
    assert torch.equal(layer.bias, before) and bool(layer.initialized)


# -- flows ---------------------------------------------------------------------------------------
FLOW_CASES = [(name, None) for name in sorted(FAMILIES)] + [
    ("realnvp", {"batch_norm": True}), ("maf", {"batch_norm": True}),
]
CONDITIONAL = ["nice", "realnvp", "glow", "maf", "iaf", "nsf-coupling", "nsf-ar"]
SMALL = {"num_blocks": 3, "hidden": [16, 16]}


def _flow(name: str, extra: dict | None = None, context_dim: int | None = None,
          std: float = 0.15) -> Flow:
    torch.manual_seed(7)
    options = {"num_blocks": 3} if name in ("planar", "radial") else dict(SMALL)
    model = build_model(name, dim=2, context_dim=context_dim, **options, **(extra or {}))
    model.data_init(torch.randn(256, 2) * 1.5 + 0.3,
                    None if context_dim is None else torch.randn(256, context_dim))
    randomize_(model, std=std)
    return model.double().eval()


def _grid_mass(model: Flow, context: torch.Tensor | None = None, half: float = 8.0,
               n: int = 321) -> float:
    axis = torch.linspace(-half, half, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    ctx = None if context is None else context.expand(points.shape[0], -1)
    with torch.no_grad():
        density = model.log_prob(points, ctx).exp()
    step = float(axis[1] - axis[0])
    return float(density.sum()) * step * step


@pytest.mark.parametrize("name, extra", FLOW_CASES, ids=[f"{n}{'-bn' if e else ''}"
                                                          for n, e in FLOW_CASES])
def test_every_2d_flow_density_integrates_to_one(name, extra):
    model = _flow(name, extra)
    assert abs(_grid_mass(model) - 1.0) < 1e-2


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_flow_log_prob_is_the_change_of_variables(name):
    model = _flow(name)
    x = torch.randn(3, 2, dtype=torch.float64)
    logp = model.log_prob(x)
    for i in range(3):
        ladj = _jacobian_logdet(lambda v, c: model.to_noise(v, c), x[i], None)
        with torch.no_grad():
            y, _ = model.to_noise(x[i:i + 1])
        expected = -0.5 * float(y.pow(2).sum()) - math.log(2 * math.pi) + float(ladj.detach())
        assert float(logp[i].detach()) == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_flow_behaves_like_a_distribution(name):
    model = _flow(name).float()
    samples = model.sample((4, 5))
    assert samples.shape == (4, 5, 2) and torch.isfinite(samples).all()
    back, _ = model.to_noise(samples.reshape(-1, 2))
    assert torch.isfinite(back).all()
    rsamples = model.rsample((8,))
    rsamples.pow(2).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_flow_file_round_trip(tmp_path, name):
    model = _flow(name)
    save_model(tmp_path / "f.safetensors", model)
    loaded = load_model(tmp_path / "f.safetensors").double().eval()
    assert loaded.name == name and loaded.config() == model.config()
    x = torch.randn(7, 2, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model.log_prob(x), loaded.log_prob(x))


@pytest.mark.parametrize("name", CONDITIONAL)
def test_conditional_flows_give_a_normalized_density_per_context(name):
    model = _flow(name, context_dim=2, std=0.1)
    contexts = torch.tensor([[1.0, -1.0], [-2.0, 0.5]], dtype=torch.float64)
    masses = [_grid_mass(model, contexts[i:i + 1], n=201) for i in range(2)]
    assert all(abs(m - 1.0) < 1e-2 for m in masses), masses
    x = torch.randn(50, 2, dtype=torch.float64)
    with torch.no_grad():
        a = model.log_prob(x, contexts[:1].expand(50, -1))
        b = model.log_prob(x, contexts[1:].expand(50, -1))
    assert (a - b).abs().max() > 1e-3  # the context changes the density
    samples = model.sample((3,), context=contexts)
    assert samples.shape == (3, 2, 2)


@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_multiscale_image_flows(name):
    torch.manual_seed(0)
    model = build_model(name, image_shape=[2, 4, 4], num_blocks=2, hidden=[8], levels=2)
    x = torch.rand(16, 2, 4, 4)
    model.data_init(x)
    randomize_(model, std=0.05)
    model = model.double().eval()
    x = x.double()
    with torch.no_grad():
        y, ladj = model.to_noise(x)
        assert y.shape == (16, 32)  # factored out at each level, flat at the end
        back = model.to_data(y)
        torch.testing.assert_close(back, x, atol=1e-8, rtol=1e-8)
    expected = _jacobian_logdet(lambda v, c: model.to_noise(v, c), x[0], None)
    torch.testing.assert_close(ladj[0], expected, atol=1e-7, rtol=1e-7)
    assert model.sample((3,)).shape == (3, 2, 4, 4)
