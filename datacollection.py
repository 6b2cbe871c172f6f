"""Challenge 2021 and CODE-15 records -> the HDF5 files every pipeline reads.

    python datacollection.py --data_root OriginalData --preprocessed_dir Preprocessed_dataset [--finetune_dataset ...]
    python datacollection.py --code15_dir DIR --preprocessed_dir Preprocessed_dataset
    python datacollection.py --demo [--demo_dir DIR]          # synthetic data (synthetic_ecg.py)

Each record: physical = (adc - baseline) / gain, resampled to 500 Hz when needed, 3rd-order
Butterworth 1-47 Hz band-pass forward-backward, each lead standardised, right-padded or cut to
6144 samples, float32. Records stream through in chunks, so memory does not grow with the dataset.
The flags and their defaults are main.py's.
"""
import collections
import json
import logging
import multiprocessing
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pandas as pd
import wfdb
from scipy.signal import butter, filtfilt, resample_poly
from tqdm import tqdm

from helper_code import (CHALLENGE_DATA_URL, CODE15_DATA_URL, CODE15_TRAIN_H5, CODE15_VALID_H5, LABEL_ABBREVIATION,
                         LABEL_NAME, LEADS, NUM_LEADS, atomic_path, dataset_classes, h5_name)

log = logging.getLogger("datacollection")

FS = 500                      # Hz, every stored record
SAMPLES = 6144                # stored length: right-padded with zeros or cut
BAND_HZ = (1.0, 47.0)
FILTER_ORDER = 3
FILTER_B, FILTER_A = butter(FILTER_ORDER, BAND_HZ, btype="bandpass", fs=FS)
MIN_SAMPLES = 3 * max(len(FILTER_A), len(FILTER_B)) + 1   # filtfilt's edge padding needs this many
FLAT_STD = 1e-9               # mV: a filtered lead this still is flat (a constant leaves ~1e-16 of residue)
CHUNK = 32                    # records per unit of work; bounds memory (~10 MB of float32 per chunk)

CODE15_LABELS = ("1dAVb", "RBBB", "LBBB", "SB", "ST", "AF")   # exams.csv's order, as the published heads' outputs
CODE15_FS = 400
CODE15_SAMPLES = 4096         # 10 s at 400 Hz, zero-padded symmetrically from 4000 in the real files

CHALLENGE_SOURCE = f"the PhysioNet/CinC Challenge 2021 training data ({CHALLENGE_DATA_URL})"
CODE15_SOURCE = f"CODE-15% ({CODE15_DATA_URL})"

PREPROCESSING = {
    "fs": FS,
    "samples": SAMPLES,
    "band_hz": list(BAND_HZ),
    "filter": f"Butterworth order {FILTER_ORDER} band-pass, forward-backward (scipy.signal.filtfilt)",
    "scaling": "per lead: zero mean, unit variance (population std; flat leads stay zero)",
    "length": f"right-padded with zeros or cut to {SAMPLES} samples",
    "dtype": "float32",
}


# ---------------------------------------------------------------------------------------------
# Names and locations
# ---------------------------------------------------------------------------------------------
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
    flat = std < FLAT_STD
    std[flat] = 1.0
    scaled = np.where(flat, 0.0, (filtered - mean) / std)
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
    """The codes of a header's Dx comment, spelled `#Dx:` (the Challenge's files) or `# Dx:`; None without one."""
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


def read_challenge_record(header_path, require_dx=True, leads=LEADS):
    """(Dx codes, physical signal (12, n) float64 with rows in LEADS order, fs) of one record, or RecordSkipped.

    wfdb parses the header and reads the .mat (format 16 at byte offset 24, the MATLAB v4 data);
    its physical values are (adc - baseline) / gain per lead, NaN at WFDB's invalid-sample value.
    A 12-signal record is taken in its stored order (every Challenge record's: LEADS).

    For prediction: `leads`, the leads a model reads, lets a header of fewer signals through when
    it names each of them (a reduced-lead record; names matched ignoring case): every signal named
    as one of LEADS goes to its row, the rows of absent leads stay zero (what lead masking makes
    of them anyway). require_dx=False: a header without Dx codes gives [] (unlabelled records).
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
    if record.n_sig == NUM_LEADS:
        rows = list(range(NUM_LEADS))
    else:
        row_of = {lead.lower(): row for row, lead in enumerate(LEADS)}
        rows = [row_of.get(name.lower()) for name in record.sig_name or []]
        missing = [lead for lead in leads if LEADS.index(lead) not in rows]
        if record.n_sig > NUM_LEADS or missing:
            signals = f"{record.n_sig} signals ({', '.join(record.sig_name or [])})"
            if len(leads) < NUM_LEADS:
                signals += f"; the model reads {', '.join(leads)}, missing {', '.join(missing)}"
            raise RecordSkipped("not 12 leads", signals)
    if not record.sig_len:
        raise RecordSkipped("zero length")
    codes = dx_codes(record.comments or [])
    if not codes and require_dx:
        raise RecordSkipped("unparseable header", "no '#Dx:' codes")
    if signal_error is not None:
        raise RecordSkipped("unreadable .mat", f"{type(signal_error).__name__}: {signal_error}")
    check_mat_header(header_path.with_suffix(".mat"), record.n_sig, record.sig_len)
    stored = record.p_signal.T
    if stored.shape != (record.n_sig, record.sig_len):
        raise RecordSkipped("unreadable .mat", f"read {stored.shape}, header says {(record.n_sig, record.sig_len)}")
    physical = np.zeros((NUM_LEADS, record.sig_len))
    standard = [i for i, row in enumerate(rows) if row is not None]
    physical[[rows[i] for i in standard]] = stored[standard]
    if not np.isfinite(physical).all():
        raise RecordSkipped("non-finite samples", f"{int((~np.isfinite(physical)).sum())} NaN/inf values")
    if round(physical.shape[1] * FS / record.fs) < MIN_SAMPLES:
        raise RecordSkipped("too short", f"{record.sig_len} samples at {record.fs} Hz")
    return codes or [], physical, float(record.fs)


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


def check_unique_names(dataset, records):
    """A ValueError, in one line naming both paths, when two (name, header_path) records share a
    name: a row is known by its record's name, and a record found twice (a copied folder) would
    also sit in two rows, perhaps one in training and one in the test set."""
    seen, twice = {}, []
    for name, header_path in records:
        if name in seen:
            twice.append((name, seen[name], header_path))
        seen.setdefault(name, header_path)
    if twice:
        name, first, second = twice[0]
        more = f" ({len(twice)} names found twice in all)" if len(twice) > 1 else ""
        raise ValueError(f"{dataset}: record {name} occurs twice, {first} and {second}{more}; rows are known by "
                         f"record name, so a name must be one record: remove the copy; nothing converted")


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
    check_unique_names(dataset, records)
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


def convert_challenge_folders(data_root, datasets, out_dir, workers=1, chunk=CHUNK):
    """Convert `data_root/{dataset}` for each of `datasets`; every folder is checked before any work."""
    missing = [data_root / d for d in datasets if not (data_root / d).is_dir()]
    if missing:
        raise FileNotFoundError(missing_dataset_message(*missing))
    return [convert_challenge(data_root / dataset, out_dir, dataset, workers, chunk) for dataset in datasets]


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


def convert_code15(code15_dir, out_dir, valid_fraction, seed, workers=1, chunk=CHUNK):
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

    train_path, valid_path = out_dir / CODE15_TRAIN_H5, out_dir / CODE15_VALID_H5
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


if __name__ == "__main__":
    import main  # the flags and their defaults live there
    main.main(prog="datacollection.py")
