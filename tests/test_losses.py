"""Fast CPU tests of the MACL losses (nnunetv2_macl.losses).

Expected values come from hand calculations or from the naive reference below (explicit
per-anchor loops over python floats), never from the code under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nnunetv2_macl.losses import (
    DenseContrastiveLoss,
    EquivarianceLoss,
    GlobalContrastiveLoss,
    MultiLevelContrastiveLoss,
    PositionSupConLoss,
    dense_contrastive_loss,
    equivariance_loss,
    global_contrastive_loss,
    instance_positive_mask,
    masked_supcon_loss,
    position_positive_mask,
)


# ----------------------------------------------------------------------------- references
def naive_supcon(features: torch.Tensor, positive: list[list[bool]], tau: float,
                 excluded: list[list[bool]] | None = None) -> float:
    """METHOD.md's SupCon, written out anchor by anchor with python floats; ``excluded`` pairs are neither
    positives nor in the denominator."""
    f = [[float(x) for x in row] for row in features.double()]
    f = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in f]
    m = len(f)

    def sim(a: int, b: int) -> float:
        return sum(x * y for x, y in zip(f[a], f[b])) / tau

    losses = []
    for a in range(m):
        others = [k for k in range(m) if k != a and not (excluded and excluded[a][k])]
        pos = [b for b in others if positive[a][b]]
        if not pos:
            continue
        log_denominator = math.log(sum(math.exp(sim(a, k)) for k in others))
        losses.append(-sum(sim(a, b) - log_denominator for b in pos) / len(pos))
    return sum(losses) / len(losses)


def naive_position_positives(positions: list[float], threshold: float) -> list[list[bool]]:
    m = len(positions)
    return [[a != b and abs(positions[a] - positions[b]) < threshold for b in range(m)] for a in range(m)]


def make_outputs(n: int = 4, seed: int = 0, requires_grad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "global_dominant": (n, 8),
        "global_auxiliary": (n, 8),
        "dense_dominant": (n, 5, 4, 4),
        "dense_auxiliary": (n, 5, 4, 4),
        "bottleneck_dominant": (n, 6, 2, 2),
        "bottleneck_auxiliary": (n, 6, 8, 8),
    }
    return {k: torch.randn(*s, generator=g).requires_grad_(requires_grad) for k, s in shapes.items()}


# ----------------------------------------------------------------------------- masks
def test_position_mask_1d_with_exact_ties():
    positions = torch.tensor([0.25, 0.5, 0.625, 0.75])
    mask = position_positive_mask(positions, threshold=0.25)
    expected = torch.tensor(
        [
            [False, False, False, False],  # 0.25 vs 0.5: |dp| == t is not positive
            [False, False, True, False],  # 0.5 vs 0.625: 0.125 < t; 0.5 vs 0.75: tie
            [False, True, False, True],  # 0.625 vs 0.75: 0.125 < t
            [False, False, True, False],
        ]
    )
    assert mask.dtype == torch.bool and mask.shape == (4, 4)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_position_mask_slice_positions_ties_independent_of_rounding(dtype):
    # p = (i + 1) / 20 and t = 0.1: |i - j| == 2 is an exact tie, however floats round it.
    n = 20
    positions = torch.tensor([(i + 1) / n for i in range(n)], dtype=dtype)
    mask = position_positive_mask(positions, threshold=0.1)
    expected = torch.tensor([[i != j and abs(i - j) < 2 for j in range(n)] for i in range(n)])
    assert torch.equal(mask, expected)


def test_position_mask_3d_needs_every_axis():
    positions = torch.tensor(
        [
            [0.5, 0.5, 0.5],
            [0.55, 0.45, 0.5],  # within 0.1 of row 0 on every axis
            [0.55, 0.5, 0.7],  # too far on the last axis only
            [0.5, 0.5, 0.6],  # |dz| == 0.1 exactly vs row 0: not positive
        ]
    )
    mask = position_positive_mask(positions, threshold=0.1)
    assert mask.shape == (4, 4)
    assert not mask.diagonal().any()
    assert mask[0, 1] and mask[1, 0]
    assert not mask[0, 2] and not mask[1, 2]
    assert not mask[0, 3]
    assert not mask[2, 3]  # d = (0.05, 0, 0.1): tie on z
    assert not mask[1, 3]  # d = (0.05, 0.05, 0.1): tie on z
    assert mask.sum().item() == 2  # only the pair (0, 1), both directions


def test_position_mask_3d_matches_explicit_rule():
    g = torch.Generator().manual_seed(1)
    positions = torch.rand(12, 3, generator=g)
    t = 0.3
    mask = position_positive_mask(positions, t)
    p = positions.tolist()
    expected = torch.tensor(
        [[a != b and all(abs(p[a][d] - p[b][d]) < t for d in range(3)) for b in range(12)] for a in range(12)]
    )
    assert torch.equal(mask, expected)


def test_position_mask_diagonal_false_even_for_duplicates():
    mask = position_positive_mask(torch.tensor([0.3, 0.3, 0.3]), 0.1)
    assert torch.equal(mask, ~torch.eye(3, dtype=torch.bool))


def test_instance_mask_simclr():
    mask = instance_positive_mask(3, 2)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for i in range(3):
        expected[i, i + 3] = expected[i + 3, i] = True
    assert torch.equal(mask, expected)
    three_views = instance_positive_mask(2, 3)
    assert three_views.shape == (6, 6)
    assert three_views.sum(dim=1).tolist() == [2] * 6
    assert three_views[0, 2] and three_views[0, 4] and not three_views[0, 1]


# ----------------------------------------------------------------------------- SupCon
def test_supcon_hand_example_anchor_without_positive_is_skipped():
    # f0 = f1 = e1 (positives of each other), f2 = e2 has no positive.
    # anchors 0 and 1: -log(e^{1/tau} / (e^{1/tau} + e^0)) = log(1 + e^{-1/tau}).
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[False, True, False], [True, False, False], [False, False, False]])
    for tau in (0.1, 0.5):
        loss = masked_supcon_loss(features, mask, tau=tau)
        assert loss.dtype == torch.float32 and loss.ndim == 0
        # abs: float32 resolves log(1 + 4.5e-5) only to ~1e-7.
        assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0 / tau)), rel=1e-5, abs=1e-6)


def test_supcon_hand_example_normalises_features():
    # Normalised: e1, e2, -e1, -e2; positives 0<->1 and 2<->3. With tau = 1 every anchor has
    # sims (0 to its positive, -1 and 0 to the others): loss = log(e^0 + e^-1 + e^0).
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, -0.5]])
    mask = torch.tensor(
        [[False, True, False, False], [True, False, False, False], [False, False, False, True], [False, False, True, False]]
    )
    loss = masked_supcon_loss(features, mask, tau=1.0)
    assert loss.item() == pytest.approx(math.log(2.0 + math.exp(-1.0)), rel=1e-6)


def test_supcon_matches_naive_reference_random():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(10, 7, generator=g)
    positions = torch.rand(10, generator=g).tolist()
    positive = naive_position_positives(positions, 0.3)
    mask = torch.tensor(positive)
    loss = masked_supcon_loss(features, mask, tau=0.2)
    assert loss.item() == pytest.approx(naive_supcon(features, positive, 0.2), rel=1e-5)


def test_supcon_base_temperature_factor():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(6, 4, generator=g)
    mask = instance_positive_mask(3, 2)
    plain = masked_supcon_loss(features, mask, tau=0.1)
    scaled = masked_supcon_loss(features, mask, tau=0.1, base_temperature=0.07)
    assert scaled.item() == pytest.approx(plain.item() * 0.1 / 0.07, rel=1e-6)


def test_supcon_is_stable_for_tiny_temperature():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    mask = instance_positive_mask(2, 2)
    loss = masked_supcon_loss(features, mask, tau=1e-3)
    # by hand with logsumexp (similarities / tau are +-1000 or 0): anchors 0..3 lose 2000, 1000, 1000 and
    # log 3 (its three others all tie at 0)
    assert loss.item() == pytest.approx((2000 + 1000 + 1000 + math.log(3)) / 4, rel=1e-5)


def test_position_supcon_module_stacks_branches():
    g = torch.Generator().manual_seed(3)
    dom, aux = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    positions = [0.1, 0.15, 0.5, 0.55, 0.9]
    module = PositionSupConLoss(threshold=0.1, tau=0.1)
    expected = naive_supcon(torch.cat([dom, aux]), naive_position_positives(positions * 2, 0.1), 0.1)
    assert module(dom, aux, torch.tensor(positions)).item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- Lg
def test_global_loss_hand_example_far_positions():
    # Stacked [e1, e2, e1, e2], positions [0.1, 0.9, 0.1, 0.9]: only the other view is positive.
    # Each anchor: sims 1/tau to its positive, 0 to the two others -> log(1 + 2 e^{-1/tau}).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for tau in (0.5, 0.1):
        expected = math.log1p(2.0 * math.exp(-1.0 / tau))
        loss = global_contrastive_loss(z, z.clone(), torch.tensor([0.1, 0.9]), threshold=0.1, tau=tau)
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        # SimCLR positives give the same value here, whatever the positions.
        simclr = global_contrastive_loss(z, z.clone(), torch.tensor([0.5, 0.5]), tau=tau, positives="instance")
        assert simclr.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        no_positions = global_contrastive_loss(z, z.clone(), None, tau=tau, positives="instance")
        assert no_positions.item() == pytest.approx(simclr.item())


def test_global_loss_hand_example_close_positions():
    # Positions [0.5, 0.55] with t = 0.1: all three others are positives of each anchor.
    # lse = log(e^0 + e^{1/tau} + e^0); loss = -(1/3) * (0 + 1/tau + 0 - 3 lse) = lse - 1/(3 tau).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.1
    lse = math.log(2.0 + math.exp(1.0 / tau))
    loss = global_contrastive_loss(z, z.clone(), torch.tensor([0.5, 0.55]), threshold=0.1, tau=tau)
    assert loss.item() == pytest.approx(lse - 1.0 / (3.0 * tau), rel=1e-5)
    module = GlobalContrastiveLoss(threshold=0.1, tau=tau)
    assert module(z, z.clone(), torch.tensor([0.5, 0.55])).item() == pytest.approx(loss.item())


# ----------------------------------------------------------------------------- Ld
@pytest.mark.parametrize("spatial", [(3, 4), (2, 3, 2)])
def test_dense_supcon_equals_mean_of_per_location_supcon(spatial):
    g = torch.Generator().manual_seed(7)
    n, c = 4, 5
    dom = torch.randn(n, c, *spatial, generator=g)
    aux = torch.randn(n, c, *spatial, generator=g)
    positions = [0.1, 0.15, 0.6, 0.95]
    positive = naive_position_positives(positions * 2, 0.1)
    per_location = []
    for index in torch.cartesian_prod(*[torch.arange(s) for s in spatial]).tolist():
        loc = (slice(None), slice(None), *index)
        per_location.append(naive_supcon(torch.cat([dom[loc], aux[loc]]), positive, 0.1))
    expected = sum(per_location) / len(per_location)
    loss = dense_contrastive_loss(dom, aux, torch.tensor(positions), threshold=0.1, tau=0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dense_supcon_instance_positives():
    g = torch.Generator().manual_seed(8)
    dom, aux = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    positive = instance_positive_mask(3, 2).tolist()
    expected = sum(
        naive_supcon(torch.cat([dom[:, :, i, j], aux[:, :, i, j]]), positive, 0.1) for i in range(2) for j in range(2)
    ) / 4
    loss = dense_contrastive_loss(dom, aux, None, positives="instance")
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_dense_mse_and_byol_forms():
    g = torch.Generator().manual_seed(9)
    z = torch.randn(2, 3, 4, 4, generator=g)
    positions = torch.tensor([0.2, 0.8])
    for form in ("mse", "byol"):
        assert dense_contrastive_loss(z, z.clone(), positions, form=form).item() == pytest.approx(0.0, abs=1e-6)
    # byol compares directions only: scaling one branch changes nothing; plain mse sees the scale.
    assert dense_contrastive_loss(z, 3.0 * z, positions, form="byol").item() == pytest.approx(0.0, abs=1e-6)
    assert dense_contrastive_loss(z, 3.0 * z, positions, form="mse").item() == pytest.approx(
        (4.0 * z.pow(2)).mean().item(), rel=1e-5)
    # Orthogonal unit features at every location: cos = 0.
    dom = torch.zeros(2, 2, 3, 3)
    dom[:, 0] = 2.0
    aux = torch.zeros(2, 2, 3, 3)
    aux[:, 1] = 0.5
    # byol: 2 - 2 * 0 = 2; plain mse: mean over channels of ((2 - 0)^2, (0 - 0.5)^2) = 2.125.
    assert dense_contrastive_loss(dom, aux, positions, form="byol").item() == pytest.approx(2.0)
    assert dense_contrastive_loss(dom, aux, positions, form="mse").item() == pytest.approx(2.125)
    # Opposite directions: byol = 4, mse = mean((4, 0)^2 over channels) = 8.
    assert dense_contrastive_loss(dom, -dom, positions, form="byol").item() == pytest.approx(4.0)
    assert dense_contrastive_loss(dom, -dom, positions, form="mse").item() == pytest.approx(8.0)
    module = DenseContrastiveLoss(form="byol")
    assert module(dom, aux, positions).item() == pytest.approx(2.0)


# ----------------------------------------------------------------------------- LER
def naive_equivariance(y: torch.Tensor, y_tilde_paired: torch.Tensor) -> float:
    """METHOD.md's LER written out with python floats: per sample, each channel centred over the
    locations; per location, the channel vector made unit length; L1 over channels / sqrt(C); mean
    over samples and locations."""
    def directions(t):
        n, c = t.shape[:2]
        flat = t.double().reshape(n, c, -1).tolist()
        out = []
        for sample in flat:
            means = [sum(ch) / len(ch) for ch in sample]
            centred = [[v - m for v in ch] for ch, m in zip(sample, means)]
            locations = list(zip(*centred))
            out.append([[v / max(math.sqrt(sum(w * w for w in loc)), 1e-12) for v in loc] for loc in locations])
        return out

    a, b = directions(y), directions(y_tilde_paired)
    c = y.shape[1]
    per_location = [sum(abs(u - v) for u, v in zip(la, lb)) / math.sqrt(c)
                    for sa, sb in zip(a, b) for la, lb in zip(sa, sb)]
    return sum(per_location) / len(per_location)


def test_equivariance_same_size_matches_the_written_out_formula():
    g = torch.Generator().manual_seed(10)
    y = torch.randn(2, 3, 4, 4, generator=g)
    other = torch.randn(2, 3, 4, 4, generator=g)
    assert equivariance_loss(y, y.clone()).item() == pytest.approx(0.0, abs=1e-6)
    expected = naive_equivariance(y, other)
    assert equivariance_loss(y, other).item() == pytest.approx(expected, rel=1e-5)
    assert EquivarianceLoss()(y, other).item() == pytest.approx(expected, rel=1e-5)


def test_equivariance_cannot_be_lowered_by_scaling_the_features():
    """Shrinking the last stage's norm weights scales both bottlenecks; LER must not reward it."""
    g = torch.Generator().manual_seed(12)
    y, y_tilde = torch.randn(4, 8, 2, 2, generator=g), torch.randn(4, 8, 8, 8, generator=g)
    base = equivariance_loss(y, y_tilde).item()
    assert base > 0.1
    for factor in (0.1, 0.01, 10.0):
        assert equivariance_loss(factor * y, factor * y_tilde).item() == pytest.approx(base, rel=1e-4)


