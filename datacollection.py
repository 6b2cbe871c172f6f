"""Challenge 2021 and CODE-15 records -> the HDF5 files every pipeline reads; demo data; splits.

    python datacollection.py --data-root OriginalData --out Preprocessed_dataset [--datasets ...] [--workers N]
    python datacollection.py --code15 DIR --out Preprocessed_dataset
    python datacollection.py --demo [DIR]

Each record: physical = (adc - baseline) / gain, resampled to 500 Hz when needed, 3rd-order
Butterworth 1-47 Hz band-pass forward-backward, each lead standardised, right-padded or cut to
6144 samples, float32. Records stream through in chunks, so memory does not grow with the dataset.
"""
import argparse
import collections
import json
import logging
import multiprocessing
import os
import shutil
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pandas as pd
import scipy.fft
import scipy.io
import torch
import wfdb
from scipy.signal import butter, filtfilt, resample_poly
from tqdm import tqdm

from helper_code import (DEMO_CLASSES, DEMO_DATASET, LABEL_ABBREVIATION, LABEL_NAME, REPO_ROOT, FlagParser,
                         atomic_path, dataset_classes, float_in, int_at_least, setup_logging)

log = logging.getLogger("datacollection")

DATASETS = ("WFDB_Ga", "WFDB_PTBXL", "WFDB_Ningbo", "WFDB_ChapmanShaoxing")
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
NUM_LEADS = 12
FS = 500                      # Hz, every stored record
SAMPLES = 6144                # stored length: right-padded with zeros or cut
BAND_HZ = (1.0, 47.0)
FILTER_ORDER = 3
FILTER_B, FILTER_A = butter(FILTER_ORDER, BAND_HZ, btype="bandpass", fs=FS)
MIN_SAMPLES = 3 * max(len(FILTER_A), len(FILTER_B)) + 1   # filtfilt's edge padding needs this many
CHUNK = 32                    # records per unit of work; bounds memory (~10 MB of float32 per chunk)

CODE15_LABELS = ("1dAVb", "RBBB", "LBBB", "SB", "AF", "ST")
CODE15_FS = 400
CODE15_SAMPLES = 4096         # 10 s at 400 Hz, zero-padded symmetrically from 4000 in the real files

CHALLENGE_SOURCE = ("the PhysioNet/CinC Challenge 2021 training data "
                    "(https://physionet.org/content/challenge-2021/1.0.3/training/)")
CODE15_SOURCE = "CODE-15% (https://zenodo.org/records/4916206)"

PREPROCESSING = {
    "fs": FS,
    "samples": SAMPLES,
    "band_hz": list(BAND_HZ),
    "filter": f"Butterworth order {FILTER_ORDER} band-pass, forward-backward (scipy.signal.filtfilt)",
    "scaling": "per lead: zero mean, unit variance (population std; flat leads stay zero)",
    "length": f"right-padded with zeros or cut to {SAMPLES} samples",
    "dtype": "float32",
}

DATA_ROOT = REPO_ROOT / "OriginalData"            # one sub-folder per Challenge dataset
PREPROCESSED_DIR = REPO_ROOT / "Preprocessed_dataset"
DEMO_DIR = REPO_ROOT / "demo"

# Demo sizes: small enough for the whole `main.py --demo` on 2 CPU cores, large enough to learn.
DEMO_RECORDS = 1500
DEMO_CODE15 = 2000
DEMO_CODE15_PER_PART = 1000


# ---------------------------------------------------------------------------------------------
# Names and locations
# ---------------------------------------------------------------------------------------------
def h5_name(dataset, num_classes):
    return f"class_sepe{num_classes}_dataset_{dataset}_32.hdf5"


def find_dataset_h5(preprocessed_dir, dataset):
    """The converted HDF5 of `dataset` in `preprocessed_dir`, whatever its class count."""
    preprocessed_dir = Path(preprocessed_dir)
    found = sorted(preprocessed_dir.glob(f"class_sepe*_dataset_{dataset}_32.hdf5"))
    if len(found) > 1:
        raise FileNotFoundError(f"several converted files for {dataset} in {preprocessed_dir}: "
                                f"{', '.join(p.name for p in found)}; keep one")
    if not found:
        try:
            expected = preprocessed_dir / h5_name(dataset, len(dataset_classes(dataset)))
        except KeyError:
            expected = preprocessed_dir / h5_name(dataset, "{C}")
        raise FileNotFoundError(
            f"no converted dataset at {expected}. Convert {CHALLENGE_SOURCE} with "
            f"`python datacollection.py --data-root OriginalData --out {preprocessed_dir}`, "
            f"or make synthetic data with `python datacollection.py --demo`")
    return found[0]


def missing_dataset_message(*dataset_dirs):
    return (f"dataset folder not found: {', '.join(str(d) for d in dataset_dirs)}. Each should hold that "
            f"dataset's records (.hea + .mat, sub-folders allowed) from {CHALLENGE_SOURCE}; "
            f"or run `python datacollection.py --demo` for synthetic data")


# ---------------------------------------------------------------------------------------------
# Preprocessing (vectorised over records and leads)
# ---------------------------------------------------------------------------------------------
def resample(signals, fs, target_fs=FS):
    """Polyphase resampling along the last axis by the rational factor target_fs / fs."""
    if fs == target_fs:
        return signals
    ratio = Fraction(target_fs) / Fraction(fs).limit_denominator(1000)
    return resample_poly(signals, ratio.numerator, ratio.denominator, axis=-1)


