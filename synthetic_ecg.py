"""Synthetic ECGs for the demo, written in the exact real formats and converted like real data.

    python datacollection.py --demo [--demo_dir DIR]      # or, as part of the whole demo: python main.py --demo

One generator serves both formats: Challenge-format records (`.hea` + int16 `.mat`, `#Dx:`
SNOMED codes) and CODE-15-format exams (`exams.csv` + `exams_part{k}.hdf5` at 400 Hz). Each class
has its own physiology, and nine of the sixteen are ones CODE-15 never labels, so fine-tuning a
CODE-15 backbone has something left to learn, as on the real Challenge sets.
"""
import contextlib
import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pandas as pd
import scipy.fft
import scipy.io

from datacollection import CODE15_FS, CODE15_SAMPLES, FS, convert_challenge, convert_code15
from helper_code import DEMO_CLASSES, DEMO_DATASET, LEADS, NUM_LEADS

log = logging.getLogger("synthetic_ecg")

# Sizes: small enough for the whole `main.py --demo` on 2 CPU cores, large enough to learn.
DEMO_RECORDS = 1600
DEMO_CODE15 = 2000
DEMO_CODE15_PER_PART = 1000
DEMO_CODE15_VALID_FRACTION = 0.1   # of the CODE-15 patients

# What each demo class is here (codes: helper_code.DEMO_CLASSES), every one drawn on its own:
#   426783006 NSR    sinus rhythm at 62-95 bpm: a P wave before every narrow QRS
#   426177001 SB     sinus bradycardia, 38-54 bpm
#   427084000 STach  sinus tachycardia, 106-150 bpm
#   164889003 AF     atrial fibrillation: irregularly irregular RR, no P wave, 4-8 Hz f-waves
#   10370003  PR     pacing rhythm: a ventricular pacemaker at a steady 60-80 bpm, no P wave; a
#                    pacing spike, then a wide QRS from the right-ventricular apex (superior axis,
#                    negative across V1-V5) with a discordant T
#   270492004 IAVB   first-degree AV block: PR prolonged (P peak 0.28-0.36 s before R, else 0.13-0.18 s)
#   59118001  RBBB   QRS 1.6-1.9x wider, late R' in V1-V2, slurred terminal S in I, aVL, V5-V6,
#                    T inverted in V1-V2
#   164909002 LBBB   QRS 1.6-1.9x wider, no septal q, broad notched R in I, aVL, V5-V6, deep broad S
#                    in V1-V3, T discordant to the QRS
#   39732003  LAD    left axis deviation: frontal QRS axis -85..-35 deg (normal -25..85): I positive,
#                    II, III, aVF negative
#   47665007  RAD    right axis deviation: frontal QRS axis 100..160 deg: I negative, III, aVF positive
#   284470004 PAC    2-4 premature atrial beats at random positions: early (50-70% of the RR), a larger
#                    P wave from a low atrial focus (axis -100..-50 deg: inverted in II, III, aVF, V1-V6),
#                    shorter PR, the same narrow QRS; the sinus node resets, so no compensatory pause
#   427172004 PVC    1-3 premature ventricular beats at random positions: early (45-70% of the RR), no
#                    P wave, wide bizarre QRS of another axis, T discordant to it, a full
#                    compensatory pause
#   59931005  TInv   primary T-wave inversion in one territory: anterior (V1-V4), lateral (I, aVL,
#                    V5-V6) or inferior (II, III, aVF); only in records without bundle branch block,
#                    whose own secondary T changes are not labelled
#   111975006 LQT    long QT: QTc (Fridericia) 500-600 ms, normally 370-440 ms
#   164917005 QAb    pathological Q waves (an old infarct): a deep Q wave 35-45 ms wide in one
#                    territory, inferior (II, III, aVF), lateral (I, aVL, V5-V6) or anterior (QS in
#                    V1-V4, the R wave there lost); not with LBBB, which hides them
#   251146004 LQRSV  low QRS voltage: every QRS wave scaled to 22-36%, the T wave to 70-100%
# Between people: QRS, T and P amplitudes (log-normal), frontal QRS, P and T axes, the precordial
# transition zone and per-electrode gains. Nuisances: muscle (EMG) noise with bursts, electrode
# motion artefacts, baseline wander, respiratory amplitude modulation, mains hum, amplifier noise.
# Limb leads follow Einthoven's and Goldberger's relations (III = II - I, ...), as recorded ones do.
RHYTHMS = ("normal", "brady", "tachy", "af", "paced")
RHYTHM_PROBS = (0.42, 0.18, 0.16, 0.18, 0.06)
HEART_RATE = {"normal": (62, 95), "brady": (38, 54), "tachy": (106, 150), "af": (70, 130), "paced": (60, 80)}
IAVB_PROB = 0.2              # of sinus records: AF and paced ones have no conducted P wave
BBB_PROBS = (0.8, 0.12, 0.08)  # none, RBBB, LBBB; of records with their own conduction (not paced)
AXIS_PROBS = (0.78, 0.13, 0.09)  # normal, left, right; likewise
AXIS_DEG = ((-25, 85), (-85, -35), (100, 160))
PAC_PROB = 0.15              # of sinus records
PVC_PROB = 0.1
TINV_PROB = 0.13             # of records without bundle branch block
LQT_PROB = 0.09
LOW_VOLTAGE_PROB = 0.07
QAB_PROB = 0.1               # of records with their own conduction and no LBBB
QTC_S = ((0.37, 0.44), (0.50, 0.60))     # QTc (Fridericia): others, long QT
LOW_VOLTAGE_QRS = (0.22, 0.36)           # every QRS wave scaled by this in low-voltage records
RESPIRATORY_RR = (0.0, 0.04)             # sinus RR modulated with breathing by this, unlabelled
PAC_COUPLING, PVC_COUPLING = (0.5, 0.7), (0.45, 0.7)   # premature beat's RR over the sinus RR
TINV_DEPTH = (0.6, 1.3)                  # inverted T against the upright one it replaces
EMG_MV = (0.002, 0.015)                  # muscle noise level between records (bursts on top)
SINUS, PAC, PVC = 0, 1, 2    # beat kinds, each with its own template