def test_equivariance_ignores_a_vector_all_locations_share():
    """InstanceNorm + LeakyReLU leave a large common vector at every location; LER compares the spatial
    pattern, so adding one to either map changes nothing (uncentred, it pushed LER towards 0)."""
    g = torch.Generator().manual_seed(15)
    y, y_tilde = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    base = equivariance_loss(y, y_tilde).item()
    common = 50 * torch.randn(3, 16, 1, 1, generator=g)
    assert equivariance_loss(y + common, y_tilde).item() == pytest.approx(base, rel=1e-4)
    assert equivariance_loss(y, y_tilde - common).item() == pytest.approx(base, rel=1e-4)


def test_equivariance_has_a_scale_that_acts():
    """Unrelated maps give about 2/sqrt(pi) whatever the channel count (L1 of independent unit vectors,
    summed over C and divided by sqrt(C)); a map with no spatial pattern is not a free zero."""
    g = torch.Generator().manual_seed(16)
    for channels in (32, 256):
        y, y_tilde = torch.randn(8, channels, 4, 4, generator=g), torch.randn(8, channels, 4, 4, generator=g)
        assert equivariance_loss(y, y_tilde).item() == pytest.approx(2 / math.sqrt(math.pi), abs=0.08)
        constant = torch.randn(8, channels, 1, 1, generator=g).expand(8, channels, 4, 4)
        assert equivariance_loss(constant, y_tilde).item() > 0.5
        assert equivariance_loss(y, constant).item() > 0.5


