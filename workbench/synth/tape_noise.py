"""The tape-noise simulator: what a blank tape sounds like on one replay machine at one speed.

Every device in the registry gets a stable signature (`device_signature`): the format (reel or
cassette) sets physical defaults, a hash of the device id moves each of them within a plausible range
(so two decks of the same model still differ, as real ones do), and an optional `[simulation]` table in
the device's TOML overrides any of them. The keys of that table (all optional):

    mains_hz               50 or 60: mains frequency where the transfer was made
    hum_dbfs               RMS level of the hum fundamental (dBFS)
    hum_harmonics_db       list: levels of hum harmonics 2, 3, ... relative to the fundamental (dB)
    hum_drift_hz           peak slow drift of the mains frequency (Hz)
    hiss_dbfs              RMS level of the tape hiss at 7.5 ips (dBFS)
    hiss_db_per_halving    how much louder the hiss gets each time the speed halves (dB)
    electronics_dbfs       RMS level of head and playback-amplifier noise (dBFS)
    rumble_dbfs            RMS level of transport rumble below ~25 Hz (dBFS)
    modulation_depth       standard deviation of the hiss's slow amplitude fluctuation (fraction)
    coating_um             magnetic coating thickness (µm)
    spacing_um             effective head-to-tape spacing (µm)
    gap_um                 playback-head gap length (µm)
    shortest_wavelength_um shortest wavelength the machine reproduces (µm): band edge v/λ at speed v
    capstan_mm             capstan diameter (mm): a rumble line at v/(π·d)
    channel_correlation    correlation of the hiss between channels (0..1)
    channel_offsets_db     list: level offset of each channel (dB)
    clicks_per_minute      rate of injected clicks
    dropouts_per_minute    rate of injected dropouts

e.g. in registry/devices/technics-tr575-a.toml:

    [simulation]
    mains_hz = 60
    hum_dbfs = -66.0

The physics, per component (f frequency, v tape speed, k = 2πf/v the wavenumber):

- Tape hiss. Particulate noise read by an inductive head has a head-voltage power spectrum
  ∝ k·(1 − e^(−2kδ))·e^(−2kd)·sinc²(g/λ) (independent particles through a coating of thickness δ at
  spacing d, gap g; Mallinson): rising 6 dB/oct for thin coatings at long wavelengths, 3 dB/oct for
  thick ones. The playback equaliser of that speed (time constants T1 + T2: `device.eq_at(speed)`)
  integrates it: |H(f)| ∝ √(1 + (2πfT2)²) / √(1 + (2πfT1)²), so longer T2 (slower speeds, cassette)
  leaves more hiss above 1/(2πT2). Short-wavelength reproduce losses beyond spacing and gap are
  lumped into a 4th-order roll-off at v/λ_min: the bandwidth the speed allows. Slower speeds are
  noisier by `hiss_db_per_halving`. Its level fluctuates slowly (modulation noise: the hiss times
  1 + m·u(t), u low-passed at 60 Hz).
- Head and amplifier noise: white with a 1/f corner at the preamplifier input, integrated by the same
  playback EQ (hence its low-frequency weight), not affected by tape losses; a white output floor.
- Mains hum: a fundamental at 50 or 60 Hz and harmonics, the frequency drifting slowly (a few
  hundredths of a hertz over minutes) and the level breathing by ±0.7 dB; per-channel level and phase.
- Rumble: transport vibration below ~25 Hz plus a line at the capstan's rotation frequency.
- Defects (optional): clicks (static discharge ticks), dropouts (the tape lifting off the head: the
  tape's own noise falls by 10-25 dB for 0.1-0.3 s) and one splice (a thump, a short dropout, and a
  new piece of tape whose hiss is a little louder or quieter). Their times are returned and written
  to a JSON sidecar so screening can be checked against the truth.
- Channels: the hiss is partly correlated between tracks (common tape, crosstalk); hum and rumble
  are nearly common; the electronics are independent.
- The converter: a 10 Hz subsonic high-pass and an anti-alias roll-off from 0.454·fs.

Rendering streams in blocks: each noise source is white Gaussian noise from its own generator, shaped
by a linear-phase FIR designed from the spectra above and applied by FFT overlap-add (exact across
blocks), so memory stays flat however long the tape. The same seed gives byte-identical output.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from workbench.audio.dsp import MODEL_SAMPLE_RATE
from workbench.devices import Device, PlaybackEq, format_speed, parse_playback_eq
from workbench.errors import WorkbenchError
from workbench.progress import Progress, no_progress

REFERENCE_SPEED_IPS = 7.5  # hiss_dbfs is stated at this speed
METRES_PER_INCH = 0.0254
AMPLIFIER_LF_LIMIT_HZ = 20.0  # an EQ with no bass time constant stops integrating here
PREAMP_FLICKER_CORNER_HZ = 200.0  # 1/f corner of the playback preamplifier's input noise
SUBSONIC_HZ = 10.0  # the converter's / coupling capacitors' high-pass (2nd order)
ANTI_ALIAS_START = 0.454  # the anti-alias filter's passband edge as a fraction of fs; zero at fs/2
OUTPUT_FLOOR_DBFS = -112.0  # line output and converter noise
MODULATION_BANDWIDTH_HZ = 60.0
RUMBLE_CORNER_HZ = 25.0
HUM_AMPLITUDE_BREATH = 0.08  # ±0.7 dB slow level change of the hum
MIN_DEFECT_SECONDS = 4.0  # shorter renders get no defects (no room to place them apart)
DEFECT_MARGIN_SECONDS = 0.4  # no defect this close to either end
DEFECT_SEPARATION_SECONDS = 0.5
SUPPORTED_SAMPLE_RATES = (22_050, 32_000, 44_100, 48_000, 88_200, 96_000, 176_400, 192_000)

# What each [simulation] key means (validated, shown by `workbench synth signature`).
SIMULATION_KEYS = {
    "mains_hz": "mains frequency where the transfer was made: 50 or 60",
    "hum_dbfs": "RMS level of the hum fundamental (dBFS)",
    "hum_harmonics_db": "levels of hum harmonics 2, 3, ... relative to the fundamental (dB), a list",
    "hum_drift_hz": "peak slow drift of the mains frequency (Hz)",
    "hiss_dbfs": f"RMS level of the tape hiss at {REFERENCE_SPEED_IPS:g} ips (dBFS)",
    "hiss_db_per_halving": "how much louder the hiss gets each time the speed halves (dB)",
    "electronics_dbfs": "RMS level of head and playback-amplifier noise (dBFS)",
    "rumble_dbfs": "RMS level of transport rumble below ~25 Hz (dBFS)",
    "modulation_depth": "standard deviation of the hiss's slow amplitude fluctuation (fraction)",
    "coating_um": "magnetic coating thickness (µm)",
    "spacing_um": "effective head-to-tape spacing (µm)",
    "gap_um": "playback-head gap length (µm)",
    "shortest_wavelength_um": "shortest wavelength the machine reproduces (µm): band edge v/λ at speed v",
    "capstan_mm": "capstan diameter (mm): a rumble line at v/(π·d)",
    "channel_correlation": "correlation of the hiss between channels (0..1)",
    "channel_offsets_db": "level offset of each channel (dB), a list",
    "clicks_per_minute": "rate of injected clicks",
    "dropouts_per_minute": "rate of injected dropouts",
}
# Plausible bounds per key: overrides outside them are refused (they would not sound like tape).
_BOUNDS = {
    "hum_dbfs": (-140.0, -20.0), "hum_drift_hz": (0.0, 0.4), "hiss_dbfs": (-130.0, -30.0),
    "hiss_db_per_halving": (0.0, 12.0), "electronics_dbfs": (-140.0, -30.0), "rumble_dbfs": (-140.0, -30.0),
    "modulation_depth": (0.0, 0.5), "coating_um": (0.5, 40.0), "spacing_um": (0.0, 5.0), "gap_um": (0.1, 20.0),
    "shortest_wavelength_um": (0.5, 50.0), "capstan_mm": (0.5, 50.0), "channel_correlation": (0.0, 1.0),
    "clicks_per_minute": (0.0, 60.0), "dropouts_per_minute": (0.0, 60.0),
}
_LIST_BOUNDS = {"hum_harmonics_db": (-80.0, 20.0), "channel_offsets_db": (-20.0, 20.0)}

# Physical starting points per kind of machine; a hash of the device id moves each within a range.
_FORMAT_DEFAULTS = {
    "reel": dict(hiss_dbfs=-70.0, coating_um=12.0, spacing_um=0.25, gap_um=2.5, shortest_wavelength_um=5.5,
                 capstan_mm=6.0),
    "cassette": dict(hiss_dbfs=-66.0, coating_um=5.0, spacing_um=0.15, gap_um=1.0, shortest_wavelength_um=3.0,
                     capstan_mm=2.4),
}


@dataclass(frozen=True)
class TapeSignature:
    """The noise character of one replay machine; see the module docstring for each field's meaning."""

    device_id: str
    channels: int
    mains_hz: int
    hum_dbfs: float
    hum_harmonics_db: tuple[float, ...]
    hum_drift_hz: float
    hiss_dbfs: float
    hiss_db_per_halving: float
    electronics_dbfs: float
    rumble_dbfs: float
    modulation_depth: float
    coating_um: float
    spacing_um: float
    gap_um: float
    shortest_wavelength_um: float
    capstan_mm: float
    channel_correlation: float
    channel_offsets_db: tuple[float, ...]
    clicks_per_minute: float
    dropouts_per_minute: float
    overridden: tuple[str, ...] = ()  # keys that came from the device's [simulation] table

    def hiss_rms_dbfs(self, speed_ips: float) -> float:
        return self.hiss_dbfs + self.hiss_db_per_halving * math.log2(REFERENCE_SPEED_IPS / speed_ips)

    def band_edge_hz(self, speed_ips: float) -> float:
        """v/λ_min: where the speed's short-wavelength roll-off sets in."""
        return speed_ips * METRES_PER_INCH / (self.shortest_wavelength_um * 1e-6)

    def gap_null_hz(self, speed_ips: float) -> float:
        return speed_ips * METRES_PER_INCH / (self.gap_um * 1e-6)

    def capstan_hz(self, speed_ips: float) -> float:
        return speed_ips * METRES_PER_INCH / (math.pi * self.capstan_mm * 1e-3)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["hum_harmonics_db"] = list(self.hum_harmonics_db)
        data["channel_offsets_db"] = list(self.channel_offsets_db)
        data["overridden"] = list(self.overridden)
        return data


