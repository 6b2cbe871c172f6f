"""Data path: label facts, real-record conversion, bad input, atomicity, streaming, CODE-15, splits, demo."""
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from fractions import Fraction

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import torch
import wfdb
from scipy.signal import butter, find_peaks, resample_poly, sosfiltfilt
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import datacollection as dc
import ecg_dataset as ds
import main
import synthetic_ecg as synth
from helper_code import (DATASET_SOURCE, DATASETS, DEMO_CLASSES, DEMO_DATASET, LABEL_ABBREVIATION, SCORED_LABELS,
                         SOURCES, dataset_classes, h5_name)

from conftest import REPO_ROOT


def reference_preprocess(physical, fs):
    """Independent of the project: per-lead SOS band-pass, numpy standardise, zero-pad/cut."""
    if fs != 500:
        ratio = Fraction(500) / Fraction(int(fs))
        physical = resample_poly(physical, ratio.numerator, ratio.denominator, axis=-1)
    sos = butter(3, [1, 47], btype="bandpass", fs=500, output="sos")
    out = np.zeros((12, 1, 6144))
    for lead in range(12):
        filtered = sosfiltfilt(sos, physical[lead])
        scaled = (filtered - filtered.mean()) / filtered.std()
        n = min(6144, len(scaled))
        out[lead, 0, :n] = scaled[:n]
    return out


