"""Synthetic clean music: the embedded corpus the denoiser learns what music (as opposed to tape noise) is.

Each piece is composed and played from its seed alone:
- composition: a key and mode, a chord progression, bars grouped in four-bar phrases, a melody that
  walks the scale and leans on chord tones, a bass line, a harmony part, and in some pieces drums;
  phrase-level dynamics (pp to f, with hairpins), rests, and general pauses between phrases;
- timbres (additive synthesis with physically motivated partials):
  piano-like (stiff-string inharmonicity f_n = n·f0·√(1+Bn²), hammer-position comb, faster decay of
  high partials, detuned unison strings, damper release, hammer thump), bowed (sawtooth-like partials
  through a violin-family body response, delayed vibrato, bow noise, slow attack), plucked (pluck-position
  comb, bright attack decaying fast), mallet (marimba-like partial ratios 1 : 3.93 : 9.27) and drums (kick,
  snare, hi-hat: shaped noise and swept sines);
- a room: a stereo pair of impulse responses with early reflections and a frequency-dependent late decay
  (high frequencies die sooner), convolved with torchaudio;
- mastering: integrated loudness set to a level drawn from `LOUDNESS_RANGE_LUFS` (ITU-R BS.1770 via
  torchaudio.functional.loudness) and a smooth peak limiter at `PEAK_CEILING_DBFS`: no clipping.

`render_music` writes pieces into a folder with a `music.json` manifest; the same seed and request give
byte-identical files, and asking again for what a folder already holds reuses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from workbench.audio.io import read_json_object
from workbench.errors import WorkbenchError
from workbench.progress import Progress, no_progress

MUSIC_SAMPLE_RATE = 44_100
LOUDNESS_RANGE_LUFS = (-26.0, -18.0)  # each piece's integrated loudness is drawn from this range
PEAK_CEILING_DBFS = -1.0  # true sample peaks stay at or below this
PIECE_SECONDS = 30.0
MIN_PIECE_SECONDS = 5.0
GENERATOR = "workbench.synth.music/1"  # bump when the synthesis changes: old folders are then not reused
MANIFEST = "music.json"

SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11), "natural minor": (0, 2, 3, 5, 7, 8, 10), "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10), "harmonic minor": (0, 2, 3, 5, 7, 8, 11),
}
PROGRESSIONS = ((0, 4, 5, 3), (0, 5, 3, 4), (1, 4, 0, 0), (0, 3, 4, 0), (5, 3, 0, 4), (0, 3, 0, 4), (0, 6, 5, 4))
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MELODIC_TIMBRES = ("piano", "bowed", "plucked", "mallet")
TIMBRES = (*MELODIC_TIMBRES, "drums")


@dataclass
class Note:
    start: float  # seconds
    duration: float  # seconds the key/bow/finger is held
    midi: float
    velocity: float  # 0..1, dynamics included
    voice: str  # "lead", "harmony", "bass"


@dataclass
class Hit:
    start: float
    kind: str  # "kick", "snare", "hat", "open-hat"
    velocity: float


@dataclass
class Score:
    seconds: float
    tempo_bpm: float
    beats_per_bar: int
    key: str
    timbres: dict[str, str]  # voice -> timbre
    notes: list[Note] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)
    pauses: list[tuple[float, float]] = field(default_factory=list)  # general pauses (start, end)

    def max_polyphony(self) -> int:
        """The most notes held at once."""
        edges = sorted([(n.start, 1) for n in self.notes] + [(n.start + n.duration, -1) for n in self.notes])
        depth = best = 0
        for _, step in edges:
            depth += step
            best = max(best, depth)
        return best


# --- composition ----------------------------------------------------------------------------------------

def compose(rng: np.random.Generator, seconds: float, lead_timbre: str) -> Score:
    """A piece's score: phrases of four bars over a looping progression, ending a reverb tail early."""
    assert lead_timbre in MELODIC_TIMBRES
    tempo = float(rng.uniform(66, 132))
    beat = 60.0 / tempo
    beats_per_bar = int(rng.choice([3, 4], p=[0.25, 0.75]))
    bar = beats_per_bar * beat
    root = int(rng.integers(45, 57))  # A2 .. G#3: the bass register
    mode = str(rng.choice(list(SCALES)))
    scale = SCALES[mode]
    progression = PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))]
    timbres = {
        "lead": lead_timbre,
        "harmony": str(rng.choice([t for t in ("piano", "bowed", "plucked") if t != lead_timbre] or ["piano"])),
        "bass": str(rng.choice(["plucked", "bowed", "piano"])),
    }
    drums = bool(rng.random() < 0.4)
    if drums:
        timbres["drums"] = "drums"
    score = Score(seconds, tempo, beats_per_bar, f"{NOTE_NAMES[root % 12]} {mode}", timbres)

    def pitch(degree: int, octave_base: int) -> int:
        return octave_base + 12 * (degree // 7) + scale[degree % 7]

    t, bar_index = 0.25, 0
    end = max(seconds - 2.0, t + bar)  # the last two seconds for the reverb tail, yet at least one bar
    dynamic = float(rng.uniform(0.45, 0.8))
    melody_degree = 7 + int(rng.integers(0, 5))  # scale degrees above root + 12
    pause_due = seconds > 15  # at least one general pause in any piece long enough for phrases
    while t + bar <= end:
        phrase_bar = bar_index % 4
        if phrase_bar == 0 and bar_index:
            dynamic = float(np.clip(dynamic + rng.choice([-0.25, -0.12, 0.0, 0.12, 0.25]), 0.25, 1.0))
            if pause_due or rng.random() < 0.3:
                pause = float(rng.uniform(1.5, 3.0))
                if t + pause + bar <= end:
                    score.pauses.append((t, t + pause))
                    t += pause
                    pause_due = False
        hairpin = 1.0 + 0.18 * math.sin(math.pi * (phrase_bar + 0.5) / 4)
        level = dynamic * hairpin
        chord_degree = progression[bar_index % len(progression)]
        chord = [chord_degree, chord_degree + 2, chord_degree + 4] + ([chord_degree + 6] if rng.random() < 0.3 else [])
        phrase_end = phrase_bar == 3

        # melody
        beats_left, position = float(beats_per_bar), 0.0
        long_notes = lead_timbre == "bowed"
        while beats_left > 1e-9:
            if phrase_end and position >= beats_per_bar - 2:
                length = beats_left
            else:
                choices = (1.0, 2.0, 3.0) if long_notes else (0.5, 1.0, 1.0, 1.5, 2.0)
                length = min(float(rng.choice(choices)), beats_left)
            rest = rng.random() < 0.12 or (phrase_end and position >= beats_per_bar - 1 and beats_left <= 1)
            if not rest:
                melody_degree = int(np.clip(melody_degree + rng.choice([-2, -1, -1, 0, 1, 1, 2]), 3, 15))
                if position == 0.0:  # strong beat: the nearest chord tone
                    tones = [c + 7 * o for c in chord for o in (0, 1, 2)]
                    melody_degree = min(tones, key=lambda d: abs(d - melody_degree))
                legato = 1.0 if long_notes else float(rng.uniform(0.7, 0.95))
                score.notes.append(Note(t + position * beat, length * beat * legato, pitch(melody_degree, root + 12),
                                        level * float(rng.uniform(0.8, 1.0)), "lead"))
            position += length
            beats_left -= length

        # harmony
        voicing = [pitch(d, root + 12) for d in chord]
        if timbres["harmony"] == "plucked":  # arpeggio in eighths
            cycle = voicing + voicing[-2:0:-1]
            for i in range(beats_per_bar * 2):
                score.notes.append(Note(t + i * beat / 2, beat * 0.9, cycle[i % len(cycle)],
                                        0.55 * level * float(rng.uniform(0.85, 1.0)), "harmony"))
        else:
            strikes = [0] if timbres["harmony"] == "bowed" or beats_per_bar == 3 else [0, 2]
            for s in strikes:
                held = (beats_per_bar - s if s == strikes[-1] else 2) * beat * 0.97
                for p in voicing:
                    score.notes.append(Note(t + s * beat, held, p, 0.5 * level * float(rng.uniform(0.85, 1.0)),
                                            "harmony"))

        # bass
        bass_root = pitch(chord_degree, root) - (12 if pitch(chord_degree, root) > root + 7 else 0)
        score.notes.append(Note(t, beat * (2 if beats_per_bar == 4 else 1.5) * 0.95, bass_root, 0.75 * level, "bass"))
        second = bass_root + int(rng.choice([7, 12, 0]))
        second_at = 2 if beats_per_bar == 4 else 2
        score.notes.append(Note(t + second_at * beat, beat * (beats_per_bar - second_at) * 0.9, second, 0.65 * level,
                                "bass"))

        # drums
        if drums:
            for b in range(beats_per_bar):
                if b == 0 or (beats_per_bar == 4 and b == 2):
                    score.hits.append(Hit(t + b * beat, "kick", level))
                if (beats_per_bar == 4 and b in (1, 3)) or (beats_per_bar == 3 and b == 2):
                    score.hits.append(Hit(t + b * beat, "snare", 0.8 * level))
                for half in (0, 1):
                    kind = "open-hat" if (phrase_end and b == beats_per_bar - 1 and half) else "hat"
                    score.hits.append(Hit(t + (b + half / 2) * beat, kind, (0.3 if half else 0.45) * level))
            if phrase_end:  # a fill: sixteenth snares on the last beat
                for q in range(4):
                    score.hits.append(Hit(t + (beats_per_bar - 1 + q / 4) * beat, "snare", (0.4 + 0.12 * q) * level))
        t += bar
        bar_index += 1

    for item in (*score.notes, *score.hits):  # a human player: a few milliseconds early or late
        item.start = max(0.0, item.start + float(np.clip(rng.normal(0, 0.006), -0.015, 0.015)))
    return score


# --- instruments ---------------------------------------------------------------------------------------------

def _hz(midi: float) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


_CHUNK = 512  # frames per row of the phasor matrix product below


def _partials(freqs: np.ndarray, amps: np.ndarray, decays: np.ndarray | None, frames: int, sr: int,
              phases: np.ndarray) -> np.ndarray:
    """Σ a_n·e^(−t/τ_n)·sin(2π f_n t + 2π φ_n) over the partials below 0.45·sr, exactly.

    Each partial is a damped complex exponential z_n^t, and z_n^(cK + k) = z_n^(cK)·z_n^k: the whole
    sum is one complex matrix product (chunks × partials) @ (partials × K), with no per-sample
    transcendental function at all.
    """
    keep = (freqs < 0.45 * sr) & (amps > 1e-4)
    if not keep.any() or frames <= 0:
        return np.zeros(max(frames, 0))
    damping = np.zeros(int(keep.sum())) if decays is None else 1.0 / decays[keep]
    log_z = (-damping + 2j * math.pi * freqs[keep]) / sr  # per-frame log of each partial's phasor
    chunks = -(-frames // _CHUNK)
    within = np.exp(np.outer(log_z, np.arange(_CHUNK)))  # (partials, K)
    starts = np.exp(np.outer(np.arange(chunks) * _CHUNK, log_z) + 2j * math.pi * phases[keep][None, :])
    starts *= amps[keep][None, :]
    # Im(S @ W) as one real product [Re S, Im S] @ [Im W; Re W]; einsum's own loop, not a threaded BLAS
    # whose spinning threads cost more than they save on products this small
    real = np.einsum("ij,jk->ik", np.hstack([starts.real, starts.imag]).astype(np.float32),
                     np.vstack([within.imag, within.real]).astype(np.float32))
    return real.ravel()[:frames]


def _harmonic_wavetable(amps: np.ndarray, phases: np.ndarray, size: int = 4096) -> np.ndarray:
    """One period of Σ a_n sin(2π n x + 2π φ_n): a waveform to read at any (vibrato-warped) phase."""
    x = np.arange(size) / size
    n = np.arange(1, amps.size + 1)[:, None]
    return amps @ np.sin(2 * math.pi * (n * x[None, :] + phases[:, None]))


def _fade(frames: int, sr: int, attack_s: float, release_s: float, hold_frames: int) -> np.ndarray:
    """Raised-cosine attack, hold until `hold_frames`, raised-cosine release to zero."""
    envelope = np.ones(frames)
    attack = min(frames, max(1, int(attack_s * sr)))
    envelope[:attack] = 0.5 * (1 - np.cos(math.pi * np.arange(attack) / attack))
    release = max(1, int(release_s * sr))
    if hold_frames < frames:
        fall = 0.5 * (1 + np.cos(math.pi * np.minimum(np.arange(frames - hold_frames) / release, 1.0)))
        envelope[hold_frames:] *= fall
    return envelope


def _piano(f0: float, duration: float, velocity: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    midi = 69 + 12 * math.log2(f0 / 440.0)
    b = 1e-4 * 2 ** ((midi - 60) / 24)  # stiffness grows towards the treble
    tau0 = float(np.clip(4.0 * (261.6 / f0) ** 0.6, 0.6, 8.0))
    frames = int(min(duration + 0.25, 6.9 * tau0) * sr)
    n = np.arange(1, 25)
    freqs = n * f0 * np.sqrt(1 + b * n ** 2)
    hammer_position = 1 / float(rng.uniform(7.0, 9.0))
    amps = n ** -0.9 * np.exp(-(n - 1) * (0.35 - 0.25 * velocity)) * (np.abs(np.sin(math.pi * n * hammer_position)) + 0.1)
    decays = tau0 / (1 + 0.1 * n ** 1.5)
    phases = rng.uniform(0, 1, n.size)
    tone = _partials(freqs, amps, decays, frames, sr, phases)
    unison = 2 ** (float(rng.uniform(0.5, 1.5)) / 1200)  # a second string a cent off: the slow beating
    tone += 0.6 * _partials(freqs[:3] * unison, amps[:3], decays[:3] * 1.3, frames, sr, rng.uniform(0, 1, 3))
    thump = rng.standard_normal(int(0.006 * sr)) * np.exp(-np.arange(int(0.006 * sr)) / (0.0015 * sr))
    tone[: thump.size] += 0.03 * velocity * np.convolve(thump, np.ones(8) / 8, "same")
    hold = int(duration * sr)
    return tone * _fade(frames, sr, 0.002, 0.12, hold) * velocity


_BODY_RESONANCES = ((280.0, 60.0, 1.0), (460.0, 90.0, 0.8), (1100.0, 300.0, 0.5), (2600.0, 600.0, 0.6),
                    (4200.0, 900.0, 0.3))


def _bowed(f0: float, duration: float, velocity: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    release = float(rng.uniform(0.15, 0.3))
    frames = int((duration + release) * sr)
    n = np.arange(1, 31)
    freqs = n * f0
    body = 0.25 + sum(g / (1 + ((freqs - fc) / bw) ** 2) for fc, bw, g in _BODY_RESONANCES)
    amps = body / n * np.exp(-(n - 1) * (0.12 - 0.06 * velocity))
    t = np.arange(frames) / sr
    rate, depth = float(rng.uniform(5.0, 6.5)), float(rng.uniform(0.003, 0.006))
    # the vibrato's time warp t + ∫ depth·sin(2π·rate·t) dt, smooth enough to compute every 32 frames
    coarse = t[::32]
    onset = np.clip((coarse - 0.25) / 0.3, 0.0, 1.0)  # vibrato comes in after the note settles
    warp = coarse + np.concatenate([[0.0], np.cumsum(depth * onset * np.sin(2 * math.pi * rate * coarse))[:-1]]) * 32 / sr
    cycles = f0 * np.interp(t, coarse, warp)
    amps = np.where(freqs * (1 + depth) < 0.45 * sr, amps, 0.0)  # no partial may alias, even at the vibrato's top
    table = _harmonic_wavetable(amps, rng.uniform(0, 1, n.size))
    tone = np.interp(np.mod(cycles, 1.0) * table.size, np.arange(table.size), table, period=table.size)
    bow_noise = np.diff(rng.standard_normal(frames + 1)) * 0.015
    envelope = _fade(frames, sr, float(rng.uniform(0.08, 0.2)), release, int(duration * sr))
    swell = 1 + 0.1 * np.interp(t, coarse, np.sin(math.pi * np.clip(coarse / max(duration, 1e-3), 0, 1)))
    return (tone + bow_noise) * envelope * swell * velocity * 0.7


def _plucked(f0: float, duration: float, velocity: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    tau0 = float(np.clip(2.5 * (261.6 / f0) ** 0.5, 0.4, 5.0))
    frames = int(min(duration + 0.1, 6.9 * tau0) * sr)
    n = np.arange(1, 21)
    freqs = n * f0 * np.sqrt(1 + 2e-5 * n ** 2)
    pluck = float(rng.uniform(0.12, 0.3))
    amps = np.abs(np.sin(math.pi * n * pluck)) / n ** (1.4 - 0.4 * velocity)
    decays = tau0 / (1 + 0.03 * n ** 2)
    tone = _partials(freqs, amps, decays, frames, sr, rng.uniform(0, 1, n.size))
    return tone * _fade(frames, sr, 0.001, 0.08, int(duration * sr)) * velocity * 1.2


def _mallet(f0: float, duration: float, velocity: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    tau = float(np.clip(0.9 * (440.0 / f0) ** 0.5, 0.25, 2.5))
    frames = int(min(max(duration, 0.3) + 0.3, 6.9 * tau) * sr)
    freqs = f0 * np.array([1.0, 3.93, 9.27, 16.0])
    amps = np.array([1.0, 0.35 * velocity + 0.1, 0.12 * velocity, 0.05 * velocity])
    decays = tau * np.array([1.0, 0.25, 0.1, 0.05])
    tone = _partials(freqs, amps, decays, frames, sr, rng.uniform(0, 1, 4))
    knock = rng.standard_normal(int(0.003 * sr)) * np.exp(-np.arange(int(0.003 * sr)) / (0.0007 * sr))
    tone[: knock.size] += 0.05 * velocity * knock
    return tone * _fade(frames, sr, 0.0005, 0.05, frames) * velocity


_INSTRUMENTS = {"piano": _piano, "bowed": _bowed, "plucked": _plucked, "mallet": _mallet}


class _DrumKit:
    """One kit per piece: a few variants of each drum made once (noise shaped by its spectrum), so hits
    differ a little, as real strokes do, without synthesising every stroke anew."""

    VARIANTS = {"kick": 3, "snare": 4, "hat": 6, "open-hat": 2}

    def __init__(self, sr: int, rng: np.random.Generator):
        self.sr, self.rng = sr, rng
        self.kick_low = float(rng.uniform(42, 55))
        self.snare_tone = float(rng.uniform(170, 220))
        self.hat_cutoff = float(rng.uniform(6500, 9000))
        self.sounds = {kind: [self._make(kind) for _ in range(count)] for kind, count in self.VARIANTS.items()}

    def _shaped_noise(self, frames: int, kind: str, frequency: float) -> np.ndarray:
        """White noise through a 2nd-order high-pass or band-pass magnitude response (zero phase: for
        noise only the magnitude is heard)."""
        spectrum = np.fft.rfft(self.rng.standard_normal(frames))
        ratio = np.maximum(np.fft.rfftfreq(frames, 1 / self.sr), 1e-3) / frequency
        if kind == "highpass":
            gain = ratio ** 2 / np.sqrt(1 + ratio ** 4)
        else:  # band-pass, Q ≈ 0.8
            gain = 1 / np.sqrt(1 + (0.8 * (ratio - 1 / ratio)) ** 2)
        return np.fft.irfft(spectrum * gain, frames)

    def hit(self, kind: str, velocity: float) -> np.ndarray:
        variants = self.sounds[kind]
        return velocity * variants[int(self.rng.integers(len(variants)))]

    def _make(self, kind: str) -> np.ndarray:
        sr, rng = self.sr, self.rng
        if kind == "kick":
            frames = int(0.5 * sr)
            t = np.arange(frames) / sr
            freq = self.kick_low * float(rng.uniform(0.97, 1.03)) + 90 * np.exp(-t / 0.04)
            body = np.sin(2 * math.pi * np.cumsum(freq) / sr) * np.exp(-t / 0.25)
            body[: int(0.002 * sr)] += 0.3 * rng.standard_normal(int(0.002 * sr))
            return 0.9 * body
        if kind == "snare":
            frames = int(0.4 * sr)
            t = np.arange(frames) / sr
            tone = np.sin(2 * math.pi * self.snare_tone * t) + 0.5 * np.sin(2 * math.pi * 1.78 * self.snare_tone * t)
            rattle = self._shaped_noise(frames, "bandpass", 3500.0 * float(rng.uniform(0.9, 1.1)))
            return 0.4 * tone * np.exp(-t / 0.06) + 1.2 * rattle * np.exp(-t / 0.12)
        frames = int((0.45 if kind == "open-hat" else 0.12) * sr)
        t = np.arange(frames) / sr
        decay = 0.25 if kind == "open-hat" else 0.03
        noise = self._shaped_noise(frames, "highpass", self.hat_cutoff * float(rng.uniform(0.95, 1.05)))
        return 0.5 * noise * np.exp(-t / decay)


# --- room and mastering --------------------------------------------------------------------------------------

def _room_impulse(rng: np.random.Generator, sr: int, rt60: float) -> np.ndarray:
    """A room's impulse response (no direct sound): sparse early reflections, then a late tail whose
    decay time falls with frequency (1.25x rt60 in the bass, half of it at 8 kHz); unit energy."""
    length = int(min(1.3 * rt60 * 1.25, 3.0) * sr)
    t = np.arange(length) / sr
    spectrum = np.fft.rfft(rng.standard_normal(length))
    f = np.fft.rfftfreq(length, 1 / sr)
    centres = np.array([125.0, 250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0])
    band_rt = rt60 * np.interp(np.log2(centres), np.log2([125.0, 1000.0, 8000.0]), [1.25, 1.0, 0.5])
    log_f = np.log2(np.maximum(f, 1.0))
    tail = np.zeros(length)
    for i, centre in enumerate(centres):  # complementary raised-cosine bands in log frequency
        distance = np.abs(log_f - math.log2(centre))
        weight = np.where(distance < 1.0, 0.5 * (1 + np.cos(math.pi * distance)), 0.0)
        if i == 0:
            weight = np.where(log_f < math.log2(centre), 1.0, weight)
        if i == len(centres) - 1:
            weight = np.where(log_f > math.log2(centre), 1.0, weight)
        tail += np.fft.irfft(spectrum * weight, length) * np.exp(-6.91 * t / band_rt[i])
    onset = np.clip(t / 0.03, 0.0, 1.0)  # the late field builds up over the first 30 ms
    tail *= onset
    reflection = math.sqrt(0.03 * float(np.sum(np.square(tail))))  # each about 3 % of the tail's energy
    for _ in range(8):  # early reflections off nearby surfaces
        at = int(rng.uniform(0.004, 0.05) * sr)
        tail[at] += float(rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)) * math.exp(-6.91 * at / sr / rt60) * reflection
    return tail / math.sqrt(float(np.sum(np.square(tail))))


def _limit(x: np.ndarray, sr: int, ceiling: float) -> tuple[np.ndarray, bool]:
    """A smooth peak limiter: gain = min(1, ceiling/peak) eased over 2 ms; never raises a peak.
    Returns the limited signal and whether the limiter had anything to do."""
    from scipy.ndimage import maximum_filter1d, minimum_filter1d, uniform_filter1d

    if float(np.max(np.abs(x))) <= ceiling:
        return x, False
    width = max(3, int(0.002 * sr) | 1)
    peak = maximum_filter1d(np.max(np.abs(x), axis=0), width)
    gain = np.minimum(1.0, ceiling / np.maximum(peak, 1e-12))
    gain = uniform_filter1d(minimum_filter1d(gain, width), width)  # each eased gain <= the gain it covers
    return x * gain[None, :], True


def loudness_lufs(samples: np.ndarray, sr: int) -> float:
    """Integrated loudness (ITU-R BS.1770, gated) of (channels, frames) float samples."""
    import torch
    import torchaudio.functional as AF

    return float(AF.loudness(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), sr))


def _master(x: np.ndarray, sr: int, target_lufs: float) -> tuple[np.ndarray, float]:
    """Loudness to about `target_lufs` with peaks limited at the ceiling; returns the loudness.

    Integrated loudness scales exactly with gain, so one measurement sets the gain, and while the
    limiter leaves the piece alone the result is the target itself. When it does engage it costs a
    little loudness: that is measured, and a further pass runs only if the piece fell outside
    `LOUDNESS_RANGE_LUFS`.
    """
    ceiling = 10 ** (PEAK_CEILING_DBFS / 20)
    loudness = loudness_lufs(x, sr)
    assert math.isfinite(loudness), "a piece without sound"
    for _ in range(3):
        x, limited = _limit(x * 10 ** ((target_lufs - loudness) / 20), sr, ceiling)
        loudness = loudness_lufs(x, sr) if limited else target_lufs
        if LOUDNESS_RANGE_LUFS[0] <= loudness <= LOUDNESS_RANGE_LUFS[1]:
            break
    return x, loudness


# --- pieces --------------------------------------------------------------------------------------------------

@dataclass
class MusicPiece:
    """One rendered piece and what it is made of."""

    file: str  # name inside its folder
    seconds: float
    frames: int
    seed: list[int]  # the SeedSequence entropy it was played from
    key: str
    tempo_bpm: float
    beats_per_bar: int
    timbres: dict[str, str]
    notes: int
    max_polyphony: int
    pauses: list[list[float]]
    rt60_s: float
    loudness_lufs: float
    peak_dbfs: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def render_piece(seed: list[int], seconds: float, sample_rate: int = MUSIC_SAMPLE_RATE, channels: int = 1,
                 lead_timbre: str | None = None) -> tuple[np.ndarray, MusicPiece]:
    """Compose and play one piece: float32 (channels, frames) in [-1, 1] and its description."""
    if channels not in (1, 2):
        raise WorkbenchError(f"synthetic music is mono or stereo, not {channels} channels")
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    lead = lead_timbre or MELODIC_TIMBRES[int(rng.integers(len(MELODIC_TIMBRES)))]
    score = compose(rng, seconds, lead)
    sr = sample_rate
    frames = int(round(seconds * sr))
    pans = {"lead": float(rng.uniform(-0.3, 0.3)), "harmony": float(rng.uniform(-0.6, 0.6)),
            "bass": float(rng.uniform(-0.15, 0.15)), "drums": float(rng.uniform(-0.2, 0.2))}
    detune = {voice: float(rng.uniform(-3, 3)) / 100 for voice in pans}  # each player a few cents off
    voices = {voice: np.zeros(frames) for voice in pans}
    for note in score.notes:
        instrument = _INSTRUMENTS[score.timbres[note.voice]]
        tone = instrument(_hz(note.midi + detune[note.voice]), note.duration, note.velocity, sr, rng)
        _add(voices[note.voice], tone, int(note.start * sr))
    kit = _DrumKit(sr, rng)
    for hit in score.hits:
        _add(voices["drums"], kit.hit(hit.kind, hit.velocity), int(hit.start * sr))

    dry = np.zeros((channels, frames))
    for voice, signal in voices.items():
        if channels == 1:
            dry[0] += signal
        else:  # constant-power pan
            angle = (pans[voice] + 1) * math.pi / 4
            dry[0] += math.cos(angle) * signal
            dry[1] += math.sin(angle) * signal
    rt60 = float(rng.uniform(0.5, 2.2))
    wet_db = float(rng.uniform(-12.0, -4.0))  # reverberant level relative to the direct sound
    from scipy.signal import fftconvolve

    impulses = np.stack([_room_impulse(rng, sr, rt60) for _ in range(channels)])
    predelay = int(rng.uniform(0.01, 0.03) * sr)
    impulses = np.pad(impulses, ((0, 0), (predelay, 0)))
    # scipy's FFT convolution: it picks fast FFT lengths, ~3x quicker here than torchaudio's fftconvolve
    wet = fftconvolve(dry.astype(np.float32), impulses.astype(np.float32), axes=1)[:, :frames]
    mixed = dry + 10 ** (wet_db / 20) * wet  # the IR has unit energy: wet power ≈ dry power
    mixed *= _fade(frames, sr, 0.005, 1.0, frames - int(1.0 * sr))[None, :]
    target = float(rng.uniform(*LOUDNESS_RANGE_LUFS))
    mastered, loudness = _master(mixed, sr, target)
    peak = float(np.max(np.abs(mastered)))
    piece = MusicPiece(
        file="", seconds=frames / sr, frames=frames, seed=list(seed), key=score.key,
        tempo_bpm=round(score.tempo_bpm, 2), beats_per_bar=score.beats_per_bar, timbres=score.timbres,
        notes=len(score.notes) + len(score.hits), max_polyphony=score.max_polyphony(),
        pauses=[[round(a, 3), round(b, 3)] for a, b in score.pauses], rt60_s=round(rt60, 3),
        loudness_lufs=round(loudness, 2), peak_dbfs=round(20 * math.log10(peak), 2) if peak > 0 else -200.0)
    return mastered.astype(np.float32), piece


def _add(track: np.ndarray, sound: np.ndarray, at: int) -> None:
    if at >= track.size:
        return
    stop = min(track.size, at + sound.size)
    track[at:stop] += sound[: stop - at]


# --- a folder of pieces ----------------------------------------------------------------------------------------

@dataclass
class MusicRender:
    folder: Path
    manifest: Path
    pieces: list[MusicPiece]
    reused: bool

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.pieces)

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "manifest": str(self.manifest), "reused": self.reused,
                "seconds": round(self.seconds, 3), "pieces": [p.to_dict() for p in self.pieces]}


def plan_pieces(minutes: float, piece_seconds: float = PIECE_SECONDS) -> list[float]:
    """Split `minutes` into pieces of about `piece_seconds` (equal lengths, none under MIN_PIECE_SECONDS)."""
    total = minutes * 60.0
    if not total >= MIN_PIECE_SECONDS:
        raise WorkbenchError(f"{minutes:g} minutes of music is too short: at least {MIN_PIECE_SECONDS:g} s")
    if not piece_seconds >= MIN_PIECE_SECONDS:
        raise WorkbenchError(f"pieces of {piece_seconds:g} s are too short: at least {MIN_PIECE_SECONDS:g} s")
    count = max(1, round(total / piece_seconds))
    return [total / count] * count


def render_music(folder: Path, minutes: float, seed: int = 0, sample_rate: int = MUSIC_SAMPLE_RATE,
                 channels: int = 1, piece_seconds: float = PIECE_SECONDS, subtype: str = "PCM_24",
                 progress: Progress = no_progress) -> MusicRender:
    """Render `minutes` of music as pieces `piece-000.wav`, ... in `folder`, with `music.json` beside them.

    A folder already holding exactly this request is reused; an interrupted render resumes (pieces
    are written atomically and recorded in the manifest one by one); a folder holding anything else
    under these names is refused rather than overwritten.
    """
    from workbench.audio.io import atomic_write_json, write_audio

    folder = Path(folder)
    lengths = plan_pieces(minutes, piece_seconds)
    request = {"generator": GENERATOR, "seed": int(seed), "minutes": float(minutes), "sample_rate": int(sample_rate),
               "channels": int(channels), "piece_seconds": float(piece_seconds), "subtype": subtype,
               "loudness_range_lufs": list(LOUDNESS_RANGE_LUFS), "peak_ceiling_dbfs": PEAK_CEILING_DBFS}
    manifest_path = folder / MANIFEST
    done: dict[str, MusicPiece] = {}
    existing: dict = {}
    if manifest_path.exists():
        existing = read_json_object(manifest_path, "music manifest")
        if existing.get("request") != request:
            raise WorkbenchError(f"{folder}: already holds synthetic music of another request "
                                 f"(seed {existing.get('request', {}).get('seed')}); use an empty folder")
        done = {p["file"]: MusicPiece(**p) for p in existing.get("pieces", []) if (folder / p["file"]).is_file()}
    names = [f"piece-{i:03d}.wav" for i in range(len(lengths))]
    for name in names:  # without our manifest a file under these names is someone else's: refuse
        if not existing and (folder / name).exists():
            raise WorkbenchError(f"{folder / name}: exists and is not part of this render; use an empty folder")
    if len(done) == len(names) and existing.get("complete"):
        return MusicRender(folder, manifest_path, [done[n] for n in names], reused=True)

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest_path, {"request": request, "complete": False, "pieces": [p.to_dict() for p in done.values()]})
    pieces: list[MusicPiece] = []
    total = sum(lengths)
    rendered = 0.0
    stage = f"music {folder.name}"
    progress(stage, 0.0, total)
    for index, (name, seconds) in enumerate(zip(names, lengths)):
        if name in done:
            pieces.append(done[name])
        else:
            lead = MELODIC_TIMBRES[(index + seed) % len(MELODIC_TIMBRES)]  # every timbre leads in turn
            audio, piece = render_piece([int(seed), index], seconds, sample_rate, channels, lead)
            piece.file = name
            write_audio(folder / name, audio, sample_rate, subtype=subtype)
            pieces.append(piece)
            atomic_write_json(manifest_path, {"request": request, "complete": False,
                                              "pieces": [p.to_dict() for p in pieces]})
        rendered += seconds
        progress(stage, rendered, total)
    atomic_write_json(manifest_path, {"request": request, "complete": True, "pieces": [p.to_dict() for p in pieces]})
    return MusicRender(folder, manifest_path, pieces, reused=False)