def _format_family(device_format: str) -> str:
    return "cassette" if "cassette" in device_format else "reel"


def _device_rng(device_id: str) -> np.random.Generator:
    """A generator seeded by the device id alone: the same id always gets the same signature."""
    digest = hashlib.sha256(f"workbench tape signature:{device_id}".encode()).digest()
    return np.random.default_rng(np.random.SeedSequence(int.from_bytes(digest[:16], "big")))


def hum_harmonics_db(uniform, highest: int) -> tuple[float, ...]:
    """Levels of hum harmonics 2 .. `highest` relative to the fundamental (dB), drawn with `uniform(low, high)`:
    falling 2.5 dB a harmonic, each a few dB lower at random, the odd ones lifted by one random emphasis
    (transformer fields give odd harmonics, rectifier buzz even ones)."""
    odd_emphasis = uniform(0.0, 8.0)
    return tuple(round(-2.5 * k - uniform(0.0, 8.0) + (odd_emphasis if k % 2 else 0.0), 1) for k in range(2, highest + 1))


def device_signature(device: Device) -> TapeSignature:
    """The device's stable signature: format defaults, moved by a hash of its id, then its overrides."""
    base = _FORMAT_DEFAULTS[_format_family(device.format)]
    rng = _device_rng(device.id)
    uniform = lambda low, high: float(rng.uniform(low, high))  # noqa: E731  (fixed draw order below)
    harmonics = hum_harmonics_db(uniform, 8)
    values = dict(
        mains_hz=50,
        hum_dbfs=round(uniform(-80.0, -70.0), 1),
        hum_harmonics_db=harmonics,
        hum_drift_hz=round(uniform(0.02, 0.08), 3),
        hiss_dbfs=round(base["hiss_dbfs"] + uniform(-3.0, 3.0), 1),
        hiss_db_per_halving=round(uniform(2.5, 3.5), 2),
        electronics_dbfs=round(uniform(-94.0, -86.0), 1),
        rumble_dbfs=round(uniform(-90.0, -80.0), 1),
        modulation_depth=round(uniform(0.03, 0.12), 3),
        coating_um=round(base["coating_um"] * uniform(0.85, 1.15), 2),
        spacing_um=round(base["spacing_um"] * uniform(0.8, 1.25), 3),
        gap_um=round(base["gap_um"] * uniform(0.85, 1.15), 2),
        shortest_wavelength_um=round(base["shortest_wavelength_um"] * uniform(0.9, 1.1), 2),
        capstan_mm=round(base["capstan_mm"] * uniform(0.8, 1.25), 2),
        channel_correlation=round(uniform(0.1, 0.4), 2),
        channel_offsets_db=tuple(round(uniform(-1.0, 1.0), 2) for _ in range(device.channels)),
        clicks_per_minute=round(uniform(1.0, 3.0), 2),
        dropouts_per_minute=round(uniform(0.5, 1.5), 2),
    )
    overrides = _validated_overrides(device)
    values.update(overrides)
    return TapeSignature(device_id=device.id, channels=device.channels, overridden=tuple(sorted(overrides)), **values)


