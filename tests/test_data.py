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
    dx = next(line.split(":", 1)[1] for line in lines if line.startswith(("#Dx:", "# Dx:")))
    return float(fs), np.array(gains), np.array(baselines), [c.strip() for c in dx.split(",")]


def write_good_records(folder, names, seed=0, codes=("426783006",)):
    rng = np.random.default_rng(seed)
    signals = synth.synthesize_ecg(synth.sample_conditions(len(names), rng), 500, 5000, rng)
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
    (folder / "nodx.hea").write_text("\n".join(l for l in text.splitlines() if not l.startswith("#Dx")) + "\n")
    text = (folder / "unscored.hea").read_text()
    (folder / "unscored.hea").write_text(text.replace("#Dx: 426783006", "#Dx: 67741000119109"))

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
        signal = synth.synthesize_ecg(synth.sample_conditions(1, rng), fs, 10 * fs, rng)[0]
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


def test_a_record_name_found_twice_stops_the_conversion_naming_both_paths(tmp_path):
    dataset = tmp_path / "OriginalData" / "WFDB_Ga"
    for sub in ("g1", "g1/copy", "g2"):
        (dataset / sub).mkdir(parents=True)
    write_good_records(dataset / "g1", ["E00001", "E00002", "E00003"])
    write_good_records(dataset / "g1" / "copy", ["E00002"])
    write_good_records(dataset / "g2", ["E00003", "E00004"], seed=1)
    with pytest.raises(SystemExit) as stop:
        main.main(["--data_root", str(tmp_path / "OriginalData"), "--preprocessed_dir", str(tmp_path / "out"),
                   "--finetune_dataset", "WFDB_Ga"], prog="datacollection.py")
    message = str(stop.value.code)
    assert len(message.splitlines()) == 1 and message.startswith("error: WFDB_Ga: record E00002 occurs twice")
    assert f"{dataset / 'g1' / 'E00002.hea'} and {dataset / 'g1' / 'copy' / 'E00002.hea'}" in message
    assert "(2 names found twice in all)" in message and not (tmp_path / "out").exists()
    shutil.rmtree(dataset / "g1" / "copy")
    (dataset / "g2" / "E00003.hea").unlink()
    (dataset / "g2" / "E00003.mat").unlink()
    with h5py.File(dc.convert_challenge(dataset, tmp_path / "out", "WFDB_Ga")) as f:
        assert sorted(n.decode() if isinstance(n, bytes) else n for n in f["record_names"][:]) == \
            ["E00001", "E00002", "E00003", "E00004"]


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
DEMO_CODE = {LABEL_ABBREVIATION[code]: code for code in DEMO_CLASSES}
CODE15_CODES = ("270492004", "59118001", "164909002", "426177001", "427084000", "164889003")  # 1dAVb RBBB LBBB SB ST AF
QRS_HIGHPASS = butter(2, 8, btype="highpass", fs=500, output="sos")  # keeps the QRS, drops P and T waves
R = 125   # samples before the R peak in a median beat (0.25 s at 500 Hz)


def test_demo_formats_and_layout(tiny_demo):
    raw = tiny_demo["raw_dir"]
    demo_root = raw.parent
    out = demo_root / "Preprocessed_dataset"
    assert tiny_demo["challenge_h5"] == out / h5_name(DEMO_DATASET, len(DEMO_CLASSES))
    assert ds.find_dataset_h5(out, DEMO_DATASET) == tiny_demo["challenge_h5"]
    assert not list(demo_root.glob(".demo-staging-*"))
    header = raw / DEMO_DATASET / "D00000.hea"
    fs, gains, baselines, codes = parse_header(header)
    adc = scipy.io.loadmat(header.with_suffix(".mat"))["val"]
    assert adc.dtype == np.int16 and adc.shape == (12, 5000) and fs == 500
    record = wfdb.rdrecord(str(header.with_suffix("")))
    np.testing.assert_allclose(record.p_signal.T, (adc - baselines[:, None]) / gains[:, None], atol=1e-12)
    assert set(codes) <= set(DEMO_CLASSES)
    # The CODE-15 part carries CODE-15's six labels and no other, as the real exams.csv does.
    exams = pd.read_csv(raw / "CODE15" / "exams.csv")
    assert set(exams.columns) == {"exam_id", "age", "is_male", *dc.CODE15_LABELS, "patient_id", "normal_ecg",
                                  "trace_file"}
    with h5py.File(raw / "CODE15" / "exams_part0.hdf5") as part:
        assert part["tracings"].shape[1:] == (4096, 12) and part["exam_id"].shape == part["tracings"].shape[:1]
    with h5py.File(tiny_demo["challenge_h5"]) as f:
        assert f["record_set"].shape == (200, 12, 1, 6144)
        assert (f["label_set"][:].sum(0) >= 5).all()
        assert f.attrs["source_dir"] == str(raw / DEMO_DATASET)
    for key in ("code15_train", "code15_valid"):
        with h5py.File(tiny_demo[key]) as f:
            assert list(f.attrs["class_codes"]) == list(dc.CODE15_LABELS) and len(f["record_set"]) > 0


