"""DiffGuard (klip_med.eval.diffguard, klip_med.eval.levels) on cases with a known answer: a
two-class Gaussian mixture prior with its exact noise predictor and its exact noise-aware
classifier; the level classifier on images whose level is drawn into them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klip_med.errors import KLIPMedError
from klip_med.eval.diffguard import (
    DiffGuard,
    diffguard_map,
    guided_regeneration,
    load_diffguard,
    log_prob_gradient,
    save_diffguard,
)
from klip_med.eval.levels import LevelData, level_accuracy, level_of, train_level_classifier
from klip_med.sampling.schedule import linear_beta_alphas_cumprod


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class MixturePrior:
    """x0 ~ sum_c 1/K N(mu_c, v I): the exact epsilon predictor of the noised mixture."""

    def __init__(self, means: torch.Tensor, var: float) -> None:
        self.means, self.var = means, var
        self.alphas_cumprod = linear_beta_alphas_cumprod(1000)
        self.device = torch.device("cpu")

    def terms(self, x: torch.Tensor, t):
        """(a_t, s_t^2, log p(c | x_t) up to a constant): x_t | c ~ N(sqrt(a) mu_c, (a v + 1 - a) I)."""
        a = self.alphas_cumprod.float()[torch.as_tensor(t).round().long().reshape(-1)].reshape(-1, 1, 1, 1)
        s2 = a * self.var + 1 - a
        diff = x[:, None] - a.sqrt()[:, None] * self.means[None]
        return a, s2, -(diff**2).flatten(2).sum(2) / (2 * s2.reshape(-1, 1))

    def eps(self, x: torch.Tensor, t) -> torch.Tensor:
        a, s2, logits = self.terms(x, t)
        w = torch.softmax(logits, 1)[:, :, None, None, None]
        x0_c = self.means[None] + (a.sqrt() * self.var / s2)[:, None] * (x[:, None] - a.sqrt()[:, None] * self.means[None])
        return (x - a.sqrt() * (w * x0_c).sum(1)) / (1 - a).sqrt()


class MixtureClassifier(torch.nn.Module):
    """The exact p(c | x_t, t) of :class:`MixturePrior` (logits); its features are the image itself."""

    def __init__(self, prior: MixturePrior) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, x, t):
        return self.prior.terms(x, t)[2]

    def features(self, x):
        return x


def _mixture(size: int = 8):
    mu0 = torch.full((1, size, size), -0.5)
    mu0[..., : size // 2] = 0.5  # class 0: left half bright; class 1: the mirror image
    prior = MixturePrior(torch.stack([mu0, -mu0]), 0.01)
    return prior, MixtureClassifier(prior), mu0


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_guidance_gradient_is_the_exact_score_of_the_class_posterior():
    """d/dx log p(c | x_t) = -(x - sqrt(a) mu_c) / s^2 + sum_k p(k | x_t) (x - sqrt(a) mu_k) / s^2."""
    prior, clf, _ = _mixture()
    x = torch.randn(2, 1, 8, 8, generator=_g(0))
    t = 300
    a, s2, logits = prior.terms(x, torch.full((2,), t))
    w = torch.softmax(logits, 1)
    centred = x[:, None] - a.sqrt()[:, None] * prior.means[None]
    expected = -centred[:, 1] / s2 + (w[:, :, None, None, None] * centred).sum(1) / s2
    got = log_prob_gradient(clf, x, t, torch.tensor([1, 1]))
    assert torch.allclose(got, expected, atol=1e-5)


def test_guided_regeneration_of_an_in_class_image_changes_less_than_out_of_class():
    """An image of class 0 re-generated towards class 0 stays where it was; towards class 1 it is
    turned into class 1 (the two means differ by 1 in every pixel)."""
    prior, clf, mu0 = _mixture()
    x = (mu0 + 0.1 * torch.randn(mu0.shape, generator=_g(0)))[None]
    own, ts = guided_regeneration(prior, clf, x, torch.tensor([0]), _g(1), t_frac=0.3, steps=10, scale=1.0)
    other, _ = guided_regeneration(prior, clf, x, torch.tensor([1]), _g(1), t_frac=0.3, steps=10, scale=1.0)
    assert ts[0] == round(0.3 * 999) and ts[-1] == 0 and len(ts) == 10
    change_own, change_other = float((own - x).abs().mean()), float((other - x).abs().mean())
    assert change_own < 0.15 and change_other > 0.8
    assert float((other - (-mu0)).abs().mean()) < 0.15  # it became class 1


def test_diffguard_map_is_low_for_an_in_class_image_and_finds_the_out_of_class_part():
    """A class-0 image with its top-left quadrant flipped is not of either class: the classifier
    predicts class 0 (three quadrants agree), the guided re-generation restores class 0, and the
    mismatch lies in the flipped quadrant."""
    prior, clf, mu0 = _mixture()
    noise = 0.1 * torch.randn(mu0.shape, generator=_g(0))
    healthy = (mu0 + noise)[0]
    shifted = mu0.clone()
    shifted[..., :4, :4] *= -1
    shifted = (shifted + noise)[0]
    m_id, nfe, info_id = diffguard_map(prior, clf, healthy, _g(2), t_frac=0.3, steps=10, scale=1.0)
    m_ood, _, info_ood = diffguard_map(prior, clf, shifted, _g(2), t_frac=0.3, steps=10, scale=1.0)
    assert nfe == 10 and info_id["level"] == 0 and info_ood["level"] == 0
    assert float(m_ood.mean()) > 5 * float(m_id.mean())
    quadrants = m_ood.reshape(2, 4, 2, 4).mean(dim=(1, 3))
    assert np.unravel_index(int(quadrants.argmax()), (2, 2)) == (0, 0)
    assert float(quadrants[0, 0]) > 10 * float(quadrants.flatten()[1:].max())


def test_level_of_bins_positions_evenly():
    assert [level_of(i, 12, 6) for i in range(12)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert level_of(0, 1, 6) == 3 and level_of(9, 10, 3) == 2
    with pytest.raises(KLIPMedError, match="index: expected a slice index"):
        level_of(10, 10, 6)


def _discs(n: int, levels: int, size: int, g: torch.Generator) -> LevelData:
    """Images whose level is the radius of a bright disc at a random place (plus noise): a level
    carried by content, as anatomy carries it (the classifier pools over positions)."""
    lv = torch.randint(0, levels, (n,), generator=g)
    rows, cols = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    images = -0.5 + 0.1 * torch.randn(n, 1, size, size, generator=g)
    for k in range(n):
        r = 1.5 + 1.5 * float(lv[k])
        c = (size / 2 - 1) + 2 * (torch.rand(2, generator=g) - 0.5)
        images[k, 0] += ((rows - c[0]) ** 2 + (cols - c[1]) ** 2 <= r**2).float()
    return LevelData(images, lv, (lv.float() + 0.5) / levels, ["toy"] * n)


def test_level_classifier_learns_levels_and_knows_how_noisy_its_input_is(tmp_path):
    g = _g(0)
    abar = linear_beta_alphas_cumprod(1000)
    train, held = _discs(256, 4, 16, g), _discs(64, 4, 16, g)
    net, record = train_level_classifier(train, abar, _g(1), n_levels=4, channels=(16, 16, 16, 16), steps=300,
                                         batch=32, lr=2e-3)
    assert record["steps_trained"] == 300 and sum(record["train_level_counts"]) == 256
    acc = level_accuracy(net, held, abar, _g(2), timesteps=(0, 999))
    assert acc["t=0"]["accuracy"] >= 0.9  # the band is plain at t = 0
    assert acc["t=999"]["accuracy"] <= 0.5  # and gone at t = T - 1 (chance is 0.25)
    dg = DiffGuard(net, t_frac=0.3, steps=3, scale=1.0)
    prior, _, _ = _mixture(16)  # any prior with eps and alphas_cumprod works for the mechanics
    m, nfe, info = dg.score_map(prior, held.images[0, 0], _g(3))
    assert m.shape == (16, 16) and nfe == 3 and 0 <= info["level"] < 4 and info["level_kl"] >= 0
    from klip_med.priors.config import PriorConfig, default_architecture, default_schedule
    from klip_med.priors.diffusion import DiffusionPrior
    from klip_med.priors.intensity import IntensityRule

    config = PriorConfig(name="tiny", modality="MR", image_size=16, architecture=default_architecture((16, 16, 16, 16)),
                         schedule=default_schedule(100), weights_dtype="float32",
                         intensity=IntensityRule("mr-percentile", percentile=99.0, reference=0.8))
    torch.manual_seed(0)  # test-only: the network's random initialisation
    owner = DiffusionPrior(config).eval()
    save_diffguard(net, tmp_path / "diffguard", owner, record)
    loaded, config_read = load_diffguard(tmp_path / "diffguard", owner)
    x = held.images[:4]
    assert torch.equal(loaded(x, torch.zeros(4)), net(x, torch.zeros(4)))  # float32: exact
    assert config_read["model"]["n_levels"] == 4 and config_read["training"]["steps_trained"] == 300
    with pytest.raises(KLIPMedError, match="kind: expected 'dlsr'"):
        from klip_med.eval.dlsr import load_dlsr

        load_dlsr(tmp_path / "diffguard", owner)
