"""Synthetic ECGs for the demo, written in the exact real formats and converted like real data.

    python datacollection.py --demo [--demo_dir DIR]      # or, as part of the whole demo: python main.py --demo

One generator serves both formats: Challenge-format records (`.hea` + int16 `.mat`, `# Dx:`
SNOMED codes) and CODE-15-format exams (`exams.csv` + `exams_part{k}.hdf5` at 400 Hz). The
classes differ physiologically, so a model has something real to learn.
"""
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.fft
import scipy.io

from datacollection import CODE15_FS, CODE15_SAMPLES, FS, convert_challenge, convert_code15
from helper_code import DEMO_CLASSES, DEMO_DATASET, LEADS, NUM_LEADS

log = logging.getLogger("synthetic_ecg")

# Sizes: small enough for the whole `main.py --demo` on 2 CPU cores, large enough to learn.
DEMO_RECORDS = 1500
DEMO_CODE15 = 2000
DEMO_CODE15_PER_PART = 1000
DEMO_CODE15_VALID_FRACTION = 0.1   # of the CODE-15 patients

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


def make_demo(demo_dir, seed=0, n_records=DEMO_RECORDS, n_code15=DEMO_CODE15, workers=1):
    """Write synthetic Challenge- and CODE-15-format data under `demo_dir` and convert it like real data."""
    demo_dir = Path(demo_dir)
    raw_dir = demo_dir / "OriginalData"
    out_dir = demo_dir / "Preprocessed_dataset"
    rng = np.random.default_rng(seed)
    write_demo_challenge(raw_dir / DEMO_DATASET, n_records, rng)
    write_demo_code15(raw_dir / "CODE15", n_code15, rng)
    log.info("demo: wrote %d Challenge-format records and %d CODE-15 exams under %s", n_records, n_code15, raw_dir)
    challenge_h5 = convert_challenge(raw_dir / DEMO_DATASET, out_dir, DEMO_DATASET, workers=workers)
    code15_train, code15_valid = convert_code15(raw_dir / "CODE15", out_dir, DEMO_CODE15_VALID_FRACTION, seed,
                                                 workers=workers)
    return {"challenge_h5": challenge_h5, "code15_train": code15_train, "code15_valid": code15_valid,
            "raw_dir": raw_dir}