def _validated_overrides(device: Device) -> dict:
    """The device's [simulation] table checked key by key; a WorkbenchError names the first problem."""
    where = f"device {device.id}: [simulation]"
    overrides = {}
    for key, value in (device.simulation or {}).items():
        if key not in SIMULATION_KEYS:
            raise WorkbenchError(f"{where} has unknown key {key!r} (known: {', '.join(SIMULATION_KEYS)})")
        if key == "mains_hz":
            if value not in (50, 60) or isinstance(value, bool):
                raise WorkbenchError(f"{where} mains_hz is {value!r}; it must be 50 or 60")
            overrides[key] = int(value)
        elif key in _LIST_BOUNDS:
            low, high = _LIST_BOUNDS[key]
            if not isinstance(value, list) or not all(_is_number(v) and low <= v <= high for v in value):
                raise WorkbenchError(f"{where} {key} must be a list of numbers between {low:g} and {high:g}")
            if key == "channel_offsets_db" and len(value) != device.channels:
                raise WorkbenchError(f"{where} channel_offsets_db has {len(value)} values for {device.channels} channels")
            if key == "hum_harmonics_db" and not value:
                raise WorkbenchError(f"{where} hum_harmonics_db is empty; give at least the 2nd harmonic")
            overrides[key] = tuple(float(v) for v in value)
        else:
            low, high = _BOUNDS[key]
            if not _is_number(value) or not low <= value <= high:
                raise WorkbenchError(f"{where} {key} is {value!r}; it must be a number between {low:g} and {high:g}")
            overrides[key] = float(value)
    return overrides


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def playback_eq_for(device: Device, speed_ips: float) -> tuple[PlaybackEq, bool]:
    """(the device's playback EQ at this speed, whether it was assumed because the registry has none)."""
    eq = device.eq_at(speed_ips)
    if eq is not None:
        return eq, False
    if _format_family(device.format) == "cassette":
        return parse_playback_eq("IEC Type I 3180+120 µs"), True
    standard = {15.0: "IEC 35 µs", 7.5: "IEC 70 µs", 3.75: "IEC 3180+90 µs"}
    return parse_playback_eq(standard.get(speed_ips, "IEC 3180+120 µs" if speed_ips < 3.75 else "IEC 35 µs")), True


# --- the stationary spectra ---------------------------------------------------------------------------

def _eq_power(f: np.ndarray, eq: PlaybackEq) -> np.ndarray:
    """|H_playback|², normalised to 1 at 1 kHz."""
    t2 = eq.high_us * 1e-6
    t1 = (eq.low_us * 1e-6) if eq.low_us else 1.0 / (2 * math.pi * AMPLIFIER_LF_LIMIT_HZ)

    def power(x):
        w = 2 * math.pi * x
        return (1 + (w * t2) ** 2) / (1 + (w * t1) ** 2)

    return power(f) / power(np.asarray(1000.0))


def _converter_power(f: np.ndarray, sample_rate: int) -> np.ndarray:
    """Subsonic high-pass times the anti-alias roll-off (raised cosine to zero at fs/2)."""
    highpass = (f / SUBSONIC_HZ) ** 4 / (1 + (f / SUBSONIC_HZ) ** 4)
    start, stop = ANTI_ALIAS_START * sample_rate, 0.5 * sample_rate
    position = np.clip((f - start) / (stop - start), 0.0, 1.0)
    antialias = np.square(0.5 * (1 + np.cos(math.pi * position)))
    return highpass * antialias