def preprocess(signals, fs):
    """(B, 12, n) physical values at `fs` -> (B, 12, 1, SAMPLES) float32 model input."""
    signals = resample(np.asarray(signals, dtype=np.float64), fs)
    filtered = filtfilt(FILTER_B, FILTER_A, signals, axis=-1)
    mean = filtered.mean(axis=-1, keepdims=True)
    std = filtered.std(axis=-1, keepdims=True)
    std[std == 0] = 1.0
    scaled = (filtered - mean) / std
    out = np.zeros(signals.shape[:2] + (1, SAMPLES), dtype=np.float32)
    n = min(SAMPLES, scaled.shape[-1])
    out[:, :, 0, :n] = scaled[..., :n]
    return out


def preprocess_many(signals, fs):
    """Preprocess records of possibly different lengths and rates, batching equal ones together."""
    out = np.zeros((len(signals), NUM_LEADS, 1, SAMPLES), dtype=np.float32)
    groups = collections.defaultdict(list)
    for i, (signal, rate) in enumerate(zip(signals, fs)):
        groups[(signal.shape[-1], rate)].append(i)
    for (_, rate), rows in groups.items():
        out[rows] = preprocess(np.stack([signals[i] for i in rows]), rate)
    return out


# ---------------------------------------------------------------------------------------------
# Reading Challenge records
# ---------------------------------------------------------------------------------------------
class RecordSkipped(Exception):
    """A record that cannot be used; `reason` is the category counted in the summary."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def dx_codes(comments):
    for comment in comments:
        key, _, value = comment.partition(":")
        if key.strip() == "Dx":
            return [code.strip() for code in value.split(",") if code.strip()]
    return None


def check_mat_header(mat_path, n_sig, sig_len):
    """The MATLAB v4 header must announce an int16 matrix of n_sig x sig_len, fully present."""
    with open(mat_path, "rb") as f:
        head = np.frombuffer(f.read(20), dtype="<i4")
    if head.size < 5:
        raise RecordSkipped("unreadable .mat", f"{mat_path.name}: shorter than a MATLAB v4 header")
    mat_type, rows, cols, _, name_len = (int(v) for v in head)
    if mat_type != 30 or (rows, cols) != (n_sig, sig_len):
        raise RecordSkipped("unreadable .mat", f"{mat_path.name}: MATLAB v4 type {mat_type} {rows}x{cols}, "
                                               f"header expects int16 (type 30) {n_sig}x{sig_len}")
    expected = 20 + name_len + 2 * rows * cols
    if mat_path.stat().st_size < expected:
        raise RecordSkipped("unreadable .mat", f"{mat_path.name}: truncated ({mat_path.stat().st_size} "
                                               f"of {expected} bytes)")


def read_challenge_record(header_path):
    """(Dx codes, physical signal (12, n) float64, fs) of one record, or RecordSkipped.

    wfdb parses the header and reads the .mat (format 16 at byte offset 24, the MATLAB v4 data);
    its physical values are (adc - baseline) / gain per lead, NaN at WFDB's invalid-sample value.
    """
    record_path = str(header_path.with_suffix(""))
    signal_error = None
    try:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # judged below, per record
            record = wfdb.rdrecord(record_path)
    except Exception as error:  # find out whether the header or the signal file is at fault
        try:
            record = wfdb.rdheader(record_path)
        except Exception as header_error:
            raise RecordSkipped("unparseable header", f"{type(header_error).__name__}: {header_error}")
        signal_error = error
    if record.n_sig != NUM_LEADS:
        raise RecordSkipped("not 12 leads", f"{record.n_sig} signals")
    if not record.sig_len:
        raise RecordSkipped("zero length")
    codes = dx_codes(record.comments or [])
    if not codes:
        raise RecordSkipped("unparseable header", "no '# Dx:' codes")
    if signal_error is not None:
        raise RecordSkipped("unreadable .mat", f"{type(signal_error).__name__}: {signal_error}")
    check_mat_header(header_path.with_suffix(".mat"), record.n_sig, record.sig_len)
    physical = record.p_signal.T
    if physical.shape != (NUM_LEADS, record.sig_len):
        raise RecordSkipped("unreadable .mat", f"read {physical.shape}, header says {(NUM_LEADS, record.sig_len)}")
    if not np.isfinite(physical).all():
        raise RecordSkipped("non-finite samples", f"{int((~np.isfinite(physical)).sum())} NaN/inf values")
    if round(physical.shape[1] * FS / record.fs) < MIN_SAMPLES:
        raise RecordSkipped("too short", f"{record.sig_len} samples at {record.fs} Hz")
    return codes, physical, float(record.fs)


def find_records(dataset_dir):
    """Pair `.hea` and `.mat` files anywhere under `dataset_dir`.

    Returns (records, unpaired): records as (name, header_path) sorted by relative path, unpaired
    as (name, reason) for a header without a recording or a recording without a header.
    """
    headers = {p.relative_to(dataset_dir).with_suffix(""): p for p in dataset_dir.rglob("*.hea")}
    mats = {p.relative_to(dataset_dir).with_suffix("") for p in dataset_dir.rglob("*.mat")}
    records, unpaired = [], []
    for key in sorted(set(headers) | mats):
        if key not in mats:
            unpaired.append((key.name, "missing .mat"))
        elif key not in headers:
            unpaired.append((key.name, "missing .hea"))
        else:
            records.append((key.name, headers[key]))
    return records, unpaired


class ChunkResult(NamedTuple):
    records: np.ndarray        # (k, 12, 1, SAMPLES) float32
    labels: np.ndarray         # (k, C) float32
    names: list
    skipped: list              # (name, reason, detail)
    is_valid: np.ndarray = None  # CODE-15 only: which rows go to the validation file


def convert_challenge_chunk(classes, records):
    """Worker: read and preprocess one chunk of (name, header_path) records."""
    signals, fs, labels, names, skipped = [], [], [], [], []
    for name, header_path in records:
        try:
            codes, physical, rate = read_challenge_record(header_path)
            label = np.isin(classes, codes).astype(np.float32)
            if not label.any():
                raise RecordSkipped("no scored class", f"Dx {','.join(codes)}")
        except RecordSkipped as skip:
            skipped.append((name, skip.reason, skip.detail))
            continue
        signals.append(physical)
        fs.append(rate)
        labels.append(label)
        names.append(name)
    return ChunkResult(preprocess_many(signals, fs), np.array(labels, np.float32).reshape(-1, len(classes)),
                       names, skipped)


# ---------------------------------------------------------------------------------------------
# Streaming: workers in order, appended chunk by chunk to resizable HDF5 datasets
# ---------------------------------------------------------------------------------------------
def ordered_results(fn, tasks, workers):
    """Yield fn(task) in task order; at most 2 tasks per worker in flight, so memory stays flat."""
    if workers <= 1:
        for task in tasks:
            yield fn(*task)
        return
    with multiprocessing.Pool(workers) as pool:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class H5Appender:
    """`record_set`, `label_set` and `record_names`, grown as chunks arrive."""

    def __init__(self, h5file, class_codes, class_names, attrs):
        num_classes = len(class_codes)
        self.records = h5file.create_dataset("record_set", shape=(0, NUM_LEADS, 1, SAMPLES), dtype="float32",
                                             maxshape=(None, NUM_LEADS, 1, SAMPLES), chunks=(1, NUM_LEADS, 1, SAMPLES))
        self.labels = h5file.create_dataset("label_set", shape=(0, num_classes), dtype="float32",
                                            maxshape=(None, num_classes), chunks=(4096, num_classes))
        self.names = h5file.create_dataset("record_names", shape=(0,), dtype=h5py.string_dtype(),
                                           maxshape=(None,), chunks=(4096,))
        h5file.attrs["class_codes"] = list(class_codes)
        h5file.attrs["class_names"] = list(class_names)
        h5file.attrs["leads"] = list(LEADS)
        h5file.attrs["preprocessing"] = json.dumps(PREPROCESSING)
        for key, value in attrs.items():
            h5file.attrs[key] = value
        self.h5file = h5file
        self.positives = np.zeros(num_classes, dtype=np.int64)

    def __len__(self):
        return self.records.shape[0]

    def append(self, records, labels, names):
        start, end = len(self), len(self) + len(names)
        for dataset, values in ((self.records, records), (self.labels, labels), (self.names, names)):
            dataset.resize(end, axis=0)
            dataset[start:end] = values
        self.positives += labels.sum(axis=0).astype(np.int64)


def summarise(label, found, writer, skipped, class_names):
    reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items())) or "none"
    positives = ", ".join(f"{name}={count}" for name, count in zip(class_names, writer.positives))
    log.info("%s: found %d records, wrote %d, skipped %d (%s); %d classes; positives per class: %s",
             label, found, len(writer), sum(skipped.values()), reasons, len(class_names), positives)
    writer.h5file.attrs["records_found"] = found
    writer.h5file.attrs["skipped"] = json.dumps(dict(skipped))


def convert_challenge(dataset_dir, out_dir, dataset, workers=1, chunk=CHUNK):
    """Convert one Challenge folder into `class_sepe{C}_dataset_{dataset}_32.hdf5` in `out_dir`."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(missing_dataset_message(dataset_dir))
    classes = dataset_classes(dataset)
    class_names = [LABEL_ABBREVIATION[code] for code in classes]
    records, unpaired = find_records(dataset_dir)
    found = len(records) + len(unpaired)
    skipped = collections.Counter()
    for name, reason in unpaired:
        log.warning("%s: skipped %s: %s", dataset, name, reason)
        skipped[reason] += 1
    out_path = Path(out_dir) / h5_name(dataset, len(classes))
    tasks = [(classes, records[i:i + chunk]) for i in range(0, len(records), chunk)]
    attrs = {"dataset": dataset, "source_dir": str(dataset_dir),
             "class_full_names": [LABEL_NAME[code] for code in classes]}
    with atomic_path(out_path) as tmp_path:
        with h5py.File(tmp_path, "w") as h5file:
            writer = H5Appender(h5file, classes, class_names, attrs)
            with tqdm(total=len(records), desc=dataset, unit="rec") as bar:
                for result in ordered_results(convert_challenge_chunk, tasks, workers):
                    writer.append(result.records, result.labels, result.names)
                    for name, reason, detail in result.skipped:
                        log.warning("%s: skipped %s: %s%s", dataset, name, reason, f" ({detail})" if detail else "")
                        skipped[reason] += 1
                    bar.update(len(result.names) + len(result.skipped))
            summarise(dataset, found, writer, skipped, class_names)
            if not len(writer):
                raise ValueError(f"{dataset}: no usable records in {dataset_dir}; nothing written")
    return out_path