# Precordial (V1-V6) amplitudes (mV) of each wave; the limb leads come from frontal-plane vectors.
P_V = np.array([0.06, 0.1, 0.1, 0.1, 0.1, 0.08])
Q_V = np.array([0.0, 0.0, 0.0, -0.05, -0.08, -0.08])
R_V = np.array([0.25, 0.5, 0.9, 1.3, 1.2, 0.9])
S_V = np.array([-0.9, -1.2, -0.7, -0.4, -0.2, -0.1])
T_V = np.array([0.05, 0.45, 0.45, 0.4, 0.3, 0.22])
RBBB_RPRIME_V = np.array([0.7, 0.5, 0.2, 0.0, 0.0, 0.0])
RBBB_SLUR_V = np.array([0.0, 0.0, 0.0, -0.2, -0.35, -0.4])
LBBB_NOTCH_V = np.array([0.0, 0.0, 0.0, 0.4, 0.8, 0.8])
LBBB_DEEP_S_V = np.array([-1.3, -1.6, -1.0, 0.0, 0.0, 0.0])
PVC_RV_ORIGIN_V = np.array([-1.2, -1.4, -0.8, 0.6, 1.2, 1.3])   # right-ventricular focus: LBBB-like
PVC_LV_ORIGIN_V = np.array([1.3, 1.1, 0.8, -0.4, -0.9, -1.1])   # left-ventricular focus: RBBB-like
PACED_V = np.array([-1.0, -1.4, -1.3, -1.0, -0.5, 0.3])          # right-ventricular apex: QS to V5
F_WAVE_V = np.array([1.0, 0.6, 0.4, 0.3, 0.2, 0.2])
TINV_TERRITORY_V = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0.5, 1, 1], [0, 0, 0, 0, 0, 0]])
QAB_Q_V = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 0, -0.2, -0.5, -0.5], [-0.5, -0.7, -0.6, -0.4, 0, 0]])  # territory
QAB_R_LOSS_V = np.array([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0.8, 0.4, 0, 0]])    # inf., lat., ant.
TEMPLATE_S = (-0.45, 0.75)   # beat template window around the R peak, seconds (long QT at slow rates)

# A frontal-plane vector (x towards lead I, y towards aVF) -> I, II, III, aVR, aVL, aVF.
FRONTAL_TO_LIMB = np.array([[1.0, 0.0], [0.5, np.sqrt(3) / 2], [-0.5, np.sqrt(3) / 2],
                            [-0.75, -np.sqrt(3) / 4], [0.75, -np.sqrt(3) / 4], [0.0, np.sqrt(3) / 2]])
# Electrode potentials (RA, LA, LL, V1..V6) -> the 12 leads; precordial leads against Wilson's terminal.
LEAD_FROM_ELECTRODE = np.zeros((NUM_LEADS, 9))
LEAD_FROM_ELECTRODE[:6, :3] = [[-1, 1, 0], [-1, 0, 1], [0, -1, 1], [1, -0.5, -0.5], [-0.5, 1, -0.5], [-0.5, -0.5, 1]]
LEAD_FROM_ELECTRODE[6:, :3] = -1 / 3
LEAD_FROM_ELECTRODE[6:, 3:] = np.eye(6)


