"""Tests of the FFJORD toy densities against independent answers.

Samplers are checked against the exact densities (2-D histograms, chi-square) and so is a
transcription of FFJORD's reference generator; densities against closed forms, scipy
quadrature, autograd Jacobians and grid integrals; stored entropies against Monte Carlo.
Every check here fails for a mirrored (sign-flipped) sampler or density.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from flowlab.data import DATASETS, ToyDensity, get_dataset
from flowlab.data.toy import NoisyCurves, Pinwheel
from flowlab.errors import DataError

NAMES = ["8gaussians", "checkerboard", "2spirals", "pinwheel", "rings", "circles", "moons",
         "swissroll"]  # fmt: skip
EXPENSIVE = {"2spirals", "pinwheel", "moons", "swissroll"}  # numerical densities
BINS = 16  # histogram bins per axis over [-bounds, bounds]
MIRROR = torch.tensor([1.0, -1.0], dtype=torch.float64)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.cache
def _grid(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``log p`` and the mass ``p h^2`` of each cell of a cell-centred ``(m, m)`` grid over
    ``[-bounds, bounds]^2`` whose side ``h`` is several times smaller than every noise scale
    (the midpoint rule then converges spectrally for these smooth densities)."""
    density = DATASETS[name]
    m = 160 if name in EXPENSIVE else 320
    h = 2.0 * density.bounds / m
    centres = -density.bounds + h * (torch.arange(m, dtype=torch.float64) + 0.5)
    gx, gy = torch.meshgrid(centres, centres, indexing="ij")
    log_p = density.log_prob(torch.stack([gx.ravel(), gy.ravel()], dim=1)).reshape(m, m)
    return log_p.numpy(), (log_p.exp() * h * h).numpy()