# ---------------------------------------------------------------------------------------------
# CODE-15
# ---------------------------------------------------------------------------------------------
def code15_parts(code15_dir):
    """exams_part{k}.hdf5 files in numeric order of k."""
    parts = list(code15_dir.glob("exams_part*.hdf5"))
    return sorted(parts, key=lambda p: int("".join(ch for ch in p.stem if ch.isdigit()) or 0))


def convert_code15_chunk(part_path, start, stop, labels, known, is_valid):
    """Worker: preprocess tracings[start:stop] of one part; rows unknown to exams.csv are skipped."""
    with h5py.File(part_path, "r") as part:
        exam_ids = part["exam_id"][start:stop]
        tracings = part["tracings"][start:stop]              # (k, 4096, 12) at 400 Hz
    signals = np.transpose(tracings, (0, 2, 1)).astype(np.float64)
    finite = np.isfinite(signals).all(axis=(1, 2))
    keep = known & finite
    skipped = [(str(e), "exam_id not in exams.csv", part_path.name) for e in exam_ids[~known]]
    skipped += [(str(e), "non-finite samples", part_path.name) for e in exam_ids[known & ~finite]]
    records = preprocess(signals[keep], CODE15_FS) if keep.any() else np.zeros((0, NUM_LEADS, 1, SAMPLES), np.float32)
    return ChunkResult(records, labels[keep], [str(e) for e in exam_ids[keep]], skipped, is_valid[keep])