def parse_header(path):
    """Minimal WFDB header reading written for the test: fs, gains, baselines, Dx codes."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    _, n_sig, fs, _ = lines[0].split()[:4]
    gains, baselines = [], []
    for line in lines[1:1 + int(n_sig)]:
        gain_field = line.split()[2]
        gains.append(float(gain_field.split("(")[0]))
        baselines.append(int(gain_field.split("(")[1].split(")")[0]))
    dx = next(line.split(":", 1)[1] for line in lines if line.startswith("# Dx:"))
    return float(fs), np.array(gains), np.array(baselines), [c.strip() for c in dx.split(",")]


def write_good_records(folder, names, seed=0, codes=("426783006",)):
    rng = np.random.default_rng(seed)
    signals = synth.synthesize_ecg(*synth.sample_conditions(len(names), rng), 500, 5000, rng)
    for name, signal in zip(names, signals):
        synth.write_challenge_record(folder, name, signal, 500, list(codes), np.full(12, 1000.0),
                                  rng.integers(-20, 20, 12), 60, "Female")


def file_digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Label facts
# ---------------------------------------------------------------------------------------------
def test_class_selection_counts_and_literal_codes():
    counts = {d: len(dataset_classes(d)) for d in DATASETS}
    assert counts == {"WFDB_Ga": 18, "WFDB_PTBXL": 19, "WFDB_Ningbo": 23, "WFDB_ChapmanShaoxing": 16}
    table_order = [code for code, *_ in SCORED_LABELS]
    for dataset in DATASETS:
        classes = dataset_classes(dataset)
        assert classes == sorted(classes, key=table_order.index)
        column = SOURCES.index(DATASET_SOURCE[dataset])
        assert all(dict((c, n) for c, _, _, n in SCORED_LABELS)[code][column] > 200 for code in classes)
    georgia = dataset_classes("WFDB_Ga")
    assert "59118001" in georgia and "713427006" not in georgia      # RBBB kept, CRBBB (28) not merged in
    assert "713427006" in dataset_classes("WFDB_Ningbo") and "59118001" not in dataset_classes("WFDB_Ningbo")
    assert dataset_classes(DEMO_DATASET) == list(DEMO_CLASSES)
    with pytest.raises(KeyError, match="unknown dataset"):
        dataset_classes("WFDB_Nowhere")


def test_label_table_matches_challenge_csv(shared_data):
    table = pd.read_csv(shared_data / "dx_mapping_scored.csv", dtype={"SNOMEDCTCode": str})
    assert [row[0] for row in SCORED_LABELS] == list(table["SNOMEDCTCode"])
    assert [row[1] for row in SCORED_LABELS] == list(table["Abbreviation"])
    assert [row[2] for row in SCORED_LABELS] == list(table["Dx"])
    assert [list(row[3]) for row in SCORED_LABELS] == table[list(SOURCES)].to_numpy().tolist()


# ---------------------------------------------------------------------------------------------
# Real records
# ---------------------------------------------------------------------------------------------
def test_real_records_read_and_convert(shared_data, tmp_path):
    sample = shared_data / "cinc2021-sample"
    for header in sorted(sample.glob("*.hea")):
        fs, gains, baselines, codes = parse_header(header)
        adc = scipy.io.loadmat(header.with_suffix(".mat"))["val"].astype(np.float64)
        read_codes, physical, read_fs = dc.read_challenge_record(header)
        assert read_fs == fs == 500
        assert read_codes == codes
        np.testing.assert_allclose(physical, (adc - baselines[:, None]) / gains[:, None], rtol=0, atol=1e-12)

    # Nested sub-folders as in the official download.
    layout = {"WFDB_Ga": "E0*", "WFDB_PTBXL": "HR0*"}
    for dataset, pattern in layout.items():
        nested = tmp_path / "OriginalData" / dataset / "g1"
        nested.mkdir(parents=True)
        for path in sample.glob(pattern):
            shutil.copy(path, nested / path.name)
        out = dc.convert_challenge(tmp_path / "OriginalData" / dataset, tmp_path / "out", dataset, workers=1, chunk=4)
        assert out.name == h5_name(dataset, len(dataset_classes(dataset)))
        classes = dataset_classes(dataset)
        with h5py.File(out) as f:
            records, labels = f["record_set"][:], f["label_set"][:]
            names = [n.decode() if isinstance(n, bytes) else n for n in f["record_names"][:]]
            assert list(f.attrs["class_codes"]) == classes
            assert [str(a) for a in f.attrs["class_names"]] == [LABEL_ABBREVIATION[c] for c in classes]
            assert json.loads(f.attrs["preprocessing"])["samples"] == 6144
        expected_names = sorted(p.stem for p in sample.glob(pattern + ".hea")
                                if set(parse_header(p)[3]) & set(classes))
        assert names == expected_names and len(names) > 0
        assert records.shape == (len(names), 12, 1, 6144) and records.dtype == np.float32
        assert labels.shape == (len(names), len(classes))
        for name, record, label in zip(names, records, labels):
            header = sample / f"{name}.hea"
            fs, gains, baselines, codes = parse_header(header)
            adc = scipy.io.loadmat(header.with_suffix(".mat"))["val"].astype(np.float64)
            expected = reference_preprocess((adc - baselines[:, None]) / gains[:, None], fs)
            np.testing.assert_allclose(record, expected, rtol=0, atol=1e-5)
            np.testing.assert_array_equal(label, [float(c in codes) for c in classes])


# ---------------------------------------------------------------------------------------------
# Bad input, missing data, atomic output
# ---------------------------------------------------------------------------------------------
def test_every_bad_input_is_skipped_counted_and_logged(tmp_path, caplog):
    folder = tmp_path / "WFDB_Demo"
    (folder / "sub").mkdir(parents=True)
    write_good_records(folder, ["good1", "good2"])
    write_good_records(folder / "sub", ["good3"], seed=1)
    write_good_records(folder, ["nomat", "garbled", "truncated", "elevenlead", "nanrec", "infrec",
                                "zerolen", "badheader", "nodx", "unscored"], seed=2)
    (folder / "nomat.mat").unlink()
    scipy.io.savemat(folder / "nohea.mat", {"val": np.zeros((12, 5000), np.int16)}, format="4")
    (folder / "garbled.mat").write_bytes(b"not a matlab file")
    (folder / "truncated.mat").write_bytes((folder / "truncated.mat").read_bytes()[:5000])
    lines = (folder / "elevenlead.hea").read_text().splitlines()
    lines[0] = lines[0].replace(" 12 ", " 11 ")
    (folder / "elevenlead.hea").write_text("\n".join(lines[:12] + lines[13:]) + "\n")
    adc = scipy.io.loadmat(folder / "elevenlead.mat")["val"][:11]
    scipy.io.savemat(folder / "elevenlead.mat", {"val": adc}, format="4")
    adc = scipy.io.loadmat(folder / "nanrec.mat")["val"]
    adc[3, 100:110] = -32768  # WFDB's invalid-sample value: NaN in physical units
    scipy.io.savemat(folder / "nanrec.mat", {"val": adc}, format="4")
    text = (folder / "infrec.hea").read_text()
    (folder / "infrec.hea").write_text(text.replace("1000.0(", "1e-320(", 1))  # adc / 1e-320 overflows
    text = (folder / "zerolen.hea").read_text().splitlines()
    text[0] = "zerolen 12 500 0"
    (folder / "zerolen.hea").write_text("\n".join(text) + "\n")
    scipy.io.savemat(folder / "zerolen.mat", {"val": np.zeros((12, 0), np.int16)}, format="4")
    (folder / "badheader.hea").write_text("this is not a WFDB header\n")
    text = (folder / "nodx.hea").read_text()
    (folder / "nodx.hea").write_text("\n".join(l for l in text.splitlines() if not l.startswith("# Dx")) + "\n")
    text = (folder / "unscored.hea").read_text()
    (folder / "unscored.hea").write_text(text.replace("# Dx: 426783006", "# Dx: 67741000119109"))

    with caplog.at_level(logging.INFO, logger="datacollection"):
        out = dc.convert_challenge(folder, tmp_path / "out", DEMO_DATASET, workers=1, chunk=3)
    expected = {"nomat": "missing .mat", "nohea": "missing .hea", "garbled": "unreadable .mat",
                "truncated": "unreadable .mat", "elevenlead": "not 12 leads", "nanrec": "non-finite samples",
                "infrec": "non-finite samples", "zerolen": "zero length", "badheader": "unparseable header",
                "nodx": "unparseable header", "unscored": "no scored class"}
    with h5py.File(out) as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f["record_names"][:]]
        skipped = json.loads(f.attrs["skipped"])
        assert f.attrs["records_found"] == 3 + len(expected)
    assert names == ["good1", "good2", "good3"]
    assert skipped == dict(pd.Series(expected).value_counts())
    for name, reason in expected.items():
        assert any(f"skipped {name}: {reason}" in r.getMessage() for r in caplog.records), (name, reason)
    summary = [r.getMessage() for r in caplog.records if "found 14 records, wrote 3, skipped 11" in r.getMessage()]
    assert summary, "missing per-dataset summary line"


def test_other_sampling_rates_are_resampled_to_500_hz(tmp_path):
    folder = tmp_path / "WFDB_Demo"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for name, fs in (("at250", 250), ("at1000", 1000), ("at500", 500)):
        signal = synth.synthesize_ecg(*synth.sample_conditions(1, rng), fs, 10 * fs, rng)[0]
        synth.write_challenge_record(folder, name, signal, fs, ["426783006"], np.full(12, 500.0), np.zeros(12, int), 40, "Male")
    out = dc.convert_challenge(folder, tmp_path / "out", DEMO_DATASET)
    with h5py.File(out) as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f["record_names"][:]]
        for name, record in zip(names, f["record_set"][:]):
            fs, gains, baselines, _ = parse_header(folder / f"{name}.hea")
            adc = scipy.io.loadmat(folder / f"{name}.mat")["val"].astype(np.float64)
            expected = reference_preprocess((adc - baselines[:, None]) / gains[:, None], fs)
            np.testing.assert_allclose(record, expected, rtol=0, atol=1e-5)
            assert np.all(record[:, 0, 5000:] == 0) and np.any(record[:, 0, 4990:5000] != 0)
    assert names == ["at1000", "at250", "at500"]


def test_missing_dataset_folder_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="PhysioNet/CinC Challenge 2021") as error:
        dc.convert_challenge(tmp_path / "nowhere" / "WFDB_Ga", tmp_path / "out", "WFDB_Ga")
    assert str(tmp_path / "nowhere" / "WFDB_Ga") in str(error.value)
    with pytest.raises(SystemExit, match="WFDB_PTBXL") as exit_error:
        main.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "out"), "--datasets", "WFDB_PTBXL"],
                  prog="datacollection.py")
    assert "PhysioNet" in str(exit_error.value.code)
    with pytest.raises(FileNotFoundError, match="--demo"):
        ds.find_dataset_h5(tmp_path, "WFDB_Ga")
    with pytest.raises(FileNotFoundError, match="CODE-15"):
        dc.convert_code15(tmp_path / "nocode", tmp_path / "out", valid_fraction=0.1, seed=18)
    assert not (tmp_path / "out").exists()


def test_interrupted_conversion_leaves_no_final_file(tmp_path, monkeypatch):
    folder = tmp_path / "WFDB_Demo"
    folder.mkdir()
    write_good_records(folder, [f"r{i}" for i in range(6)])
    real_chunk = dc.convert_challenge_chunk
    calls = []

    def interrupted_after_first_chunk(*args):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_chunk(*args)

    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    good = dc.convert_challenge(folder, existing, DEMO_DATASET, chunk=2)
    digest = file_digest(good)
    monkeypatch.setattr(dc, "convert_challenge_chunk", interrupted_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        dc.convert_challenge(folder, fresh, DEMO_DATASET, chunk=2)
    assert list(fresh.iterdir()) == []
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        dc.convert_challenge(folder, existing, DEMO_DATASET, chunk=2)
    assert list(existing.iterdir()) == [good] and file_digest(good) == digest
    assert ds.find_dataset_h5(existing, DEMO_DATASET) == good


# ---------------------------------------------------------------------------------------------
# Streaming memory and workers
# ---------------------------------------------------------------------------------------------
MEASURE_PEAK = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import datacollection as dc
    from helper_code import PeakMemory
    with PeakMemory("cpu") as peak:
        dc.convert_challenge({folder!r}, {out!r}, "WFDB_Demo", workers=1, chunk=16)
    print(peak.peak_mb)
""")


