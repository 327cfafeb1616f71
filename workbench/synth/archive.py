"""A small synthetic sound archive for the demo (and for any test that wants a whole archive).

`build_archive(OUT_DIR, devices)` writes:

    OUT_DIR/archive.json                          what is where: devices, speeds, files, seeds
    OUT_DIR/blank-tape/<device>_<speed>ips.wav    blank tape played on each machine, with defects to screen
    OUT_DIR/blank-tape/<device>_<speed>ips.synth.json   the truth about it (signature, injected events)
    OUT_DIR/corpus/{train,validation,test}/piece-NNN.wav (+ music.json)   clean synthetic music
    OUT_DIR/transfers/<device>_<speed>ips_transfer-N.wav   music + that machine's noise, 48 kHz 24-bit stereo
    OUT_DIR/transfers/reference/<same name>                the clean music of each transfer (same format)
    OUT_DIR/transfers/<name>.synth.json                    how each transfer was made

Sized (`--scale demo`) so the whole demo (ingest, pretrain a tiny model, fine-tune with a small study,
evaluate, denoise) runs in minutes on two cores; `--scale small` is a few seconds of each, for tests.

Idempotent: asking again with the same seed and scale over a complete archive reuses it; an interrupted
build resumes (archive.json marks the folder as this request's from the start; every file is written
atomically with its own sidecar, checked before reuse); a folder holding an archive of another request,
or archive parts without a manifest, is refused rather than overwritten.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from workbench.audio.io import read_json_object
from workbench.devices import Device, format_speed
from workbench.errors import WorkbenchError
from workbench.progress import Progress, no_progress
from workbench.synth.music import MELODIC_TIMBRES, MUSIC_SAMPLE_RATE, render_music, render_piece
from workbench.synth.tape_noise import TapeNoiseRenderer, device_signature, render_blank_tape, sidecar_path

GENERATOR = "workbench.synth.archive/1"
MANIFEST = "archive.json"
# (device, speed) pairs with blank tape in the archive: a portable at both its slow speeds, a studio
# machine at both of its, and a cassette deck (60 Hz mains in its registry entry).
BLANK_TAPES = (("uher-4000-l", 3.75), ("uher-4000-l", 1.875), ("revox-a77", 7.5), ("revox-a77", 3.75),
               ("technics-tr575-a", 1.875))
TRANSFERS = (("technics-tr575-a", 1.875), ("revox-a77", 3.75))  # stereo machines; the first `transfers` used
TRANSFER_SAMPLE_RATE = 48_000  # unlike the model's 44.1 kHz: the denoiser must resample and come back
TRANSFER_SUBTYPE = "PCM_24"
TRANSFER_SNR_DB = 18.0  # music RMS over noise RMS in each transfer: clearly noisy, inside the training range
TRANSFER_PEAK = 0.98


@dataclass(frozen=True)
class ArchiveScale:
    noise_seconds: float  # per device and speed
    train_minutes: float
    validation_minutes: float
    test_minutes: float
    piece_seconds: float
    transfer_seconds: float
    transfers: int


SCALES = {
    "small": ArchiveScale(noise_seconds=20.0, train_minutes=20 / 60, validation_minutes=10 / 60, test_minutes=10 / 60,
                          piece_seconds=10.0, transfer_seconds=6.0, transfers=1),
    "demo": ArchiveScale(noise_seconds=120.0, train_minutes=4.0, validation_minutes=1.0, test_minutes=2.0,
                         piece_seconds=30.0, transfer_seconds=25.0, transfers=2),
}
SPLITS = ("train", "validation", "test")


@dataclass
class ArchiveResult:
    folder: Path
    manifest: dict
    reused: bool  # the whole archive was already there
    rendered: list[str] = field(default_factory=list)  # what this call wrote (relative paths)

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "manifest_path": str(self.manifest_path), "reused": self.reused,
                "rendered": self.rendered, **self.manifest}


def derived_seed(seed: int, name: str) -> int:
    """A seed for one part of the archive, stable and distinct per part."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "big") >> 1


def _blank_tape_name(device_id: str, speed: float) -> str:
    return f"{device_id}_{format_speed(speed)}ips"