def official_dx_codes(header_path):
    """The official Challenge 2021 scorer's reading, written for the test: the codes after ': ' on
    the header line that starts with '#Dx' (none when no line does)."""
    lines = [line for line in header_path.read_text().splitlines() if line.startswith("#Dx")]
    return [code.strip() for code in lines[0].split(": ")[1].split(",")] if lines else []


def test_demo_headers_are_spelled_as_the_challenge_writes_them(tmp_path):
    n = 24
    synth.write_demo_challenge(tmp_path / "demo", n, np.random.default_rng(0))
    labels = synth.demo_labels(synth.sample_conditions(n, np.random.default_rng(0)))   # that run's first draws
    for i, row in enumerate(labels):
        header = tmp_path / "demo" / f"D{i:05d}.hea"
        codes = [code for code, present in zip(DEMO_CLASSES, row) if present]
        comments = [line.split(":")[0] for line in header.read_text().splitlines() if line.startswith("#")]
        assert comments == ["#Age", "#Sex", "#Dx", "#Rx", "#Hx", "#Sx"]
        assert codes and official_dx_codes(header) == codes == dc.read_challenge_record(header)[0]
    # The spelling with a space (some copies of the data, the shared sample records) still reads.
    spaced = tmp_path / "spaced"
    spaced.mkdir()
    shutil.copy(header.with_suffix(".mat"), spaced)
    (spaced / header.name).write_text(header.read_text().replace("#Dx:", "# Dx:"))
    assert official_dx_codes(spaced / header.name) == [] and dc.read_challenge_record(spaced / header.name)[0] == codes


def test_demo_classes_reach_beyond_code15():
    scored = [code for code, *_ in SCORED_LABELS]
    assert list(DEMO_CLASSES) == sorted(DEMO_CLASSES, key=scored.index)   # scored codes, in the table's order
    assert set(CODE15_CODES) | {"426783006"} <= set(DEMO_CLASSES)     # sinus rhythm: the score's baseline
    assert len(DEMO_CLASSES) >= 12 and len(set(DEMO_CLASSES) - set(CODE15_CODES) - {"426783006"}) >= 6


def test_demo_prevalences_and_co_occurrence():
    labels = synth.demo_labels(synth.sample_conditions(20000, np.random.default_rng(1)))
    prevalence = dict(zip([LABEL_ABBREVIATION[c] for c in DEMO_CLASSES], labels.mean(0)))
    assert all(0.05 < p < 0.46 for p in prevalence.values()), prevalence
    assert min(prevalence.values()) < 0.08 and max(prevalence.values()) > 0.35
    rhythm = labels[:, [DEMO_CLASSES.index(DEMO_CODE[name]) for name in ("NSR", "SB", "STach", "AF", "PR")]]
    assert (rhythm.sum(1) == 1).all()                                  # one rhythm per record
    assert 0.4 < (labels.sum(1) >= 2).mean() < 0.9                     # most but not all have more

    def both(a, b):
        return (labels[:, DEMO_CLASSES.index(DEMO_CODE[a])] & labels[:, DEMO_CLASSES.index(DEMO_CODE[b])]).mean()
    assert both("LAD", "LBBB") > 0.005 and both("LQT", "TInv") > 0.005
    assert both("AF", "PVC") > 0.01 and both("PR", "PVC") > 0.002
    for rhythm_name in ("AF", "PR"):                                          # no sinus P wave to go early or
        assert both(rhythm_name, "PAC") == both(rhythm_name, "IAVB") == 0    # go early or conduct slowly
    for paced_away in ("LBBB", "RBBB", "LAD", "RAD", "TInv", "QAb"):          # the pacemaker sets the QRS and T
        assert both("PR", paced_away) == 0
    assert both("LBBB", "TInv") == both("RBBB", "TInv") == 0                  # primary TInv only without BBB
    assert both("LBBB", "QAb") == 0 and both("RBBB", "QAb") > 0.005           # LBBB hides Q waves