def test_streaming_peak_memory_flat_in_records(tmp_path):
    peaks = {}
    for n in (64, 256):
        folder = tmp_path / f"n{n}" / "WFDB_Demo"
        folder.mkdir(parents=True)
        synth.write_demo_challenge(folder, n, np.random.default_rng(n))
        script = MEASURE_PEAK.format(repo=str(REPO_ROOT), folder=str(folder), out=str(tmp_path / f"out{n}"))
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        peaks[n] = float(result.stdout.strip().splitlines()[-1])
    assert peaks[256] < 1.2 * peaks[64], peaks


def test_workers_give_identical_output(tiny_demo, tmp_path):
    raw = tiny_demo["raw_dir"] / DEMO_DATASET
    two = dc.convert_challenge(raw, tmp_path, DEMO_DATASET, workers=2, chunk=8)
    with h5py.File(two) as a, h5py.File(tiny_demo["challenge_h5"]) as b:
        for key in ("record_set", "label_set", "record_names"):
            np.testing.assert_array_equal(a[key][:], b[key][:])


# ---------------------------------------------------------------------------------------------
# CODE-15
# ---------------------------------------------------------------------------------------------
def test_code15_converter(tmp_path):
    raw = tmp_path / "CODE15"
    synth.write_demo_code15(raw, 120, np.random.default_rng(3), per_part=50)
    assert sorted(p.name for p in raw.glob("*.hdf5")) == ["exams_part0.hdf5", "exams_part1.hdf5", "exams_part2.hdf5"]
    exams = pd.read_csv(raw / "exams.csv").set_index("exam_id")
    with h5py.File(raw / "exams_part1.hdf5", "r+") as part:
        assert part["tracings"].shape == (50, 4096, 12)
        nan_exam, unknown_exam = int(part["exam_id"][0]), int(part["exam_id"][1])
        tracing = part["tracings"][0]
        tracing[10, 3] = np.nan
        part["tracings"][0] = tracing
        part["exam_id"][1] = 1
        probe_exam, probe = int(part["exam_id"][5]), part["tracings"][5].astype(np.float64)

    train_path, valid_path = dc.convert_code15(raw, tmp_path / "out", valid_fraction=0.25, seed=7, workers=1, chunk=16)
    assert (train_path.name, valid_path.name) == ("CODE15_train_32.hdf5", "CODE15_valid_32.hdf5")
    split = {}
    for path in (train_path, valid_path):
        with h5py.File(path) as f:
            names = [int(n) for n in f["record_names"][:]]
            assert f["record_set"].shape == (len(names), 12, 1, 6144) and f["record_set"].dtype == np.float32
            assert list(f.attrs["class_codes"]) == list(dc.CODE15_LABELS)
            expected = exams.loc[names, list(dc.CODE15_LABELS)].to_numpy(np.float32)
            np.testing.assert_array_equal(f["label_set"][:], expected)
            split[path] = names
            if probe_exam in names:
                row = f["record_set"][names.index(probe_exam)]
                np.testing.assert_allclose(row, reference_preprocess(probe.T, 400), rtol=0, atol=1e-5)
    train, valid = set(split[train_path]), set(split[valid_path])
    assert not train & valid
    assert train | valid == set(exams.index) - {nan_exam, unknown_exam}
    assert not set(exams.loc[list(train), "patient_id"]) & set(exams.loc[list(valid), "patient_id"])
    assert 0.1 < len(set(exams.loc[list(valid), "patient_id"])) / exams["patient_id"].nunique() < 0.4

    again = dc.convert_code15(raw, tmp_path / "again", valid_fraction=0.25, seed=7, workers=2, chunk=16)
    with h5py.File(again[1]) as f:
        assert [int(n) for n in f["record_names"][:]] == split[valid_path]
    other = dc.convert_code15(raw, tmp_path / "other", valid_fraction=0.25, seed=8, workers=1, chunk=16)
    with h5py.File(other[1]) as f:
        assert [int(n) for n in f["record_names"][:]] != split[valid_path]