def build_archive(folder: Path, devices: Mapping[str, Device], seed: int = 0, scale: str = "demo",
                  progress: Progress = no_progress) -> ArchiveResult:
    """Build (or reuse, or finish) the synthetic archive in `folder`; `devices` maps id -> registry entry."""
    if scale not in SCALES:
        raise WorkbenchError(f"unknown archive scale {scale!r} (use one of {', '.join(SCALES)})")
    size = SCALES[scale]
    folder = Path(folder)
    needed = sorted({d for d, _ in BLANK_TAPES} | {d for d, _ in TRANSFERS[: size.transfers]})
    missing = [d for d in needed if d not in devices]
    if missing:
        raise WorkbenchError(f"the synthetic archive needs devices {', '.join(missing)} in the registry "
                             "(a workspace made with `workbench init --research-devices` has them)")
    for device_id, speed in BLANK_TAPES:
        devices[device_id].check_speed(speed)
    request = {"generator": GENERATOR, "seed": int(seed), "scale": scale, "sizes": asdict(size),
               "signatures": {d: device_signature(devices[d]).to_dict() for d in needed}}
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        existing = read_json_object(manifest_path, "archive manifest")
        if existing.get("request") != request:
            old = existing.get("request", {})
            raise WorkbenchError(f"{folder}: holds a synthetic archive of another request (seed {old.get('seed')}, "
                                 f"scale {old.get('scale')}, or other device signatures); use another folder")
        if _all_present(folder, existing):
            return ArchiveResult(folder, existing, reused=True)
    else:
        for part in ("blank-tape", "corpus", "transfers"):
            if (folder / part).exists():
                raise WorkbenchError(f"{folder / part}: exists but {folder} has no {MANIFEST}; use another folder")
    from workbench.audio.io import atomic_write_json

    # mark the folder as this request's archive in progress: an interrupted build resumes here
    atomic_write_json(manifest_path, {"request": request, "complete": False})

    rendered: list[str] = []
    manifest: dict = {"request": request, "complete": False, "sample_rate": MUSIC_SAMPLE_RATE,
                      "blank_tapes": [], "corpus": {}, "transfers": []}

    for device_id, speed in BLANK_TAPES:
        relative = f"blank-tape/{_blank_tape_name(device_id, speed)}.wav"
        path = folder / relative
        wanted = {"device": device_id, "speed_ips": speed, "seed": int(seed), "seconds": size.noise_seconds,
                  "sample_rate": MUSIC_SAMPLE_RATE, "defects": True,
                  "signature": request["signatures"][device_id]}
        truth = _reusable(path, wanted)
        if truth is None:
            render = render_blank_tape(devices[device_id], speed, size.noise_seconds, path, seed=seed,
                                       sample_rate=MUSIC_SAMPLE_RATE, defects=True, progress=progress)
            truth = render.to_dict()
            rendered.append(relative)
        manifest["blank_tapes"].append({
            "device": device_id, "speed_ips": speed, "path": relative,
            "sidecar": str(Path(relative).with_name(sidecar_path(path).name)), "seconds": truth["seconds"],
            "channels": truth["channels"], "seed": int(seed), "playback_eq": truth["playback_eq"],
            "events": len(truth["events"])})

    for split in SPLITS:
        split_seed = derived_seed(seed, f"corpus/{split}")
        minutes = getattr(size, f"{split}_minutes")
        music = render_music(folder / "corpus" / split, minutes, seed=split_seed, piece_seconds=size.piece_seconds,
                             progress=progress)
        if not music.reused:
            rendered.append(f"corpus/{split}")
        manifest["corpus"][split] = {"folder": f"corpus/{split}", "manifest": f"corpus/{split}/music.json",
                                     "seed": split_seed, "seconds": round(music.seconds, 3),
                                     "pieces": [p.file for p in music.pieces]}

    for number, (device_id, speed) in enumerate(TRANSFERS[: size.transfers], start=1):
        name = f"{_blank_tape_name(device_id, speed)}_transfer-{number}.wav"
        entry, wrote = _transfer(folder, name, devices[device_id], speed, derived_seed(seed, f"transfer/{number}"),
                                 size.transfer_seconds, number, request["signatures"][device_id])
        manifest["transfers"].append(entry)
        if wrote:
            rendered.append(entry["path"])
        progress("transfers", number, size.transfers)

    manifest["complete"] = True
    atomic_write_json(manifest_path, manifest)
    return ArchiveResult(folder, manifest, reused=False, rendered=rendered)


