"""Multi-label metrics and the per-class threshold search, vectorised; and the scores a network gives
over a loader (predict), which every run validates and tests on.

Every metric works on whole (N, C) arrays: one sort of every class column at once gives the
precision-recall curve, the ROC counts, the confusion counts at any thresholds and the best
thresholds; one sort of every sample's row gives the ranking loss and the coverage error. Nothing
loops over samples in Python, and everything after the sorts is read at run or tie-group ends only.

The sort key packs the label into the lowest bit of twice the score's bit pattern (an
order-preserving integer for scores in [0, 1]), so a plain in-place integer sort replaces argsort
plus gathers: that is why scores must be probabilities in [0, 1]. float32 scores (what the models
output) keep their width and sort as int32 keys, about twice as fast as int64; anything else is
scored as float64.

challenge_score gives the PhysioNet/CinC Challenge 2021 score of thresholded predictions, with its
weight table's partial credit for clinically close mistakes, from one (N, classes) matrix product;
challenge_score_or_nan is the score a run reports: NaN, with the reason logged, where the classes
are not Challenge codes.

Conventions for degenerate cases:
- AUROC and AP are undefined for a class with no positives (AP, AUROC) or no negatives (AUROC):
  that class's entry is NaN and the macro means skip NaN entries (NaN only if every class is).
- F-beta / G-beta of a class with nothing to find and nothing predicted (TP = FP = FN = 0) is 1,
  as in the PhysioNet Challenge scoring code.
- Ranking loss: samples with no positive or no negative labels contribute 0 (as sklearn).
- Coverage error: samples with no positive labels contribute 0 (as sklearn).
"""
import logging

import numpy as np
import torch

from helper_code import CHALLENGE_CLASS_OF, CHALLENGE_WEIGHTS_80THS, NUM_LEADS
from model_src_ecg import mask_leads

log = logging.getLogger("adagrad_fusion.evaluation")

BETA = 2
DEFAULT_THRESHOLD = 0.5      # thresholds=None: scores are probabilities
KEY_DTYPE = {np.float32: np.int32, np.float64: np.int64}   # the sort key of each score width
CHALLENGE_WEIGHTS = np.array(CHALLENGE_WEIGHTS_80THS, dtype=np.float64) / 80
SINUS_RHYTHM = "426783006"   # the Challenge score's baseline model predicts it alone for every recording


def _check_shapes(labels, other, other_name):
    if labels.ndim != 2 or labels.shape != other.shape:
        raise ValueError(f"labels and {other_name} must both be (samples, classes); got {labels.shape} and {other.shape}")


def _check(labels, scores):
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    scores = scores if scores.dtype.type in KEY_DTYPE else scores.astype(np.float64)
    _check_shapes(labels, scores, "scores")
    if scores.size and not (scores.min() >= 0 and scores.max() <= 1):   # NaN fails both comparisons
        if not np.isfinite(scores).all():
            raise ValueError(f"scores hold {np.size(scores) - np.isfinite(scores).sum()} non-finite values (NaN/inf)")
        raise ValueError(f"scores must be probabilities in [0, 1] (apply a sigmoid to logits); "
                         f"got values in [{scores.min():.3g}, {scores.max():.3g}]")
    return labels > 0.5, scores


def _order_keys(labels, scores, descending):
    """One integer key per entry, as wide as the score, whose plain ascending integer sort orders the
    scores, with the label riding along in the lowest bit: no argsort or gathers are needed.

    For scores in [0, 1] the bit pattern x is an order-preserving integer below 2**62 (2**30 for
    float32), so 2x fits the key (-0.0 wraps onto 0 once doubled). Descending: -2x + label, best
    first, a score's negatives before its positives; ascending: 2x - label, worst first, a score's
    positives before its negatives. Either way keys of equal scores differ only in the lowest bit,
    and the score bits are -(key >> 1) when descending.
    Built in C order whatever the layout of `scores`, so a transposed view sorts by class.
    """
    key_dtype = KEY_DTYPE[scores.dtype.type]
    key = np.empty(scores.shape, dtype=key_dtype)
    np.multiply(scores.view(key_dtype), -2 if descending else 2, out=key)
    (np.add if descending else np.subtract)(key, labels, out=key)
    return key