# ---------------------------------------------------------------------------------------------
# Splits and lazy datasets
# ---------------------------------------------------------------------------------------------
def write_label_file(path, labels):
    with h5py.File(path, "w") as f:
        f.create_dataset("record_set", data=np.arange(len(labels) * 12 * 8, dtype=np.float32).reshape(-1, 12, 1, 8))
        f.create_dataset("label_set", data=labels.astype(np.float32))
        f.attrs["class_codes"] = [f"c{i}" for i in range(labels.shape[1])]
        f.attrs["class_names"] = [f"name{i}" for i in range(labels.shape[1])]


def test_iterative_stratification_splits(tmp_path):
    rng = np.random.default_rng(0)
    prevalence = np.array([0.5, 0.3, 0.15, 0.08, 0.05, 0.03, 0.02])
    labels = (rng.random((3000, len(prevalence))) < prevalence).astype(np.float32)
    path = tmp_path / "labels.hdf5"
    write_label_file(path, labels)
    data = ds.load_experiment_datasets(path, finetune_label_ratio=0.1, seed=18)
    train, valid, test = (set(d.indices.tolist()) for d in (data.train, data.valid, data.test))
    assert not (train & valid or train & test or valid & test)
    assert train | valid | test == set(range(3000))
    pool = len(train) + len(valid)
    assert abs(pool - 300) <= 3 and abs(len(valid) - 0.2 * pool) <= 3
    pool_labels = labels[sorted(train | valid)]
    # Stratified: each class's share of the pool is its share of the data, far tighter than random.
    np.testing.assert_allclose(pool_labels.sum(0), 0.1 * labels.sum(0), atol=1.01)
    np.testing.assert_allclose(labels[sorted(train)].sum(0), 0.8 * pool_labels.sum(0), atol=1.01)
    assert (data.train.labels.sum(0) > 0).all()
    np.testing.assert_allclose(data.positive_rates, pool_labels.mean(0))
    assert data.positive_probably == pytest.approx(pool_labels.mean(0).mean())
    assert data.class_codes == [f"c{i}" for i in range(7)] and data.class_names[0] == "name0"

    same = ds.load_experiment_datasets(path, finetune_label_ratio=0.1, seed=18)
    other = ds.load_experiment_datasets(path, finetune_label_ratio=0.1, seed=19)
    for a, b in zip(data[:3], same[:3]):
        np.testing.assert_array_equal(a.indices, b.indices)
    assert set(other.test.indices.tolist()) != test