class Conditions(NamedTuple):
    """What each synthetic record (one row) has; its labels follow from it (demo_labels)."""
    rhythm: np.ndarray             # index into RHYTHMS
    iavb: np.ndarray               # first-degree AV block
    bbb: np.ndarray                # 0 none, 1 right, 2 left bundle branch block
    axis: np.ndarray               # 0 normal, 1 left, 2 right axis deviation
    pac: np.ndarray
    pvc: np.ndarray
    t_inversion: np.ndarray
    long_qt: np.ndarray
    low_voltage: np.ndarray
    q_waves: np.ndarray


def sample_conditions(n, rng):
    """Conditions of n records, each drawn on its own at the probabilities above."""
    rhythm = rng.choice(len(RHYTHMS), size=n, p=RHYTHM_PROBS)
    sinus = rhythm < RHYTHMS.index("af")
    conducted = rhythm != RHYTHMS.index("paced")
    bbb = rng.choice(3, size=n, p=BBB_PROBS) * conducted
    return Conditions(
        rhythm=rhythm, iavb=(rng.random(n) < IAVB_PROB) & sinus, bbb=bbb,
        axis=rng.choice(3, size=n, p=AXIS_PROBS) * conducted, pac=(rng.random(n) < PAC_PROB) & sinus,
        pvc=rng.random(n) < PVC_PROB, t_inversion=(rng.random(n) < TINV_PROB) & (bbb == 0) & conducted,
        long_qt=rng.random(n) < LQT_PROB, low_voltage=rng.random(n) < LOW_VOLTAGE_PROB,
        q_waves=(rng.random(n) < QAB_PROB) & conducted & (bbb != 2))


def demo_labels(conditions):
    """(n, len(DEMO_CLASSES)) bool: each record's classes, columns in DEMO_CLASSES order."""
    c = conditions
    by_code = {"426783006": c.rhythm == RHYTHMS.index("normal"), "426177001": c.rhythm == RHYTHMS.index("brady"),
               "427084000": c.rhythm == RHYTHMS.index("tachy"), "164889003": c.rhythm == RHYTHMS.index("af"),
               "10370003": c.rhythm == RHYTHMS.index("paced"),
               "270492004": c.iavb, "59118001": c.bbb == 1, "164909002": c.bbb == 2, "39732003": c.axis == 1,
               "47665007": c.axis == 2, "284470004": c.pac, "427172004": c.pvc, "59931005": c.t_inversion,
               "111975006": c.long_qt, "251146004": c.low_voltage, "164917005": c.q_waves}
    return np.stack([by_code[code] for code in DEMO_CLASSES], axis=1)


def frontal_leads(magnitude, angle_deg):
    """(B, 6) limb-lead amplitudes of frontal-plane vectors (0 deg towards lead I, 90 towards aVF)."""
    angle = np.deg2rad(angle_deg)
    return np.stack([magnitude * np.cos(angle), magnitude * np.sin(angle)], axis=-1) @ FRONTAL_TO_LIMB.T


def _leads(magnitude, angle_deg, precordial):
    """(B, 12): limb leads of a frontal vector beside precordial amplitudes (B, 6)."""
    return np.concatenate([frontal_leads(magnitude, angle_deg), precordial], axis=1)


def _shifted(values, shift):
    """Precordial amplitudes (6,) read `shift` leads further along (B,): the transition zone moves."""
    position = np.clip(np.arange(6) + shift[:, None], 0, 5)
    low = np.minimum(np.floor(position).astype(int), 4)
    fraction = position - low
    return values[low] * (1 - fraction) + values[low + 1] * fraction


def _template(waves, tau):
    """(B, 12, K) beat template: the sum of Gaussian waves (centre s (B,), width s (B,), amplitude (B, 12))."""
    template = np.zeros((len(waves[0][2]), NUM_LEADS, len(tau)), np.float32)
    for centre, width, amplitude in waves:
        shape = np.exp(-0.5 * ((tau[None, :] - centre[:, None]) / width[:, None]) ** 2)
        template += (amplitude[:, :, None] * shape[:, None, :]).astype(np.float32)
    return template