def convert_code15(code15_dir, out_dir, valid_fraction=0.1, seed=18, workers=1, chunk=CHUNK):
    """CODE-15 -> CODE15_train_32.hdf5 and CODE15_valid_32.hdf5 (patients split, seeded)."""
    code15_dir, out_dir = Path(code15_dir), Path(out_dir)
    csv_path = code15_dir / "exams.csv"
    parts = code15_parts(code15_dir) if code15_dir.is_dir() else []
    if not csv_path.is_file() or not parts:
        raise FileNotFoundError(f"CODE-15 not found: expected {csv_path} and {code15_dir}/exams_part*.hdf5 "
                                f"from {CODE15_SOURCE}; or run `python datacollection.py --demo`")
    exams = pd.read_csv(csv_path)
    missing = [c for c in ("exam_id", "patient_id", *CODE15_LABELS) if c not in exams.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing columns {missing}")
    exams = exams.drop_duplicates("exam_id").set_index("exam_id")
    exam_labels = exams[list(CODE15_LABELS)].astype(str).apply(lambda c: c.str.lower().isin(("true", "1", "1.0")))
    patients = np.unique(exams["patient_id"].to_numpy())
    rng = np.random.default_rng(seed)
    n_valid = max(1, round(valid_fraction * len(patients)))
    valid_patients = rng.permutation(patients)[:n_valid]
    exam_is_valid = exams["patient_id"].isin(valid_patients)

    known_ids = exams.index.to_numpy()
    tasks, found = [], 0
    for part_path in parts:
        with h5py.File(part_path, "r") as part:
            exam_ids = part["exam_id"][:]
        found += len(exam_ids)
        for start in range(0, len(exam_ids), chunk):
            ids = exam_ids[start:start + chunk]
            known = np.isin(ids, known_ids)
            labels = np.zeros((len(ids), len(CODE15_LABELS)), np.float32)
            labels[known] = exam_labels.loc[ids[known]].to_numpy(np.float32)
            is_valid = np.zeros(len(ids), bool)
            is_valid[known] = exam_is_valid.loc[ids[known]].to_numpy()
            tasks.append((part_path, start, start + len(ids), labels, known, is_valid))

    train_path, valid_path = out_dir / "CODE15_train_32.hdf5", out_dir / "CODE15_valid_32.hdf5"
    attrs = {"dataset": "CODE15", "source_dir": str(code15_dir), "source_fs": CODE15_FS,
             "valid_fraction": valid_fraction, "split_seed": seed}
    skipped = collections.Counter()
    with atomic_path(train_path) as train_tmp, atomic_path(valid_path) as valid_tmp:
        with h5py.File(train_tmp, "w") as train_file, h5py.File(valid_tmp, "w") as valid_file:
            train = H5Appender(train_file, CODE15_LABELS, CODE15_LABELS, {**attrs, "split": "train"})
            valid = H5Appender(valid_file, CODE15_LABELS, CODE15_LABELS, {**attrs, "split": "valid"})
            with tqdm(total=found, desc="CODE15", unit="exam") as bar:
                for result in ordered_results(convert_code15_chunk, tasks, workers):
                    for writer, rows in ((train, ~result.is_valid), (valid, result.is_valid)):
                        writer.append(result.records[rows], result.labels[rows],
                                      [n for n, r in zip(result.names, rows) if r])
                    for name, reason, detail in result.skipped:
                        log.warning("CODE15: skipped exam %s: %s (%s)", name, reason, detail)
                        skipped[reason] += 1
                    bar.update(len(result.names) + len(result.skipped))
            for label, writer in (("CODE15 train", train), ("CODE15 valid", valid)):
                summarise(label, found, writer, skipped, CODE15_LABELS)
                if not len(writer):
                    raise ValueError(f"{label}: no exams; nothing written (too few patients for the split?)")
    return train_path, valid_path


# ---------------------------------------------------------------------------------------------
# Synthetic ECGs for the demo: same generator for both formats, classes differ physiologically
# ---------------------------------------------------------------------------------------------
RHYTHMS = ("normal", "brady", "tachy", "af")
RHYTHM_PROBS = (0.4, 0.2, 0.2, 0.2)
HEART_RATE = {"normal": (62, 92), "brady": (38, 52), "tachy": (110, 150), "af": (70, 130)}
IAVB_PROB = 0.25             # of sinus records; AF has no PR interval
BBB_PROBS = (0.6, 0.2, 0.2)  # none, RBBB, LBBB

# Per-lead amplitudes (mV) of each wave, leads in LEADS order.
P_AMP = np.array([0.14, 0.25, 0.12, -0.18, 0.03, 0.18, 0.1, 0.14, 0.14, 0.14, 0.14, 0.12])
Q_AMP = np.array([-0.05, -0.08, -0.04, 0.0, -0.04, -0.06, 0.0, 0.0, 0.0, -0.05, -0.08, -0.08])
R_AMP = np.array([0.6, 1.0, 0.5, -0.7, 0.3, 0.7, 0.25, 0.5, 0.9, 1.3, 1.2, 0.9])
S_AMP = np.array([-0.1, -0.2, -0.2, 0.1, -0.1, -0.2, -0.9, -1.2, -0.7, -0.4, -0.2, -0.1])
T_AMP = np.array([0.2, 0.3, 0.1, -0.22, 0.08, 0.2, 0.05, 0.45, 0.45, 0.4, 0.3, 0.22])
RBBB_RPRIME = np.array([0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.7, 0.5, 0.2, 0.0, 0.0, 0.0])
RBBB_SLUR = np.array([-0.35, -0.2, 0.0, 0.0, -0.3, 0.0, 0.0, 0.0, 0.0, -0.2, -0.35, -0.4])
LBBB_NOTCH = np.array([0.6, 0.3, 0.0, -0.4, 0.6, 0.1, 0.0, 0.0, 0.0, 0.4, 0.8, 0.8])
LBBB_DEEP_S = np.array([0.0, 0.0, -0.2, 0.0, 0.0, -0.1, -1.3, -1.6, -1.0, 0.0, 0.0, 0.0])
T_RBBB = T_AMP * np.array([1, 1, 1, 1, 1, 1, -1.2, -0.8, 1, 1, 1, 1])        # inverted in V1-V2
T_LBBB = -1.2 * np.abs(T_AMP) * np.sign(R_AMP + LBBB_NOTCH + LBBB_DEEP_S)      # discordant to the QRS
F_WAVE_AMP = np.array([0.3, 0.6, 0.5, -0.4, 0.1, 0.5, 1.0, 0.6, 0.4, 0.3, 0.2, 0.2])
TEMPLATE_S = (-0.45, 0.55)   # beat template window around the R peak, seconds


def sample_conditions(n, rng):
    """Per record: rhythm index into RHYTHMS, first-degree AV block flag, bundle branch block (0/1/2)."""
    rhythm = rng.choice(len(RHYTHMS), size=n, p=RHYTHM_PROBS)
    iavb = (rng.random(n) < IAVB_PROB) & (rhythm != RHYTHMS.index("af"))
    bbb = rng.choice(3, size=n, p=BBB_PROBS)
    return rhythm, iavb, bbb


def synthesize_ecg(rhythm, iavb, bbb, fs, n_samples, rng):
    """(B, 12, n_samples) physical ECG in mV: beat templates convolved with beat-time impulse trains.

    Rate separates normal / brady / tachy; AF has irregular RR, no P wave and 4-8 Hz f-waves;
    AV block lengthens PR; RBBB adds a late R' in V1-V2 and slurred S laterally; LBBB widens and
    notches R laterally with deep broad S in V1-V3 and discordant T. Baseline wander, mains hum
    and white noise on top.
    """
    batch = len(rhythm)
    af = rhythm == RHYTHMS.index("af")
    low = np.array([HEART_RATE[r][0] for r in RHYTHMS])[rhythm]
    high = np.array([HEART_RATE[r][1] for r in RHYTHMS])[rhythm]
    mean_rr = 60.0 / rng.uniform(low, high)
    duration = n_samples / fs
    max_beats = int(np.ceil((duration + 1.0) / 0.25)) + 2
    jitter = np.where(af[:, None], 0.3, 0.02) * rng.standard_normal((batch, max_beats))
    rr = np.clip(mean_rr[:, None] * np.exp(jitter), 0.25, 2.5)
    beat_times = np.cumsum(rr, axis=1) - rr[:, :1] - rng.uniform(0, 1, batch)[:, None] * rr[:, :1]

    # Beat template (B, 12, K) as a sum of Gaussian waves around the R peak.
    tau = np.arange(int(TEMPLATE_S[0] * fs), int(TEMPLATE_S[1] * fs)) / fs
    pre = -int(TEMPLATE_S[0] * fs)
    lead_gain = 1 + 0.15 * rng.standard_normal((batch, NUM_LEADS))
    qrs_scale = np.where(bbb > 0, rng.uniform(1.6, 1.9, batch), rng.uniform(0.9, 1.1, batch))
    pr = np.where(iavb, rng.uniform(0.28, 0.36, batch), rng.uniform(0.13, 0.18, batch))
    qt = np.clip(0.32 * np.sqrt(mean_rr), 0.2, 0.42) + 0.02 * (bbb > 0)
    rbbb, lbbb = (bbb == 1)[:, None], (bbb == 2)[:, None]
    t_amp = np.where(rbbb, T_RBBB, np.where(lbbb, T_LBBB, T_AMP))
    waves = [  # (centre s, width s, per-lead amplitude)
        (-pr, np.full(batch, 0.025), np.where(af[:, None], 0.0, P_AMP)),
        (-0.025 * qrs_scale, 0.008 * qrs_scale, np.where(lbbb, 0.0, Q_AMP)),
        (np.zeros(batch), 0.010 * qrs_scale, np.broadcast_to(R_AMP, (batch, NUM_LEADS))),
        (0.025 * qrs_scale, 0.010 * qrs_scale, np.where(lbbb, 0.0, S_AMP)),
        (qt, np.full(batch, 0.045), t_amp),
        (np.full(batch, 0.07), np.full(batch, 0.018), np.where(rbbb, RBBB_RPRIME, 0.0)),
        (np.full(batch, 0.06), np.full(batch, 0.022), np.where(rbbb, RBBB_SLUR, 0.0)),
        (np.full(batch, 0.045), np.full(batch, 0.02), np.where(lbbb, LBBB_NOTCH, 0.0)),
        (np.full(batch, 0.045), np.full(batch, 0.028), np.where(lbbb, LBBB_DEEP_S, 0.0)),
    ]
    template = np.zeros((batch, NUM_LEADS, len(tau)))
    for centre, width, amplitude in waves:
        shape = np.exp(-0.5 * ((tau[None, :] - centre[:, None]) / width[:, None]) ** 2)
        template += (amplitude * lead_gain)[:, :, None] * shape[:, None, :]

    # Impulse at each beat, convolved with the template through the FFT; output starts K samples in.
    k = len(tau)
    impulses = np.zeros((batch, n_samples + k), dtype=np.float32)
    position = np.round(beat_times * fs).astype(np.int64) + k - pre
    inside = (position >= 0) & (position < n_samples + k)
    impulses[np.nonzero(inside)[0], position[inside]] = 1.0
    n_fft = scipy.fft.next_fast_len(n_samples + 2 * k, real=True)
    spectrum = scipy.fft.rfft(impulses, n_fft)[:, None, :] * scipy.fft.rfft(template.astype(np.float32), n_fft)
    ecg = scipy.fft.irfft(spectrum, n_fft)[..., k:k + n_samples]

    t = np.arange(n_samples) / fs
    f_rate = rng.uniform(4.5, 8.0, batch)[:, None]
    f_phase = 2 * np.pi * f_rate * t + 0.8 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4, batch)[:, None] * t)
    f_waves = rng.uniform(0.05, 0.1, batch)[:, None] * np.sin(f_phase + rng.uniform(0, 2 * np.pi, batch)[:, None])
    ecg[af] += F_WAVE_AMP[:, None] * f_waves[af][:, None, :]
    # Baseline wander: one slow sine per record, its phase per lead as a mix of sin and cos.
    wander_phase = 2 * np.pi * rng.uniform(0.1, 0.4, (batch, 1, 1)) * t
    lead_phase = rng.uniform(0, 2 * np.pi, (batch, NUM_LEADS, 1))
    wander_amp = rng.uniform(0.05, 0.3, (batch, NUM_LEADS, 1))
    ecg += wander_amp * (np.cos(lead_phase) * np.sin(wander_phase) + np.sin(lead_phase) * np.cos(wander_phase))
    ecg += 0.02 * np.sin(2 * np.pi * 50 * t + rng.uniform(0, 2 * np.pi, (batch, 1, 1)))
    ecg += rng.uniform(0.01, 0.03, (batch, 1, 1)) * rng.standard_normal((batch, NUM_LEADS, n_samples), dtype=np.float32)
    return ecg


