"""Multi-label metrics of SPEC §6 and the per-class threshold search of SPEC §5, vectorised.

Every metric works on whole (N, C) arrays: one sort of every class column at once gives the
precision-recall curve, the ROC counts and the thresholds; one sort of every sample's row gives
the ranking loss. Nothing loops over samples in Python.

The sort key packs the label into the lowest bit of the score's bit pattern shifted left by one
(an order-preserving integer as long as the score is in [0, 2)), so a plain integer sort replaces
argsort plus gathers: that is why scores must be probabilities in [0, 1].

Conventions for degenerate cases:
- AUROC and AP are undefined for a class with no positives (AP, AUROC) or no negatives (AUROC):
  that class's entry is NaN and the macro means skip NaN entries (NaN only if every class is).
- F-beta / G-beta of a class with nothing to find and nothing predicted (TP = FP = FN = 0) is 1,
  as in the PhysioNet Challenge scoring code.
- Ranking loss: samples with no positive or no negative labels contribute 0 (as sklearn).
- Coverage error: samples with no positive labels contribute 0 (as sklearn).
"""
import functools

import numpy as np

BETA = 2
DEFAULT_THRESHOLD = 0.5      # thresholds=None: scores are probabilities


def _check(labels, scores):
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must both be (samples, classes); got {labels.shape} and {scores.shape}")
    if scores.size and not (scores.min() >= 0 and scores.max() <= 1):   # NaN fails both comparisons
        if not np.isfinite(scores).all():
            raise ValueError(f"scores hold {np.size(scores) - np.isfinite(scores).sum()} non-finite values (NaN/inf)")
        raise ValueError(f"scores must be probabilities in [0, 1] (apply a sigmoid to logits); "
                         f"got values in [{scores.min():.3g}, {scores.max():.3g}]")
    return labels > 0.5, scores


def _sorted_rows(labels, scores):
    """Each row sorted by descending score: (sorted scores, sorted labels, is-last-of-its-tie-group).

    Positions inside a group of equal scores share one threshold, so curves are only read at
    group ends (as sklearn does); the order inside a group never matters.
    """
    key = np.ascontiguousarray(scores).view(np.int64) << 1    # the shift also maps -0.0 onto 0.0
    key |= labels
    key = np.sort(key, axis=1)[:, ::-1]
    sorted_labels = (key & 1).astype(bool)
    sorted_scores = (key >> 1).view(np.float64)
    is_end = np.ones(scores.shape, dtype=bool)
    is_end[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    return sorted_scores, sorted_labels, is_end


class _TieGroups:
    """The tie groups of every row, flattened in row order: each group's row, the number of
    records and of positives up to its end, and the positives inside it."""

    def __init__(self, sorted_labels, is_end):
        self.rows, n = sorted_labels.shape
        ends = np.flatnonzero(is_end)
        self.row = ends // n
        self.first = np.ones(len(ends), dtype=bool)     # first group of its row
        self.first[1:] = self.row[1:] != self.row[:-1]
        self.upto = ends - self.row * n + 1
        self.pos_upto = np.cumsum(sorted_labels, axis=1, dtype=np.int64).ravel()[ends]
        self.pos_in = self.pos_upto - self.previous(self.pos_upto)

    def previous(self, upto):
        """The count up to the previous group of the same row (0 for a row's first group)."""
        before = np.empty_like(upto)
        before[0] = 0
        before[1:] = upto[:-1]
        before[self.first] = 0
        return before

    def row_sum(self, values):
        return np.bincount(self.row, weights=values, minlength=self.rows)


class _ClassCurves:
    """Per class (rows of the transposed arrays): the descending sort and its tie groups."""

    def __init__(self, labels, scores):
        self.sorted_scores, self.sorted_labels, self.is_end = _sorted_rows(labels.T, scores.T)
        self.positives = labels.sum(axis=0)
        self.negatives = len(labels) - self.positives

    @functools.cached_property
    def groups(self):
        return _TieGroups(self.sorted_labels, self.is_end)

    def average_precision(self):
        """Every positive of a group takes the precision at the group's end."""
        g = self.groups
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = g.row_sum(g.pos_in * g.pos_upto / g.upto) / self.positives
        return np.where(self.positives > 0, ap, np.nan)

    def auroc(self):
        """Each positive counts the negatives below its tie group, plus half of those inside it."""
        g = self.groups
        neg_upto = g.upto - g.pos_upto
        beaten = self.negatives[g.row] - (neg_upto + g.previous(neg_upto)) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = g.row_sum(g.pos_in * beaten) / (self.positives * self.negatives)
        return np.where((self.positives > 0) & (self.negatives > 0), auc, np.nan)

    def thresholds(self, beta):
        """At every group end F-beta = (1+β²)TP / (predicted + β²·positives); the best per class."""
        true_pos = np.cumsum(self.sorted_labels, axis=1, dtype=np.int64)
        predicted = np.arange(1, self.sorted_labels.shape[1] + 1)
        f = (1 + beta ** 2) * true_pos / (predicted + beta ** 2 * self.positives[:, None])
        best = np.argmax(np.where(self.is_end, f, -1.0), axis=1)
        chosen = self.sorted_scores[np.arange(len(best)), best]
        return np.where(self.positives > 0, chosen, np.nextafter(self.sorted_scores[:, 0], np.inf))


def average_precision(labels, scores):
    """Per-class AP = sum over positives of precision at their rank / number of positives (ties share
    the precision at the end of their group). NaN for a class without positives."""
    return _ClassCurves(*_check(labels, scores)).average_precision()


def auroc(labels, scores):
    """Per-class area under the ROC curve: P(positive scored above a negative) + P(tie)/2.
    NaN for a class without positives or without negatives."""
    return _ClassCurves(*_check(labels, scores)).auroc()


def ranking_loss(labels, scores):
    """Mean over samples of the fraction of (positive, negative) label pairs with the negative
    scored at least as high as the positive (sorted within each sample, ties counted as wrong)."""
    return _ranking_loss(*_check(labels, scores))


def _ranking_loss(labels, scores):
    _, sorted_labels, is_end = _sorted_rows(labels, scores)
    # rows are short (one entry per class) and rarely tied: read counts per position, not per group
    negatives_so_far = np.cumsum(~sorted_labels, axis=1, dtype=np.int32)
    at_ends = np.where(is_end, negatives_so_far, np.iinfo(np.int32).max)
    negatives_to_group_end = np.minimum.accumulate(at_ends[:, ::-1], axis=1)[:, ::-1]
    wrong = (sorted_labels * negatives_to_group_end).sum(axis=1)
    positives = labels.sum(axis=1)
    pairs = positives * (labels.shape[1] - positives)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.where(pairs > 0, wrong / pairs, 0.0).mean())


