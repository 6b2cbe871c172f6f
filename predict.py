"""Apply a trained model to ECG records, or export it to ONNX.

    python predict.py --model MODEL --records PATH [--out predictions.csv] [--challenge_outputs DIR] [--plot DIR]
    python predict.py --model MODEL --export model.onnx [--int8 [--calibrate RECORDS]]
    python predict.py --model pretrained_checkpoint/CODE_testtinylightbias_full_checkpoint.pkl --records PATH

MODEL is a finished stage's `merged_*.pt` (a fine-tuned teacher or a distilled student: it names
its classes, thresholds, leads and preprocessing), an ONNX file this script exported (float32 or
int8; its metadata names the same), or a CODE-15 backbone `{pretrain}{config}bias_full_checkpoint.pkl`,
applied as it is: its head's six CODE-15 labels at threshold 0.5 (the config from the file name,
or --config).
PATH is a folder of Challenge-format records (.hea + .mat, sub-folders allowed, any sampling
rate), one .hea file, or an HDF5 written by datacollection.py. Records are read and preprocessed
by datacollection.py's own functions, scored in batches, and written as they go; every output
appears only when complete. docs/predict.md describes the CSV, the Challenge output files, the
pictures and the int8 model.
"""
import argparse
import collections
import contextlib
import csv
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import h5py
import numpy as np
import torch
from tqdm import tqdm

import ecg_plot
import evaluation
from datacollection import (CODE15_LABELS, PREPROCESSING, SAMPLES, RecordSkipped, find_records, preprocess_many,
                            read_challenge_record)
from helper_code import (LEADS, NUM_LEADS, FlagParser, atomic_path, backbone_name, get_device, int_at_least,
                         settings_differences, setup_logging)
from model_file import is_merged, model_from_file
from model_src_ecg import KEPT_LEADS, MODEL_CONFIGS, build_model, load_pretrained
from model_src_ecg.backbone import DDP_PREFIX
from onnx_export import (INT8_SUFFIX, ONNX_INPUT, ONNX_METADATA, ONNX_OUTPUTS, ONNX_PACKAGES, ONNX_RUNTIME, export_onnx,
                         missing_onnx_packages)

log = logging.getLogger("adagrad_fusion.predict")

BATCH = 32                      # records read, preprocessed and scored together
DEFAULT_OUT = Path("predictions.csv")
BACKBONE_THRESHOLD = 0.5
# The SNOMED CT codes of the CODE-15 labels (RBBB: 59118001; the Challenge scores 713427006 as the same class)
CODE15_SNOMED = {"1dAVb": "270492004", "RBBB": "59118001", "LBBB": "164909002", "SB": "426177001",
                 "ST": "427084000", "AF": "164889003"}
HDF5_SUFFIXES = (".h5", ".hdf5")
ONNX_SUFFIX = ".onnx"


@dataclass
class Model:
    """A network in eval mode and what applying it needs."""
    net: torch.nn.Module
    config: str
    class_codes: list
    class_names: list
    thresholds: np.ndarray          # float64, one per class: label = probability >= threshold
    leads: tuple                    # the leads it reads; the others are zeroed (KEPT_LEADS)
    preprocessing: dict | None      # what its training records went through (None: not recorded)
    split: dict | None = None       # the records it was validated and tested on (model_file.split_description)
    session: object = None          # an ONNX file's onnxruntime.InferenceSession; `net` is then None


# ---------------------------------------------------------------------------------------------
# The model: a merged stage file, or a CODE-15 backbone as published
# ---------------------------------------------------------------------------------------------
def load_model(path, device, config=None, threads=None):
    """The Model in `path`, or a ValueError whose message names the flag at fault. `threads`: ONNX
    Runtime's intra-op threads for an ONNX file (None: its choice)."""
    if Path(path).suffix.lower() == ONNX_SUFFIX:
        if config is not None:
            raise ValueError(f"argument --config: only for a backbone checkpoint; {path} is an ONNX model, whose "
                             f"metadata names its config")
        return onnx_model(path, threads)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        detail = str(error).strip().split(". ")[0]      # torch's messages run on for lines
        reason = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
        raise ValueError(f"argument --model: {path} is not a model file torch can read ({reason})") from None
    if is_merged(saved):
        if config is not None:
            raise ValueError(f"argument --config: only for a backbone checkpoint; {path} is a merged model file, "
                             f"which names its config")
        _, net, description = model_from_file(saved, device, path)
        model = Model(net, description["config"], [str(c) for c in description["class_codes"]],
                      [str(n) for n in description["class_names"]],
                      np.asarray(description["thresholds"], np.float64), tuple(description["leads"]),
                      description["preprocessing"], description.get("split"))
    elif isinstance(saved, dict) and saved and all(isinstance(v, torch.Tensor) for v in saved.values()):
        model = backbone_model(saved, Path(path), config, device)
    else:
        raise ValueError(f"argument --model: {path} is neither a merged model file (merged_*.pt) nor a backbone "
                         f"checkpoint (a state_dict)")
    if KEPT_LEADS.get(len(model.leads)) != model.leads:
        raise ValueError(f"argument --model: it reads leads {', '.join(model.leads)}, a set lead masking does not "
                         f"know ({'; '.join(', '.join(leads) for leads in KEPT_LEADS.values())})")
    return model