class _ClassCurves:
    """Per class, the scores sorted best first, read only at the ends of tie groups.

    Positions inside a group of equal scores share one threshold, so curves are only read at group
    ends (as sklearn does). Every array below has one entry per group, all classes' groups flattened
    class after class; counts come from one cumulative sum over the whole flattened sort.
    """

    def __init__(self, labels, scores):
        n, classes = scores.shape
        key = _order_keys(labels.T, scores.T, descending=True)
        key.sort(axis=1)
        key = key.ravel()
        # runs of equal keys (one score and label: a score's negatives, then its positives)
        is_run_end = np.empty(key.size, dtype=bool)
        np.not_equal(key[1:], key[:-1], out=is_run_end[:-1])
        is_run_end[n - 1::n] = True                              # a class's last record ends a run
        run_end = np.flatnonzero(is_run_end)
        run_key = key[run_end]
        run_row = run_end // n
        positives_so_far = np.cumsum(np.diff(run_end, prepend=-1) * (run_key & 1))   # running over all classes
        # a tie group ends with the run before a new score or a new class
        score_bits = np.negative(run_key >> 1)
        is_end = np.ones(len(run_end), dtype=bool)
        is_end[:-1] = (score_bits[1:] != score_bits[:-1]) | (run_row[1:] != run_row[:-1])
        ends = run_end[is_end]
        positives_so_far = positives_so_far[is_end]
        self.row = run_row[is_end]
        self.row_start = np.searchsorted(self.row, np.arange(classes))
        class_total = positives_so_far[np.searchsorted(self.row, np.arange(classes), side="right") - 1]
        self.positives = np.diff(class_total, prepend=0)
        self.negatives = n - self.positives
        self.upto = ends - self.row * n + 1
        self.pos_upto = positives_so_far - (class_total - self.positives)[self.row]
        self.pos_in = np.diff(positives_so_far, prepend=0)
        self.count_in = np.diff(ends, prepend=-1)
        self.scores = score_bits[is_end].view(scores.dtype)

    def row_sum(self, values):
        return np.bincount(self.row, weights=values, minlength=len(self.positives))

    def average_precision(self):
        """Every positive of a group takes the precision at the group's end."""
        with np.errstate(invalid="ignore", divide="ignore"):
            ap = self.row_sum(self.pos_in * self.pos_upto / self.upto) / self.positives
        return np.where(self.positives > 0, ap, np.nan)

    def auroc(self):
        """Each positive counts the negatives below its tie group, plus half of those inside it."""
        neg_upto = self.upto - self.pos_upto
        beaten = self.negatives[self.row] - neg_upto + (self.count_in - self.pos_in) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = self.row_sum(self.pos_in * beaten) / (self.positives * self.negatives)
        return np.where((self.positives > 0) & (self.negatives > 0), auc, np.nan)

    def confusion(self, thresholds):
        """Per class TP, FP, FN of predicting score >= threshold: the groups at or above a threshold
        are a prefix of the class's groups, so the counts are those at the prefix's last group."""
        above = np.bincount(self.row, weights=self.scores >= thresholds[self.row], minlength=len(thresholds))
        last = self.row_start + above.astype(np.int64) - 1
        tp = np.where(above > 0, self.pos_upto[last], 0).astype(np.float64)
        predicted = np.where(above > 0, self.upto[last], 0)
        return tp, predicted - tp, self.positives - tp

    def thresholds(self, beta):
        """At every group end F-beta = (1+β²)TP / (predicted + β²·positives); the first best per class."""
        if not len(self.positives):      # no classes: np.maximum.reduceat needs at least one
            return np.empty(0)
        f = (1 + beta ** 2) * self.pos_upto / (self.upto + beta ** 2 * self.positives[self.row])
        best_f = np.maximum.reduceat(f, self.row_start)
        hits = np.flatnonzero(f == best_f[self.row])
        best = hits[np.searchsorted(self.row[hits], np.arange(len(best_f)))]
        highest = self.scores[self.row_start].astype(np.float64)
        return np.where(self.positives > 0, self.scores[best], np.nextafter(highest, np.inf))


