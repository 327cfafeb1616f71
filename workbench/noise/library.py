"""The noise library: content-addressed snippet files plus a SQLite manifest, and the profiles.

Layout under `workspace.noise_library`:
    snippets/<sha256[:2]>/<sha256>.wav    mono 44.1 kHz 32-bit float, named by the sha256 of its
                                          little-endian float32 samples
    library.sqlite                        the manifest: sources, snippets, exclusions
    profiles/<device>@<speed>ips.json/png the noise profile of each device and speed

The manifest is the truth: a snippet exists for the workbench only once a row names it. Ingests write
snippet files first (harmless: content-addressed, invisible until named) and then commit all rows in
one SQLite transaction, so a failure or a kill leaves the library as it was. Files no row names are
orphans and are removed by `collect_garbage` once old enough not to belong to an ingest in progress.

For training code: `NoiseLibrary(workspace).snippets(device, speed, split)` lists `Snippet`s,
`Snippet.load()` reads one, `digest(snippets)` names a selection for dataset lineage, `profile()` gives
the device's noise profile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from workbench.audio.dsp import MODEL_SAMPLE_RATE
from workbench.devices import format_speed
from workbench.errors import WorkbenchError
from workbench.noise.profile import NoiseProfile, ProfileAccumulator, plot_profile
from workbench.workspace import Workspace

SCHEMA_VERSION = 1
ALREADY = "already in the library"  # the status of a recording that is skipped because it was ingested before
ORPHAN_MIN_AGE_SECONDS = 3600.0  # younger unreferenced files may belong to an ingest in progress

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    speed_ips REAL NOT NULL,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    tape TEXT,
    notes TEXT NOT NULL DEFAULT '',
    sample_rate INTEGER NOT NULL,
    channels INTEGER NOT NULL,
    frames INTEGER NOT NULL,
    format TEXT NOT NULL,
    subtype TEXT NOT NULL,
    split_seed TEXT NOT NULL,
    snippet_seconds REAL NOT NULL,
    usable_seconds REAL NOT NULL,
    ingested_at TEXT NOT NULL,
    UNIQUE (sha256, device, speed_ips)
);
CREATE TABLE IF NOT EXISTS snippets (
    id INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL,
    file TEXT NOT NULL,
    device TEXT NOT NULL,
    speed_ips REAL NOT NULL,
    source_id INTEGER NOT NULL REFERENCES sources (id) ON DELETE CASCADE,
    channel INTEGER NOT NULL,
    split TEXT NOT NULL CHECK (split IN ('train', 'validation', 'test')),
    start_sample INTEGER NOT NULL,
    end_sample INTEGER NOT NULL,
    source_start_sample INTEGER NOT NULL,
    source_end_sample INTEGER NOT NULL,
    frames INTEGER NOT NULL,
    rms_dbfs REAL NOT NULL,
    UNIQUE (device, speed_ips, sha256)
);
CREATE INDEX IF NOT EXISTS snippets_by_device ON snippets (device, speed_ips, split);
CREATE TABLE IF NOT EXISTS exclusions (
    id INTEGER PRIMARY KEY,
    source_id INTEGER NOT NULL REFERENCES sources (id) ON DELETE CASCADE,
    channel INTEGER NOT NULL,
    start_s REAL NOT NULL,
    end_s REAL NOT NULL,
    reason TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Snippet:
    """One stored noise snippet: mono, 44.1 kHz float32, from one channel of one source recording."""

    sha256: str  # of the float32 little-endian samples; also the file name
    path: Path
    device: str
    speed_ips: float
    split: str  # train, validation or test
    channel: int  # 0-based channel of the source
    frames: int
    rms_dbfs: float
    source_sha256: str
    source_path: str
    start_sample: int  # in the source's 44.1 kHz stream
    end_sample: int
    source_start_sample: int  # in the source file at its own rate
    source_end_sample: int
    tape: str | None
    notes: str
    ingested_at: str
    sample_rate: int = MODEL_SAMPLE_RATE

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    def load(self) -> np.ndarray:
        """The snippet's samples, float32 (frames,)."""
        from workbench.audio.io import read_audio

        samples, rate = read_audio(self.path)
        assert rate == self.sample_rate and samples.shape == (1, self.frames), (self.path, rate, samples.shape)
        return samples[0]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