def _tape_head_power(f: np.ndarray, signature: TapeSignature, speed_ips: float) -> np.ndarray:
    """Head-voltage power of particulate tape noise per hertz (Mallinson), times the band-edge roll-off."""
    v = speed_ips * METRES_PER_INCH
    k = 2 * math.pi * f / v
    coating, spacing, gap = signature.coating_um * 1e-6, signature.spacing_um * 1e-6, signature.gap_um * 1e-6
    gap_loss = np.maximum(np.square(np.sinc(gap * f / v)), 1e-6)
    band_edge = 1.0 / (1 + (f / signature.band_edge_hz(speed_ips)) ** 8)
    return k * -np.expm1(-2 * k * coating) * np.exp(-2 * k * spacing) * gap_loss * band_edge


def component_shapes(signature: TapeSignature, eq: PlaybackEq, speed_ips: float, sample_rate: int,
                     f: np.ndarray) -> dict[str, np.ndarray]:
    """Unnormalised power shapes of the stationary noise components at frequencies `f` (> 0)."""
    f = np.maximum(np.asarray(f, dtype=np.float64), 1e-3)
    converter = _converter_power(f, sample_rate)
    eq_power = _eq_power(f, eq)
    return {
        "hiss": _tape_head_power(f, signature, speed_ips) * eq_power * converter,
        "electronics": (1 + PREAMP_FLICKER_CORNER_HZ / f) * eq_power * converter,
        "floor": converter,
        "rumble": converter / (1 + (f / RUMBLE_CORNER_HZ) ** 4),
    }


def component_levels_dbfs(signature: TapeSignature, speed_ips: float) -> dict[str, float]:
    """RMS level of each stationary component (before channel offsets), dBFS."""
    return {"hiss": signature.hiss_rms_dbfs(speed_ips), "electronics": signature.electronics_dbfs,
            "floor": OUTPUT_FLOOR_DBFS, "rumble": signature.rumble_dbfs}


def design_psd_db(signature: TapeSignature, eq: PlaybackEq, speed_ips: float, sample_rate: int,
                  frequencies: np.ndarray) -> np.ndarray:
    """The intended one-sided PSD (dB re FS²/Hz, channels averaged) of the stationary noise, lines excluded.

    Each component's shape scaled so it integrates to its RMS level; the hiss includes the power its
    modulation adds (1 + m²). This is the simulator's own statement of what it renders; tests compare
    it with what the profile code measures.
    """
    grid = np.linspace(0.0, sample_rate / 2, 1 << 16)[1:]
    shapes_grid = component_shapes(signature, eq, speed_ips, sample_rate, grid)
    shapes = component_shapes(signature, eq, speed_ips, sample_rate, frequencies)
    levels = component_levels_dbfs(signature, speed_ips)
    total = np.zeros_like(np.asarray(frequencies, dtype=np.float64))
    for name, shape in shapes.items():
        variance = 10 ** (levels[name] / 10) * (1 + signature.modulation_depth ** 2 if name == "hiss" else 1.0)
        total += variance * shape / np.trapezoid(shapes_grid[name], grid)
    channel_power = float(np.mean(10 ** (np.asarray(signature.channel_offsets_db) / 10)))
    return 10 * np.log10(total * channel_power + 1e-30)


# --- events --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InjectedEvent:
    """A defect the simulator put on the tape: what screening should find and exclude."""

    kind: str  # "click", "dropout" or "splice"
    start_s: float
    end_s: float
    level_db: float  # click and splice: peak level (dBFS); dropout: depth (dB)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "start_s": round(self.start_s, 6), "end_s": round(self.end_s, 6),
                "level_db": round(self.level_db, 2)}


@dataclass
class _Defects:
    events: list[InjectedEvent] = field(default_factory=list)
    impulses: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (start frame, (channels, n))
    dropouts: list[tuple[int, int, int, float]] = field(default_factory=list)  # (start, stop, ramp, gain)
    step: tuple[int, int, float] | None = None  # (frame, ramp, gain after): the splice's new piece of tape


def _raised_cosine_window(frames: np.ndarray, start: int, stop: int, ramp: int) -> np.ndarray:
    """1 inside [start+ramp, stop-ramp), cosine ramps to 0 at start and stop, 0 outside."""
    rise = np.clip((frames - start) / ramp, 0.0, 1.0)
    fall = np.clip((stop - frames) / ramp, 0.0, 1.0)
    return 0.5 * (1 - np.cos(math.pi * np.minimum(rise, fall)))