def average_precision(labels, scores):
    """Per-class AP = sum over positives of precision at their rank / number of positives (ties share
    the precision at the end of their group). NaN for a class without positives."""
    return _ClassCurves(*_check(labels, scores)).average_precision()


def mean_average_precision(labels, scores):
    """Validation criterion: mAP x 100 (0 where no class has a positive, or for a diverged model)."""
    if not np.isfinite(scores).all():
        log.warning("validation scores hold NaN/inf (diverged training?): counted as mAP 0")
        return 0.0
    ap = average_precision(labels, scores)
    return float(100 * np.nanmean(ap)) if np.isfinite(ap).any() else 0.0


def auroc(labels, scores):
    """Per-class area under the ROC curve: P(positive scored above a negative) + P(tie)/2.
    NaN for a class without positives or without negatives."""
    return _ClassCurves(*_check(labels, scores)).auroc()


def ranking_loss(labels, scores):
    """Mean over samples of the fraction of (positive, negative) label pairs with the negative
    scored at least as high as the positive (sorted within each sample, ties counted as wrong)."""
    labels, scores = _check(labels, scores)
    wrong, positives, _ = _per_sample_ranks(labels, scores)
    return _ranking_loss(wrong, positives, labels.shape[1])


def _ranking_loss(wrong, positives, classes):
    pairs = positives * (classes - positives)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.where(pairs > 0, wrong / pairs, 0.0).mean())


def coverage_error(labels, scores):
    """Mean over samples of how many labels, best first, cover every positive (ties counted in)."""
    return float(_per_sample_ranks(*_check(labels, scores))[2].mean())


