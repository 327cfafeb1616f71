"""The clean music corpus: the music that training mixes with tape noise (the "y" of Eq. 1).

`add_corpus(workspace, folder)` registers a folder of WAV / FLAC music in `registry/corpus/corpora.json`
with every file's sha256, length and split. The split comes from the folder's layout:
- MusicNet (`train_data/` and `test_data/`): its test recordings stay test; a tenth of its training
  recordings (at least one) becomes validation;
- `train/`, `validation/` (or `val/`, `valid/`, `dev/`) and `test/` subfolders: as they say (validation
  carved from train when missing);
- anything else: a deterministic split by file, 80 / 10 / 10 (at least one validation and one test file).
The carving is deterministic: files are ranked by a hash of their relative path.

With no corpus registered, training uses the embedded synthetic corpus, rendered on first use into
`registry/corpus/synthetic/` by the synth package's music renderer with a fixed seed.
`corpus_digest(files)` fingerprints exactly which files were used, for lineage.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from workbench.audio.io import AUDIO_SUFFIXES, atomic_write_json, audio_info, check_file_finite, sha256_file
from workbench.errors import WorkbenchError
from workbench.progress import Progress, no_progress
from workbench.workspace import Workspace

SPLITS = ("train", "validation", "test")
SYNTHETIC = "synthetic"
# The embedded corpus: minutes of music per split and the renderer's seed. Enough for the quickstart
# recipe's crops and for evaluation's 10 s test fragments; a real archive registers real music.
SYNTHETIC_MINUTES = {"train": 3.0, "validation": 1.0, "test": 2.0}
SYNTHETIC_SEED = 1877  # the year of the phonograph
VALIDATION_FOLDERS = ("validation", "val", "valid", "dev")
CORPUS_NAME = re.compile(r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$")


@dataclass(frozen=True)
class CorpusFile:
    corpus: str
    path: Path  # absolute
    sha256: str
    frames: int
    sample_rate: int
    channels: int
    split: str

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def registry_path(workspace: Workspace) -> Path:
    return workspace.corpus_dir / "corpora.json"


def _read_registry(workspace: Workspace) -> dict:
    path = registry_path(workspace)
    if not path.is_file():
        return {"corpora": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise WorkbenchError(f"{path}: corrupt corpus registry ({error})") from None


def _rank(relative: str) -> str:
    return hashlib.sha256(relative.encode()).hexdigest()


def _carve(files: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split off max(1, round(fraction·n)) files chosen by path hash: (rest, carved)."""
    ranked = sorted(files, key=_rank)
    count = max(1, round(fraction * len(ranked)))
    return sorted(ranked[count:]), sorted(ranked[:count])


def _audio_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES and not p.name.startswith("."))


def plan_splits(folder: Path) -> tuple[str, dict[str, str]]:
    """The folder's layout ("musicnet", "folders" or "by-file") and each audio file's split."""
    files = _audio_files(folder)
    if not files:
        raise WorkbenchError(f"{folder}: no WAV/FLAC/AIFF files in it")
    top = {Path(f).parts[0] for f in files if len(Path(f).parts) > 1}
    split_of: dict[str, str] = {}
    if {"train_data", "test_data"} <= top:
        layout, train_dir, val_dirs, test_dir = "musicnet", "train_data", (), "test_data"
    elif "train" in top and (top & set(VALIDATION_FOLDERS) or "test" in top):
        layout, train_dir, val_dirs, test_dir = "folders", "train", VALIDATION_FOLDERS, "test"
    else:
        layout = "by-file"
    if layout == "by-file":
        if len(files) < 3:
            raise WorkbenchError(f"{folder}: {len(files)} audio file(s) cannot be split into train/validation/test; "
                                 "add more, or use train/ validation/ test/ subfolders")
        rest, test = _carve(files, 0.1)
        train, validation = _carve(rest, 0.1 / 0.9)
        split_of.update({f: "train" for f in train} | {f: "validation" for f in validation} | {f: "test" for f in test})
        return layout, split_of
    by_top: dict[str, list[str]] = {}
    for f in files:
        parts = Path(f).parts
        by_top.setdefault(parts[0] if len(parts) > 1 else "", []).append(f)
    train = by_top.get(train_dir, [])
    validation = [f for d in val_dirs for f in by_top.get(d, [])]
    test = by_top.get(test_dir, [])
    if not validation:
        if len(train) < 2:
            raise WorkbenchError(f"{folder}: {train_dir}/ needs at least 2 files to carve a validation split from")
        train, validation = _carve(train, 0.1)
    if not train or not test:
        missing = train_dir if not train else test_dir
        raise WorkbenchError(f"{folder}: {missing}/ has no audio files")
    split_of.update({f: "train" for f in train} | {f: "validation" for f in validation} | {f: "test" for f in test})
    return layout, split_of