def _beats(c, mean_rr, breath, breath_phase, duration, rng):
    """(beat times (B, N) s, beat kinds (B, N)): sinus or AF beats, premature beats at random positions."""
    batch = len(c.rhythm)
    af = c.rhythm == RHYTHMS.index("af")
    max_beats = int(np.ceil((duration + 1.0) / 0.25)) + 2
    index = np.arange(max_beats)
    sa_depth = rng.uniform(*RESPIRATORY_RR, batch) * (c.rhythm < RHYTHMS.index("af"))
    respiration = np.sin(2 * np.pi * index * mean_rr[:, None] / breath[:, None] + breath_phase[:, None])
    variability = np.select([af, c.rhythm == RHYTHMS.index("paced")], [0.3, 0.003], 0.02)   # pacemakers are steady
    jitter = variability[:, None] * rng.standard_normal((batch, max_beats))
    rr = np.clip(mean_rr[:, None] * np.exp(jitter) * (1 + sa_depth[:, None] * respiration), 0.25, 2.5)
    start = rng.uniform(0, 1, batch) * rr[:, 0]
    nominal = np.cumsum(rr, axis=1) - rr[:, :1] - start[:, None]

    # Premature beats where one (at most 55% of its RR early) and its pause fit in the record, never
    # next to another one.
    fits = (index >= 1) & (nominal - 0.55 * rr > 0.3) & (nominal < duration - 1.2)
    score = np.where(fits, rng.random(rr.shape), -1.0)
    kind = np.zeros(rr.shape, np.int8)
    rows = np.arange(batch)
    n_pac = np.where(c.pac, rng.integers(2, 5, batch), 0)
    n_pvc = np.where(c.pvc, rng.integers(1, 4, batch), 0)
    for beat_kind, wanted in ((PAC, n_pac >= 1), (PVC, n_pvc >= 1), (PAC, n_pac >= 2), (PVC, n_pvc >= 2),
                              (PAC, n_pac >= 3), (PVC, n_pvc >= 3), (PAC, n_pac >= 4)):
        pick = score.argmax(axis=1)
        place = wanted & (score[rows, pick] >= 0)
        kind[rows[place], pick[place]] = beat_kind
        for offset in (-1, 0, 1):
            score[rows[place], np.clip(pick[place] + offset, 0, max_beats - 1)] = -1.0
    early = rr * np.where(kind == PAC, rng.uniform(*PAC_COUPLING, rr.shape), rng.uniform(*PVC_COUPLING, rr.shape))
    before = np.roll(kind, 1, axis=1)   # the kind of the preceding beat (the last beat is never premature)
    rr = np.select([kind > 0, before == PAC, before == PVC],
                   [early,
                    rr * rng.uniform(1.0, 1.15, rr.shape),   # PAC resets the sinus node: about one cycle
                    rr + np.roll(rr - early, 1, axis=1)],    # PVC: the next sinus beat comes on time
                   rr)
    return np.cumsum(rr, axis=1) - rr[:, :1] - start[:, None], kind