def backbone_config(path):
    """The config in a backbone file's name `{pretrain}{config}bias_full_checkpoint.pkl` (the
    longest that fits: tinylight before light)."""
    for config in sorted(MODEL_CONFIGS, key=len, reverse=True):
        if path.name.endswith(backbone_name("", config)):
            return config
    raise ValueError(f"argument --config: {path.name} does not tell the backbone's config (its name is not "
                     f"{backbone_name('{pretrain}', '{config}')}); give it with --config")


def backbone_model(state, path, config, device):
    """A CODE-15 backbone applied as it is: its trunk and its six-output head (classifier.1), at 0.5."""
    config = config or backbone_config(path)
    prefix = DDP_PREFIX if all(k.startswith(DDP_PREFIX) for k in state) else ""
    head = {name: state.get(f"{prefix}classifier.1.{name}") for name in ("weight", "bias")}
    if head["weight"] is None or head["bias"] is None:
        raise ValueError(f"argument --model: {path} has no classifier.1 (the CODE-15 head): not a backbone checkpoint")
    if head["weight"].shape[0] != len(CODE15_LABELS):
        raise ValueError(f"argument --model: {path}'s head has {head['weight'].shape[0]} outputs; a CODE-15 backbone "
                         f"has {len(CODE15_LABELS)} ({', '.join(CODE15_LABELS)})")
    net = build_model(config, len(CODE15_LABELS), r=0)
    try:
        load_pretrained(net, path)          # the trunk, checked key by key and shape by shape
        net.classifier[1].load_state_dict(head)
    except (ValueError, RuntimeError):
        raise ValueError(f"argument --model: {path} does not fit a {config} backbone: its keys or shapes differ "
                         f"(another config? --config names it)") from None
    net.requires_grad_(False)
    return Model(net.to(device).eval(), config, [CODE15_SNOMED[label] for label in CODE15_LABELS],
                 list(CODE15_LABELS), np.full(len(CODE15_LABELS), BACKBONE_THRESHOLD), LEADS, dict(PREPROCESSING))


def onnx_session(path, threads=None):
    """An ONNX Runtime session on the CPU for the file at `path`, on `threads` intra-op threads (None:
    ONNX Runtime's choice, one per core)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or 0
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_model(path, threads=None):
    """A model exported by this script (float32 or int8), run by ONNX Runtime: its metadata says what
    applying it needs, as a merged file's description does."""
    try:
        session = onnx_session(path, threads)
    except Exception as error:      # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"argument --model: {path} is not an ONNX model ONNX Runtime can load ({detail})") from None
    metadata = session.get_modelmeta().custom_metadata_map
    missing = [key for key in ONNX_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"argument --model: {path} lacks the metadata predict.py --export writes "
                         f"({', '.join(missing)}); export the model with predict.py")
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if inputs != [ONNX_INPUT] or ONNX_OUTPUTS[0] not in outputs:
        raise ValueError(f"argument --model: {path} takes {', '.join(inputs)} and gives {', '.join(outputs)}; a file "
                         f"of predict.py --export takes {ONNX_INPUT} and gives {', '.join(ONNX_OUTPUTS)}")
    read = {key: json.loads(metadata[key]) for key in ONNX_METADATA if key != "config"}
    return Model(None, metadata["config"], [str(c) for c in read["class_codes"]], [str(n) for n in read["class_names"]],
                 np.asarray(read["thresholds"], np.float64), tuple(read["leads"]), read["preprocessing"],
                 session=session)