def _plan_defects(signature: TapeSignature, frames: int, sample_rate: int, rng: np.random.Generator) -> _Defects:
    defects = _Defects()
    seconds = frames / sample_rate
    if seconds < MIN_DEFECT_SECONDS:
        return defects
    minutes = seconds / 60
    clicks = max(1, round(signature.clicks_per_minute * minutes)) if signature.clicks_per_minute > 0 else 0
    dropouts = max(1, round(signature.dropouts_per_minute * minutes)) if signature.dropouts_per_minute > 0 else 0
    taken: list[tuple[float, float]] = []

    def place(length_s: float, low: float = DEFECT_MARGIN_SECONDS, high: float | None = None) -> float | None:
        high = (seconds - DEFECT_MARGIN_SECONDS - length_s) if high is None else high
        for _ in range(200):
            start = float(rng.uniform(low, high))
            if all(start + length_s + DEFECT_SEPARATION_SECONDS < a or start > b + DEFECT_SEPARATION_SECONDS
                   for a, b in taken):
                taken.append((start, start + length_s))
                return start
        return None

    channel_gains = lambda: rng.uniform(0.6, 1.0, signature.channels)[:, None]  # noqa: E731

    # the splice first, in the middle part of the tape
    thump_tau = float(rng.uniform(0.5e-3, 2e-3))
    thump_peak_db = float(rng.uniform(-24.0, -12.0))
    splice_dropout_s = float(rng.uniform(0.03, 0.08))
    splice_depth_db = float(rng.uniform(12.0, 20.0))
    step_db = float(rng.choice([-1, 1]) * rng.uniform(0.5, 2.0))
    length = 0.01 + splice_dropout_s + 0.01
    start = place(length, 0.3 * seconds, 0.7 * seconds - length)
    if start is not None:
        at = round((start + 0.005) * sample_rate)
        t = np.arange(round(8 * thump_tau * sample_rate)) / sample_rate
        thump = (t / thump_tau) * np.exp(1 - t / thump_tau)
        thump = thump + 0.5 * _tick(t, float(rng.uniform(1500, 4000)), thump_tau / 3)
        thump *= 10 ** (thump_peak_db / 20) / np.max(np.abs(thump))
        defects.impulses.append((at, channel_gains() * thump[None, :]))
        ramp = round(0.004 * sample_rate)
        defects.dropouts.append((at, at + round(splice_dropout_s * sample_rate), ramp, 10 ** (-splice_depth_db / 20)))
        defects.step = (at, ramp, 10 ** (step_db / 20))
        defects.events.append(InjectedEvent("splice", start, start + length, thump_peak_db))

    for _ in range(dropouts):
        duration = float(rng.uniform(0.1, 0.3))  # the ones that matter: long enough to dent a 50 ms level
        depth_db = float(rng.uniform(10.0, 25.0))
        ramp_s = float(rng.uniform(0.003, 0.008))
        start = place(duration)
        if start is None:
            continue
        first = round(start * sample_rate)
        defects.dropouts.append((first, first + round(duration * sample_rate), round(ramp_s * sample_rate),
                                 10 ** (-depth_db / 20)))
        defects.events.append(InjectedEvent("dropout", start, start + duration, depth_db))

    for _ in range(clicks):
        tau = float(rng.uniform(0.1e-3, 0.5e-3))
        peak_db = float(rng.uniform(-30.0, -10.0))
        frequency = float(rng.uniform(1500.0, 6000.0))
        length_s = 8 * tau
        start = place(length_s)
        if start is None:
            continue
        t = np.arange(max(2, round(length_s * sample_rate))) / sample_rate
        tick = _tick(t, frequency, tau)
        tick *= 10 ** (peak_db / 20) / np.max(np.abs(tick))
        defects.impulses.append((round(start * sample_rate), channel_gains() * tick[None, :]))
        defects.events.append(InjectedEvent("click", start, start + length_s, peak_db))

    defects.events.sort(key=lambda e: e.start_s)
    return defects


def _tick(t: np.ndarray, frequency: float, tau: float) -> np.ndarray:
    """A static-discharge click: a sharp onset ringing down at `frequency`."""
    return np.exp(-t / tau) * np.cos(2 * math.pi * frequency * t)


# --- streaming renderer ------------------------------------------------------------------------------------

def _fir_length(sample_rate: float) -> int:
    return 1 << round(math.log2(0.186 * sample_rate))  # 8192 taps at 44.1 kHz: ~5 Hz resolution


