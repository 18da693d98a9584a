"""The divergence tr(df/dz) of a vector field, exactly or by Hutchinson's estimator.

Both functions take the already computed output ``f = field(t, z)`` and the input ``z`` it was
computed from (with ``z.requires_grad``), so that the network runs once per evaluation.

The Hutchinson probe is not drawn here: the caller draws it once per solve with
:func:`sample_probe` and passes the same probe at every evaluation, which keeps the estimated
log-density a deterministic function of the probe and makes the dynamics a proper ODE.
"""

from __future__ import annotations

import torch

from flowlab.errors import ConfigError

PROBES = ("gaussian", "rademacher")


def divergence_exact(
    f: torch.Tensor, z: torch.Tensor, create_graph: bool, with_frobenius: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact divergence as a sum of ``dim`` vector-Jacobian products (cheap for small dim).

    Args:
        f: ``(batch, dim)`` field values computed from ``z`` (or ``(batch, C, H, W)``: any
            event shape, taken element by element in flattened order).
        z: input of the same shape that requires grad.
        create_graph: keep the graph (needed when the divergence is differentiated).
        with_frobenius: also return the exact squared Frobenius norm ``||df/dz||_F^2`` per
            sample, which comes for free from the same rows of the Jacobian.

    Returns:
        ``(div, frob)``, each ``(batch,)``; ``frob`` is None unless asked for.
    """
    div = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    frob = torch.zeros_like(div) if with_frobenius else None
    flat = f.flatten(1)
    for i in range(flat.shape[1]):
        row = torch.autograd.grad(
            flat[:, i].sum(), z, create_graph=create_graph, retain_graph=True
        )[0].flatten(1)
        div = div + row[:, i]
        if frob is not None:
            frob = frob + row.pow(2).sum(dim=1)
    return div, frob


def divergence_hutchinson(
    f: torch.Tensor, z: torch.Tensor, probe: torch.Tensor, create_graph: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson's unbiased estimate ``eps^T (df/dz) eps`` of the divergence.

    Args:
        f, z: as in :func:`divergence_exact` (any shape ``(batch, ...)``).
        probe: ``eps`` with the shape of ``z``, zero mean and identity covariance.
        create_graph: keep the graph.

    Returns:
        ``(div, frob)``: the estimate ``(batch,)`` and ``||eps^T df/dz||^2`` ``(batch,)``, an
        unbiased estimate of the squared Frobenius norm (the RNODE Jacobian regularizer).
    """
    e_dfdz = torch.autograd.grad(f, z, probe, create_graph=create_graph)[0]
    div = (e_dfdz * probe).flatten(1).sum(dim=1)
    frob = e_dfdz.pow(2).flatten(1).sum(dim=1)
    return div, frob


def sample_probe(
    like: torch.Tensor, kind: str = "rademacher", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw a Hutchinson probe of the shape, dtype and device of ``like``.

    ``gaussian``: standard normal entries; ``rademacher``: +-1 with equal probability (lower
    variance for the trace estimator).
    """
    if kind == "gaussian":
        return torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, device=like.device, generator=generator)
        return bits.to(like.dtype) * 2 - 1
    raise ConfigError(f"unknown probe {kind!r}; choose 'gaussian' or 'rademacher'")