def check_preprocessing(model, applied, what, flag="--records"):
    """A ValueError (naming `flag`) when the records are (to be) preprocessed otherwise than the
    model's training records were; a warning where either side does not say."""
    if model.preprocessing is None:
        log.warning("the model does not record how its training records were preprocessed; assuming as %s", what)
    elif applied is None:
        log.warning("%s does not record its preprocessing; assuming the model's", what)
    else:
        differences = settings_differences(model.preprocessing, applied)
        if differences:
            raise ValueError(f"argument {flag}: the model was trained on records preprocessed otherwise than "
                             f"{what} ({differences})")


# ---------------------------------------------------------------------------------------------
# Records: batches of preprocessed inputs, and the records that could not be used
# ---------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    names: list
    inputs: np.ndarray       # (k, 12, 1, SAMPLES) float32, preprocessed as in training
    flat: np.ndarray         # (k, 12) bool: a lead whose samples are all equal (HDF5: all zero)
    skipped: list            # (name, reason, detail) of records not used
    recorded: list           # (physical signal (12, n) in mV, fs) per record as read; [] from an HDF5


@dataclass
class RecordSource:
    path: Path
    total: int              # records found, usable or not
    batches: Callable       # batches(batch_size): every Batch in order, read as they are asked for


def skipped_only(skipped):
    return Batch([], np.zeros((0, NUM_LEADS, 1, SAMPLES), np.float32), np.zeros((0, NUM_LEADS), bool), skipped, [])


def read_batch(records, leads):
    """Read and preprocess (name, header_path) records exactly as the converter does; unlabelled
    records are fine, and a reduced-lead model needs only its leads."""
    signals, rates, names, skipped = [], [], [], []
    for name, header_path in records:
        try:
            _, physical, fs = read_challenge_record(header_path, require_dx=False, leads=leads)
        except RecordSkipped as skip:
            skipped.append((name, skip.reason, skip.detail))
            continue
        signals.append(physical)
        rates.append(fs)
        names.append(name)
    flat = np.array([np.ptp(signal, axis=-1) == 0 for signal in signals], bool).reshape(-1, NUM_LEADS)
    return Batch(names, preprocess_many(signals, rates), flat, skipped, list(zip(signals, rates)))


def challenge_source(path, model, only=None, flag="--records"):
    """A folder of Challenge records (sub-folders too) or one .hea; `only`: the names to take (None:
    all). Records whose name (file stem) occurs twice are skipped: a name must say which row and
    which output file is whose."""
    check_preprocessing(model, PREPROCESSING, "datacollection.py preprocesses records", flag)
    if path.is_dir():
        records, unpaired = find_records(path)
    elif path.with_suffix(".mat").is_file():
        records, unpaired = [(path.stem, path)], []
    else:
        records, unpaired = [], [(path.stem, "missing .mat")]
    if only is not None:
        records = [(name, header_path) for name, header_path in records if name in only]
        unpaired = [(name, reason) for name, reason in unpaired if name in only]
    paths_of = collections.defaultdict(list)
    for name, header_path in records:
        paths_of[name].append(header_path)
    duplicated = [(name, "duplicate name", ", ".join(map(str, paths)))
                  for name, paths in paths_of.items() if len(paths) > 1 for _ in paths]
    records = [(name, header_path) for name, header_path in records if len(paths_of[name]) == 1]
    up_front = [(name, reason, "") for name, reason in unpaired] + duplicated

    def batches(size):
        if up_front:
            yield skipped_only(up_front)
        for start in range(0, len(records), size):
            yield read_batch(records[start:start + size], model.leads)
    return RecordSource(path, len(records) + len(up_front), batches)


def h5_source(path, model, only=None, flag="--records"):
    """An HDF5 of datacollection.py: its records, already preprocessed, by `record_names`; `only`:
    the names to take (None: all)."""
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in ("record_set", "record_names") if key not in f]
            stored = [] if missing else f["record_names"][:]
            all_names = [n.decode() if isinstance(n, bytes) else str(n) for n in stored]
            applied = json.loads(f.attrs["preprocessing"]) if "preprocessing" in f.attrs else None
    except OSError as error:
        raise ValueError(f"argument {flag}: {path} is not a readable HDF5 file ({error})") from None
    if missing:
        raise ValueError(f"argument {flag}: {path} has no {' or '.join(missing)}: not an HDF5 of datacollection.py")
    check_preprocessing(model, applied, f"{path.name}'s records", flag)
    rows = [row for row, name in enumerate(all_names) if only is None or name in only]

    def batches(size):
        with h5py.File(path, "r") as f:
            for start in range(0, len(rows), size):
                chosen = rows[start:start + size]
                contiguous = chosen[-1] - chosen[0] + 1 == len(chosen)    # a slice reads fastest
                inputs = f["record_set"][chosen[0]:chosen[-1] + 1] if contiguous else f["record_set"][chosen]
                yield Batch([all_names[row] for row in chosen], inputs, ~inputs.any(axis=(2, 3)), [], [])
    return RecordSource(path, len(rows), batches)