def synthesize_ecg(conditions, fs, n_samples, rng):
    """(B, 12, n_samples) physical ECG in mV for Conditions of B records.

    Three beat templates per record (sinus or paced, PAC, PVC), each a sum of Gaussian waves,
    convolved through the FFT with impulse trains at their beats' times; then AF f-waves,
    respiratory amplitude modulation, and electrode noise (EMG, motion artefacts, baseline wander,
    mains hum, amplifier noise) mapped to the leads.
    """
    c = conditions
    batch = len(c.rhythm)
    af, paced = c.rhythm == RHYTHMS.index("af"), c.rhythm == RHYTHMS.index("paced")
    duration = n_samples / fs
    t = np.arange(n_samples) / fs
    low = np.array([HEART_RATE[r][0] for r in RHYTHMS])[c.rhythm]
    high = np.array([HEART_RATE[r][1] for r in RHYTHMS])[c.rhythm]
    mean_rr = 60.0 / rng.uniform(low, high)
    breath, breath_phase = rng.uniform(3.0, 6.0, batch), rng.uniform(0, 2 * np.pi, batch)
    beat_times, kind = _beats(c, mean_rr, breath, breath_phase, duration, rng)

    # The person: amplitudes, axes, transition zone, precordial electrode gains.
    rbbb, lbbb = c.bbb == 1, c.bbb == 2
    voltage = np.where(c.low_voltage, rng.uniform(*LOW_VOLTAGE_QRS, batch), 1.0)
    qrs_mag = 1.1 * np.exp(0.25 * rng.standard_normal(batch)) * voltage
    t_size = np.exp(0.3 * rng.standard_normal(batch)) * np.where(c.low_voltage, rng.uniform(0.7, 1.0, batch), 1.0)
    p_size = np.exp(0.2 * rng.standard_normal(batch))
    t_mag, p_mag = 0.3 * t_size, 0.18 * p_size
    axis_low, axis_high = np.array(AXIS_DEG).T
    axis = rng.uniform(axis_low[c.axis], axis_high[c.axis])
    p_axis, t_axis = rng.uniform(30, 75, batch), rng.uniform(5, 70, batch)
    shift = rng.uniform(-0.7, 0.7, batch)
    gain_v = np.exp(0.2 * rng.standard_normal((batch, 1)) + 0.12 * rng.standard_normal((batch, 6)))
    qrs_v = gain_v * voltage[:, None]
    qrs_scale = np.where((c.bbb > 0) | paced, rng.uniform(1.6, 1.9, batch), rng.uniform(0.9, 1.1, batch))
    pr = np.where(c.iavb, rng.uniform(0.28, 0.36, batch), rng.uniform(0.13, 0.18, batch))
    # QT from Q onset to T end by Fridericia (QTc * RR^(1/3)); the T peak sits 2.5 widths before its end.
    t_width = rng.uniform(0.04, 0.055, batch) * np.where(c.long_qt, 1.15, 1.0)
    qtc = rng.uniform(*np.array(QTC_S)[c.long_qt.astype(int)].T)
    t_peak = qtc * np.cbrt(mean_rr) - 0.04 * qrs_scale - 2.5 * t_width

    # Paced beats: a spike, then a wide QRS spreading from the right-ventricular apex.
    paced_mag = paced * qrs_mag * rng.uniform(1.2, 1.6, batch)
    paced_axis = rng.uniform(-100, -60, batch)
    paced_v = paced[:, None] * PACED_V * qrs_v * rng.uniform(0.8, 1.2, (batch, 1))
    spike = paced * rng.uniform(1.0, 3.0, batch)

    # Pathological Q waves: the infarcted wall's early forces are lost, so they point away from it.
    r_v = _shifted(R_V, shift)
    q_territory = rng.integers(0, 3, batch)
    q_mag = c.q_waves * (q_territory < 2) * qrs_mag * rng.uniform(0.35, 0.6, batch)
    q_axis = np.where(q_territory == 0, rng.uniform(-100, -80, batch), rng.uniform(160, 200, batch))
    q_v = c.q_waves[:, None] * QAB_Q_V[q_territory] * qrs_v
    r_v = r_v * (1 - c.q_waves[:, None] * QAB_R_LOSS_V[q_territory])

    # T wave: normal, secondary to a bundle branch block or to pacing, or inverted in one territory.
    t_v = np.abs(T_V) * np.ones((batch, 1))
    t_v[rbbb, :2] *= -1.2
    lbbb_qrs_v = r_v + LBBB_NOTCH_V + LBBB_DEEP_S_V
    t_v[lbbb] = -1.2 * t_v[lbbb] * np.sign(lbbb_qrs_v[lbbb])
    notch_axis = rng.uniform(-30, 10, batch)
    t_axis = np.where(lbbb, notch_axis + 180, t_axis)
    t_mag = np.where(lbbb, 1.2 * t_mag, t_mag)
    t_v[paced] = -0.4 * PACED_V
    t_axis = np.where(paced, paced_axis + 180, t_axis)
    territory = rng.integers(0, 3, batch)
    depth = rng.uniform(*TINV_DEPTH, batch)
    inverted = c.t_inversion[:, None] * TINV_TERRITORY_V[territory]
    t_v = t_v * (1 - inverted) - depth[:, None] * np.maximum(t_v, 0.15) * inverted
    t_axis = np.where(c.t_inversion & (territory == 1), rng.uniform(120, 170, batch), t_axis)
    t_axis = np.where(c.t_inversion & (territory == 2), rng.uniform(-110, -70, batch), t_axis)
    t_mag = np.where(c.t_inversion & (territory > 0), depth * t_mag, t_mag)

    ones, zeros = np.ones(batch), np.zeros(batch)
    s = qrs_scale
    qrs = [  # (centre s, width s, 12-lead amplitude) of the conducted QRS
        (-0.025 * s, 0.008 * s, _leads(np.where(lbbb, 0.0, 0.15 * qrs_mag), axis + rng.uniform(140, 180, batch),
                                       np.where(lbbb[:, None], 0.0, Q_V * qrs_v))),
        (-0.03 * s, rng.uniform(0.012, 0.016, batch) * s, _leads(q_mag, q_axis, q_v)),
        (zeros, 0.010 * s, _leads(qrs_mag, axis, r_v * qrs_v)),
        (0.025 * s, 0.010 * s, _leads(0.3 * qrs_mag, axis - rng.uniform(120, 170, batch),
                                      np.where(lbbb[:, None], 0.0, _shifted(S_V, shift) * qrs_v))),
        (0.07 * ones, 0.018 * ones, _leads(zeros, zeros, rbbb[:, None] * RBBB_RPRIME_V * qrs_v)),
        (0.06 * ones, 0.022 * ones, _leads(rbbb * 0.35 * qrs_mag, rng.uniform(160, 200, batch),
                                           rbbb[:, None] * RBBB_SLUR_V * qrs_v)),
        (0.045 * ones, 0.02 * ones, _leads(lbbb * 0.6 * qrs_mag, notch_axis, lbbb[:, None] * LBBB_NOTCH_V * qrs_v)),
        (0.045 * ones, 0.028 * ones, _leads(zeros, zeros, lbbb[:, None] * LBBB_DEEP_S_V * qrs_v)),
    ]
    qrs = [(centre, width, amplitude * ~paced[:, None]) for centre, width, amplitude in qrs]
    paced_qrs = [(-0.07 * ones, 0.0008 * ones, _leads(spike, rng.uniform(0, 360, batch),
                                                      spike[:, None] * rng.uniform(-1, 1, (batch, 6)))),
                 (zeros, rng.uniform(0.028, 0.034, batch), _leads(paced_mag, paced_axis, paced_v)),
                 (0.045 * ones, 0.02 * ones, _leads(0.4 * paced_mag, paced_axis + 90, 0.3 * paced_v))]
    t_wave = (t_peak, t_width, _leads(t_mag, t_axis, t_v * (gain_v * t_size[:, None])))
    p_v = P_V * (gain_v * p_size[:, None])
    atrial = ~(af | paced)
    p_wave = (-pr, 0.025 * ones, _leads(atrial * p_mag, p_axis, atrial[:, None] * p_v))
    # PAC: a low atrial focus, so a P wave upwards (inverted inferiorly) and a shorter PR; conducted normally.
    pac_p = (-pr * rng.uniform(0.75, 0.95, batch), 0.022 * ones,
             _leads(p_mag * rng.uniform(1.0, 1.6, batch), rng.uniform(-100, -50, batch),
                    p_v * rng.uniform(-1.2, -0.6, (batch, 1))))
    # PVC: a ventricular focus, so no P, a wide QRS of its own axis and a T opposite to it (as large as
    # in others where the QRS is low).
    pvc_mag = qrs_mag * rng.uniform(1.2, 1.8, batch)
    pvc_axis = rng.uniform(-180, 180, batch)
    pvc_origin = np.where(rng.random((batch, 1)) < 0.5, PVC_RV_ORIGIN_V, PVC_LV_ORIGIN_V)
    pvc_v = pvc_origin * qrs_v * rng.uniform(0.8, 1.4, (batch, 1))
    pvc = [(zeros, rng.uniform(0.026, 0.034, batch), _leads(pvc_mag, pvc_axis, pvc_v)),
           (0.045 * ones, 0.02 * ones, _leads(0.4 * pvc_mag, pvc_axis + rng.uniform(60, 120, batch), 0.3 * pvc_v)),
           (rng.uniform(0.26, 0.34, batch), 0.06 * ones,
            _leads(0.35 * pvc_mag / voltage, pvc_axis + 180, -0.35 * pvc_v / voltage[:, None]))]

    tau = np.arange(int(TEMPLATE_S[0] * fs), int(TEMPLATE_S[1] * fs)) / fs
    pre, k = -int(TEMPLATE_S[0] * fs), len(tau)
    templates = {SINUS: [p_wave, *qrs, *paced_qrs, t_wave], PAC: [pac_p, *qrs, t_wave], PVC: pvc}
    n_fft = scipy.fft.next_fast_len(n_samples + 2 * k, real=True)
    position = np.round(beat_times * fs).astype(np.int64) + k - pre
    inside = (position >= 0) & (position < n_samples + k)
    spectrum = 0
    for beat_kind, waves in templates.items():
        impulses = np.zeros((batch, n_samples + k), dtype=np.float32)
        rows, columns = np.nonzero(inside & (kind == beat_kind))
        impulses[rows, position[rows, columns]] = 1.0
        spectrum = spectrum + scipy.fft.rfft(impulses, n_fft)[:, None, :] * scipy.fft.rfft(_template(waves, tau), n_fft)
    ecg = scipy.fft.irfft(spectrum, n_fft)[..., k:k + n_samples]

    f_rate = rng.uniform(4.5, 8.0, batch)[:, None]
    f_phase = 2 * np.pi * f_rate * t + 0.8 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4, batch)[:, None] * t)
    f_waves = rng.uniform(0.03, 0.12, batch)[:, None] * np.sin(f_phase + rng.uniform(0, 2 * np.pi, batch)[:, None])
    f_leads = _leads(ones, rng.uniform(40, 110, batch), F_WAVE_V * gain_v)
    ecg[af] += (f_leads[af, :, None] * f_waves[af, None, :]).astype(np.float32)
    breathing = np.sin(2 * np.pi * t / breath[:, None] + breath_phase[:, None])
    ecg *= (1 + rng.uniform(0.03, 0.1, (batch, 1)) * breathing)[:, None, :].astype(np.float32)

    return ecg + LEAD_FROM_ELECTRODE.astype(np.float32) @ _electrode_noise(batch, fs, n_samples, breath, rng)