def challenge_codes(rhythm, iavb, bbb):
    """SNOMED codes of one synthetic record, as a Challenge header lists them."""
    codes = [DEMO_CLASSES[rhythm]]  # rhythm index order matches DEMO_CLASSES: NSR, SB, STach, AF
    if iavb:
        codes.append(DEMO_CLASSES[4])
    if bbb:
        codes.append(DEMO_CLASSES[4 + bbb])
    return codes


def write_challenge_record(folder, name, physical, fs, codes, gains, baselines, age, sex):
    """One record in the Challenge's format: WFDB header + MATLAB v4 `val` int16 (12 x n)."""
    adc = np.clip(np.round(physical * gains[:, None] + baselines[:, None]), -32767, 32767).astype(np.int16)
    scipy.io.savemat(folder / f"{name}.mat", {"val": adc}, format="4")
    checksums = ((adc.astype(np.int64).sum(axis=1) + 32768) % 65536) - 32768
    lines = [f"{name} {NUM_LEADS} {fs:g} {adc.shape[1]}"]
    lines += [f"{name}.mat 16x1+24 {gains[i]:.1f}({baselines[i]})/mV 16 0 {adc[i, 0]} {checksums[i]} 0 {LEADS[i]}"
              for i in range(NUM_LEADS)]
    lines += [f"# Age: {age}", f"# Sex: {sex}", f"# Dx: {','.join(codes)}",
              "# Rx: Unknown", "# Hx: Unknown", "# Sx: Unknown"]
    (folder / f"{name}.hea").write_text("\n".join(lines) + "\n")


