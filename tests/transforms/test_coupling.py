"""Coupling layers at initialization, on data with a reflection symmetry."""

import pytest
import torch

from flowlab.models import build_model


def _symmetric_batch() -> torch.Tensor:
    """Points of 8gaussians' shape, closed under reflecting either coordinate, so that
    E[x2 | x1] = E[x1 | x2] = 0 exactly on the batch."""
    angles = torch.arange(8) * torch.pi / 4
    centres = 2.8 * torch.stack([angles.cos(), angles.sin()], dim=1)
    noise = torch.randn(128, 2, generator=torch.Generator().manual_seed(0))
    x = centres.repeat(16, 1) + 0.35 * noise
    return torch.cat([x, x * torch.tensor([-1.0, 1.0]), x * torch.tensor([1.0, -1.0]), -x])


@pytest.mark.parametrize("family", ["nice", "realnvp"])
def test_couplings_start_off_the_symmetric_stationary_point(family):
    """A zero-initialized additive coupling gets exactly zero gradient on such data (the NLL's
    gradient in the shift is E[z | x_kept] = 0): NICE then never leaves the Gaussian fit (gap
    1.42 nats on 8gaussians after 300 s). Every coupling's conditioner must get a gradient."""
    torch.manual_seed(0)
    flow = build_model(family, dim=2)
    (-flow.log_prob(_symmetric_batch()).mean()).backward()
    nets = [m for name, m in flow.named_modules() if name.endswith(".net")]
    assert nets, "no coupling conditioners found"
    for net in nets:
        norm = sum(float(p.grad.norm()) for p in net.parameters() if p.grad is not None)
        assert norm > 1e-4, (family, norm)