def test_rare_class_reaches_train_when_data_allows():
    labels = np.zeros((400, 3), bool)
    labels[:, 0] = True
    labels[:60, 1] = True        # 60 positives: 6 in a 10% pool, ~5 in train
    labels[100:103, 2] = True    # 3 positives: 0.3 expected in the pool, so none required
    subset = ds.iterative_stratification(labels, [0.1, 0.9], np.random.default_rng(1))
    assert labels[subset == 0, 1].sum() == 6
    assert (subset == 0).sum() == 40


def test_ecgh5dataset_is_lazy_and_per_process(tmp_path):
    labels = (np.random.default_rng(1).random((20, 4)) < 0.4).astype(np.float32)
    path = tmp_path / "small.hdf5"
    write_label_file(path, labels)
    dataset = ds.ECGH5Dataset(path, indices=[3, 7, 11])
    assert len(dataset) == 3 and dataset.num_classes == 4 and dataset._records is None
    x, y = dataset[1]
    assert x.dtype == torch.float32 and x.shape == (12, 1, 8)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(x.numpy(), f["record_set"][7])
    np.testing.assert_array_equal(y.numpy(), labels[7])
    np.testing.assert_array_equal(dataset.labels, labels[[3, 7, 11]])
    reduced = ds.ECGH5Dataset(path, indices=[7], leads=["II", "V1", "V5"])
    kept = reduced[0][0].abs().sum(dim=(1, 2)) > 0
    assert kept.tolist() == [i in (1, 6, 10) for i in range(12)]

    loader = torch.utils.data.DataLoader(ds.ECGH5Dataset(path), batch_size=5, num_workers=2)
    xs = torch.cat([batch[0] for batch in loader])
    with h5py.File(path) as f:
        np.testing.assert_array_equal(xs.numpy(), f["record_set"][:])