def _centred_means(y_tilde: torch.Tensor, k: tuple[int, ...]) -> torch.Tensor:
    """Y~ paired to the dominant grid by hand: cell j is the mean of the cells within k/2 of k*j."""
    spatial = y_tilde.shape[2:]
    grid = [n // f for n, f in zip(spatial, k)]
    out = torch.empty(*y_tilde.shape[:2], *grid, dtype=y_tilde.dtype)
    for index in itertools.product(*[range(g) for g in grid]):
        window = tuple(slice(max(0, f * j - f // 2), min(n, f * j + f // 2 + 1)) if f > 1 else slice(j, j + 1)
                       for j, f, n in zip(index, k, spatial))
        out[(slice(None), slice(None)) + index] = y_tilde[(slice(None), slice(None)) + window].flatten(2).mean(2)
    return out


def test_equivariance_pairs_y_j_with_a_window_centred_on_k_j_2d():
    # the dominant cell j sits on the input pixel of auxiliary cell k*j (METHOD.md, geometry)
    y_tilde = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    paired = _centred_means(y_tilde, (4, 4))
    assert equivariance_loss(paired, y_tilde).item() == pytest.approx(0.0, abs=1e-5)
    assert equivariance_loss(paired, y_tilde).item() == pytest.approx(naive_equivariance(paired, paired), abs=1e-6)
    blocks = torch.nn.functional.avg_pool2d(y_tilde, 4)  # the former pairing: block k*j .. k*j+k-1
    assert equivariance_loss(blocks, y_tilde).item() > 0.1


def test_equivariance_pairs_y_j_with_a_window_centred_on_k_j_3d():
    y_tilde = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(13))
    assert equivariance_loss(_centred_means(y_tilde, (2, 2, 2)), y_tilde).item() == pytest.approx(0.0, abs=1e-5)
    # anisotropic: one axis not down-sampled (lambda = 1 on that axis)
    y = _centred_means(y_tilde, (1, 2, 4))
    assert equivariance_loss(y, y_tilde).item() == pytest.approx(0.0, abs=1e-5)
    assert equivariance_loss(torch.nn.functional.avg_pool3d(y_tilde, (1, 2, 4)), y_tilde).item() > 0.1


# ----------------------------------------------------------------------------- L_MLC
def test_multilevel_weighting():
    outputs = make_outputs()
    positions = torch.tensor([0.1, 0.15, 0.5, 0.9])
    loss_fn = MultiLevelContrastiveLoss()
    total, parts = loss_fn(outputs, positions)
    assert set(parts) == {"Lg", "Ld", "LER"}
    lg = global_contrastive_loss(outputs["global_dominant"], outputs["global_auxiliary"], positions)
    ld = dense_contrastive_loss(outputs["dense_dominant"], outputs["dense_auxiliary"], positions)
    ler = equivariance_loss(outputs["bottleneck_dominant"], outputs["bottleneck_auxiliary"])
    assert parts["Lg"].item() == pytest.approx(lg.item())
    assert parts["Ld"].item() == pytest.approx(ld.item())
    assert parts["LER"].item() == pytest.approx(ler.item())
    assert total.item() == pytest.approx(1.0 * lg.item() + 0.5 * ld.item() + 1.0 * ler.item(), rel=1e-6)
    custom_total, _ = MultiLevelContrastiveLoss(weights=(0.2, 2.0, 3.0))(outputs, positions)
    assert custom_total.item() == pytest.approx(0.2 * lg.item() + 2.0 * ld.item() + 3.0 * ler.item(), rel=1e-6)


def test_multilevel_parts_are_detached_and_total_has_graph():
    outputs = make_outputs(requires_grad=True)
    total, parts = MultiLevelContrastiveLoss()(outputs, torch.tensor([0.1, 0.15, 0.5, 0.9]))
    assert total.requires_grad and total.dtype == torch.float32 and total.ndim == 0
    assert all(not v.requires_grad for v in parts.values())


def test_multilevel_switched_off_components_need_no_outputs():
    full = make_outputs()
    positions = torch.tensor([0.1, 0.15, 0.5, 0.9])
    pcl_outputs = {k: full[k] for k in ("global_dominant", "global_auxiliary")}
    total, parts = MultiLevelContrastiveLoss(weights=(1.0, 0.0, 0.0))(pcl_outputs, positions)
    assert parts["Ld"].item() == 0.0 and parts["LER"].item() == 0.0
    assert total.item() == pytest.approx(parts["Lg"].item())
    image_level = {k: v for k, v in full.items() if not k.startswith("dense")}
    total, parts = MultiLevelContrastiveLoss(weights=(1.0, 0.0, 1.0))(image_level, positions)
    assert parts["Ld"].item() == 0.0
    assert total.item() == pytest.approx(parts["Lg"].item() + parts["LER"].item(), rel=1e-6)
    # SimCLR baseline: instance positives, positions not needed.
    total, _ = MultiLevelContrastiveLoss(weights=(1.0, 0.0, 0.0), positives="instance")(pcl_outputs, None)
    n = pcl_outputs["global_dominant"].shape[0]
    other_view = [[a != b and a % n == b % n for b in range(2 * n)] for a in range(2 * n)]
    features = torch.cat([pcl_outputs["global_dominant"], pcl_outputs["global_auxiliary"]])
    assert total.item() == pytest.approx(naive_supcon(features, other_view, 0.1), rel=1e-5)


def test_multilevel_missing_output_names_the_key():
    outputs = make_outputs()
    del outputs["dense_auxiliary"]
    with pytest.raises(ValueError, match="dense_auxiliary"):
        MultiLevelContrastiveLoss()(outputs, torch.tensor([0.1, 0.15, 0.5, 0.9]))
    outputs = make_outputs()
    outputs["bottleneck_dominant"] = None
    with pytest.raises(ValueError, match="bottleneck_dominant"):
        MultiLevelContrastiveLoss()(outputs, torch.tensor([0.1, 0.15, 0.5, 0.9]))


@pytest.mark.parametrize("dense_form", ["supcon", "mse", "byol"])
def test_multilevel_dense_forms(dense_form):
    outputs = make_outputs()
    positions = torch.tensor([0.1, 0.15, 0.5, 0.9])
    _, parts = MultiLevelContrastiveLoss(dense_form=dense_form)(outputs, positions)
    expected = dense_contrastive_loss(outputs["dense_dominant"], outputs["dense_auxiliary"], positions, form=dense_form)
    assert parts["Ld"].item() == pytest.approx(expected.item())


# ----------------------------------------------------------------------------- gradients, dtypes
@pytest.mark.parametrize("dense_form", ["supcon", "mse", "byol"])
def test_gradients_reach_every_input(dense_form):
    outputs = make_outputs(requires_grad=True)
    total, _ = MultiLevelContrastiveLoss(dense_form=dense_form)(outputs, torch.tensor([0.1, 0.15, 0.5, 0.9]))
    total.backward()
    for key, tensor in outputs.items():
        assert tensor.grad is not None, key
        assert torch.isfinite(tensor.grad).all(), key
        assert tensor.grad.abs().sum() > 0, key


def test_bf16_inputs_give_finite_float32_loss():
    outputs32 = make_outputs()
    outputs16 = {k: v.to(torch.bfloat16).requires_grad_() for k, v in outputs32.items()}
    positions = torch.tensor([0.1, 0.15, 0.5, 0.9])
    total, parts = MultiLevelContrastiveLoss()(outputs16, positions)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(v.dtype == torch.float32 for v in parts.values())
    # Same value as float32 maths on the bf16-rounded inputs.
    rounded = {k: v.detach().float() for k, v in outputs16.items()}
    reference, _ = MultiLevelContrastiveLoss()(rounded, positions)
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)
    total.backward()
    assert all(v.grad is not None and v.grad.dtype == torch.bfloat16 for v in outputs16.values())
    # fp16 too, for each functional loss.
    z = torch.randn(4, 8).half()
    assert global_contrastive_loss(z, z.flip(0), positions).dtype == torch.float32


def test_losses_stay_float32_under_autocast():
    outputs = make_outputs()
    positions = torch.tensor([0.1, 0.15, 0.5, 0.9])
    reference, _ = MultiLevelContrastiveLoss()(outputs, positions)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        total, _ = MultiLevelContrastiveLoss()(outputs, positions)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)