def coverage_error(labels, scores):
    """Mean over samples of how many labels, best first, cover every positive (ties counted in)."""
    return _coverage_error(*_check(labels, scores))


def _coverage_error(labels, scores):
    lowest_positive = np.where(labels, scores, np.inf).min(axis=1, keepdims=True)
    covered = (scores >= lowest_positive).sum(axis=1)
    return float(np.where(labels.any(axis=1), covered, 0).mean())


def beta_measures(labels, predictions, beta=BETA):
    """Per-class F-beta = (1+β²)TP/((1+β²)TP+FP+β²FN) and G-beta = TP/(TP+FP+β·FN); 1 where the
    denominator is 0 (nothing to find, nothing predicted)."""
    return _beta_scores(*_confusion(np.asarray(labels) > 0.5, np.asarray(predictions, dtype=bool)), beta)


def _confusion(labels, predictions):
    """Per-class TP, FP, FN counts of boolean (N, C) arrays."""
    tp = (labels & predictions).sum(axis=0).astype(np.float64)
    return tp, predictions.sum(axis=0) - tp, labels.sum(axis=0) - tp


def _beta_scores(tp, fp, fn, beta):
    f_den = (1 + beta ** 2) * tp + fp + beta ** 2 * fn
    g_den = tp + fp + beta * fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(f_den > 0, (1 + beta ** 2) * tp / f_den, 1.0)
        g = np.where(g_den > 0, tp / g_den, 1.0)
    return f, g


def find_thresholds(labels, scores, beta=BETA):
    """Per class, the score threshold (predict positive at score >= threshold) maximising F-beta
    over the precision-recall curve; ties go to the highest threshold. A class with no positives
    gets a threshold just above its highest score (predict none: F-beta 1 by convention)."""
    return _ClassCurves(*_check(labels, scores)).thresholds(beta)


def evaluate(labels, scores, thresholds=None, beta=BETA):
    """SPEC §6 metrics of scores (probabilities) against multi-hot labels, both (N, C).

    Threshold-free metrics: AUROC, AP/mAP, ranking loss, coverage error. Thresholded ones
    (score >= threshold per class; None -> 0.5): Hamming loss, subset accuracy, F-beta, G-beta, F1.
    """
    labels, scores = _check(labels, scores)
    thresholds = np.full(scores.shape[1], DEFAULT_THRESHOLD) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (scores.shape[1],):
        raise ValueError(f"thresholds must have one entry per class ({scores.shape[1]}), got shape {thresholds.shape}")
    predictions = scores >= thresholds
    curves = _ClassCurves(labels, scores)
    auc, ap = curves.auroc(), curves.average_precision()
    counts = _confusion(labels, predictions)
    f_beta, g_beta = _beta_scores(*counts, beta)
    f1, _ = _beta_scores(*counts, 1)
    with np.errstate(all="ignore"):
        auc_macro = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")
        map_value = float(100 * np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")
    return {
        "auc_roc_macro": auc_macro,
        "auc_roc_per_class": auc,
        "Map_value": map_value,
        "ap_per_class": 100 * ap,
        "F1score_b": float(f_beta.mean()),
        "Fbeta_per_class": f_beta,
        "Gbeta_score": float(g_beta.mean()),
        "Gbeta_per_class": g_beta,
        "F1score": float(f1.mean()),
        "F1_per_class": f1,
        "ranking_loss": _ranking_loss(labels, scores),
        "coverage_error": _coverage_error(labels, scores),
        "hamming_loss": float((counts[1].sum() + counts[2].sum()) / labels.size),
        "subset_accuracy": float((predictions == labels).all(axis=1).mean()),
        "thresholds": thresholds,
        "beta": beta,
    }