def write_demo_challenge(folder, n_records, rng, fs=FS, seconds=10, batch=256):
    """A Challenge-format folder of synthetic records named D00000, D00001, ..."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for start in range(0, n_records, batch):
        n = min(batch, n_records - start)
        rhythm, iavb, bbb = sample_conditions(n, rng)
        signals = synthesize_ecg(rhythm, iavb, bbb, fs, int(seconds * fs), rng)
        gains = rng.choice([200.0, 500.0, 1000.0], size=n)
        baselines = rng.integers(-50, 51, size=(n, NUM_LEADS))
        ages, sexes = rng.integers(18, 90, size=n), rng.choice(["Male", "Female"], size=n)
        for i in range(n):
            codes = challenge_codes(rhythm[i], iavb[i], bbb[i])
            write_challenge_record(folder, f"D{start + i:05d}", signals[i], fs, codes,
                                   np.full(NUM_LEADS, gains[i]), baselines[i], ages[i], sexes[i])


def write_demo_code15(folder, n_exams, rng, per_part=DEMO_CODE15_PER_PART, batch=256):
    """CODE-15 format: exams.csv + exams_part{k}.hdf5 (`tracings` (N, 4096, 12) at 400 Hz, `exam_id`)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rhythm, iavb, bbb = sample_conditions(n_exams, rng)
    exam_ids = 100000 + rng.permutation(10 * n_exams)[:n_exams]
    patient_ids = rng.integers(0, max(1, int(0.8 * n_exams)), size=n_exams)
    labels = {"1dAVb": iavb, "RBBB": bbb == 1, "LBBB": bbb == 2, "SB": rhythm == RHYTHMS.index("brady"),
              "AF": rhythm == RHYTHMS.index("af"), "ST": rhythm == RHYTHMS.index("tachy")}
    part_of = np.arange(n_exams) // per_part
    exams = pd.DataFrame({"exam_id": exam_ids, "age": rng.integers(18, 90, n_exams),
                          "is_male": rng.random(n_exams) < 0.5, **labels, "patient_id": patient_ids,
                          "normal_ecg": ~np.any(list(labels.values()), axis=0),
                          "trace_file": [f"exams_part{p}.hdf5" for p in part_of]})
    exams.to_csv(folder / "exams.csv", index=False)
    pad = (CODE15_SAMPLES - 10 * CODE15_FS) // 2
    for part in np.unique(part_of):
        rows = np.flatnonzero(part_of == part)
        with h5py.File(folder / f"exams_part{part}.hdf5", "w") as f:
            tracings = f.create_dataset("tracings", (len(rows), CODE15_SAMPLES, NUM_LEADS), dtype="float32")
            f.create_dataset("exam_id", data=exam_ids[rows])
            for start in range(0, len(rows), batch):
                sub = rows[start:start + batch]
                ecg = synthesize_ecg(rhythm[sub], iavb[sub], bbb[sub], CODE15_FS, 10 * CODE15_FS, rng)
                tracings[start:start + len(sub), pad:pad + 10 * CODE15_FS] = np.transpose(ecg, (0, 2, 1))


