"""The archive's device registry: one TOML file per replay machine in `registry/devices/<id>.toml`.

A device is a physical replay machine (one deck of a double cassette deck counts as its own device:
its heads and electronics differ). Every noise snippet, study and model is keyed by its id.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.errors import WorkbenchError

if TYPE_CHECKING:  # annotations only: workspace.py imports this module (init_workspace writes devices)
    from workbench.workspace import Workspace

KNOWN_FORMATS = ('1/4" reel', '1/2" reel', '1" reel', '2" reel', "cassette", "microcassette")
DEVICE_ID = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
# "NAB 3180+50 µs", "IEC 70 µs", "IEC Type I 3180+120 µs": an optional low-frequency time constant
# (the 3180 µs bass shelf) and the high-frequency one that sets the hiss curve.
EQ_PATTERN = re.compile(r"^(?P<standard>.*?)\s*(?:(?P<low>\d+(?:\.\d+)?)\s*\+\s*)?(?P<high>\d+(?:\.\d+)?)\s*(?:µs|us)$")


@dataclass(frozen=True)
class PlaybackEq:
    """A playback equalisation curve given by its time constants in microseconds."""

    standard: str
    low_us: float | None
    high_us: float


def parse_playback_eq(text: str) -> PlaybackEq:
    match = EQ_PATTERN.match(text.strip())
    if not match:
        raise ValueError(f"playback EQ {text!r} is not of the form 'NAB 3180+50 µs' or 'IEC 70 µs'")
    low = match["low"]
    return PlaybackEq(match["standard"].strip(), float(low) if low else None, float(match["high"]))


def playback_eq_by_speed(items: list[str]) -> dict[str, str]:
    """`["7.5=NAB 3180+50 µs", ...]` (SPEED=CURVE, as `devices add --eq` takes them) -> {format_speed: curve}."""
    playback_eq = {}
    for item in items:
        key, _, curve = item.partition("=")
        try:
            playback_eq[format_speed(float(key))] = curve.strip()
        except ValueError:
            raise WorkbenchError(f"--eq {item!r} is not SPEED=CURVE, e.g. '7.5=NAB 3180+50 µs'") from None
    return playback_eq


def format_speed(speed_ips: float) -> str:
    """7.5 -> '7.5', 15.0 -> '15', 1.875 -> '1.875': the spelling used in keys, names and tables."""
    return f"{speed_ips:g}"


@dataclass
class Device:
    id: str
    make: str
    model: str
    format: str
    speeds_ips: list[float]
    channels: int = 2
    tracks: str = ""
    playback_eq: dict[str, str] = field(default_factory=dict)  # format_speed(speed) -> curve
    notes: str = ""
    # Optional overrides for the tape-noise simulator (mains_hz, hiss_dbfs, ...); see workbench.synth.
    simulation: dict = field(default_factory=dict)

    def eq_at(self, speed_ips: float) -> PlaybackEq | None:
        text = self.playback_eq.get(format_speed(speed_ips))
        return parse_playback_eq(text) if text else None

    def check_speed(self, speed_ips: float) -> float:
        """`speed_ips` if this device plays at it, else a WorkbenchError listing the speeds it has."""
        for speed in self.speeds_ips:
            if abs(speed - speed_ips) < 1e-6:
                return speed
        have = ", ".join(format_speed(s) for s in self.speeds_ips)
        raise WorkbenchError(f"device {self.id} has no speed {format_speed(speed_ips)} ips (it has: {have})")


def validate_device(device: Device, source: str = "device") -> None:
    """Raise a one-line WorkbenchError for the first thing wrong with `device`."""
    if not DEVICE_ID.match(device.id):
        raise WorkbenchError(f"{source}: id {device.id!r} is not a slug (lowercase letters, digits, single hyphens)")
    if device.format not in KNOWN_FORMATS:
        raise WorkbenchError(f"{source}: format {device.format!r} is not one of {', '.join(KNOWN_FORMATS)}")
    if not device.speeds_ips:
        raise WorkbenchError(f"{source}: no speeds given")
    for speed in device.speeds_ips:
        if not isinstance(speed, (int, float)) or isinstance(speed, bool) or not speed > 0:
            raise WorkbenchError(f"{source}: speed {speed!r} is not a positive number of ips")
    if not isinstance(device.channels, int) or device.channels < 1:
        raise WorkbenchError(f"{source}: channels {device.channels!r} is not a positive whole number")
    speeds = {format_speed(s) for s in device.speeds_ips}
    for key, curve in device.playback_eq.items():
        if key not in speeds:
            raise WorkbenchError(f"{source}: playback_eq names speed {key} which the device does not have")
        try:
            parse_playback_eq(curve)
        except ValueError as error:
            raise WorkbenchError(f"{source}: {error}") from None


def device_path(workspace: Workspace, device_id: str) -> Path:
    return workspace.devices_dir / f"{device_id}.toml"


def read_device(path: Path) -> Device:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise WorkbenchError(f"{path}: not a readable device file ({error})") from None
    known = {"id", "make", "model", "format", "speeds_ips", "channels", "tracks", "playback_eq", "notes", "simulation"}
    unknown = set(data) - known
    if unknown:
        raise WorkbenchError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    missing = {"id", "make", "model", "format", "speeds_ips"} - set(data)
    if missing:
        raise WorkbenchError(f"{path}: missing {', '.join(sorted(missing))}")
    device = Device(**data)
    device.speeds_ips = [float(s) if isinstance(s, int) and not isinstance(s, bool) else s for s in device.speeds_ips]
    validate_device(device, str(path))
    if path.stem != device.id:
        raise WorkbenchError(f"{path}: file name does not match its id {device.id!r}")
    return device


def load_devices(workspace: Workspace) -> dict[str, Device]:
    return {p.stem: read_device(p) for p in sorted(workspace.devices_dir.glob("*.toml"))}


def get_device(workspace: Workspace, device_id: str) -> Device:
    path = device_path(workspace, device_id)
    if not path.exists():
        known = ", ".join(sorted(load_devices(workspace))) or "none yet"
        raise WorkbenchError(f"unknown device {device_id!r} (registered: {known}); add it with `workbench devices add`")
    return read_device(path)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to a device file")


def device_to_toml(device: Device) -> str:
    lines = [f"{key} = {_toml_value(getattr(device, key))}" for key in
             ("id", "make", "model", "format", "tracks", "channels", "speeds_ips", "notes")]
    for table in ("playback_eq", "simulation"):
        entries = getattr(device, table)
        if entries:
            lines += ["", f"[{table}]"] + [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in entries.items()]
    return "\n".join(lines) + "\n"


def write_device(workspace: Workspace, device: Device, replace: bool = False) -> Path:
    """Validate and write `device`; refuses to overwrite an existing entry unless `replace`."""
    from workbench.audio.io import atomic_write_text  # audio.io loads numpy and soundfile; `--help` must not

    validate_device(device)
    path = device_path(workspace, device.id)
    if path.exists() and not replace:
        raise WorkbenchError(f"{path}: device {device.id} already exists")
    atomic_write_text(path, device_to_toml(device))
    return path


def research_devices() -> list[Device]:
    """The machines of the research data set, as the repository's own registry holds them."""
    bundled = Path(__file__).resolve().parent.parent / "registry" / "devices"
    return [read_device(p) for p in sorted(bundled.glob("*.toml"))]