def _chi_square_pvalue(name: str, points: np.ndarray) -> float:
    """p-value of Pearson's chi-square test of ``points`` ``(n, 2)`` against the density's
    masses in ``BINS x BINS`` bins (cells summed from :func:`_grid`).

    Bins expected to hold fewer than 20 points are pooled with the outside of the window;
    the pooled expectation is floored at 1, so points where the density says there are none
    still make the statistic explode."""
    bounds = DATASETS[name].bounds
    _, cells = _grid(name)
    m = cells.shape[0]
    mass = cells.reshape(BINS, m // BINS, BINS, m // BINS).sum(axis=(1, 3)).ravel()
    edges = np.linspace(-bounds, bounds, BINS + 1)
    counts, _, _ = np.histogram2d(points[:, 0], points[:, 1], bins=[edges, edges])
    counts = counts.ravel()
    n = points.shape[0]
    expected = n * mass
    kept = expected >= 20
    pooled_count = n - counts[kept].sum()
    pooled_expected = max(n - expected[kept].sum(), 1.0)
    stat = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum()
    stat += (pooled_count - pooled_expected) ** 2 / pooled_expected
    return float(stats.chi2.sf(stat, df=int(kept.sum())))


def _ffjord_reference(name: str, n: int, rng: np.random.RandomState) -> np.ndarray:
    """A second, independent generator written from the published definitions of the FFJORD
    toy sets (the issue's wording; scikit-learn's generators where they are named), drawing
    the finite-batch way the reference does (fixed class counts, angles on a grid)."""
    if name in ("swissroll", "circles", "moons"):
        datasets = pytest.importorskip("sklearn.datasets")
        if name == "swissroll":
            xyz = datasets.make_swiss_roll(n_samples=n, noise=1.0, random_state=rng)[0]
            return np.column_stack([xyz[:, 0], xyz[:, 2]]) * 0.2
        if name == "circles":
            return 3.0 * datasets.make_circles(
                n_samples=n, factor=0.5, noise=0.08, random_state=rng
            )[0]
        moons = datasets.make_moons(n_samples=n, noise=0.1, random_state=rng)[0]
        return 2.0 * moons - np.array([1.0, 0.2])
    if name == "rings":
        counts = [n // 4] * 3
        counts.insert(3, n - sum(counts))
        parts = []
        for radius, count in zip((3.0, 2.25, 1.5, 0.75), counts, strict=True):
            theta = 2 * np.pi * np.arange(count) / count
            parts.append(radius * np.column_stack([np.cos(theta), np.sin(theta)]))
        points = np.concatenate(parts)[rng.permutation(n)]
        return points + 0.08 * rng.standard_normal(points.shape)
    if name == "8gaussians":
        angle = np.pi / 4 * rng.randint(0, 8, size=n)
        centre = 4.0 * np.column_stack([np.cos(angle), np.sin(angle)])
        return (centre + 0.5 * rng.standard_normal((n, 2))) / 1.414
    if name == "pinwheel":
        k = np.repeat(np.arange(5), n // 5)
        radial = 1.0 + 0.3 * rng.standard_normal(k.size)
        tangential = 0.1 * rng.standard_normal(k.size)
        a = 2 * np.pi * k / 5 + 0.25 * np.exp(radial)
        # (r, t) times the rotation matrix [[cos a, -sin a], [sin a, cos a]] from the right
        out = np.column_stack([radial * np.cos(a) + tangential * np.sin(a),
                               -radial * np.sin(a) + tangential * np.cos(a)])
        return 2.0 * out[rng.permutation(k.size)]
    if name == "2spirals":
        half = n // 2
        turn = 3 * np.pi * np.sqrt(rng.uniform(size=half))
        arm = np.column_stack([-turn * np.cos(turn), turn * np.sin(turn)])
        arm = arm + 0.5 * rng.uniform(size=(half, 2))
        both = np.concatenate([arm, -arm]) / 3.0
        return both + 0.1 * rng.standard_normal(both.shape)
    assert name == "checkerboard"
    x1 = rng.uniform(-2.0, 2.0, size=n)
    x2 = rng.uniform(size=n) - 2.0 * rng.randint(0, 2, size=n) + np.mod(np.floor(x1), 2)
    return 2.0 * np.column_stack([x1, x2])


# --- registry and interface ----------------------------------------------------------------


def test_registry_holds_exactly_the_eight_densities():
    assert sorted(DATASETS) == sorted(NAMES)
    for name, density in DATASETS.items():
        assert isinstance(density, ToyDensity)
        assert density.name == name and density.dim == 2 and density.bounds > 0
        assert get_dataset(name) is density


def test_unknown_name_raises_data_error_listing_choices():
    with pytest.raises(DataError) as info:
        get_dataset("nope")
    assert "nope" in str(info.value)
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_sample_shape_dtype_and_reproducibility(name: str):
    density = DATASETS[name]
    a = density.sample(500, _generator(0))
    b = density.sample(500, _generator(0))
    c = density.sample(500, _generator(1))
    wide = density.sample(500, _generator(0), dtype=torch.float64)
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert wide.dtype == torch.float64 and torch.equal(wide.float(), a)
    assert density.sample(0).shape == (0, 2)


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_shape_dtype_and_validation(name: str):
    density = DATASETS[name]
    x = density.sample(64, _generator(2))
    assert density.log_prob(x).dtype == torch.float32 and density.log_prob(x).shape == (64,)
    lp64 = density.log_prob(x.double())
    assert lp64.dtype == torch.float64 and torch.isfinite(lp64).all()
    far = torch.tensor([[math.inf, 0.0], [0.0, -math.inf]])
    assert torch.equal(density.log_prob(far), torch.full((2,), -math.inf))
    with pytest.raises(DataError, match=r"shape \(n, 2\)"):
        density.log_prob(torch.zeros(3, 3))
    with pytest.raises(DataError, match="NaN"):
        density.log_prob(torch.tensor([[0.0, math.nan]]))


@pytest.mark.parametrize("name", ["2spirals", "pinwheel"])
def test_log_prob_does_not_depend_on_chunking(name: str):
    density = DATASETS[name]
    x = density.sample(4000, _generator(3), dtype=torch.float64)  # several chunks
    x[::500] *= 2.5  # far points, for pinwheel on finer root grids
    whole = density.log_prob(x)
    parts = torch.cat([density.log_prob(x[i : i + 7]) for i in range(0, 4000, 500)])
    torch.testing.assert_close(whole[::500], parts[::7], rtol=1e-12, atol=1e-12)


# --- densities: normalization and independent answers --------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_density_integrates_to_one_on_the_window(name: str):
    _, cells = _grid(name)
    if name == "checkerboard":  # cells align with the board: exact
        assert cells.sum() == pytest.approx(1.0, abs=1e-12)
    else:  # at most ~2e-4 of the mass lies outside the window
        assert cells.sum() == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_stored_entropy_matches_grid_integral(name: str):
    """The window's part of ``-int p log p`` (midpoint rule) is the stored entropy up to its
    4-decimal rounding, plus the part of the mass outside the window (< 2.5e-4, in tails where
    ``-log p < 25``), which can only add to it."""
    log_p, cells = _grid(name)
    inside = cells > 0
    window_entropy = -(cells[inside] * log_p[inside]).sum()
    outside_mass = max(1.0 - cells.sum(), 0.0)
    gap = DATASETS[name].entropy - window_entropy
    assert -6e-5 <= gap <= 6e-5 + 25 * outside_mass, (gap, outside_mass)


def test_8gaussians_at_a_centre_equals_hand_computed_value():
    r, s = 4.0 / 1.414, 0.5 / 1.414
    # distances from centre 0 to centre j on the circle of radius r: 2 r sin(j pi / 8)
    terms = [math.exp(-((2 * r * math.sin(j * math.pi / 8)) ** 2) / (2 * s * s)) for j in range(8)]
    expected = math.log(sum(terms) / (8 * 2 * math.pi * s * s))
    for k in (0, 3):
        angle = k * math.pi / 4
        centre = torch.tensor([[r * math.cos(angle), r * math.sin(angle)]], dtype=torch.float64)
        got = DATASETS["8gaussians"].log_prob(centre).item()
        assert got == pytest.approx(expected, abs=1e-12)
    # the two neighbours, 2 r sin(pi/8) = 6.1 std away, add 2 exp(-18.75) to the own term
    assert expected == pytest.approx(-math.log(16 * math.pi * s * s), abs=2e-8)


def test_checkerboard_support_cells():
    lp = DATASETS["checkerboard"].log_prob(
        torch.tensor([[1.0, 1.0], [-3.0, -3.0], [-1.0, 3.0], [1.0, -1.0], [3.0, 1.0], [5.0, 5.0]])
    )
    assert lp[:3].tolist() == pytest.approx([math.log(1 / 32)] * 3, abs=1e-7)
    assert lp[3:].tolist() == [-math.inf] * 3


@pytest.mark.parametrize(("name", "radii", "std"), [
    ("rings", (3.0, 2.25, 1.5, 0.75), 0.08), ("circles", (3.0, 1.5), 0.24)])  # fmt: skip
def test_ring_density_matches_quadrature_over_the_angle(name, radii, std):
    points = [(0.0, 0.0), (3.05, 0.0), (-1.0, 1.1), (0.4, -0.6), (2.0, 2.0), (4.5, -1.0)]

    def density(x, y):
        def integrand(a, radius):
            d2 = (x - radius * math.cos(a)) ** 2 + (y - radius * math.sin(a)) ** 2
            return math.exp(-d2 / (2 * std**2)) / (2 * math.pi * std**2) / (2 * math.pi)

        quad = [integrate.quad(integrand, 0, 2 * math.pi, args=(r,), epsabs=0, epsrel=1e-12,
                               limit=200)[0] for r in radii]  # fmt: skip
        return sum(quad) / len(radii)

    got = DATASETS[name].log_prob(torch.tensor(points, dtype=torch.float64))
    expected = [math.log(density(*p)) for p in points]
    assert got.tolist() == pytest.approx(expected, abs=1e-9)


def _spirals_density(x: np.ndarray) -> float:
    """2spirals by scipy quad: ``n`` has density ``2n/(3pi)^2``, then box [0, 1/6] (or
    [-1/6, 0] for the mirrored arm) + N(0, 0.1^2) per coordinate around ``+-c(n)/3``."""
    end = 3 * math.pi

    def integrand(n, sign):
        centre = sign * np.array([-n * math.cos(n), n * math.sin(n)]) / 3
        lo, hi = (0.0, 1 / 6) if sign > 0 else (-1 / 6, 0.0)
        a, b = (x - centre - lo) / 0.1, (x - centre - hi) / 0.1
        # Phi(a) - Phi(b) = Phi(-b) - Phi(-a): take the pair in the lower tail (no cancellation)
        upper = special.ndtr(-b) - special.ndtr(-a)
        box = 6 * np.where(a + b > 0, upper, special.ndtr(a) - special.ndtr(b))
        return 2 * n / end**2 * box.prod()

    breaks = np.linspace(0, end, 80)[1:-1]
    return 0.5 * sum(
        integrate.quad(integrand, 0, end, args=(s,), points=breaks, limit=1000, epsrel=1e-11,
                       epsabs=0)[0] for s in (1.0, -1.0))  # fmt: skip


def _curve_density(x: np.ndarray, curves, low: float, high: float) -> float:
    """Equal mixture over ``curves`` of ``int N(x; c(s), 0.2^2 I) ds / (high - low)``."""

    def integrand(s, curve):
        d2 = ((x - np.array(curve(s))) ** 2).sum()
        return math.exp(-d2 / (2 * 0.04)) / (2 * math.pi * 0.04) / (high - low)

    breaks = np.linspace(low, high, 40)[1:-1]
    return np.mean([integrate.quad(integrand, low, high, args=(c,), points=breaks, limit=1000,
                                   epsrel=1e-12, epsabs=0)[0] for c in curves])  # fmt: skip


@pytest.mark.parametrize("name", ["2spirals", "moons", "swissroll"])
def test_curve_density_matches_scipy_quadrature(name: str):
    points = np.array([[0.3, -0.2], [1.0, 1.0], [-2.0, 0.5], [2.5, -1.5], [0.0, 0.0]])
    if name == "2spirals":
        expected = [_spirals_density(p) for p in points]
    elif name == "moons":
        outer = lambda s: (2 * math.cos(s) - 1, 2 * math.sin(s) - 0.2)  # noqa: E731
        inner = lambda s: (1 - 2 * math.cos(s), 0.8 - 2 * math.sin(s))  # noqa: E731
        expected = [_curve_density(p, (outer, inner), 0.0, math.pi) for p in points]
    else:
        roll = lambda t: (t * math.cos(t) / 5, t * math.sin(t) / 5)  # noqa: E731
        expected = [_curve_density(p, (roll,), 1.5 * math.pi, 4.5 * math.pi) for p in points]
    got = DATASETS[name].log_prob(torch.tensor(points))
    assert got.tolist() == pytest.approx(np.log(expected).tolist(), abs=1e-7)


@pytest.mark.parametrize("name", ["2spirals", "moons", "swissroll", "pinwheel"])
def test_numerical_density_is_converged(name: str):
    density = DATASETS[name]
    assert isinstance(density, NoisyCurves | Pinwheel)
    x = density.sample(1500, _generator(4), dtype=torch.float64)
    coarse, fine = density.log_prob(x), density.refined(2).log_prob(x)
    assert (fine - coarse).abs().max().item() < 1e-6
    assert abs((fine - coarse).mean().item()) < 1e-8


def test_pinwheel_density_bounds_the_autograd_change_of_variables():
    """Per sample, the term of its own preimage ``N2(f) / (5 |det dx/df|)``, with the
    Jacobian from autograd, is a lower bound of the exact density (the other preimages add to
    it) and equals it for most samples (where the arms do not overlap)."""
    g = _generator(5)
    n = 2000
    label = torch.randint(0, 5, (n,), generator=g).double()
    std = torch.tensor([0.3, 0.1], dtype=torch.float64)
    f = torch.randn(n, 2, generator=g, dtype=torch.float64) * std
    f[:, 0] += 1.0
    f.requires_grad_(True)
    angle = 2 * math.pi * label / 5 + 0.25 * torch.exp(f[:, 0])
    rotation = torch.stack(
        [torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], dim=1
    ).reshape(n, 2, 2)
    x = 2 * torch.einsum("ti,tij->tj", f, rotation)  # FFJORD's own expression
    rows = [torch.autograd.grad(x[:, i].sum(), f, retain_graph=True)[0] for i in (0, 1)]
    log_det = torch.linalg.slogdet(torch.stack(rows, dim=1)).logabsdet
    mean = torch.tensor([1.0, 0.0], dtype=torch.float64)
    log_n2 = torch.distributions.Normal(mean, std).log_prob(f).sum(dim=1)
    own = (log_n2 - log_det - math.log(5)).detach()
    excess = DATASETS["pinwheel"].log_prob(x.detach()) - own
    assert excess.min().item() > -1e-9
    assert excess.median().item() < 1e-8
    assert (excess < 1e-4).double().mean().item() > 0.9


# --- samplers against densities ------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_samples_match_density_histogram(name: str):
    x = DATASETS[name].sample(50_000, _generator(6), dtype=torch.float64).numpy()
    assert _chi_square_pvalue(name, x) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_ffjord_reference_generator_matches_density(name: str):
    x = _ffjord_reference(name, 50_000, np.random.RandomState(7))
    assert _chi_square_pvalue(name, x) > 1e-3


@pytest.mark.parametrize("name", ["pinwheel", "2spirals", "checkerboard"])
def test_mirrored_samples_are_rejected(name: str):
    """Chirality: a sign error in a rotation or a curve mirrors these densities."""
    density = DATASETS[name]
    x = density.sample(20_000, _generator(8), dtype=torch.float64)
    mirrored = x * MIRROR
    assert _chi_square_pvalue(name, mirrored.numpy()) < 1e-12
    assert -density.log_prob(mirrored).mean().item() > density.entropy + 0.5


@pytest.mark.parametrize("name", NAMES)
def test_stored_entropy_matches_monte_carlo(name: str):
    """The true density evaluated on fresh samples reaches the stored entropy within 3 s.e.
    (plus 0.003 nats for the stored value's own Monte Carlo error)."""
    density = DATASETS[name]
    n = 10_000 if name == "2spirals" else 20_000
    log_p = density.log_prob(density.sample(n, _generator(9), dtype=torch.float64))
    estimate = -log_p.mean().item()
    se = log_p.std().item() / math.sqrt(n)
    assert abs(estimate - density.entropy) < 3 * se + 0.003, (estimate, se, density.entropy)