def make_demo(demo_dir=DEMO_DIR, seed=0, n_records=DEMO_RECORDS, n_code15=DEMO_CODE15, workers=1):
    """Write synthetic Challenge- and CODE-15-format data under `demo_dir` and convert it like real data."""
    demo_dir = Path(demo_dir)
    raw_dir = demo_dir / "OriginalData"
    out_dir = demo_dir / "Preprocessed_dataset"
    rng = np.random.default_rng(seed)
    write_demo_challenge(raw_dir / DEMO_DATASET, n_records, rng)
    write_demo_code15(raw_dir / "CODE15", n_code15, rng)
    log.info("demo: wrote %d Challenge-format records and %d CODE-15 exams under %s", n_records, n_code15, raw_dir)
    challenge_h5 = convert_challenge(raw_dir / DEMO_DATASET, out_dir, DEMO_DATASET, workers=workers)
    code15_train, code15_valid = convert_code15(raw_dir / "CODE15", out_dir, seed=seed, workers=workers)
    return {"challenge_h5": challenge_h5, "code15_train": code15_train, "code15_valid": code15_valid,
            "raw_dir": raw_dir}


# ---------------------------------------------------------------------------------------------
# Experiment splits and lazy datasets
# ---------------------------------------------------------------------------------------------
def iterative_stratification(labels, proportions, rng):
    """Subset index per row, multi-label stratified (Sechidis, Tsoumakas & Vlahavas, 2011).

    Repeatedly take the label with the fewest unassigned examples and give each of its examples
    to the subset that still wants most of that label (ties: the subset wanting most examples
    overall, then random). Rows without labels fill the subsets wanting most examples.
    """
    labels = np.asarray(labels) > 0
    n_rows = len(labels)
    proportions = np.asarray(proportions, dtype=np.float64) / np.sum(proportions)
    wanted = proportions * n_rows
    wanted_label = proportions[:, None] * labels.sum(axis=0)[None, :]
    subset = np.full(n_rows, -1)
    visit = rng.permutation(n_rows)

    def pick(scores, tie_break):
        best = np.flatnonzero(scores == scores.max())
        if len(best) > 1:
            best = best[tie_break[best] == tie_break[best].max()]
        return best[0] if len(best) == 1 else rng.choice(best)

    while True:
        open_rows = visit[subset[visit] < 0]
        remaining = labels[open_rows].sum(axis=0)
        if not remaining.any():
            break
        label = np.flatnonzero(remaining == remaining[remaining > 0].min())[0]
        for row in open_rows[labels[open_rows, label]]:
            chosen = pick(wanted_label[:, label], wanted)
            subset[row] = chosen
            wanted_label[chosen] -= labels[row]
            wanted[chosen] -= 1
    for row in visit[subset[visit] < 0]:
        chosen = pick(wanted, wanted)
        subset[row] = chosen
        wanted[chosen] -= 1
    return subset