def _events(batch, n_max, rate, duration, rng):
    """Up to n_max events per record (Poisson count): (centre s, active mask, electrode), each (B, n_max)."""
    active = np.arange(n_max) < np.minimum(rng.poisson(rate, batch), n_max)[:, None]
    return rng.uniform(0, duration, (batch, n_max)), active, rng.integers(0, 9, (batch, n_max))


def _to_electrodes(shapes, electrode):
    """Event waveforms (B, E, n) placed on their electrodes (B, E) -> (B, 9, n)."""
    one_hot = (electrode[:, :, None] == np.arange(9)).astype(np.float32)
    return np.matmul(one_hot.transpose(0, 2, 1), shapes.astype(np.float32))


def _electrode_noise(batch, fs, n_samples, breath, rng):
    """(B, 9, n) mV at the electrodes RA, LA, LL, V1-V6: EMG, motion artefacts, baseline wander,
    mains hum, amplifier noise. Noise at the electrodes keeps the limb leads' relations exact."""
    duration = n_samples / fs
    t = (np.arange(n_samples) / fs).astype(np.float32)
    # EMG: 20-150 Hz Gaussian noise, a level per electrode (arms and legs noisier) with bursts.
    freqs = scipy.fft.rfftfreq(n_samples, 1 / fs)
    band = np.flatnonzero((freqs >= 20) & (freqs <= 150))
    coefficients = np.zeros((batch, 9, len(freqs)), np.complex64)
    coefficients[..., band] = (rng.standard_normal((batch, 9, len(band)), dtype=np.float32)
                               + 1j * rng.standard_normal((batch, 9, len(band)), dtype=np.float32))
    emg = scipy.fft.irfft(coefficients, n_samples) * np.float32(n_samples / (2 * np.sqrt(len(band))))
    level = rng.uniform(*EMG_MV, (batch, 1, 1)) * np.exp(0.4 * rng.standard_normal((batch, 9, 1)))
    level[:, :3] *= 1.5
    centre, active, electrode = _events(batch, 2, 0.6, duration, rng)
    width = rng.uniform(0.3, 1.2, centre.shape)
    bursts = (active * rng.uniform(0.02, 0.1, centre.shape))[..., None] * np.exp(
        -0.5 * ((t - centre[..., None]) / width[..., None]).astype(np.float32) ** 2)
    noise = emg * (level.astype(np.float32) + _to_electrodes(bursts, electrode))
    # Motion artefacts: a short mono- or biphasic deflection where an electrode moved.
    centre, active, electrode = _events(batch, 3, 0.5, duration, rng)
    u = ((t - centre[..., None]) / rng.uniform(0.04, 0.2, centre.shape)[..., None]).astype(np.float32)
    biphasic = rng.random(centre.shape)[..., None] < 0.5
    amplitude = (active * rng.choice([-1, 1], centre.shape) * rng.uniform(0.2, 1.0, centre.shape))[..., None]
    noise += _to_electrodes(amplitude * np.exp(-0.5 * u ** 2) * np.where(biphasic, 1.65 * u, 1), electrode)
    # Baseline wander (breathing, a slower drift) and mains hum: sinusoids of their own amplitude
    # and phase at each electrode, a sin and a cos of the shared frequency mixed.
    for period, amplitude in ((breath[:, None, None], (0.02, 0.2)), (rng.uniform(10, 50, (batch, 1, 1)), (0.0, 0.3)),
                              (np.full((batch, 1, 1), 1 / 50), (0.003, 0.02))):
        angle = (2 * np.pi * t / period).astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, (batch, 9, 1))
        amplitude = rng.uniform(*amplitude, (batch, 9, 1))
        noise += (amplitude * np.cos(phase)).astype(np.float32) * np.sin(angle)
        noise += (amplitude * np.sin(phase)).astype(np.float32) * np.cos(angle)
    return noise + rng.uniform(0.003, 0.01, (batch, 1, 1)).astype(np.float32) * rng.standard_normal(
        (batch, 9, n_samples), dtype=np.float32)