def _scan(folder: Path, name: str, progress: Progress) -> tuple[str, list[dict]]:
    layout, split_of = plan_splits(folder)
    entries = []
    for done, relative in enumerate(sorted(split_of)):
        progress(f"corpus {name}", done, len(split_of))
        info = audio_info(folder / relative)
        check_file_finite(folder / relative)  # a NaN in the music would reach every loss it is mixed into
        entries.append({"path": relative, "sha256": sha256_file(folder / relative), "frames": info.frames,
                        "sample_rate": info.sample_rate, "channels": info.channels, "split": split_of[relative]})
    progress(f"corpus {name}", len(split_of), len(split_of))
    return layout, entries


def _summary(name: str, record: dict) -> dict:
    files = record["files"]
    per_split = {}
    for split in SPLITS:
        chosen = [f for f in files if f["split"] == split]
        per_split[split] = {"files": len(chosen), "minutes": round(sum(f["frames"] / f["sample_rate"] for f in chosen) / 60, 2)}
    return {"name": name, "root": record["root"], "layout": record["layout"], "added": record["added"],
            "files": len(files), "splits": per_split, "digest": _digest_entries(files)}


def add_corpus(workspace: Workspace, folder: Path, name: str | None = None, replace: bool = False,
               progress: Progress = no_progress) -> dict:
    """Register `folder`'s music under `name` (default: the folder's name); returns its summary.

    Every file is checked (readable, not truncated) and hashed; nothing is copied or modified.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise WorkbenchError(f"{folder}: no such folder")
    name = name or re.sub(r"[^a-z0-9]+", "-", folder.name.lower()).strip("-")
    if not CORPUS_NAME.match(name or ""):
        raise WorkbenchError(f"corpus name {name!r} must be lowercase letters and digits joined by - or _")
    if name == SYNTHETIC:
        raise WorkbenchError(f"corpus name {SYNTHETIC!r} is reserved for the embedded synthetic corpus")
    registry = _read_registry(workspace)
    if name in registry["corpora"] and not replace:
        raise WorkbenchError(f"corpus {name!r} is already registered (from {registry['corpora'][name]['root']}); "
                             "pass --replace to register it again")
    layout, entries = _scan(folder, name, progress)
    record = {"root": str(folder), "layout": layout,
              "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "files": entries}
    registry = _read_registry(workspace)  # re-read: hashing a large corpus takes a while
    registry["corpora"][name] = record
    atomic_write_json(registry_path(workspace), registry)
    return _summary(name, record)


def remove_corpus(workspace: Workspace, name: str) -> None:
    registry = _read_registry(workspace)
    if name not in registry["corpora"]:
        raise WorkbenchError(f"corpus {name!r} is not registered (registered: {', '.join(registry['corpora']) or 'none'})")
    del registry["corpora"][name]
    atomic_write_json(registry_path(workspace), registry)


def list_corpora(workspace: Workspace) -> list[dict]:
    """Summaries of the registered corpora, plus the synthetic one once it has been rendered."""
    summaries = [_summary(name, record) for name, record in sorted(_read_registry(workspace)["corpora"].items())]
    synthetic = _synthetic_manifest(workspace)
    if synthetic.is_file():
        summaries.append(_summary(SYNTHETIC, json.loads(synthetic.read_text())))
    return summaries


def _synthetic_manifest(workspace: Workspace) -> Path:
    return workspace.corpus_dir / SYNTHETIC / "corpus.json"


def ensure_synthetic_corpus(workspace: Workspace, progress: Progress = no_progress) -> dict:
    """The embedded synthetic corpus's record, rendering it first if this workspace has none yet."""
    manifest = _synthetic_manifest(workspace)
    if manifest.is_file():
        return json.loads(manifest.read_text())
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with open(manifest.parent.with_name(SYNTHETIC + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel workers: one renders, the others wait and read
        if manifest.is_file():
            return json.loads(manifest.read_text())
        return _render_synthetic(workspace, progress)


def _render_synthetic(workspace: Workspace, progress: Progress) -> dict:
    manifest = _synthetic_manifest(workspace)
    from workbench.synth.music import render_music  # numpy + torchaudio synthesis, deterministic per seed

    root = manifest.parent
    entries = []
    for split, minutes in SYNTHETIC_MINUTES.items():
        folder = root / split

        def report(stage, done, total=None, **fields):
            progress(f"render synthetic {split} music", done, total, **fields)

        rendered = render_music(folder, minutes, seed=SYNTHETIC_SEED + SPLITS.index(split), progress=report)
        for piece in rendered.pieces:
            path = folder / piece.file
            info = audio_info(path)
            entries.append({"path": f"{split}/{piece.file}", "sha256": sha256_file(path), "frames": info.frames,
                            "sample_rate": info.sample_rate, "channels": info.channels, "split": split})
    record = {"root": str(root), "layout": SYNTHETIC, "seed": SYNTHETIC_SEED,
              "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "files": entries}
    atomic_write_json(manifest, record)
    return record


def _files_of(name: str, record: dict) -> list[CorpusFile]:
    root = Path(record["root"])
    return [CorpusFile(name, root / f["path"], f["sha256"], int(f["frames"]), int(f["sample_rate"]), int(f["channels"]),
                       f["split"]) for f in record["files"]]


def corpus_files(workspace: Workspace, split: str | None = None, corpora: list[str] | None = None,
                 progress: Progress = no_progress) -> list[CorpusFile]:
    """The clean files to train or score on: the named corpora, else every registered one, else the synthetic one."""
    assert split in (None, *SPLITS), split
    registry = _read_registry(workspace)["corpora"]
    names = list(corpora or registry or [SYNTHETIC])
    files: list[CorpusFile] = []
    for name in names:
        if name == SYNTHETIC:
            files += _files_of(name, ensure_synthetic_corpus(workspace, progress))
        elif name in registry:
            files += _files_of(name, registry[name])
        else:
            raise WorkbenchError(f"corpus {name!r} is not registered (registered: {', '.join(registry) or 'none'}; "
                                 f"`workbench corpus add DIR --name {name}`)")
    chosen = [f for f in files if split is None or f.split == split]
    if not chosen:
        raise WorkbenchError(f"corpus {', '.join(names)} has no {split} files")
    return chosen


def _digest_entries(entries: list[dict]) -> str:
    lines = sorted(f"{e['sha256']} {e['split']}" for e in entries)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def corpus_digest(files: list[CorpusFile]) -> str:
    """A short digest of exactly these files (their contents and splits), independent of order and location."""
    return _digest_entries([asdict(f) for f in files])


def corpus_lineage(files: list[CorpusFile]) -> dict:
    """What MLflow lineage records about the clean music: corpora, roots, file count, minutes, digest."""
    corpora = sorted({f.corpus for f in files})
    return {"corpora": corpora, "roots": sorted({str(f.path.parent) for f in files})[:20], "files": len(files),
            "minutes": round(sum(f.seconds for f in files) / 60, 3), "digest": corpus_digest(files),
            "splits": sorted({f.split for f in files})}