# ----------------------------------------------------------------------------- invalid arguments
@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, float("nan")])
def test_invalid_threshold(threshold):
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match="threshold"):
        position_positive_mask(torch.tensor([0.1, 0.2]), threshold)
    with pytest.raises(ValueError, match="threshold"):
        global_contrastive_loss(z, z, torch.tensor([0.1, 0.2]), threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        MultiLevelContrastiveLoss(threshold=threshold)
    with pytest.raises(ValueError, match="threshold"):
        PositionSupConLoss(threshold=threshold)


def test_threshold_one_is_allowed():
    mask = position_positive_mask(torch.tensor([0.0, 0.5, 1.0]), 1.0)
    assert mask[0, 1] and not mask[0, 2]  # |dp| == 1 is a tie


def test_invalid_form_and_positives():
    z = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="form"):
        dense_contrastive_loss(z, z, torch.tensor([0.1, 0.2]), form="l2")
    with pytest.raises(ValueError, match="dense_form"):
        MultiLevelContrastiveLoss(dense_form="cosine")
    with pytest.raises(ValueError, match="positives"):
        global_contrastive_loss(z[:, :, 0, 0], z[:, :, 0, 0], torch.tensor([0.1, 0.2]), positives="label")
    with pytest.raises(ValueError, match="positives"):
        MultiLevelContrastiveLoss(positives="label")


