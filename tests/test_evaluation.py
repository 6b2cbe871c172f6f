"""The metrics against sklearn and hand-computed values, including degenerate classes."""
import numpy as np
import pytest
from sklearn import metrics

import evaluation


def random_case(n=400, c=6, seed=0, decimals=2):
    """Correlated scores rounded so ties occur; every class has positives and negatives."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, c)) < rng.uniform(0.1, 0.5, c)).astype(float)
    labels[0], labels[1] = 1, 0
    scores = np.round(np.clip(rng.normal(0.4 + 0.3 * labels, 0.2), 0, 1), decimals)
    return labels, scores


@pytest.mark.parametrize("decimals", [1, 2, 6])
def test_threshold_free_metrics_equal_sklearn(decimals):
    labels, scores = random_case(decimals=decimals)
    result = evaluation.evaluate(labels, scores)
    auc = [metrics.roc_auc_score(labels[:, k], scores[:, k]) for k in range(labels.shape[1])]
    ap = [metrics.average_precision_score(labels[:, k], scores[:, k]) for k in range(labels.shape[1])]
    np.testing.assert_allclose(result["auc_roc_per_class"], auc, atol=1e-12)
    np.testing.assert_allclose(result["auc_roc_macro"], metrics.roc_auc_score(labels, scores, average="macro"), atol=1e-12)
    np.testing.assert_allclose(result["ap_per_class"], 100 * np.array(ap), atol=1e-10)
    np.testing.assert_allclose(result["Map_value"], 100 * np.mean(ap), atol=1e-10)
    assert result["ranking_loss"] == pytest.approx(metrics.label_ranking_loss(labels, scores), abs=1e-12)
    assert result["coverage_error"] == pytest.approx(metrics.coverage_error(labels, scores), abs=1e-12)


def test_thresholded_metrics_equal_sklearn():
    labels, scores = random_case(seed=1)
    thresholds = np.linspace(0.3, 0.7, labels.shape[1])
    result = evaluation.evaluate(labels, scores, thresholds)
    predictions = scores >= thresholds
    assert result["hamming_loss"] == pytest.approx(metrics.hamming_loss(labels, predictions))
    assert result["subset_accuracy"] == pytest.approx(metrics.accuracy_score(labels, predictions))
    fbeta = metrics.fbeta_score(labels, predictions, beta=2, average=None, zero_division=1.0)
    f1 = metrics.f1_score(labels, predictions, average=None, zero_division=1.0)
    np.testing.assert_allclose(result["Fbeta_per_class"], fbeta, atol=1e-12)
    assert result["F1score_b"] == pytest.approx(fbeta.mean())
    assert result["F1score"] == pytest.approx(f1.mean())


def test_hand_computed_small_case():
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    scores = np.array([[0.9, 0.2], [0.8, 0.6], [0.3, 0.6], [0.1, 0.7]])
    result = evaluation.evaluate(labels, scores, thresholds=np.array([0.5, 0.5]))
    # class 0: order 0.9(+) 0.8(-) 0.3(+) 0.1(-): AP = (1/1 + 2/3)/2; AUC = 3 of 4 pairs
    # class 1: order 0.7(-) {0.6(+), 0.6(+)} 0.2(-): AP = 2/3 (tied pair shares precision at 3);
    #          AUC = each positive beats one negative, ties none: 2/4
    np.testing.assert_allclose(result["ap_per_class"], [100 * (1 + 2 / 3) / 2, 100 * 2 / 3])
    np.testing.assert_allclose(result["auc_roc_per_class"], [0.75, 0.5])
    # predictions: class 0 -> rows 0,1: TP 1 FP 1 FN 1; class 1 -> rows 1,2,3: TP 2 FP 1 FN 0
    f0, f1 = 5 * 1 / (5 * 1 + 1 + 4 * 1), 5 * 2 / (5 * 2 + 1 + 0)
    g0, g1 = 1 / (1 + 1 + 2 * 1), 2 / (2 + 1 + 0)
    np.testing.assert_allclose(result["Fbeta_per_class"], [f0, f1])
    np.testing.assert_allclose(result["Gbeta_per_class"], [g0, g1])
    assert result["Gbeta_score"] == pytest.approx((g0 + g1) / 2)
    assert result["hamming_loss"] == pytest.approx(3 / 8)     # row0 ok, row1 FP0, row2 FN0, row3 FP1
    assert result["subset_accuracy"] == pytest.approx(1 / 4)
    # ranking: row1 (pos 1 at 0.6 vs neg 0 at 0.8) wrong; row2 (pos 0.3 vs pos 0.6, no negatives) 0
    assert result["ranking_loss"] == pytest.approx(1 / 4)
    # coverage: row0 1, row1 2, row2 2, row3 0 (no positives)
    assert result["coverage_error"] == pytest.approx(5 / 4)


def test_map_is_mean_precision_at_positive_ranks_without_ties():
    rng = np.random.default_rng(3)
    labels = (rng.random((50, 3)) < 0.3).astype(int)
    labels[0] = 1
    scores = rng.random((50, 3))
    expected = []
    for k in range(3):
        order = np.argsort(-scores[:, k])
        hits = labels[order, k]
        expected.append(np.mean([hits[:i + 1].mean() for i in np.flatnonzero(hits)]))
    assert evaluation.evaluate(labels, scores)["Map_value"] == pytest.approx(100 * np.mean(expected))


def test_degenerate_classes_have_defined_output():
    labels, scores = random_case(n=60, c=4, seed=4)
    labels[:, 1] = 0   # no positives
    labels[:, 2] = 1   # no negatives
    result = evaluation.evaluate(labels, scores, evaluation.find_thresholds(labels, scores))
    assert np.isnan(result["auc_roc_per_class"][[1, 2]]).all()
    assert np.isnan(result["ap_per_class"][1]) and np.isfinite(result["ap_per_class"][2])
    assert result["auc_roc_macro"] == pytest.approx(np.mean(result["auc_roc_per_class"][[0, 3]]))
    assert result["Map_value"] == pytest.approx(np.mean(result["ap_per_class"][[0, 2, 3]]))
    # no positives: the threshold predicts none here, which scores F-beta 1 (nothing to find)
    assert not (scores[:, 1] >= result["thresholds"][1]).any()
    assert result["Fbeta_per_class"][1] == 1.0 and result["Gbeta_per_class"][1] == 1.0
    for key in ("F1score_b", "Gbeta_score", "F1score", "ranking_loss", "coverage_error", "hamming_loss"):
        assert np.isfinite(result[key]), key
    empty = evaluation.evaluate(np.zeros((5, 2)), np.full((5, 2), 0.5))
    assert np.isnan(empty["auc_roc_macro"]) and np.isnan(empty["Map_value"])


def test_thresholds_maximise_fbeta_over_every_candidate():
    labels, scores = random_case(n=120, c=5, seed=5)
    thresholds = evaluation.find_thresholds(labels, scores)
    for k in range(labels.shape[1]):
        candidates = np.unique(scores[:, k])
        best = max(metrics.fbeta_score(labels[:, k], scores[:, k] >= t, beta=2) for t in candidates)
        found = metrics.fbeta_score(labels[:, k], scores[:, k] >= thresholds[k], beta=2)
        assert found == pytest.approx(best, abs=1e-12)
        assert thresholds[k] in candidates
        # ties go to the highest threshold reaching the best F-beta
        better_or_equal = [t for t in candidates
                           if metrics.fbeta_score(labels[:, k], scores[:, k] >= t, beta=2) >= best - 1e-12]
        assert thresholds[k] == max(better_or_equal)


def test_bad_inputs_say_what_is_wrong():
    labels, scores = random_case(n=10, c=3)
    with pytest.raises(ValueError, match="samples, classes"):
        evaluation.evaluate(labels, scores[:, :2])
    bad = scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        evaluation.evaluate(labels, bad)
    with pytest.raises(ValueError, match="probabilities"):
        evaluation.evaluate(labels, scores * 3 - 1)
    with pytest.raises(ValueError, match="one entry per class"):
        evaluation.evaluate(labels, scores, thresholds=[0.5])


def test_float32_scores_score_exactly_as_their_float64_values():
    """float32 scores take the int32-key path; every metric and threshold must equal the float64 path's
    on the same values, ties, a class without positives, 0, -0.0 and 1 included."""
    labels, scores = random_case(n=300, c=5, seed=6, decimals=3)
    labels[:, 4] = 0
    scores = scores.astype(np.float32)
    scores[:3, 0], scores[3:6, 1] = (0.0, -0.0, 1.0), (1.0, 0.0, -0.0)
    wide = scores.astype(np.float64)
    thresholds_32, thresholds_64 = evaluation.find_thresholds(labels, scores), evaluation.find_thresholds(labels, wide)
    np.testing.assert_array_equal(thresholds_32, thresholds_64)
    narrow_result = evaluation.evaluate(labels, scores, thresholds_32)
    wide_result = evaluation.evaluate(labels, wide, thresholds_64)
    for key, value in wide_result.items():
        np.testing.assert_array_equal(narrow_result[key], value, err_msg=key)
    auc = [metrics.roc_auc_score(labels[:, k], wide[:, k]) for k in range(4)]
    np.testing.assert_allclose(narrow_result["auc_roc_per_class"][:4], auc, atol=1e-12)


# --- PhysioNet/CinC Challenge 2021 score --------------------------------------------------------
NSR, AF, AFL, CRBBB, RBBB = "426783006", "164889003", "164890007", "713427006", "59118001"


def test_challenge_weights_equal_the_official_table(shared_data):
    import csv
    import helper_code

    with open(shared_data / "weights.csv", newline="") as table:
        rows = list(csv.reader(table))
    header = rows[0][1:]
    assert tuple(header) == helper_code.CHALLENGE_CLASSES
    assert [row[0] for row in rows[1:]] == header
    assert [[float(text) for text in row[1:]] for row in rows[1:]] == \
        [[eightieths / 80 for eightieths in row] for row in helper_code.CHALLENGE_WEIGHTS_80THS]
    np.testing.assert_array_equal(evaluation.CHALLENGE_WEIGHTS, [[float(text) for text in row[1:]] for row in rows[1:]])


def test_every_scored_code_has_a_challenge_class():
    """The 30 scored codes are the 26 classes with the 4 equivalent pairs split."""
    import helper_code

    assert sorted(helper_code.CHALLENGE_CLASS_OF) == sorted(code for code, _, _, _ in helper_code.SCORED_LABELS)
    assert sorted(set(helper_code.CHALLENGE_CLASS_OF.values())) == list(range(26))


def test_challenge_score_hand_computed_with_merged_pair():
    # columns NSR, CRBBB, RBBB, AF; CRBBB and RBBB are one class, so the classes are AF, RBBB, NSR with
    # weights AF-RBBB 0.4, AF-NSR 0.25, RBBB-NSR 0.35 (1 on the diagonal)
    codes = [NSR, CRBBB, RBBB, AF]
    labels = np.array([[0, 1, 0, 0],     # CRBBB
                       [0, 0, 0, 1],     # AF
                       [1, 1, 1, 0]])    # NSR + both RBBB codes = {NSR, RBBB}
    predictions = np.array([[0, 0, 1, 0],   # RBBB: the same class, n = 1: 1
                            [1, 0, 0, 0],   # NSR: n = 2 (AF, NSR): 0.25 / 2 = 0.125
                            [1, 0, 0, 0]])  # NSR: n = 2: (NSR,NSR) 1/2 + (RBBB,NSR) 0.35/2 = 0.675
    observed = 1 + 0.125 + 0.675                         # 1.8
    # correct: 1 + 1 + (1 + 0.35 + 0.35 + 1) / 2 = 3.35
    correct = 1 + 1 + 2.7 / 2
    # inactive (NSR alone): RBBB vs NSR 0.35/2 + AF vs NSR 0.25/2 + third as predicted 0.675 = 0.975
    inactive = 0.175 + 0.125 + 0.675
    expected = (observed - inactive) / (correct - inactive)   # 0.825 / 2.375
    assert evaluation.challenge_score(labels, predictions, codes) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.825 / 2.375)
    # the same recordings with the pair merged by hand into one RBBB column score the same
    merged_labels = np.array([[0, 1, 0], [0, 0, 1], [1, 1, 0]])
    merged_predictions = np.array([[0, 1, 0], [1, 0, 0], [1, 0, 0]])
    assert evaluation.challenge_score(merged_labels, merged_predictions, [NSR, RBBB, AF]) == pytest.approx(expected, abs=1e-12)


def test_challenge_score_partial_credit_from_off_diagonal_weight():
    # columns NSR, AF, AFL; AF-AFL 0.5, AF-NSR 0.25
    labels = np.array([[0, 1, 0], [1, 0, 0]])
    predictions = np.array([[0, 0, 1], [1, 0, 0]])
    # observed: AF called AFL, n = 2: 0.5/2 = 0.25; NSR right: 1 -> 1.25; correct 2
    # inactive: AF vs NSR, n = 2: 0.25/2 = 0.125; NSR right: 1 -> 1.125
    # score = (1.25 - 1.125) / (2 - 1.125) = 0.125 / 0.875 = 1/7
    assert evaluation.challenge_score(labels, predictions, [NSR, AF, AFL]) == pytest.approx(1 / 7, abs=1e-12)
    # calling AF sinus rhythm instead earns only what the inactive model does: 0
    assert evaluation.challenge_score(labels, [[1, 0, 0], [1, 0, 0]], [NSR, AF, AFL]) == 0.0


def test_challenge_score_perfect_and_inactive_models():
    rng = np.random.default_rng(7)
    codes = [AF, NSR, CRBBB, AFL, RBBB, "270492004"]
    labels = rng.random((200, len(codes))) < 0.3
    assert evaluation.challenge_score(labels, labels, codes) == 1.0
    inactive = np.zeros_like(labels)
    inactive[:, 1] = True
    assert evaluation.challenge_score(labels, inactive, codes) == 0.0
    # predicting everything everywhere is worse than predicting the labels
    assert evaluation.challenge_score(labels, np.ones_like(labels), codes) < 1.0


def test_challenge_score_is_zero_when_correct_equals_inactive():
    # every recording is sinus rhythm alone or unlabelled: predicting the labels earns what NSR alone
    # earns (1 per NSR recording, 0 per unlabelled one), so any model scores 0
    labels = np.array([[1, 0], [0, 0], [1, 0]])
    for predictions in ([[0, 1], [1, 1], [1, 0]], labels):
        assert evaluation.challenge_score(labels, predictions, [NSR, AF]) == 0.0


def test_challenge_score_ignores_column_order():
    rng = np.random.default_rng(8)
    codes = np.array([NSR, AF, AFL, CRBBB, RBBB, "164909002", "733534002"])
    labels, predictions = rng.random((2, 50, len(codes))) < 0.3
    order = rng.permutation(len(codes))
    assert evaluation.challenge_score(labels[:, order], predictions[:, order], codes[order]) == \
        pytest.approx(evaluation.challenge_score(labels, predictions, codes), abs=1e-12)


def loop_challenge_score(labels, predictions, class_codes):
    """The Challenge score written out recording by recording, pair by pair, from the table."""
    import helper_code

    row_of = {code: i for i, merged in enumerate(helper_code.CHALLENGE_CLASSES) for code in merged.split("|")}
    classes = sorted({row_of[code] for code in class_codes})

    def merged(row):
        return [any(row[c] for c, code in enumerate(class_codes) if row_of[code] == k) for k in classes]

    def credit(guesses):
        total = 0.0
        for truth, guess in zip(labels, guesses):
            truth, guess = merged(truth), merged(guess)
            n = max(1, sum(t or g for t, g in zip(truth, guess)))
            for j, true_class in enumerate(classes):
                for k, predicted_class in enumerate(classes):
                    if truth[j] and guess[k]:
                        total += helper_code.CHALLENGE_WEIGHTS_80THS[true_class][predicted_class] / 80 / n
        return total

    sinus_only = [[code == NSR for code in class_codes]] * len(labels)
    observed, correct, inactive = credit(predictions), credit(labels), credit(sinus_only)
    return 0.0 if correct == inactive else (observed - inactive) / (correct - inactive)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_challenge_score_equals_loop_over_recordings(seed):
    rng = np.random.default_rng(seed)
    codes = [NSR, CRBBB, RBBB, "284470004", "63593006", AF, AFL, "164909002", "733534002", "270492004"]
    labels = rng.random((120, len(codes))) < rng.uniform(0.05, 0.4, len(codes))
    labels[:5] = False                                     # unlabelled recordings: n stays 1
    noise = rng.random(labels.shape) < 0.15
    predictions = (labels ^ noise).astype(np.float32)      # 0/1 floats are binary too
    expected = loop_challenge_score(labels, predictions, codes)
    assert evaluation.challenge_score(labels.astype(int), predictions, codes) == pytest.approx(expected, rel=1e-12)


def test_challenge_score_works_for_every_dataset_class_list():
    import helper_code

    rng = np.random.default_rng(9)
    for dataset in [*helper_code.DATASET_SOURCE, helper_code.DEMO_DATASET]:
        codes = helper_code.dataset_classes(dataset)
        assert NSR in codes, dataset
        labels = rng.random((300, len(codes))) < 0.2
        predictions = labels ^ (rng.random(labels.shape) < 0.1)
        assert evaluation.challenge_score(labels, labels, codes) == 1.0, dataset
        assert evaluation.challenge_score(labels, predictions, codes) == \
            pytest.approx(loop_challenge_score(labels, predictions, codes), rel=1e-12), dataset


def test_challenge_score_bad_inputs_say_what_is_wrong():
    labels = np.array([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="sinus rhythm"):
        evaluation.challenge_score(labels, labels, [AF, AFL])
    with pytest.raises(ValueError, match="not in the Challenge 2021 weight table: 12345, 55827005"):
        evaluation.challenge_score(np.zeros((2, 4)), np.zeros((2, 4)), [NSR, "12345", AF, "55827005"])
    with pytest.raises(ValueError, match="3 codes for 2 classes"):
        evaluation.challenge_score(labels, labels, [NSR, AF, AFL])
    with pytest.raises(ValueError, match="labels and predictions must both be"):
        evaluation.challenge_score(labels, labels[:, :1], [NSR, AF])
    with pytest.raises(ValueError, match=r"labels must be binary.*1 entries are not, the first is 0\.5 at row 1, column 0"):
        evaluation.challenge_score([[1, 0], [0.5, 1]], labels, [NSR, AF])
    with pytest.raises(ValueError, match="predictions must be binary"):
        evaluation.challenge_score(labels, [[2, 0], [0, 1]], [NSR, AF])
    with pytest.raises(ValueError, match="predictions must be binary"):
        evaluation.challenge_score(labels, [[np.nan, 0], [0, 1]], [NSR, AF])