def write_challenge_record(folder, name, physical, fs, codes, gains, baselines, age, sex):
    """One record in the Challenge's format: WFDB header + MATLAB v4 `val` int16 (12 x n)."""
    adc = np.clip(np.round(physical * gains[:, None] + baselines[:, None]), -32767, 32767).astype(np.int16)
    scipy.io.savemat(folder / f"{name}.mat", {"val": adc}, format="4")
    checksums = ((adc.astype(np.int64).sum(axis=1) + 32768) % 65536) - 32768
    lines = [f"{name} {NUM_LEADS} {fs:g} {adc.shape[1]}"]
    lines += [f"{name}.mat 16x1+24 {gains[i]:.1f}({baselines[i]})/mV 16 0 {adc[i, 0]} {checksums[i]} 0 {LEADS[i]}"
              for i in range(NUM_LEADS)]
    lines += [f"#Age: {age}", f"#Sex: {sex}", f"#Dx: {','.join(codes)}", "#Rx: Unknown", "#Hx: Unknown",
              "#Sx: Unknown"]   # the Challenge's own spelling: its scorer reads the line starting "#Dx"
    (folder / f"{name}.hea").write_text("\n".join(lines) + "\n")


def write_demo_challenge(folder, n_records, rng, fs=FS, seconds=10, batch=256):
    """A Challenge-format folder of synthetic records named D00000, D00001, ... (every scored demo class)."""
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, n_records, batch):
        n = min(batch, n_records - start)
        conditions = sample_conditions(n, rng)
        labels = demo_labels(conditions)
        signals = synthesize_ecg(conditions, fs, int(seconds * fs), rng)
        gains = rng.choice([200.0, 500.0, 1000.0], size=n)
        baselines = rng.integers(-50, 51, size=(n, NUM_LEADS))
        ages, sexes = rng.integers(18, 90, size=n), rng.choice(["Male", "Female"], size=n)
        for i in range(n):
            codes = [code for code, present in zip(DEMO_CLASSES, labels[i]) if present]
            write_challenge_record(folder, f"D{start + i:05d}", signals[i], fs, codes,
                                   np.full(NUM_LEADS, gains[i]), baselines[i], ages[i], sexes[i])