def test_mismatched_shapes_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 4, 5\)"):
        dense_contrastive_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        global_contrastive_loss(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="spatial"):
        dense_contrastive_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="batch and channels"):
        equivariance_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="at least as large"):
        equivariance_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2))


def test_invalid_positions_and_other_arguments():
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="positions"):
        global_contrastive_loss(z, z, torch.tensor([0.1, 0.2]))  # wrong length
    with pytest.raises(ValueError, match="positions"):
        global_contrastive_loss(z, z, None)  # position positives need positions
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        global_contrastive_loss(z, z, torch.tensor([3.0, 7.0, 12.0]))  # raw slice indices
    with pytest.raises(ValueError, match="tau"):
        global_contrastive_loss(z, z, torch.tensor([0.1, 0.2, 0.3]), tau=0.0)
    with pytest.raises(ValueError, match="base_temperature"):
        masked_supcon_loss(z, instance_positive_mask(3, 1), base_temperature=-1.0)
    with pytest.raises(ValueError, match="positive_mask"):
        masked_supcon_loss(z, torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="weights"):
        MultiLevelContrastiveLoss(weights=(1.0, -0.5, 1.0))
    with pytest.raises(ValueError, match="weights"):
        MultiLevelContrastiveLoss(weights=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="weights"):
        MultiLevelContrastiveLoss(weights=(1.0, 0.5))


