"""A 12-lead ECG drawn as a clinical printout: 3 x 4 leads of 2.5 s and a 10 s lead II rhythm strip,
at 25 mm/s and 10 mm/mV on the standard 1 mm / 5 mm grid.

    plot_ecg("HR00001.png", signal, fs, title="HR00001: NSR 0.92")

`signal` is (12, n) in millivolts, rows in LEADS order, as datacollection.read_challenge_record
returns it: the record as read, not filtered or scaled. Each lead is only shifted vertically onto
its row (its median over the drawn part subtracted), as an electrocardiograph places its traces.
"""
import numpy as np
from matplotlib.figure import Figure

from helper_code import LEADS

MM_PER_S = 25.0
MM_PER_MV = 10.0
STRIP_S = 10.0                  # the rhythm strip; each of the 3 x 4 panels shows a quarter of it
COLUMNS = (("I", "II", "III"), ("aVR", "aVL", "aVF"), ("V1", "V2", "V3"), ("V4", "V5", "V6"))
RHYTHM_LEAD = "II"
ROW_PITCH_MM = 40.0             # between the baselines of the rows
PULSE_S = 0.2                   # the 1 mV calibration pulse at each row's start: 0.2 s wide, 10 mm high
MARGIN_MM = 8.0                 # blank paper left of the pulses, and above and below the rows
PAPER_COLOURS = {"minor": "#f6c6c6", "major": "#e58b8b", "trace": "black", "text": "#1a1a1a"}
HEADER_MM = 9.0                 # above the paper: the title
DPI = 150


def layout():
    """(lead, row, first second, last second) of every trace: the 3 x 4 panels, then the rhythm strip."""
    panel = STRIP_S / len(COLUMNS)
    traces = [(lead, row, column * panel, (column + 1) * panel)
              for column, leads in enumerate(COLUMNS) for row, lead in enumerate(leads)]
    return traces + [(RHYTHM_LEAD, len(COLUMNS[0]), 0.0, STRIP_S)]


def draw_grid(ax, width_mm, height_mm):
    minor, major = np.arange(0, width_mm + 0.5), np.arange(0, height_mm + 0.5)
    ax.vlines(minor, 0, height_mm, colors=PAPER_COLOURS["minor"], linewidth=0.3, zorder=0)
    ax.hlines(major, 0, width_mm, colors=PAPER_COLOURS["minor"], linewidth=0.3, zorder=0)
    ax.vlines(minor[::5], 0, height_mm, colors=PAPER_COLOURS["major"], linewidth=0.7, zorder=1)
    ax.hlines(major[::5], 0, width_mm, colors=PAPER_COLOURS["major"], linewidth=0.7, zorder=1)


def plot_ecg(path, signal, fs, title):
    """Write `signal` ((12, n) mV at `fs` Hz) as a PNG printout at `path`, titled `title`. A record
    shorter than 10 s leaves its panels short; a longer one shows its first 10 s."""
    signal = np.asarray(signal, dtype=np.float64)
    rows = len(COLUMNS[0]) + 1
    pulse_mm = PULSE_S * MM_PER_S
    left = MARGIN_MM + pulse_mm + 4.0               # where time 0 is drawn: after the pulse and a gap
    width_mm = left + STRIP_S * MM_PER_S + MARGIN_MM
    height_mm = 2 * MARGIN_MM + (rows - 1) * ROW_PITCH_MM + ROW_PITCH_MM / 2
    figure = Figure(figsize=(width_mm / 25.4, (height_mm + HEADER_MM) / 25.4), dpi=DPI)
    ax = figure.add_axes((0.0, 0.0, 1.0, height_mm / (height_mm + HEADER_MM)))
    ax.set_xlim(0, width_mm)
    ax.set_ylim(0, height_mm)
    ax.set_aspect("equal")
    ax.axis("off")
    draw_grid(ax, width_mm, height_mm)
    baseline = [height_mm - MARGIN_MM - ROW_PITCH_MM / 2 - row * ROW_PITCH_MM for row in range(rows)]
    pulse_x = MARGIN_MM + np.array([0.0, 1.0, 1.0, 1.0 + pulse_mm, 1.0 + pulse_mm, 2.0 + pulse_mm])
    for y in baseline:
        ax.plot(pulse_x, y + np.array([0.0, 0.0, MM_PER_MV, MM_PER_MV, 0.0, 0.0]),
                color=PAPER_COLOURS["trace"], linewidth=0.8)
    for lead, row, start_s, stop_s in layout():
        samples = signal[LEADS.index(lead), int(round(start_s * fs)):int(round(stop_s * fs))]
        if samples.size == 0:
            continue
        seconds = start_s + np.arange(samples.size) / fs
        ax.plot(left + seconds * MM_PER_S, baseline[row] + (samples - np.median(samples)) * MM_PER_MV,
                color=PAPER_COLOURS["trace"], linewidth=0.6, clip_on=True)
        ax.text(left + start_s * MM_PER_S + 1.5, baseline[row] + 11.0, lead, fontsize=8,
                color=PAPER_COLOURS["text"], fontweight="bold")
    middle = 1 - HEADER_MM / 2 / (height_mm + HEADER_MM)
    figure.text(0.01, middle, title, ha="left", va="center", fontsize=10)
    figure.text(0.99, middle, f"{MM_PER_S:g} mm/s   {MM_PER_MV:g} mm/mV   {fs:g} Hz", ha="right", va="center",
                fontsize=8, color=PAPER_COLOURS["text"])
    figure.savefig(path, format="png", dpi=DPI)