def _design_fir(shape_fn, sample_rate: float, taps: int) -> np.ndarray:
    """Linear-phase FIR whose power response follows `shape_fn(f)`, scaled to unit output variance."""
    f = np.fft.rfftfreq(taps, 1.0 / sample_rate)
    amplitude = np.sqrt(shape_fn(np.maximum(f, 1e-3)))
    amplitude[0] = 0.0
    kernel = np.roll(np.fft.irfft(amplitude, taps), taps // 2) * np.hanning(taps)
    return kernel / math.sqrt(float(np.sum(np.square(kernel))))


class _ShapedNoise:
    """White noise rows through one FIR by FFT overlap-add in float32: exact across blocks, no block edges."""

    def __init__(self, kernel: np.ndarray, rows: int, fft_size: int):
        import scipy.fft

        self.fft = scipy.fft
        self.fft_size, self.taps = fft_size, len(kernel)
        self.block = fft_size - self.taps + 1  # the most frames one call can take
        self.spectrum = scipy.fft.rfft(kernel.astype(np.float32), fft_size)
        self.tail = np.zeros((rows, self.taps - 1), dtype=np.float32)

    def filter(self, white: np.ndarray) -> np.ndarray:
        frames = white.shape[1]
        assert frames <= self.block, "block too long for the FFT size"
        shaped = self.fft.irfft(self.fft.rfft(white, self.fft_size, axis=1) * self.spectrum, self.fft_size, axis=1)
        shaped = shaped[:, : frames + self.taps - 1]
        shaped[:, : self.taps - 1] += self.tail
        self.tail = shaped[:, frames:].copy()
        return shaped[:, :frames]


class _SlowNoise:
    """Narrow low-frequency Gaussian noise (rumble, hiss modulation): shaped at ~1.4 kHz, interpolated up.

    Generating at a low rate costs a thirtieth of the audio-rate work; linear interpolation of a signal
    whose band ends far below the low rate's Nyquist leaves images more than 30 dB down.
    """

    def __init__(self, shape_fn, sample_rate: int, rng: np.random.Generator):
        self.decimation = max(1, round(sample_rate / 1400))
        rate = sample_rate / self.decimation
        taps = _fir_length(rate * 8)  # ~0.7 Hz resolution
        self.noise = _ShapedNoise(_design_fir(shape_fn, rate, taps), 1, 8 * taps)
        self.rng = rng
        self.noise.filter(rng.standard_normal((1, taps), dtype=np.float32))  # warm up
        self.buffer = np.zeros(0, dtype=np.float32)
        self.buffer_start = 0  # low-rate index of buffer[0]

    def at(self, first: int, frames: int) -> np.ndarray:
        """The signal at audio frames first .. first+frames-1, shape (frames,)."""
        position = np.arange(first, first + frames, dtype=np.float64) / self.decimation
        needed = int(position[-1]) + 2  # the last low-rate sample an interpolation reaches, exclusive
        while self.buffer_start + self.buffer.size < needed:
            chunk = self.noise.filter(self.rng.standard_normal((1, self.noise.block), dtype=np.float32))[0]
            self.buffer = np.concatenate([self.buffer, chunk])
        drop = int(position[0]) - self.buffer_start
        self.buffer, self.buffer_start = self.buffer[drop:], self.buffer_start + drop
        return np.interp(position - self.buffer_start, np.arange(self.buffer.size), self.buffer).astype(np.float32)


class TapeNoiseRenderer:
    """Renders a blank tape of one device at one speed, block by block; `events` are known up front."""

    def __init__(self, device: Device, speed_ips: float, seconds: float, seed: int = 0, sample_rate: int = 44_100,
                 defects: bool = True):
        self.speed_ips = device.check_speed(float(speed_ips))
        if sample_rate not in SUPPORTED_SAMPLE_RATES:
            raise WorkbenchError(f"sample rate {sample_rate} Hz is not supported "
                                 f"(use one of {', '.join(str(r) for r in SUPPORTED_SAMPLE_RATES)})")
        if not seconds > 0:
            raise WorkbenchError(f"a blank tape needs a positive length, not {seconds} s")
        self.device, self.seed, self.sample_rate = device, int(seed), int(sample_rate)
        self.signature = device_signature(device)
        self.channels = self.signature.channels
        self.eq, self.eq_assumed = playback_eq_for(device, self.speed_ips)
        self.frames = max(1, round(seconds * sample_rate))
        streams = np.random.SeedSequence(
            [self.seed, int(hashlib.sha256(device.id.encode()).hexdigest()[:12], 16),
             round(self.speed_ips * 1000), self.sample_rate]).spawn(7)
        self._rngs = [np.random.default_rng(s) for s in streams]
        self.defects = _plan_defects(self.signature, self.frames, self.sample_rate, self._rngs[0]) if defects else _Defects()

    @property
    def events(self) -> list[InjectedEvent]:
        return list(self.defects.events)

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    def blocks(self) -> Iterator[np.ndarray]:
        """Yield float32 (channels, frames) blocks covering exactly `self.frames` frames."""
        sig, sr, channels = self.signature, self.sample_rate, self.channels
        hiss_rng, electronics_rng, modulation_rng, rumble_rng, phase_rng = self._rngs[1:6]
        levels = {k: 10 ** (v / 20) for k, v in component_levels_dbfs(sig, self.speed_ips).items()}
        shape = lambda name: (lambda f: component_shapes(sig, self.eq, self.speed_ips, sr, f)[name])  # noqa: E731
        taps = _fir_length(sr)
        fft_size = 16 * taps
        hiss = _ShapedNoise(_design_fir(shape("hiss"), sr, taps) * levels["hiss"], channels, fft_size)
        # electronics and output floor are independent per channel: one kernel for their summed power
        grid = np.linspace(0.0, sr / 2, 1 << 16)[1:]
        area = {name: float(np.trapezoid(s, grid))
                for name, s in component_shapes(sig, self.eq, self.speed_ips, sr, grid).items()}
        electronics = _ShapedNoise(_design_fir(
            lambda f: sum(levels[name] ** 2 * shape(name)(f) / area[name] for name in ("electronics", "floor")),
            sr, taps) * math.hypot(levels["electronics"], levels["floor"]), channels, fft_size)
        modulation = _SlowNoise(lambda f: 1.0 / (1 + (f / MODULATION_BANDWIDTH_HZ) ** 2), sr, modulation_rng)
        rumble = _SlowNoise(shape("rumble"), sr, rumble_rng)
        # Independent tracks plus a common part, mixed before the (shared) filter: hiss correlation ρ.
        rho = sig.channel_correlation if channels > 1 else 0.0
        mix = np.full((channels, 1), math.sqrt(1 - rho), dtype=np.float32), np.float32(math.sqrt(rho))

        def white(rng, rows, frames):
            return rng.standard_normal((rows, frames), dtype=np.float32)

        def hiss_white(frames):
            independent, common = white(hiss_rng, channels, frames), white(hiss_rng, 1, frames)
            return mix[0] * independent + mix[1] * common

        hiss.filter(hiss_white(taps))  # warm up: start with the filters full, not from silence
        electronics.filter(white(electronics_rng, channels, taps))

        channel_gain = (10 ** (np.asarray(sig.channel_offsets_db) / 20))[:, None].astype(np.float32)
        hum = _Hum(sig.mains_hz, sig.hum_dbfs, sig.hum_harmonics_db, sig.hum_drift_hz, sr, channels, phase_rng)
        rumble_gain = phase_rng.uniform(0.8, 1.0, (channels, 1)).astype(np.float32)
        capstan_phase = float(phase_rng.uniform(0, 1))
        capstan_amplitude = math.sqrt(2) * 10 ** ((sig.rumble_dbfs - 6.0) / 20)
        capstan_cycles_per_frame = sig.capstan_hz(self.speed_ips) / sr
        sine = np.sin(2 * math.pi * np.arange(_TABLE) / _TABLE)

        for first in range(0, self.frames, hiss.block):
            n = min(hiss.block, self.frames - first)
            frame_index = np.arange(first, first + n)
            tape = hiss.filter(hiss_white(n))
            tape *= np.maximum(1.0 + sig.modulation_depth * modulation.at(first, n), 0.05)
            if self.defects.dropouts or self.defects.step:
                tape *= self._tape_gain(frame_index).astype(np.float32)
            capstan = capstan_amplitude * _periodic(sine, frame_index * capstan_cycles_per_frame + capstan_phase)
            mechanical = np.float32(levels["rumble"]) * rumble.at(first, n) + capstan.astype(np.float32)
            out = tape + electronics.filter(white(electronics_rng, channels, n)) + rumble_gain * mechanical
            out += hum.block(frame_index / sr)
            out *= channel_gain
            for start, waveform in self.defects.impulses:
                lo, hi = max(start, first), min(start + waveform.shape[1], first + n)
                if lo < hi:
                    out[:, lo - first: hi - first] += waveform[:, lo - start: hi - start]
            assert np.max(np.abs(out)) < 1.0, "the simulated noise clipped"
            yield out

    def _tape_gain(self, frame_index: np.ndarray) -> np.ndarray:
        """What happens to the tape's own noise: dropouts and the splice's step in level."""
        gain = np.ones(frame_index.shape)
        first, last = int(frame_index[0]), int(frame_index[-1])
        for start, stop, ramp, floor in self.defects.dropouts:
            if start <= last and stop >= first:
                gain *= 1 - (1 - floor) * _raised_cosine_window(frame_index, start, stop, ramp)
        if self.defects.step is not None:
            at, ramp, after = self.defects.step
            progress = np.clip((frame_index - at) / ramp, 0.0, 1.0)
            gain *= 1 + (after - 1) * 0.5 * (1 - np.cos(math.pi * progress))
        return gain

    def render_array(self) -> np.ndarray:
        """The whole render in memory, float32 (channels, frames): for short renders and tests."""
        return np.concatenate(list(self.blocks()), axis=1).astype(np.float32)


_TABLE = 4096  # wavetable length for periodic waveforms (hum, capstan): interpolation error < -75 dB


def _periodic(table: np.ndarray, cycles: np.ndarray) -> np.ndarray:
    """One period of a waveform in `table`, read at phases given in cycles (linear interpolation)."""
    return np.interp(np.mod(cycles, 1.0) * len(table), np.arange(len(table)), table, period=len(table))


class _Hum:
    """Mains hum: harmonics of a slowly drifting mains frequency, with per-channel level and phase.

    The harmonics' mix is fixed per channel, so one period of it is a wavetable read at the drifting
    phase: exact phase continuity at any length for the cost of one interpolation per sample.
    """

    def __init__(self, mains_hz: float, hum_dbfs: float, harmonics_db: Sequence[float], drift_hz: float,
                 sample_rate: int, channels: int, rng: np.random.Generator):
        self.mains = float(mains_hz)
        weights = rng.uniform(0.5, 1.0, 3)
        self.drift_amplitudes = drift_hz * weights / weights.sum()  # Hz, peaks add to drift_hz
        self.drift_periods = rng.uniform(20.0, 200.0, 3)  # seconds
        self.drift_phases = rng.uniform(0, 2 * math.pi, 3)
        self.breath_period = float(rng.uniform(30.0, 120.0))
        self.breath_phase = float(rng.uniform(0, 2 * math.pi))
        levels = [0.0, *harmonics_db]
        harmonics = [k for k in range(1, len(levels) + 1) if k * (self.mains + drift_hz) < 0.45 * sample_rate]
        amplitude = np.array([math.sqrt(2) * 10 ** ((hum_dbfs + levels[k - 1]) / 20) for k in harmonics])
        channel_level = 10 ** (rng.uniform(-2.0, 2.0, (channels, 1)) / 20) if channels > 1 else np.ones((1, 1))
        phases = rng.uniform(0, 2 * math.pi, (1, len(harmonics))) + (
            rng.uniform(-0.3, 0.3, (channels, len(harmonics))) if channels > 1 else 0.0)
        theta = 2 * math.pi * np.arange(_TABLE) / _TABLE
        k = np.array(harmonics)[:, None]
        # table[c] = Σ_k A_ck sin(k θ + φ_ck)
        self.tables = [(channel_level[c, 0] * amplitude[:, None] * np.sin(k * theta[None, :] + phases[min(c, phases.shape[0] - 1)][:, None])).sum(axis=0)
                       for c in range(channels)]

    def cycles(self, t: np.ndarray) -> np.ndarray:
        """∫ f(t) dt in cycles for f(t) = mains + Σ a sin(2π t/P + φ), zero at t = 0."""
        return self.mains * t + self._slow(t, self._drift_cycles)

    def _drift_cycles(self, t: np.ndarray) -> np.ndarray:
        cycles = np.zeros_like(t)
        for a, period, phi in zip(self.drift_amplitudes, self.drift_periods, self.drift_phases):
            cycles -= a * period / (2 * math.pi) * (np.cos(2 * math.pi * t / period + phi) - math.cos(phi))
        return cycles

    def _breath(self, t: np.ndarray) -> np.ndarray:
        return 1 + HUM_AMPLITUDE_BREATH * np.sin(2 * math.pi * t / self.breath_period + self.breath_phase)

    @staticmethod
    def _slow(t: np.ndarray, function) -> np.ndarray:
        """`function` (periods of tens of seconds) evaluated every 64 frames and interpolated between."""
        coarse = np.append(t[::64], t[-1])
        return np.interp(t, coarse, function(coarse))

    def block(self, t: np.ndarray) -> np.ndarray:
        cycles, breath = self.cycles(t), self._slow(t, self._breath)
        return np.stack([_periodic(table, cycles) * breath for table in self.tables]).astype(np.float32)


def hum_family(rng: np.random.Generator, frames: int, mains_hz: float, highest_harmonic: int,
               sample_rate: int = MODEL_SAMPLE_RATE) -> np.ndarray:
    """`frames` mono samples of a random mains-hum family on `mains_hz`: harmonics up to `highest_harmonic` at
    levels drawn as a machine's are (`hum_harmonics_db`), a drift of 0.02-0.08 Hz, random phases, the
    fundamental's RMS 1 (its level is the caller's). Training data adds it to tape noise: a general model
    that has heard hum families in general does not leave an unheard machine's in place."""
    harmonics = hum_harmonics_db(lambda low, high: float(rng.uniform(low, high)), highest_harmonic)
    hum = _Hum(mains_hz, 0.0, harmonics, float(rng.uniform(0.02, 0.08)), sample_rate, 1, rng)
    start = float(rng.uniform(0.0, 600.0))  # somewhere in ten minutes of the drift
    return hum.block(start + np.arange(frames) / sample_rate)[0]


# --- writing --------------------------------------------------------------------------------------------------

@dataclass
class BlankTapeRender:
    """What `render_blank_tape` wrote: the audio, its sidecar and the truth about it."""

    path: Path
    sidecar: Path
    device_id: str
    speed_ips: float
    seconds: float
    frames: int
    sample_rate: int
    channels: int
    seed: int
    playback_eq: str
    playback_eq_assumed: bool
    defects: bool
    events: list[InjectedEvent]
    signature: TapeSignature

    def to_dict(self) -> dict:
        return {
            "kind": "blank-tape", "path": str(self.path), "sidecar": str(self.sidecar), "device": self.device_id,
            "speed_ips": self.speed_ips, "seconds": self.seconds, "frames": self.frames,
            "sample_rate": self.sample_rate, "channels": self.channels, "seed": self.seed,
            "playback_eq": self.playback_eq, "playback_eq_assumed": self.playback_eq_assumed,
            "defects": self.defects, "events": [e.to_dict() for e in self.events],
            "signature": self.signature.to_dict(),
        }


def sidecar_path(path: Path) -> Path:
    """Where the truth about a rendered blank tape is written: beside it, `<stem>.synth.json`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.synth.json")


def _eq_text(eq: PlaybackEq) -> str:
    low = f"{eq.low_us:g}+" if eq.low_us else ""
    return f"{eq.standard} {low}{eq.high_us:g} µs".strip()


def render_blank_tape(device: Device, speed_ips: float, seconds: float, path: Path, seed: int = 0,
                      sample_rate: int = 44_100, defects: bool = True, subtype: str = "PCM_24",
                      progress: Progress = no_progress) -> BlankTapeRender:
    """Render a blank tape to `path` (atomically) and its truth to `sidecar_path(path)`; returns both.

    The same arguments always give byte-identical files.
    """
    from workbench.audio.io import atomic_audio_writer, atomic_write_json

    path = Path(path)
    renderer = TapeNoiseRenderer(device, speed_ips, seconds, seed, sample_rate, defects)
    stage = f"blank tape {device.id} {format_speed(renderer.speed_ips)} ips"
    done = 0
    progress(stage, 0, renderer.frames)
    with atomic_audio_writer(path, renderer.sample_rate, renderer.channels, subtype=subtype) as handle:
        for block in renderer.blocks():
            handle.write(block.T)
            done += block.shape[1]
            progress(stage, done, renderer.frames)
    result = BlankTapeRender(
        path=path, sidecar=sidecar_path(path), device_id=device.id, speed_ips=renderer.speed_ips,
        seconds=renderer.seconds, frames=renderer.frames, sample_rate=renderer.sample_rate,
        channels=renderer.channels, seed=renderer.seed, playback_eq=_eq_text(renderer.eq),
        playback_eq_assumed=renderer.eq_assumed, defects=defects, events=renderer.events,
        signature=renderer.signature)
    atomic_write_json(result.sidecar, result.to_dict())
    return result


def signature_report(device: Device) -> dict:
    """The device's signature plus what it means at each of its speeds (for `workbench synth signature`)."""
    signature = device_signature(device)
    speeds = []
    for speed in device.speeds_ips:
        eq, assumed = playback_eq_for(device, speed)
        speeds.append({
            "speed_ips": speed, "playback_eq": _eq_text(eq), "playback_eq_assumed": assumed,
            "hiss_rms_dbfs": round(signature.hiss_rms_dbfs(speed), 2),
            "hiss_turnover_hz": round(1e6 / (2 * math.pi * eq.high_us), 1),
            "band_edge_hz": round(signature.band_edge_hz(speed), 1),
            "gap_null_hz": round(signature.gap_null_hz(speed), 1),
            "capstan_hz": round(signature.capstan_hz(speed), 2),
        })
    return {"device": device.id, "signature": signature.to_dict(), "speeds": speeds,
            "keys": dict(SIMULATION_KEYS)}


__all__ = [
    "SIMULATION_KEYS", "TapeSignature", "device_signature", "playback_eq_for", "design_psd_db", "component_shapes",
    "InjectedEvent", "TapeNoiseRenderer", "BlankTapeRender", "render_blank_tape", "sidecar_path", "signature_report",
]