def _per_sample_ranks(labels, scores):
    """Per sample: the wrongly ordered (positive, negative) pairs, the positives and the coverage.

    Each row is sorted worst first with positives ahead of tied negatives, so the negatives after a
    positive at position j are exactly those scored at least as high: a row's wrong pairs are the sum
    of (C - 1 - j) over its positives minus 0 + 1 + ... + (P - 1). Everything from the first positive
    on scores at least as high as it, so the coverage is C minus that position (0 without positives).
    Both row sums come from one float32 matrix product (exact: every term is an integer below 2**24).
    """
    classes = scores.shape[1]
    key = _order_keys(labels, scores, descending=False)
    key.sort(axis=1)
    is_positive = np.bitwise_and(key, 1, out=key).astype(np.float32)
    weights = np.stack([np.ones(classes), classes - 1.0 - np.arange(classes)], axis=1).astype(np.float32)
    positives, after_sum = (is_positive @ weights).T.astype(np.float64)
    wrong = after_sum - positives * (positives - 1) / 2
    first_positive = np.argmax(is_positive, axis=1) if classes else np.zeros(len(scores), dtype=np.int64)
    covered = np.where(positives > 0, classes - first_positive, 0)
    return wrong, positives, covered


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
    """All metrics of scores (probabilities) against multi-hot labels, both (N, C).

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
    counts = curves.confusion(thresholds)
    f_beta, g_beta = _beta_scores(*counts, beta)
    f1, _ = _beta_scores(*counts, 1)
    wrong, positives, covered = _per_sample_ranks(labels, scores)
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
        "ranking_loss": _ranking_loss(wrong, positives, labels.shape[1]),
        "coverage_error": float(covered.mean()),
        "hamming_loss": float((counts[1].sum() + counts[2].sum()) / labels.size),
        "subset_accuracy": float(np.mean(np.einsum("ij->i", (predictions != labels).astype(np.float64)) == 0)),
        "thresholds": thresholds,
        "beta": beta,
    }


def _as_binary(name, values):
    """values (0/1 or bool) as bool, or a clear error at the first entry that is neither."""
    if values.dtype == bool:
        return values
    not_binary = (values != 0) & (values != 1)
    if not_binary.any():
        row, column = np.argwhere(not_binary)[0]
        raise ValueError(f"{name} must be binary (0/1 or bool): {np.count_nonzero(not_binary)} entries are not, "
                         f"the first is {values[row, column]} at row {row}, column {column}")
    return values == 1


def challenge_score(labels, predictions, class_codes):
    """The PhysioNet/CinC Challenge 2021 score of binary predictions against binary labels, both (N, C),
    whose columns are the SNOMED CT codes `class_codes`.

    Scored over the Challenge classes the codes cover (equivalent codes merged: a merged class is
    positive where any of its codes is). A recording with n classes positive in its labels or its
    predictions (n >= 1) earns weight[j, k] / n for every true class j and predicted class k. The sum
    over recordings is normalised so that predicting exactly the labels scores 1 and predicting sinus
    rhythm alone everywhere scores 0 (0 when those two are equal).

    Recording i's credit is (labels_i @ weights) . predictions_i / n_i, so the one matrix product
    labels @ weights (N, classes) serves the model, the labels and the sinus-rhythm baseline alike.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    _check_shapes(labels, predictions, "predictions")
    labels, predictions = _as_binary("labels", labels), _as_binary("predictions", predictions)
    class_codes = [str(code) for code in class_codes]
    if len(class_codes) != labels.shape[1]:
        raise ValueError(f"class_codes must name every column: {len(class_codes)} codes for {labels.shape[1]} classes")
    unknown = [code for code in class_codes if code not in CHALLENGE_CLASS_OF]
    if unknown:
        raise ValueError(f"class codes not in the Challenge 2021 weight table: {', '.join(unknown)}")
    table_index, first_column, column_class = np.unique([CHALLENGE_CLASS_OF[code] for code in class_codes],
                                                        return_index=True, return_inverse=True)
    sinus = np.flatnonzero(table_index == CHALLENGE_CLASS_OF[SINUS_RHYTHM])
    if not sinus.size:
        raise ValueError(f"the Challenge score is undefined without sinus rhythm ({SINUS_RHYTHM}) among the "
                         f"class codes: {', '.join(class_codes)}")
    labels, predictions = (_merge_equivalent(values, first_column, column_class) for values in (labels, predictions))
    inactive = np.zeros_like(labels)
    inactive[:, sinus[0]] = True
    credit_rates = labels.astype(np.float64) @ CHALLENGE_WEIGHTS[np.ix_(table_index, table_index)]

    def credit(guesses):
        n = np.maximum(np.count_nonzero(labels | guesses, axis=1), 1)
        return float(np.sum((credit_rates * guesses).sum(axis=1) / n))

    observed, correct, baseline = credit(predictions), credit(labels), credit(inactive)
    return 0.0 if correct == baseline else (observed - baseline) / (correct - baseline)


def challenge_score_or_nan(labels, predictions, class_codes):
    """challenge_score of 0/1 (or probability) labels, or NaN (with the reason logged) where the
    classes are not SNOMED codes of the Challenge table, as in a file converted without them."""
    try:
        return challenge_score(labels > 0.5, predictions, class_codes)
    except ValueError as error:
        log.warning("no Challenge 2021 score: %s", error)
        return float("nan")


def _merge_equivalent(values, first_column, column_class):
    """One bool column per Challenge class, positive where any of its codes' columns is: the first
    column of each class, OR-ed with the few columns of equivalent codes."""
    merged = values[:, first_column]
    for column in np.setdiff1d(np.arange(values.shape[1]), first_column):
        merged[:, column_class[column]] |= values[:, column]
    return merged


# ---------------------------------------------------------------------------------------------
# The network's scores over a loader
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(net, loader, device, leads=NUM_LEADS):
    """(labels as float64, sigmoid scores of the main head as float32: the width the net computes
    them in, which the metrics sort fastest) over a loader, as numpy arrays."""
    was_training = net.training
    net.eval()
    labels, scores = [], []
    for x, y in loader:
        x = x.to(device)
        if leads != NUM_LEADS:
            x = mask_leads(x, leads)
        scores.append(torch.sigmoid(net(x)[1]).float().cpu())
        labels.append(y)
    net.train(was_training)
    return torch.cat(labels).double().numpy(), torch.cat(scores).numpy()
