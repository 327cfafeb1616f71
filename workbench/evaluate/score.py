"""Score test recordings against their references: SNR, SI-SDR and the PEAQ ODG of each file pair.

`score_files` takes a reference and a test, each a file or a folder. Folders pair up by relative path:
the test of `clean/a/b.wav` is `test/a/b.<any audio suffix>` or, as `workbench denoise` names its outputs,
`test/a/b.denoised.<suffix>`. Every pair's headers are checked (readable, same sample rate, channel count and
length, mono or stereo) before any is scored, so such bad input costs one line and no work; a silent file
is refused when its pair is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workbench.audio.io import AUDIO_SUFFIXES, audio_info, read_audio
from workbench.errors import WorkbenchError
from workbench.evaluate.metrics import si_sdr_db, snr_db
from workbench.evaluate.peaq import peaq
from workbench.progress import Progress, no_progress


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def _counterpart(reference: Path, reference_root: Path, test_root: Path) -> Path:
    relative = reference.relative_to(reference_root)
    folder = test_root / relative.parent
    stems = {relative.stem, relative.stem + ".denoised"}
    found = sorted(p for p in folder.glob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES
                   and p.stem in stems) if folder.is_dir() else []
    if not found:
        raise WorkbenchError(f"{reference}: no test file for it in {folder} (looked for {relative.stem}.* "
                             f"and {relative.stem}.denoised.*)")
    if len(found) > 1:
        raise WorkbenchError(f"{reference}: more than one test file matches it: "
                             + ", ".join(p.name for p in found))
    return found[0]


def find_pairs(reference: Path, test: Path) -> list[tuple[Path, Path]]:
    """(reference file, test file) pairs: two files, or two folders paired by relative path."""
    reference, test = Path(reference), Path(test)
    for path in (reference, test):
        if not path.exists():
            raise WorkbenchError(f"{path}: no such file or folder")
    if reference.is_file() and test.is_file():
        return [(reference, test)]
    if reference.is_dir() and test.is_dir():
        references = _audio_files(reference)
        if not references:
            raise WorkbenchError(f"{reference}: no audio files in this folder")
        return [(path, _counterpart(path, reference, test)) for path in references]
    raise WorkbenchError(f"give two files or two folders, not a {'file' if reference.is_file() else 'folder'} "
                         f"({reference}) and a {'file' if test.is_file() else 'folder'} ({test})")


def check_pair(reference: Path, test: Path) -> None:
    """Raise a one-line WorkbenchError naming the file if this pair cannot be scored."""
    ref, tst = audio_info(reference), audio_info(test)
    if ref.sample_rate != tst.sample_rate:
        raise WorkbenchError(f"{test}: sample rate {tst.sample_rate} Hz, but its reference {reference} has "
                             f"{ref.sample_rate} Hz")
    if ref.channels != tst.channels:
        raise WorkbenchError(f"{test}: {tst.channels} channel(s), but its reference {reference} has {ref.channels}")
    if ref.frames != tst.frames:
        raise WorkbenchError(f"{test}: {tst.frames} frames ({tst.seconds:.3f} s), but its reference {reference} "
                             f"has {ref.frames} ({ref.seconds:.3f} s); the pair must be time-aligned and "
                             f"equally long")
    if ref.channels > 2:
        raise WorkbenchError(f"{reference}: {ref.channels} channels; PEAQ grades mono or stereo")


def score_pair(reference: Path, test: Path, *, with_peaq: bool = True) -> dict:
    """SNR and SI-SDR (all channels together) and, unless `with_peaq` is false, PEAQ of one checked pair."""
    check_pair(reference, test)
    ref, sample_rate = read_audio(reference)
    tst, _ = read_audio(test)
    for path, samples in ((reference, ref), (test, tst)):
        if not np.any(samples):
            raise WorkbenchError(f"{path}: silent (every sample is zero), nothing to score")
    row = {"reference": str(reference), "test": str(test), "sample_rate": sample_rate, "channels": ref.shape[0],
           "seconds": ref.shape[1] / sample_rate,
           "snr_db": float(snr_db(ref.reshape(-1), tst.reshape(-1))),
           "si_sdr_db": float(si_sdr_db(ref.reshape(-1), tst.reshape(-1)))}
    if with_peaq:
        try:
            result = peaq(ref, tst, sample_rate)
        except WorkbenchError as error:
            raise WorkbenchError(f"{reference}: {error}") from None
        row |= {"peaq_odg": result.odg, "peaq_di": result.distortion_index, "peaq_movs": result.movs}
    return row


def score_files(reference: Path, test: Path, *, with_peaq: bool = True, progress: Progress = no_progress) -> list[dict]:
    """Score every pair; all pairs are checked before the first is scored."""
    pairs = find_pairs(reference, test)
    for ref, tst in pairs:
        check_pair(ref, tst)
    rows = []
    for done, (ref, tst) in enumerate(pairs, start=1):
        rows.append(score_pair(ref, tst, with_peaq=with_peaq))
        progress("score", done, len(pairs), file=ref.name)
    return rows