def write_demo_code15(folder, n_exams, rng, per_part=DEMO_CODE15_PER_PART, batch=256):
    """CODE-15 format: exams.csv + exams_part{k}.hdf5 (`tracings` (N, 4096, 12) at 400 Hz, `exam_id`).

    The same generator as the Challenge-format set, so the exams have every demo abnormality, but
    only CODE-15's six labels are written, as in the real exams.csv.
    """
    folder.mkdir(parents=True, exist_ok=True)
    conditions = sample_conditions(n_exams, rng)
    demo = dict(zip(DEMO_CLASSES, demo_labels(conditions).T))
    exam_ids = 100000 + rng.permutation(10 * n_exams)[:n_exams]
    patient_ids = rng.integers(0, max(1, int(0.8 * n_exams)), size=n_exams)
    labels = {"1dAVb": demo["270492004"], "RBBB": demo["59118001"], "LBBB": demo["164909002"],
              "SB": demo["426177001"], "ST": demo["427084000"], "AF": demo["164889003"]}   # exams.csv's order
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
                ecg = synthesize_ecg(Conditions(*(field[sub] for field in conditions)), CODE15_FS,
                                     10 * CODE15_FS, rng)
                tracings[start:start + len(sub), pad:pad + 10 * CODE15_FS] = np.transpose(ecg, (0, 2, 1))


def _move_into_place(staged, final):
    """Rename the folder `staged` to `final` whole. Where `final` exists already (another run was
    faster, or an earlier one left it), it is kept: only files it lacks are added, each by a hard
    link that never replaces a file."""
    try:
        os.rename(staged, final)
        return
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    log.info("demo: %s exists; keeping it", final)
    for path in sorted(staged.rglob("*")):
        target = final / path.relative_to(staged)
        if path.is_dir():
            target.mkdir(exist_ok=True)
            continue
        with contextlib.suppress(FileExistsError):
            os.link(path, target)


def make_demo(demo_dir, seed=0, n_records=DEMO_RECORDS, n_code15=DEMO_CODE15, workers=1):
    """Write synthetic Challenge- and CODE-15-format data under `demo_dir` and convert it like real data.

    Everything is made in a temporary folder inside `demo_dir`, then `OriginalData` and
    `Preprocessed_dataset` are each renamed into place: a concurrent run sees the complete old
    folder or the complete new one, never a half-written one.
    """
    demo_dir = Path(demo_dir)
    demo_dir.mkdir(parents=True, exist_ok=True)
    raw_dir, out_dir = demo_dir / "OriginalData", demo_dir / "Preprocessed_dataset"
    staging = Path(tempfile.mkdtemp(prefix=".demo-staging-", dir=demo_dir))
    try:
        staged_raw, staged_out = staging / raw_dir.name, staging / out_dir.name
        rng = np.random.default_rng(seed)
        write_demo_challenge(staged_raw / DEMO_DATASET, n_records, rng)
        write_demo_code15(staged_raw / "CODE15", n_code15, rng)
        log.info("demo: wrote %d Challenge-format records and %d CODE-15 exams", n_records, n_code15)
        challenge_h5 = convert_challenge(staged_raw / DEMO_DATASET, staged_out, DEMO_DATASET, workers=workers)
        code15 = convert_code15(staged_raw / "CODE15", staged_out, DEMO_CODE15_VALID_FRACTION, seed,
                                workers=workers)
        for path, source in ((challenge_h5, raw_dir / DEMO_DATASET), *((p, raw_dir / "CODE15") for p in code15)):
            with h5py.File(path, "r+") as f:
                f.attrs["source_dir"] = str(source)   # where the records will be, not the staging folder
        _move_into_place(staged_raw, raw_dir)
        _move_into_place(staged_out, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"challenge_h5": out_dir / challenge_h5.name, "code15_train": out_dir / code15[0].name,
            "code15_valid": out_dir / code15[1].name, "raw_dir": raw_dir}