# ----------------------------------------------------------------------------- padding in Ld
@pytest.mark.parametrize("form", ["supcon", "mse", "byol"])
def test_dense_loss_ignores_a_crop_that_is_half_padding(form):
    """Left half of every crop is zero padding: Ld equals Ld on the right half alone, whatever the
    padding cells hold."""
    g = torch.Generator().manual_seed(21)
    n, c, s = 6, 8, 4
    dom, aux = torch.randn(n, c, s, s, generator=g), torch.randn(n, c, s, s, generator=g)
    positions = torch.tensor([0.1, 0.12, 0.4, 0.45, 0.8, 0.85])
    content = torch.zeros(n, 1, 32, 32)
    content[..., 16:] = 1  # the crop's right half is image
    masked = dense_contrastive_loss(dom, aux, positions, form=form, content=content)
    right_only = dense_contrastive_loss(dom[..., 2:].contiguous(), aux[..., 2:].contiguous(), positions, form=form)
    assert masked.item() == pytest.approx(right_only.item(), rel=1e-5)
    garbage = dom.clone()
    garbage[..., :2] = 100 * torch.randn(n, c, s, 2, generator=g)
    assert dense_contrastive_loss(garbage, aux, positions, form=form, content=content).item() == \
        pytest.approx(masked.item(), rel=1e-5)
    assert dense_contrastive_loss(garbage, aux, positions, form=form).item() != pytest.approx(masked.item(), rel=1e-3)


def test_dense_loss_drops_cells_below_half_content_per_sample():
    """Sample 0 is padding in the first column only; the other samples are all image."""
    from nnunetv2_macl.losses.dense_contrastive import content_cells

    # a 2x2 grid on an 8x8 crop: cell column j sits on pixel column 4j and sees columns 4j-2 .. 4j+2
    # (inside the crop: 0..2 for j = 0, 2..6 for j = 1)
    content = torch.ones(3, 1, 8, 8)
    content[0, :, :, :2] = 0  # column 0's cells see 1 image column of 3: dropped; column 1's 5 of 5
    cells = content_cells(content, (2, 2))
    assert cells.tolist() == [[False, True, False, True], [True] * 4, [True] * 4]
    content[1, :, :, 6:] = 0  # column 1's cells see 4 image columns of 5: kept
    content[2, :, :, 5:] = 0  # column 1's cells see 3 of 5: kept; 4..8 zero would leave 2 of 5
    assert content_cells(content, (2, 2))[1:].all()
    content[2, :, :, 4:] = 0
    assert content_cells(content, (2, 2))[2].tolist() == [True, False, True, False]