@dataclass(frozen=True)
class NewSource:
    """What an ingest commits for one recording (see workbench.noise.ingest)."""

    device: str
    speed_ips: float
    sha256: str
    path: str
    tape: str | None
    notes: str
    sample_rate: int
    channels: int
    frames: int
    format: str
    subtype: str
    split_seed: str
    snippet_seconds: float
    usable_seconds: float
    snippets: list[dict]  # sha256, file, channel, split, start/end samples, frames, rms_dbfs
    exclusions: list[dict]  # channel, start_s, end_s, reason


def snippet_sha256(samples: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(samples, dtype="<f4").tobytes()).hexdigest()


def profile_stem(device: str, speed_ips: float) -> str:
    return f"{device}@{format_speed(speed_ips)}ips"


class NoiseLibrary:
    """The noise library of a workspace. Reading never creates anything; writing creates what it needs."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.root = workspace.noise_library
        self.snippets_dir = self.root / "snippets"
        self.profiles_dir = self.root / "profiles"
        self.manifest = self.root / "library.sqlite"

    # --- connections ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection | None]:
        """A connection, or None when reading a library that does not exist yet."""
        if not write and not self.manifest.exists():
            yield None
            return
        self.root.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.manifest, timeout=60.0, isolation_level=None)
        try:
            connection.execute("PRAGMA foreign_keys = ON")
            if write:
                connection.executescript(SCHEMA)
                connection.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            yield connection
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # our bug, not the user's file
        except sqlite3.DatabaseError as error:  # not a database, corrupt, locked too long
            raise WorkbenchError(f"{self.manifest}: noise library manifest unusable ({error})") from None
        finally:
            connection.close()

    def snippet_file(self, sha256: str) -> Path:
        return self.snippets_dir / sha256[:2] / f"{sha256}.wav"

    def store_snippet(self, samples: np.ndarray) -> tuple[str, str, bool]:
        """Write a snippet file (if not there yet); returns (sha256, path relative to the library,
        whether this call created the file)."""
        from workbench.audio.io import write_audio

        sha256 = snippet_sha256(samples)
        path = self.snippet_file(sha256)
        if path.exists():
            return sha256, str(path.relative_to(self.root)), False
        write_audio(path, samples[np.newaxis, :], MODEL_SAMPLE_RATE, subtype="FLOAT", format="WAV")
        return sha256, str(path.relative_to(self.root)), True

    def discard_unreferenced(self, files: list[str]) -> None:
        """Remove these snippet files (relative paths) unless a manifest row names them: the clean-up
        of an ingest that failed before committing."""
        with self._connect() as db:
            named = set() if db is None else {row[0] for row in db.execute("SELECT file FROM snippets")}
        for file in files:
            if file not in named:
                (self.root / file).unlink(missing_ok=True)

    # --- writing ----------------------------------------------------------------------------------
    def ingested(self, sha256: str, device: str, speed_ips: float) -> dict | None:
        """The existing source row for this recording on this device and speed, if any."""
        with self._connect() as db:
            if db is None:
                return None
            row = db.execute("SELECT id, path, ingested_at FROM sources WHERE sha256=? AND device=? AND speed_ips=?",
                             (sha256, device, speed_ips)).fetchone()
        return None if row is None else {"id": row[0], "path": row[1], "ingested_at": row[2]}

    def commit(self, sources: list[NewSource], replace: bool, ingested_at: str) -> dict[str, dict]:
        """Add `sources` in ONE transaction. An already ingested source is replaced when `replace`,
        else skipped. Snippets whose content the library already holds for that device and speed are
        not added twice. Returns per source sha256: {"status", "added", "duplicates"}."""
        outcome: dict[str, dict] = {}
        with self._connect(write=True) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                for source in sources:
                    key = (source.sha256, source.device, source.speed_ips)
                    old = db.execute("SELECT id FROM sources WHERE sha256=? AND device=? AND speed_ips=?", key).fetchone()
                    if old is not None and not replace:
                        outcome[source.sha256] = {"status": ALREADY, "added": 0, "duplicates": 0}
                        continue
                    if old is not None:
                        db.execute("DELETE FROM sources WHERE id=?", (old[0],))
                    cursor = db.execute(
                        "INSERT INTO sources (device, speed_ips, sha256, path, tape, notes, sample_rate, channels, frames,"
                        " format, subtype, split_seed, snippet_seconds, usable_seconds, ingested_at)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                        (source.device, source.speed_ips, source.sha256, source.path, source.tape, source.notes,
                         source.sample_rate, source.channels, source.frames, source.format, source.subtype,
                         source.split_seed, source.snippet_seconds, source.usable_seconds, ingested_at))
                    source_id = cursor.lastrowid
                    added = 0
                    for s in source.snippets:
                        cursor = db.execute(
                            "INSERT OR IGNORE INTO snippets (sha256, file, device, speed_ips, source_id, channel, split,"
                            " start_sample, end_sample, source_start_sample, source_end_sample, frames, rms_dbfs)"
                            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            (s["sha256"], s["file"], source.device, source.speed_ips, source_id, s["channel"],
                             s["split"], s["start_sample"], s["end_sample"], s["source_start_sample"],
                             s["source_end_sample"], s["frames"], s["rms_dbfs"]))
                        added += cursor.rowcount
                    db.executemany("INSERT INTO exclusions (source_id, channel, start_s, end_s, reason) VALUES (?,?,?,?,?)",
                                   [(source_id, e["channel"], e["start_s"], e["end_s"], e["reason"])
                                    for e in source.exclusions])
                    outcome[source.sha256] = {"status": "replaced" if old is not None else "ingested",
                                              "added": added, "duplicates": len(source.snippets) - added}
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return outcome

    def collect_garbage(self, min_age_seconds: float = ORPHAN_MIN_AGE_SECONDS) -> int:
        """Delete snippet files (and leftover temporaries) no manifest row names, older than
        `min_age_seconds`. Returns how many were removed."""
        if not self.snippets_dir.exists():
            return 0
        with self._connect() as db:
            named = set() if db is None else {row[0] for row in db.execute("SELECT file FROM snippets")}
        cutoff = time.time() - min_age_seconds
        removed = 0
        for path in self.snippets_dir.glob("*/*"):
            relative = str(path.relative_to(self.root))
            if relative not in named and path.is_file() and path.stat().st_mtime <= cutoff:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # --- reading ----------------------------------------------------------------------------------
    def snippets(self, device: str | None = None, speed: float | None = None, split: str | None = None) -> list[Snippet]:
        """Snippets matching the filters, in a stable order (device, speed, source, channel, time)."""
        query = ("SELECT s.sha256, s.file, s.device, s.speed_ips, s.split, s.channel, s.frames, s.rms_dbfs,"
                 " src.sha256, src.path, s.start_sample, s.end_sample, s.source_start_sample, s.source_end_sample,"
                 " src.tape, src.notes, src.ingested_at FROM snippets s JOIN sources src ON src.id = s.source_id")
        clauses, values = [], []
        for column, value in (("s.device", device), ("s.speed_ips", speed), ("s.split", split)):
            if value is not None:
                clauses.append(f"{column} = ?")
                values.append(value)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY s.device, s.speed_ips, src.sha256, s.channel, s.start_sample"
        with self._connect() as db:
            rows = [] if db is None else db.execute(query, values).fetchall()
        return [Snippet(r[0], self.root / r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11],
                        r[12], r[13], r[14], r[15], r[16]) for r in rows]

    def source_counts(self, source_sha256: str, device: str, speed_ips: float) -> dict[str, tuple[int, int]]:
        """For one ingested recording: split -> (snippets, frames)."""
        with self._connect() as db:
            rows = [] if db is None else db.execute(
                "SELECT s.split, COUNT(*), SUM(s.frames) FROM snippets s JOIN sources src ON src.id = s.source_id"
                " WHERE src.sha256=? AND src.device=? AND src.speed_ips=? GROUP BY s.split",
                (source_sha256, device, speed_ips)).fetchall()
        return {split: (count, frames) for split, count, frames in rows}

    def sources(self, device: str | None = None) -> list[dict]:
        with self._connect() as db:
            if db is None:
                return []
            query = ("SELECT id, device, speed_ips, sha256, path, tape, notes, sample_rate, channels, frames,"
                     " usable_seconds, ingested_at FROM sources")
            rows = db.execute(query + (" WHERE device = ?" if device else "") + " ORDER BY device, speed_ips, path",
                              (device,) if device else ()).fetchall()
            keys = ("id", "device", "speed_ips", "sha256", "path", "tape", "notes", "sample_rate", "channels",
                    "frames", "usable_seconds", "ingested_at")
            return [dict(zip(keys, row)) for row in rows]

    def exclusions(self, source_sha256: str, device: str, speed_ips: float) -> list[dict]:
        with self._connect() as db:
            if db is None:
                return []
            rows = db.execute("SELECT e.channel, e.start_s, e.end_s, e.reason FROM exclusions e JOIN sources s"
                              " ON s.id = e.source_id WHERE s.sha256=? AND s.device=? AND s.speed_ips=?"
                              " ORDER BY e.channel, e.start_s", (source_sha256, device, speed_ips)).fetchall()
        return [{"channel": r[0], "start_s": r[1], "end_s": r[2], "reason": r[3]} for r in rows]

    def summary(self, device: str | None = None) -> list[dict]:
        """Per device and speed: snippets and minutes per split, and the totals."""
        with self._connect() as db:
            rows = [] if db is None else db.execute(
                "SELECT device, speed_ips, split, COUNT(*), SUM(frames) FROM snippets"
                + (" WHERE device = ?" if device else "") + " GROUP BY device, speed_ips, split ORDER BY device, speed_ips",
                (device,) if device else ()).fetchall()
        table: dict[tuple[str, float], dict] = {}
        for device_id, speed, split, count, frames in rows:
            entry = table.setdefault((device_id, speed), {
                "device": device_id, "speed_ips": speed,
                "splits": {name: {"snippets": 0, "minutes": 0.0} for name in ("train", "validation", "test")}})
            entry["splits"][split] = {"snippets": count, "minutes": round(frames / MODEL_SAMPLE_RATE / 60, 3)}
        for entry in table.values():
            entry["snippets"] = sum(s["snippets"] for s in entry["splits"].values())
            entry["minutes"] = round(sum(s["minutes"] for s in entry["splits"].values()), 3)
        return list(table.values())

    @staticmethod
    def digest(snippets: Iterable[Snippet]) -> str:
        """A stable sha256 naming a selection of snippets (order-independent): for dataset lineage."""
        lines = sorted(f"{s.device}\t{format_speed(s.speed_ips)}\t{s.split}\t{s.sha256}" for s in snippets)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    # --- profiles ---------------------------------------------------------------------------------
    def profile_paths(self, device: str, speed_ips: float) -> tuple[Path, Path]:
        stem = profile_stem(device, speed_ips)
        return self.profiles_dir / f"{stem}.json", self.profiles_dir / f"{stem}.png"

    def update_profile(self, device: str, speed_ips: float, progress=None) -> NoiseProfile | None:
        """(Re)compute the profile of a device and speed over all its snippets; store JSON and PNG.

        Removes a stored profile when no snippets remain."""
        from workbench.audio.io import atomic_write_json, iter_blocks

        snippets = self.snippets(device, speed_ips)
        json_path, png_path = self.profile_paths(device, speed_ips)
        if not snippets:
            json_path.unlink(missing_ok=True)
            png_path.unlink(missing_ok=True)
            return None
        accumulator = ProfileAccumulator(MODEL_SAMPLE_RATE)
        for done, snippet in enumerate(snippets):
            for block in iter_blocks(snippet.path, 1 << 18):
                accumulator.add(block)
            accumulator.end_stream()  # snippets are not contiguous: no Welch segment spans two
            if progress is not None:
                progress(f"profile {profile_stem(device, speed_ips)}", done + 1, len(snippets))
        profile = accumulator.result()
        data = profile.to_dict()
        data = {"device": device, "speed_ips": speed_ips, "snippets": len(snippets),
                "snippets_digest": self.digest(snippets), **data}
        plot_profile(profile, png_path, f"{device} @ {format_speed(speed_ips)} ips")
        atomic_write_json(json_path, data)
        return profile

    def profile(self, device: str, speed_ips: float) -> NoiseProfile | None:
        """The stored profile, recomputed first if it is missing or no longer matches the snippets."""
        json_path, _ = self.profile_paths(device, speed_ips)
        snippets = self.snippets(device, speed_ips)
        if not snippets:
            return None
        if json_path.exists():
            data = json.loads(json_path.read_text())
            if data.get("snippets_digest") == self.digest(snippets):
                return NoiseProfile.from_json(data)
        return self.update_profile(device, speed_ips)