# ---------------------------------------------------------------------------------------------
# Demo
# ---------------------------------------------------------------------------------------------
def test_demo_formats_and_layout(tiny_demo):
    raw = tiny_demo["raw_dir"]
    assert tiny_demo["challenge_h5"] == raw.parent / "Preprocessed_dataset" / h5_name(DEMO_DATASET, 7)
    assert ds.find_dataset_h5(raw.parent / "Preprocessed_dataset", DEMO_DATASET) == tiny_demo["challenge_h5"]
    header = raw / DEMO_DATASET / "D00000.hea"
    fs, gains, baselines, codes = parse_header(header)
    adc = scipy.io.loadmat(header.with_suffix(".mat"))["val"]
    assert adc.dtype == np.int16 and adc.shape == (12, 5000) and fs == 500
    record = wfdb.rdrecord(str(header.with_suffix("")))
    np.testing.assert_allclose(record.p_signal.T, (adc - baselines[:, None]) / gains[:, None], atol=1e-12)
    assert set(codes) <= set(DEMO_CLASSES)
    exams = pd.read_csv(raw / "CODE15" / "exams.csv")
    assert {"exam_id", "patient_id", "trace_file", "normal_ecg", *dc.CODE15_LABELS} <= set(exams.columns)
    with h5py.File(raw / "CODE15" / "exams_part0.hdf5") as part:
        assert part["tracings"].shape[1:] == (4096, 12) and part["exam_id"].shape == part["tracings"].shape[:1]
    with h5py.File(tiny_demo["challenge_h5"]) as f:
        assert f["record_set"].shape == (200, 12, 1, 6144)
        assert (f["label_set"][:].sum(0) >= 10).all()
    for key in ("code15_train", "code15_valid"):
        with h5py.File(tiny_demo[key]) as f:
            assert f["label_set"].shape[1] == 6 and len(f["record_set"]) > 0


def beat_intervals(record):
    """RR intervals (s) from peaks of the QRS energy (squared slope summed over leads)."""
    energy = (np.diff(record[:, 0, :5000], axis=-1) ** 2).sum(0)
    peaks, _ = find_peaks(energy, height=0.3 * np.percentile(energy, 99.5), distance=125)
    return np.diff(peaks) / 500


def test_demo_classes_are_physiologically_separable(tiny_demo):
    with h5py.File(tiny_demo["challenge_h5"]) as f:
        records, labels = f["record_set"][:], f["label_set"][:]
    rr = [beat_intervals(record) for record in records]
    heart_rate = np.array([60 / np.median(r) for r in rr])
    rr_variation = np.array([np.std(r) / np.mean(r) for r in rr])
    codes = list(DEMO_CLASSES)
    nsr, sb, st, af = (labels[:, codes.index(c)] > 0 for c in ("426783006", "426177001", "427084000", "164889003"))
    assert 35 < np.median(heart_rate[sb]) < 55 < np.median(heart_rate[nsr]) < 100 < np.median(heart_rate[st]) < 155
    assert np.median(rr_variation[af]) > 3 * np.median(rr_variation[~af])
    # A linear model on crude model-free features already separates the classes.
    spectra = [np.abs(np.fft.rfft(records[:, lead, 0, :5000], axis=-1))[:, 5:250:5] for lead in (1, 6)]
    features = np.concatenate([np.log1p(np.concatenate(spectra, axis=1)), heart_rate[:, None] / 100,
                               rr_variation[:, None]], axis=1)
    train, test = slice(0, 130), slice(130, None)
    aucs = [roc_auc_score(labels[test, c], LogisticRegression(max_iter=2000).fit(features[train], labels[train, c])
                          .decision_function(features[test])) for c in range(labels.shape[1])]
    assert np.mean(aucs) > 0.85, aucs


def test_a_flat_lead_becomes_zeros_whatever_its_constant():
    """A lead at a constant (0, or an offset such as 0.7 mV) has nothing to standardise: zeros, not
    the filter's 1e-16 residue blown up to unit variance."""
    signals = np.random.default_rng(0).normal(size=(2, 12, 5000))
    signals[0, 3], signals[1, 5] = 0.7, 0.0
    out = dc.preprocess(signals, dc.FS)
    assert not out[0, 3].any() and not out[1, 5].any()
    assert abs(float(out[0, 0].std()) - 1) < 0.2 and np.isfinite(out).all()