def crafted(n, **changes):
    """Conditions of n sinus records at a normal rate with nothing else, but for `changes`."""
    none = np.zeros(n, bool)
    fields = dict(rhythm=np.zeros(n, int), iavb=none, bbb=np.zeros(n, int), axis=np.zeros(n, int), pac=none,
                  pvc=none, t_inversion=none, long_qt=none, low_voltage=none, q_waves=none)
    fields.update({name: np.full(n, value) for name, value in changes.items()})
    return synth.Conditions(**fields)


def synthesized(seed, n=40, **changes):
    """(physical mV, band-passed mV as the converter filters it) of n crafted 10-s records at 500 Hz."""
    ecg = synth.synthesize_ecg(crafted(n, **changes), 500, 5000, np.random.default_rng(seed)).astype(np.float64)
    return ecg, sosfiltfilt(butter(3, [1, 47], btype="bandpass", fs=500, output="sos"), ecg, axis=-1)


def magnitude(record):
    """Spatial magnitude over the 12 leads, smoothed over 20 ms."""
    return np.convolve(np.sqrt((record ** 2).sum(0)), np.ones(10) / 10, mode="same")


def qrs_peaks(record):
    """R peaks (samples) of one band-passed (12, n) record: peaks of the QRS-band spatial magnitude."""
    energy = magnitude(sosfiltfilt(QRS_HIGHPASS, record, axis=-1))
    peaks, _ = find_peaks(energy, height=0.3 * np.percentile(energy, 99), distance=125)
    return peaks


def qrs_widths(record):
    """Per beat: how long (s) the spatial magnitude stays above half its value at the R peak."""
    above = magnitude(record)
    widths = []
    for peak in qrs_peaks(record):
        half = above > 0.5 * above[peak]
        left, right = peak, peak
        while left > 0 and half[left - 1]:
            left -= 1
        while right < len(half) - 1 and half[right + 1]:
            right += 1
        widths.append((right - left + 1) / 500)
    return np.array(widths)


def rr_intervals(record):
    return np.diff(qrs_peaks(record)) / 500


def median_beat(record, after=350):
    """(12, R + after): the median over beats, aligned on the R peak (sample R)."""
    peaks = qrs_peaks(record)
    peaks = peaks[(peaks >= R) & (peaks + after <= record.shape[-1])]
    return np.median(np.stack([record[:, p - R:p + after] for p in peaks]), axis=0)


def separation(positive, negative):
    """AUROC of a feature between two groups of records."""
    return roc_auc_score(np.r_[np.ones(len(positive)), np.zeros(len(negative))], np.r_[positive, negative])


def test_demo_rhythm_classes(tiny_demo):
    with h5py.File(tiny_demo["challenge_h5"]) as f:
        records, labels = f["record_set"][:, :, 0, :5000].astype(np.float64), f["label_set"][:] > 0
    rr = [rr_intervals(record) for record in records]
    heart_rate = np.array([60 / np.median(r) for r in rr])
    variation = np.array([np.std(r) / np.mean(r) for r in rr])
    nsr, sb, st, af, pac, pvc, paced = (labels[:, DEMO_CLASSES.index(DEMO_CODE[name])]
                                        for name in ("NSR", "SB", "STach", "AF", "PAC", "PVC", "PR"))
    assert 35 < np.median(heart_rate[sb]) < 55 < np.median(heart_rate[nsr]) < 100 < np.median(heart_rate[st]) < 155
    assert 58 < np.median(heart_rate[paced]) < 82
    # AF is irregularly irregular; premature beats break an otherwise steady rhythm.
    steady, ectopic = ~(af | pac | pvc), (pac | pvc) & ~af
    assert np.median(variation[af]) > 5 * np.median(variation[steady])
    assert np.median(variation[ectopic]) > 3 * np.median(variation[steady])


def test_demo_premature_beats():
    _, control = synthesized(0)
    _, pac = synthesized(1, pac=True)
    _, pvc = synthesized(2, pvc=True)

    def earliest(record):
        """(coupling: shortest RR / median RR, that beat's QRS width s, the RR before + after it / median RR)."""
        rr = rr_intervals(record)
        i = np.argmin(rr[:-1])
        return rr[i] / np.median(rr), qrs_widths(record)[i + 1], (rr[i] + rr[i + 1]) / np.median(rr)
    (c_coupling, c_width, _), (a_coupling, a_width, a_pause), (v_coupling, v_width, v_pause) = (
        np.array([earliest(r) for r in group]).T for group in (control, pac, pvc))
    assert separation(-a_coupling, -c_coupling) > 0.9 and separation(-v_coupling, -c_coupling) > 0.9   # early
    assert separation(v_width, c_width) > 0.9 and separation(v_width, a_width) > 0.9                   # PVC wide
    assert abs(np.median(a_width) - np.median(c_width)) < 0.01                                         # PAC narrow
    assert abs(np.median(v_pause) - 2) < 0.1 and np.median(a_pause) < 1.9      # compensatory pause after PVCs only