def record_source(path, model, only=None, flag="--records"):
    source = h5_source if path.suffix.lower() in HDF5_SUFFIXES else challenge_source
    return source(path, model, only, flag)


# ---------------------------------------------------------------------------------------------
# Scoring and the outputs
# ---------------------------------------------------------------------------------------------
def probabilities(model, inputs, device):
    """(k, classes) float32: training's own scoring (evaluation.predict: the model's lead masking,
    then the sigmoid of the main head), on one batch; an ONNX model's `probabilities` output, which
    computes the same inside its graph."""
    if model.session is not None:
        return model.session.run([ONNX_OUTPUTS[0]], {ONNX_INPUT: np.ascontiguousarray(inputs, np.float32)})[0]
    batch = [(torch.from_numpy(inputs), torch.zeros(len(inputs)))]
    return evaluation.predict(model.net, batch, device, len(model.leads))[1]


def csv_columns(model):
    """`record`, then per class `{code}_{name}_probability` and `{code}_{name}_label`."""
    columns = ["record"]
    for code, name in zip(model.class_codes, model.class_names):
        columns += [f"{code}_{name}_probability", f"{code}_{name}_label"]
    return columns


def number(probability):
    """The shortest text that reads back as the same float32."""
    return str(np.float32(probability))


def challenge_output(name, class_codes, labels, probs):
    """One record's file in the PhysioNet/CinC Challenge 2021 output format: `#record`, then the
    classes, the binary labels and the probabilities, each a comma-separated line."""
    lines = [f"#{name}", ",".join(class_codes), ",".join(str(int(label)) for label in labels),
             ",".join(number(p) for p in probs)]
    return "\n".join(lines) + "\n"


def plot_title(name, class_names, labels, probs):
    """The record's name and each class labelled 1, with its probability."""
    found = [f"{class_name} {p:.3f}" for class_name, label, p in zip(class_names, labels, probs) if label]
    return f"{name}:  {',  '.join(found)}" if found else f"{name}:  no class at or above its threshold"