class ECGH5Dataset(torch.utils.data.Dataset):
    """Records of an HDF5 file read lazily by index; one file handle per process, opened on first use.

    `leads`: indices (or names) of leads to keep; the others are zeroed (reduced-lead students).
    """

    def __init__(self, h5_path, indices=None, leads=None):
        self.h5_path = Path(h5_path)
        with h5py.File(self.h5_path, "r") as f:
            all_labels = f["label_set"][:]
        self.indices = np.arange(len(all_labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = all_labels[self.indices].astype(np.float32)
        self.num_classes = self.labels.shape[1]
        self.lead_mask = None
        if leads is not None:
            keep = [LEADS.index(lead) if isinstance(lead, str) else int(lead) for lead in leads]
            self.lead_mask = torch.zeros(NUM_LEADS, 1, 1)
            self.lead_mask[keep] = 1.0
        self._records = None
        self._pid = None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        if self._records is None or self._pid != os.getpid():
            self._records = h5py.File(self.h5_path, "r")["record_set"]
            self._pid = os.getpid()
        x = torch.from_numpy(self._records[self.indices[i]])
        if self.lead_mask is not None:
            x = x * self.lead_mask
        return x, torch.from_numpy(self.labels[i])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_records"] = None
        return state


class ExperimentData(NamedTuple):
    train: ECGH5Dataset
    valid: ECGH5Dataset
    test: ECGH5Dataset
    positive_rates: np.ndarray
    positive_probably: float
    class_codes: list
    class_names: list


def load_experiment_datasets(h5_path, finetune_label_ratio=0.1, seed=18):
    """The experiment split: stratified labelled pool (ratio) vs test, then pool 80% train / 20% valid."""
    with h5py.File(h5_path, "r") as f:
        labels = f["label_set"][:]
        class_codes = [str(c) for c in f.attrs.get("class_codes", [])]
        class_names = [str(c) for c in f.attrs.get("class_names", [])]
    if not class_codes:  # a file converted elsewhere: only record_set and label_set
        class_codes = [str(i) for i in range(labels.shape[1])]
        class_names = list(class_codes)
    rng = np.random.default_rng(seed)
    first = iterative_stratification(labels, [finetune_label_ratio, 1 - finetune_label_ratio], rng)
    pool, test = np.flatnonzero(first == 0), np.flatnonzero(first == 1)
    second = iterative_stratification(labels[pool], [0.8, 0.2], rng)
    train, valid = pool[second == 0], pool[second == 1]
    positive_rates = labels[pool].mean(axis=0)
    return ExperimentData(ECGH5Dataset(h5_path, train), ECGH5Dataset(h5_path, valid), ECGH5Dataset(h5_path, test),
                          positive_rates, float(positive_rates.mean()), class_codes, class_names)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser():
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT,
                        help="folder holding one sub-folder per Challenge dataset (default: OriginalData in the repo)")
    parser.add_argument("--out", type=Path, default=PREPROCESSED_DIR,
                        help="where the HDF5 files go (default: Preprocessed_dataset in the repo; "
                             "--demo uses DIR/Preprocessed_dataset)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=[*DATASETS, DEMO_DATASET],
                        help="which Challenge datasets to convert (default: all four)")
    parser.add_argument("--workers", type=int_at_least(1), default=min(8, os.cpu_count() or 1),
                        help="worker processes (default: CPU count, at most 8)")
    parser.add_argument("--chunk", type=int_at_least(1), default=CHUNK, help="records per unit of work")
    parser.add_argument("--code15", type=Path, default=None, metavar="DIR",
                        help="convert CODE-15 (exams.csv + exams_part*.hdf5) in DIR instead")
    parser.add_argument("--valid-fraction", type=float_in(0, 1), default=0.1, help="CODE-15 patients held out for validation")
    parser.add_argument("--seed", type=int_at_least(0), default=18, help="CODE-15 patient split seed")
    parser.add_argument("--demo", nargs="?", const=DEMO_DIR, type=Path, default=None, metavar="DIR",
                        help="write synthetic demo data under DIR (default: demo in the repo) and convert it")
    return parser


def main(argv=None):
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        if args.demo is not None:
            make_demo(args.demo, workers=args.workers)
        elif args.code15 is not None:
            convert_code15(args.code15, args.out, args.valid_fraction, args.seed, args.workers, args.chunk)
        else:
            missing = [args.data_root / d for d in args.datasets if not (args.data_root / d).is_dir()]
            if missing:
                raise FileNotFoundError(missing_dataset_message(*missing))
            for dataset in args.datasets:
                convert_challenge(args.data_root / dataset, args.out, dataset, args.workers, args.chunk)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    main()