def test_demo_pacing_rhythm():
    """A pacing spike (a one-sample jump) before every QRS, and a wide QRS, in paced records alone."""
    (control_mv, control), (paced_mv, paced) = synthesized(8), synthesized(9, rhythm=synth.RHYTHMS.index("paced"))

    def spiked_beats(physical, record):
        jump = np.abs(np.diff(physical, n=2, axis=-1)).max(axis=0)
        return np.mean([jump[max(peak - 60, 0):peak].max() > 0.5 for peak in qrs_peaks(record)])
    assert np.mean([spiked_beats(*pair) for pair in zip(paced_mv, paced)]) > 0.95
    assert max(spiked_beats(*pair) for pair in zip(control_mv, control)) == 0
    assert separation([np.median(qrs_widths(r)) for r in paced], [np.median(qrs_widths(r)) for r in control]) > 0.95
    rr = [rr_intervals(record) for record in paced]
    assert np.median([np.std(r) / np.mean(r) for r in rr]) < 0.01                   # a steady pacemaker
    rate = [60 / np.median(r) for r in rr]
    assert 58 < np.percentile(rate, 10) < np.percentile(rate, 90) < 82


def test_demo_axis_deviation_flips_limb_lead_polarities():
    """The frontal QRS axis read from I and II at the R peak: normal -25..85, left below -30, right above 90."""
    axes = {}
    for seed, axis in enumerate((0, 1, 2)):
        _, records = synthesized(10 + seed, axis=axis)
        beats = np.stack([median_beat(record)[:, R] for record in records])   # lead values at the R peak
        lead1, lead2 = beats[:, 0], beats[:, 1]
        axes[axis] = np.degrees(np.arctan2((2 * lead2 - lead1) / np.sqrt(3), lead1))
    normal, left, right = axes[0], axes[1], axes[2]
    assert np.mean((normal > -35) & (normal < 95)) > 0.9
    assert np.mean((left > -95) & (left < -30)) > 0.9 and np.mean((right > 90) & (right < 170)) > 0.9


def test_demo_t_wave_inversion_and_long_qt():
    _, control = synthesized(20)
    _, inverted = synthesized(21, t_inversion=True)
    _, long_qt = synthesized(22, long_qt=True)

    def negative_t_leads(record):
        """Leads (of I, II, aVF, V3-V6, upright in a normal ECG) whose T wave is negative."""
        beat = median_beat(record)
        return sum(beat[lead, R + 70:R + 200].mean() < 0 for lead in (0, 1, 5, 8, 9, 10, 11))

    def corrected_t_peak(record):
        """T-peak delay after R in the precordial lead with the largest T, over the cube root of RR (Fridericia)."""
        rr = np.median(rr_intervals(record))
        t_waves = median_beat(record)[6:, R + 50:R + int(0.75 * rr * 500)]
        lead = np.argmax(np.abs(t_waves).max(axis=1))
        return (np.argmax(np.abs(t_waves[lead])) + 50) / 500 / np.cbrt(rr)
    assert separation([negative_t_leads(r) for r in inverted], [negative_t_leads(r) for r in control]) > 0.9
    assert np.mean([negative_t_leads(r) >= 2 for r in inverted]) > 0.9
    assert separation([corrected_t_peak(r) for r in long_qt], [corrected_t_peak(r) for r in control]) > 0.95


def test_demo_pathological_q_waves():
    """A Q wave lasting 30 ms or more in some lead of QAb records; septal q waves are brief."""
    def longest_q(record):
        beat = median_beat(record)
        below = beat[:, R - 40:R - 2] < -0.1 * np.ptp(beat[:, R - 40:R + 40], axis=1).max()
        return below.sum(axis=1).max() / 500
    (_, control), (_, infarct) = synthesized(50), synthesized(51, q_waves=True)
    assert np.mean([longest_q(r) >= 0.03 for r in infarct]) > 0.8
    assert np.mean([longest_q(r) < 0.02 for r in control]) > 0.9