@contextlib.contextmanager
def staged_folder(final_dir):
    """A temporary folder beside `final_dir`; its files move into `final_dir` only when the block
    succeeds (each move atomic), so a failed run adds nothing and replaces nothing there."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))
    try:
        yield stage
        final_dir.mkdir(exist_ok=True)
        for path in sorted(stage.iterdir()):
            os.replace(path, final_dir / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def predict_records(model, source, out, challenge_dir, device, batch_size=BATCH, plot_dir=None):
    """Score every usable record of `source`; write the CSV `out` (and one Challenge output file per
    record into `challenge_dir`, one PNG printout per record into `plot_dir`). Returns {predicted,
    skipped: {reason: count}, flat, out}."""
    skipped, predicted, flat_records = collections.Counter(), 0, 0
    model_rows = [LEADS.index(lead) for lead in model.leads]
    staged = staged_folder(challenge_dir) if challenge_dir is not None else contextlib.nullcontext()
    staged_plots = staged_folder(plot_dir) if plot_dir is not None else contextlib.nullcontext()
    with atomic_path(out) as csv_tmp, open(csv_tmp, "w", newline="") as csv_file, staged as stage, \
            staged_plots as plot_stage, \
            tqdm(total=source.total, desc=f"predict {source.path.name}", unit="rec", mininterval=1) as bar:
        writer = csv.writer(csv_file)
        writer.writerow(csv_columns(model))
        for batch in source.batches(batch_size):
            for name, reason, detail in batch.skipped:
                log.warning("skipped %s: %s%s", name, reason, f" ({detail})" if detail else "")
                skipped[reason] += 1
            probs = probabilities(model, batch.inputs, device) if batch.names else []
            for i, (name, flat, record_probs) in enumerate(zip(batch.names, batch.flat[:, model_rows], probs)):
                record_labels = record_probs >= model.thresholds
                if flat.any():
                    flat_records += 1
                    log.warning("%s: lead %s flat (every sample equal; the model reads it): scored as given", name,
                                ", ".join(lead for lead, is_flat in zip(model.leads, flat) if is_flat))
                writer.writerow([name, *(text for p, label in zip(record_probs, record_labels)
                                         for text in (number(p), int(label)))])
                if stage is not None:
                    (stage / f"{name}.csv").write_text(challenge_output(name, model.class_codes, record_labels,
                                                                        record_probs))
                if plot_stage is not None:
                    signal, fs = batch.recorded[i]
                    ecg_plot.plot_ecg(plot_stage / f"{name}.png", signal, fs,
                                      plot_title(name, model.class_names, record_labels, record_probs))
            predicted += len(batch.names)
            bar.update(len(batch.names) + len(batch.skipped))
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items())) or "none"
        log.info("%s: found %d records, predicted %d, skipped %d (%s); %d with a flat lead the model reads",
                 source.path, source.total, predicted, sum(skipped.values()), reasons, flat_records)
        if not predicted:
            raise SystemExit(f"predict.py: error: no usable record in {source.path}; nothing written")
    also = ""
    if challenge_dir is not None:
        also += f" and {predicted} Challenge output files in {challenge_dir}"
    if plot_dir is not None:
        also += f" and {predicted} pictures in {plot_dir}"
    log.info("wrote %s%s", out, also)
    return {"predicted": predicted, "skipped": dict(skipped), "flat": flat_records, "out": Path(out)}


# ---------------------------------------------------------------------------------------------
# The records --int8 calibrates on (onnx_export quantizes)
# ---------------------------------------------------------------------------------------------
def calibration_source(model, path):
    """The records --int8 calibrates on: of `path` (None: the HDF5 the model's run split), only those
    the model names as its validation records, so never a test record. A model that names no split
    (a backbone, or a merged file written before merged files named theirs) takes every record of
    `path`, with a warning. A ValueError names what is missing."""
    split = model.split
    if split is None:
        if path is None:
            raise ValueError("argument --calibrate: needed, since the model names no validation split (a backbone, "
                             "or a merged file written before merged files named theirs): give an HDF5 or a folder "
                             "of records it will not be tested on")
        log.warning("the model names no validation split: calibrating on every record of %s; none should be a "
                    "record it will be tested on", path)
        return record_source(path, model, flag="--calibrate")
    names = split["validation_names"]
    if names is None:
        raise ValueError(f"argument --calibrate: the model's validation records have no names ({split['h5']} had no "
                         f"record_names), so they cannot be told from its test records")
    if path is None:
        path = Path(split["h5"])
        if not path.is_file():
            raise ValueError(f"argument --calibrate: needed, since {path}, the HDF5 the model's run split, is not "
                             f"there: give it, or a folder holding the model's validation records")
    source = record_source(path, model, only=set(names), flag="--calibrate")
    if source.total == 0:
        raise ValueError(f"argument --calibrate: none of the {len(names)} records the model was validated on "
                         f"({', '.join(names[:3])}, ...) is in {path}; give the HDF5 its run split ({split['h5']}) "
                         f"or a folder holding them (only those are used, never a test record)")
    log.info("calibrating on the model's validation records found in %s: %d of %d", path, source.total, len(names))
    return source


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------
def existing_file(text):
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return Path(text)


def records_path(text):
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"not found: {text}")
    if not (path.is_dir() or path.suffix.lower() in (".hea", *HDF5_SUFFIXES)):
        raise argparse.ArgumentTypeError(f"expected a folder of Challenge records, a .hea file or an HDF5 "
                                         f"({', '.join(HDF5_SUFFIXES)}) of datacollection.py, got {text}")
    return path


def onnx_path(text):
    if Path(text).suffix.lower() != ".onnx" or Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"expected a file name ending in .onnx, got {text}")
    return Path(text)


def build_parser():
    parser = FlagParser(prog="predict.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=existing_file,
                        help="merged_*.pt of a finished stage, an ONNX file of --export (float32 or int8), or a "
                             "CODE-15 backbone *bias_full_checkpoint.pkl")
    parser.add_argument("--records", type=records_path, help="folder of Challenge records, one .hea, or an HDF5")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the CSV: one row per record (default: {DEFAULT_OUT})")
    parser.add_argument("--challenge_outputs", type=Path, default=None, metavar="DIR",
                        help="also one {record}.csv per record here, in the Challenge 2021 output format")
    parser.add_argument("--plot", type=Path, default=None, metavar="DIR",
                        help="also one {record}.png per record here: its 12 leads as recorded, in the clinical 3 x 4 "
                             "layout with a lead II rhythm strip, titled with each class labelled 1")
    parser.add_argument("--export", type=onnx_path, default=None, metavar="FILE.onnx",
                        help="write the model as ONNX (input (batch, 12, 1, 6144))")
    parser.add_argument("--int8", action="store_true",
                        help=f"with --export: also the model statically quantized to int8 by ONNX Runtime, "
                             f"FILE{INT8_SUFFIX} beside FILE.onnx")
    parser.add_argument("--calibrate", type=records_path, default=None, metavar="RECORDS",
                        help="the records --int8 calibrates on: an HDF5 or a folder, of which only the model's "
                             "validation records are used (default: the HDF5 its run split)")
    parser.add_argument("--config", choices=list(MODEL_CONFIGS), default=None,
                        help="a backbone checkpoint's config (default: from its file name)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="CPU threads for scoring: torch's intra-op threads, or ONNX Runtime's for an ONNX model "
                             "(default: their choice, one per core); on a loaded machine fewer can be faster")
    parser.add_argument("--batch_size", type=int_at_least(1), default=BATCH,
                        help=f"records scored together (default: {BATCH})")
    return parser


def check_flags(parser, args):
    """What no single flag's type can check; fills in --out."""
    if args.records is None and args.export is None:
        parser.error("one of the arguments --records --export is required")
    if args.records is None and (args.out is not None or args.challenge_outputs is not None or args.plot is not None):
        parser.error("argument --out/--challenge_outputs/--plot: only with --records")
    args.out = DEFAULT_OUT if args.out is None else args.out
    if args.out.is_dir():
        parser.error(f"argument --out: {args.out} is a folder; name the CSV file")
    for flag, folder in (("--challenge_outputs", args.challenge_outputs), ("--plot", args.plot)):
        if folder is not None and folder.exists() and not folder.is_dir():
            parser.error(f"argument {flag}: {folder} exists and is not a folder")
    if args.plot is not None and args.records.suffix.lower() in HDF5_SUFFIXES:
        parser.error(f"argument --plot: needs the records as recorded (a folder or a .hea); {args.records} holds "
                     f"them preprocessed")
    if args.int8 and args.export is None:
        parser.error("argument --int8: only with --export")
    if args.calibrate is not None and not args.int8:
        parser.error("argument --calibrate: only with --int8")
    is_onnx = args.model.suffix.lower() == ONNX_SUFFIX
    if is_onnx and args.export is not None:
        parser.error(f"argument --export: {args.model} is already ONNX; export from the merged_*.pt or backbone it "
                     f"came from")
    if is_onnx and args.device == "cuda":
        parser.error(f"argument --device: {args.model} runs on ONNX Runtime's CPU provider")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: CUDA is not available here")
    needed = {"--export": ONNX_PACKAGES if args.export is not None else (), "--int8": (ONNX_RUNTIME,) * args.int8,
              "--model": (ONNX_RUNTIME,) * is_onnx}
    for flag, packages in needed.items():
        missing = missing_onnx_packages(packages) if packages else []
        if missing:
            parser.error(f"argument {flag}: needs the packages {', '.join(missing)} (pip install -r "
                         f"requirements.txt, or pip install onnx onnxscript onnxruntime)")


def main(argv=None):
    """predict.py's command line; returns predict_records' summary (None with --export alone)."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    try:
        model = load_model(args.model, device, args.config, args.threads)
        source = record_source(args.records, model) if args.records is not None else None
        calibration = calibration_source(model, args.calibrate) if args.int8 else None
    except ValueError as error:
        parser.error(str(error))
    log.info("model %s: %s, %d classes (%s), leads %s, on %s", args.model, model.config, len(model.class_codes),
             ", ".join(model.class_names), ", ".join(model.leads),
             "the CPU (ONNX Runtime)" if model.session is not None else device)
    if args.export is not None:
        export_onnx(model, args.export, calibration)
    if source is not None:
        return predict_records(model, source, args.out, args.challenge_outputs, device, args.batch_size, args.plot)
    return None


if __name__ == "__main__":
    main()