# ----------------------------------------------------------------------------- Ld across locations
@pytest.mark.parametrize("slice_positives", [False, True])
def test_location_contrast_matches_the_written_out_rule(slice_positives):
    """Rows (branch, slice, cell): the positive of a cell is the same cell of the same slice in the other
    branch (and, asked for, of slices within t); the same cell of other slices is otherwise left out;
    every other cell of any slice is a negative."""
    g = torch.Generator().manual_seed(31)
    n, c = 3, 5
    dom, aux = torch.randn(n, c, 2, 2, generator=g), torch.randn(n, c, 2, 2, generator=g)
    positions = [0.1, 0.15, 0.8]
    rows = [(branch, i, cell) for branch in range(2) for i in range(n) for cell in range(4)]
    features = torch.stack([(dom if b == 0 else aux)[i, :, cell // 2, cell % 2] for b, i, cell in rows])
    positive, excluded = [], []
    for _, i, ci in rows:
        positive.append([])
        excluded.append([])
        for _, j, cj in rows:
            near = abs(positions[i] - positions[j]) < 0.1
            same_cell_other_slice = ci == cj and i != j
            positive[-1].append((ci == cj and i == j) or (slice_positives and same_cell_other_slice and near))
            excluded[-1].append(same_cell_other_slice and not (slice_positives and near))
    expected = naive_supcon(features, positive, 0.1, excluded)
    loss = dense_contrastive_loss(dom, aux, torch.tensor(positions), contrast="locations", locations=64,
                                  slice_positives=slice_positives)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_location_contrast_is_not_met_by_a_map_without_spatial_detail():
    """A map that is constant over locations and encodes only the slice meets eq. 12 (its negatives at a
    location are other slices there) but is at chance for the contrast across locations."""
    g = torch.Generator().manual_seed(32)
    n, c = 8, 16
    per_slice = torch.randn(n, c, 1, 1, generator=g).expand(n, c, 4, 4).contiguous()
    positions = torch.linspace(0.05, 0.95, n)
    by_slices = dense_contrastive_loss(per_slice, per_slice, positions, contrast="slices").item()
    by_locations = dense_contrastive_loss(per_slice, per_slice, positions, contrast="locations").item()
    assert by_slices < 0.5 * math.log(2 * n - 1)
    # it can push the cells of other slices away, but the other 2 x 16 - 1 cells of its own slice tie with
    # the positive: the loss cannot go below log(31)
    assert by_locations >= math.log(2 * 16 - 1) - 1e-4
    detailed = torch.randn(n, c, 4, 4, generator=g)
    assert dense_contrastive_loss(detailed, detailed, positions, contrast="locations").item() < 0.5 * by_locations


def location_reference(dom, aux, cells, tau=0.1) -> float:
    """The locations contrast on the flat cell indices ``cells`` (the same for every slice), written out with
    the naive reference: rows (branch, slice, cell); the positive of a row is the same cell of the same slice
    in the other branch, the same cell of another slice is left out, every other row is a negative."""
    n = dom.shape[0]
    rows = [(b, i, cell) for b in range(2) for i in range(n) for cell in cells]
    features = torch.stack([(dom if b == 0 else aux).flatten(2)[i, :, cell] for b, i, cell in rows])
    positive = [[ci == cj and i == j for _, j, cj in rows] for _, i, ci in rows]
    excluded = [[ci == cj and i != j for _, j, cj in rows] for _, i, ci in rows]
    return naive_supcon(features, positive, tau, excluded)


def drawn_cells(seed: int, total: int, locations: int) -> list[int]:
    """The cells the sampler draws after ``torch.manual_seed(seed)``: the first ``locations`` of a random
    permutation of all ``total`` cells (global torch RNG, one draw shared by the batch)."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:locations].tolist()


def equal_feature_cells(loss: float, n: int) -> float:
    """How many cells entered a locations loss of equal features: each anchor's denominator then holds
    2 n k - 1 - 2 (n - 1) equal terms (all rows but itself and the same cell of the other n - 1 slices), so
    the loss is log(2 n (k - 1) + 1)."""
    return (math.exp(loss) - 1) / (2 * n) + 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_location_contrast_samples_a_shared_subset_written_out(seed):
    """64 cells, 16 sampled: the loss is the written-out SupCon on exactly the cells the seed draws, the same
    cells for every slice; another draw or all cells give other values."""
    g = torch.Generator().manual_seed(33)
    n, c = 4, 6
    dom, aux = torch.randn(n, c, 8, 8, generator=g), torch.randn(n, c, 8, 8, generator=g)
    positions = torch.tensor([0.1, 0.3, 0.5, 0.7])
    torch.manual_seed(seed)
    loss = dense_contrastive_loss(dom, aux, positions, contrast="locations", locations=16).item()
    cells = drawn_cells(seed, 64, 16)
    assert len(set(cells)) == 16
    assert loss == pytest.approx(location_reference(dom, aux, cells), rel=1e-5)
    other = drawn_cells(seed + 10, 64, 16)
    assert set(other) != set(cells)
    assert loss != pytest.approx(location_reference(dom, aux, other), rel=1e-3)
    assert loss != pytest.approx(location_reference(dom, aux, list(range(64))), rel=1e-3)
    # equal features: the loss counts the cells that entered it
    torch.manual_seed(seed)
    ones = torch.ones(n, c, 8, 8)
    tied = dense_contrastive_loss(ones, ones, positions, contrast="locations", locations=16).item()
    assert equal_feature_cells(tied, n) == pytest.approx(16, abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_location_contrast_samples_with_padding_and_never_uses_padded_cells(seed):
    """The crop's left half is padding: 32 content cells of 64, more than the 16 sampled, so sampling really
    happens, among the content cells only. The loss is the written-out SupCon on the drawn cells that are content, whatever the padded cells
    hold: no padded cell is ever an anchor, a positive or a negative."""
    g = torch.Generator().manual_seed(34)
    n, c = 4, 6
    dom, aux = torch.randn(n, c, 8, 8, generator=g), torch.randn(n, c, 8, 8, generator=g)
    positions = torch.tensor([0.1, 0.3, 0.5, 0.7])
    content = torch.zeros(n, 1, 32, 32)
    content[..., 16:] = 1  # cell column j sits on pixel column 4 j: columns 4..7 are image
    content_cells = {row * 8 + col for row in range(8) for col in range(4, 8)}
    assert len(content_cells) == 32
    candidates = sorted(content_cells)  # cells that are content in some sample, in grid order
    used = [candidates[i] for i in drawn_cells(seed, len(candidates), 16)]
    assert len(used) == 16 and set(used) <= content_cells
    torch.manual_seed(seed)
    loss = dense_contrastive_loss(dom, aux, positions, contrast="locations", content=content, locations=16).item()
    assert loss == pytest.approx(location_reference(dom, aux, used), rel=1e-5)
    garbage, garbage_aux = dom.clone(), aux.clone()
    garbage[..., :4] = 100 * torch.randn(n, c, 8, 4, generator=g)
    garbage_aux[..., :4] = -100 * torch.randn(n, c, 8, 4, generator=g)
    torch.manual_seed(seed)
    assert dense_contrastive_loss(garbage, garbage_aux, positions, contrast="locations", content=content,
                                  locations=16).item() == pytest.approx(loss, rel=1e-5)
    torch.manual_seed(seed)  # without the mask the padded cells count, and the value moves
    assert dense_contrastive_loss(garbage, garbage_aux, positions, contrast="locations",
                                  locations=16).item() != pytest.approx(loss, rel=1e-3)
    # equal features: exactly the content cells among those drawn entered the loss
    ones = torch.ones(n, c, 8, 8)
    torch.manual_seed(seed)
    tied = dense_contrastive_loss(ones, ones, positions, contrast="locations", content=content, locations=16).item()
    assert equal_feature_cells(tied, n) == pytest.approx(len(used), abs=1e-3)


def test_location_sampler_spends_its_budget_on_content_cells():
    """With 32 content cells and locations = 16, every draw should use 16 content cells (padded cells are
    never sampled)."""
    n, c = 4, 6
    positions = torch.tensor([0.1, 0.3, 0.5, 0.7])
    content = torch.zeros(n, 1, 32, 32)
    content[..., 16:] = 1
    ones = torch.ones(n, c, 8, 8)
    for seed in range(5):
        torch.manual_seed(seed)
        tied = dense_contrastive_loss(ones, ones, positions, contrast="locations", content=content,
                                      locations=16).item()
        assert equal_feature_cells(tied, n) == pytest.approx(16, abs=1e-3), seed


def test_dense_loss_with_a_different_padding_per_sample_matches_the_reference():
    """Each sample has its own padded cells: at every location the SupCon runs over the samples (both
    branches) whose cell there is image, written out with the naive reference and averaged over the
    locations that keep a positive pair."""
    from nnunetv2_macl.losses.dense_contrastive import content_cells

    g = torch.Generator().manual_seed(41)
    n, c = 4, 6
    dom, aux = torch.randn(n, c, 2, 2, generator=g), torch.randn(n, c, 2, 2, generator=g)
    positions = [0.1, 0.15, 0.2, 0.9]
    content = torch.ones(n, 1, 8, 8)
    content[0, :, :, :2] = 0  # sample 0: left cell column is padding
    content[2, :, :2, :] = 0  # sample 2: top cell row is padding
    content[3] = 0  # sample 3: all padding
    cells = content_cells(content, (2, 2))
    assert cells.tolist() == [[False, True, False, True], [True] * 4, [False, False, True, True], [False] * 4]
    per_location = []
    for s in range(4):
        keep = [i for i in range(n) if cells[i, s]]
        rows = keep + keep  # dominant then auxiliary rows of the kept samples
        features = torch.stack([dom[i, :, s // 2, s % 2] for i in keep] + [aux[i, :, s // 2, s % 2] for i in keep])
        pos = [positions[i] for i in rows]
        per_location.append(naive_supcon(features, naive_position_positives(pos, 0.1), 0.1))
    expected = sum(per_location) / len(per_location)
    loss = dense_contrastive_loss(dom, aux, torch.tensor(positions), content=content)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