def test_demo_low_qrs_voltage():
    (control_mv, control), (low_mv, low) = synthesized(30), synthesized(31, low_voltage=True)

    def limb_qrs(record):
        """Largest QRS peak-to-peak (mV) over the limb leads of the median beat."""
        return np.ptp(median_beat(record)[:6, R - 30:R + 30], axis=1).max()

    def qrs_to_t(record):
        """QRS over T-wave peak-to-peak in V2-V4 after standardisation: what is left for a model."""
        beat = median_beat(record)[7:10]
        return np.ptp(beat[:, R - 30:R + 30], axis=1).sum() / np.ptp(beat[:, R + 60:], axis=1).sum()
    low_qrs, control_qrs = [limb_qrs(r) for r in low], [limb_qrs(r) for r in control]
    assert np.mean(np.array(low_qrs) < 0.6) > 0.8 and np.median(control_qrs) > 0.9
    assert separation(-np.array(low_qrs), -np.array(control_qrs)) > 0.97
    standardised_low, standardised_control = (dc.preprocess(mv, 500)[:, :, 0, :5000].astype(np.float64)
                                             for mv in (low_mv, control_mv))
    assert separation([-qrs_to_t(r) for r in standardised_low], [-qrs_to_t(r) for r in standardised_control]) > 0.75


def test_demo_limb_leads_and_nuisances():
    physical, filtered = synthesized(40, n=64, axis=0)
    lead1, lead2 = physical[:, 0], physical[:, 1]
    relations = {"III": lead2 - lead1, "aVR": -(lead1 + lead2) / 2, "aVL": lead1 - lead2 / 2, "aVF": lead2 - lead1 / 2}
    for lead, expected in relations.items():                                 # Einthoven's and Goldberger's
        np.testing.assert_allclose(physical[:, dc.LEADS.index(lead)], expected, atol=1e-5)
    # People differ in amplitude; records differ in muscle noise.
    qrs = np.array([np.ptp(median_beat(record)[:, R - 30:R + 30], axis=1).max() for record in filtered])
    assert np.std(np.log(qrs)) > 0.15
    muscle = sosfiltfilt(butter(4, [60, 140], btype="bandpass", fs=500, output="sos"), physical, axis=-1)
    level = muscle.std(axis=-1).mean(axis=1)                     # above the QRS band: EMG and amplifier noise
    assert level.max() > 3 * level.min()


def test_demo_made_aside_and_renamed_into_place(tmp_path):
    small = dict(n_records=12, n_code15=40)
    made = synth.make_demo(tmp_path, seed=0, **small)
    files = {path: path.stat().st_ino for path in tmp_path.rglob("*") if path.is_file()}
    made["code15_valid"].unlink()                       # a file lost since
    again = synth.make_demo(tmp_path, seed=0, **small)
    assert again == made and made["code15_valid"].is_file()
    assert all(path.stat().st_ino == inode for path, inode in files.items() if path != made["code15_valid"])
    assert not list(tmp_path.glob(".demo-staging-*"))

    # Two runs started together: both finish, and the data is whole.
    script = ("import sys; sys.path.insert(0, {repo!r}); import synthetic_ecg as synth; "
              "synth.make_demo({folder!r}, seed=0, n_records=12, n_code15=40)")
    folder = tmp_path / "together"
    runs = [subprocess.Popen([sys.executable, "-c", script.format(repo=str(REPO_ROOT), folder=str(folder))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert all(run.wait() == 0 for run in runs), [run.stderr.read() for run in runs]
    out = folder / "Preprocessed_dataset"
    with h5py.File(ds.find_dataset_h5(out, DEMO_DATASET)) as f:
        assert len(f["record_set"]) == 12
    assert len(list((folder / "OriginalData" / DEMO_DATASET).glob("*.hea"))) == 12
    assert (out / "CODE15_train_32.hdf5").is_file() and not list(folder.glob(".demo-staging-*"))


def test_a_flat_lead_becomes_zeros_whatever_its_constant():
    """A lead at a constant (0, or an offset such as 0.7 mV) has nothing to standardise: zeros, not
    the filter's 1e-16 residue blown up to unit variance."""
    signals = np.random.default_rng(0).normal(size=(2, 12, 5000))
    signals[0, 3], signals[1, 5] = 0.7, 0.0
    out = dc.preprocess(signals, dc.FS)
    assert not out[0, 3].any() and not out[1, 5].any()
    assert abs(float(out[0, 0].std()) - 1) < 0.2 and np.isfinite(out).all()