def _transfer(folder: Path, name: str, device: Device, speed: float, seed: int, seconds: float, number: int,
              signature: dict) -> tuple[dict, bool]:
    """A 'digitised transfer': music played back on `device` (its noise at TRANSFER_SNR_DB), 48 kHz stereo."""
    from workbench.audio.dsp import resample
    from workbench.audio.io import atomic_write_json, write_audio

    relative, reference = f"transfers/{name}", f"transfers/reference/{name}"
    path, sidecar = folder / relative, sidecar_path(folder / relative)
    entry = {"device": device.id, "speed_ips": speed, "path": relative, "reference": reference,
             "sidecar": str(Path(relative).with_name(sidecar.name)), "seed": seed, "seconds": seconds,
             "sample_rate": TRANSFER_SAMPLE_RATE, "channels": 2, "subtype": TRANSFER_SUBTYPE,
             "snr_db": TRANSFER_SNR_DB, "signature": signature}
    if path.is_file() and (folder / reference).is_file() and sidecar.is_file():
        if read_json_object(sidecar, "transfer sidecar") == entry:
            return entry, False

    music, _ = render_piece([seed, 0], seconds, MUSIC_SAMPLE_RATE, channels=2,
                            lead_timbre=MELODIC_TIMBRES[number % len(MELODIC_TIMBRES)])
    noise = TapeNoiseRenderer(device, speed, music.shape[1] / MUSIC_SAMPLE_RATE, seed=seed,
                              sample_rate=MUSIC_SAMPLE_RATE, defects=False).render_array()
    if noise.shape[0] != 2:
        noise = np.repeat(noise[:1], 2, axis=0)  # a mono machine's output on both channels
    music_rms = float(np.sqrt(np.mean(np.square(music, dtype=np.float64))))
    noise_rms = float(np.sqrt(np.mean(np.square(noise, dtype=np.float64))))
    noise = noise * (music_rms / noise_rms * 10 ** (-TRANSFER_SNR_DB / 20))
    clean = resample(music, MUSIC_SAMPLE_RATE, TRANSFER_SAMPLE_RATE)
    noisy = resample(music + noise, MUSIC_SAMPLE_RATE, TRANSFER_SAMPLE_RATE)
    # resampling can overshoot a little: one gain for both keeps them comparable and unclipped
    gain = min(1.0, TRANSFER_PEAK / max(float(np.max(np.abs(noisy))), float(np.max(np.abs(clean)))))
    write_audio(folder / reference, clean * gain, TRANSFER_SAMPLE_RATE, subtype=TRANSFER_SUBTYPE)
    write_audio(path, noisy * gain, TRANSFER_SAMPLE_RATE, subtype=TRANSFER_SUBTYPE)
    atomic_write_json(sidecar, entry)
    return entry, True


def _reusable(path: Path, wanted: dict) -> dict | None:
    """The sidecar of an existing blank tape rendered exactly as `wanted`, else None (render it again:
    the folder is this request's archive, so whatever is there is an interrupted build's)."""
    sidecar = sidecar_path(path)
    if path.is_file() and sidecar.is_file():
        truth = read_json_object(sidecar, "blank-tape sidecar")
        if all(truth.get(key) == value for key, value in wanted.items()) and truth.get("frames"):
            return truth
    return None


def _all_present(folder: Path, manifest: dict) -> bool:
    paths = [e["path"] for e in manifest.get("blank_tapes", [])] + \
            [e[k] for e in manifest.get("transfers", []) for k in ("path", "reference")] + \
            [f"{c['folder']}/{p}" for c in manifest.get("corpus", {}).values() for p in c.get("pieces", [])]
    return bool(manifest.get("complete")) and all((folder / p).is_file() for p in paths)

