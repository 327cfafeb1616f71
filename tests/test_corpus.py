"""The clean corpus: folder layouts and their splits, hashing, bad files, the synthetic fallback, digests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from workbench.audio.io import sha256_file, write_audio
from workbench.corpus import add_corpus, corpus_digest, corpus_files, list_corpora, plan_splits, registry_path
from workbench.errors import WorkbenchError

RATE = 44_100


def _music(path, seconds=0.5, seed=0, rate=RATE, channels=1):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t) + 0.01 * rng.standard_normal(t.size)
    write_audio(path, np.tile(tone.astype(np.float32), (channels, 1)), rate, subtype="PCM_16")
    return path


def test_folders_layout_keeps_its_splits_and_hashes_every_file(workspace, tmp_path, cli):
    music = tmp_path / "music"
    for split, count in (("train", 3), ("validation", 1), ("test", 2)):
        for i in range(count):
            _music(music / split / f"{split}-{i}.wav", seed=hash((split, i)) % 1000)
    result = cli("corpus", "add", music, "--name", "studio", "--json")
    assert result.code == 0, result.stderr
    summary = result.json()
    assert summary["layout"] == "folders"
    assert {s: v["files"] for s, v in summary["splits"].items()} == {"train": 3, "validation": 1, "test": 2}
    files = corpus_files(workspace, corpora=["studio"])
    assert len(files) == 6
    for f in files:
        assert f.split == f.path.parent.name
        assert f.sha256 == sha256_file(f.path)
        assert f.frames == RATE // 2 and f.sample_rate == RATE
    listed = cli("corpus", "list", "--json").json()
    assert [c["name"] for c in listed] == ["studio"] and listed[0]["digest"] == corpus_digest(files)


def test_musicnet_layout_keeps_test_recordings_in_test(workspace, tmp_path):
    root = tmp_path / "musicnet"
    for i in range(10):
        _music(root / "train_data" / f"{1700 + i}.wav", seed=i)
    for i in range(3):
        _music(root / "test_data" / f"{2100 + i}.wav", seed=50 + i)
    (root / "train_labels").mkdir()
    (root / "train_labels" / "1700.csv").write_text("start_time,end_time\n")
    summary = add_corpus(workspace, root, name="musicnet")
    assert summary["layout"] == "musicnet"
    files = corpus_files(workspace)
    test = sorted(f.path.name for f in files if f.split == "test")
    assert test == ["2100.wav", "2101.wav", "2102.wav"]
    validation = [f for f in files if f.split == "validation"]
    assert len(validation) == 1 and validation[0].path.parent.name == "train_data"
    assert sum(f.split == "train" for f in files) == 9


def test_plain_folder_is_split_by_file_deterministically(tmp_path):
    folder = tmp_path / "flat"
    for i in range(20):
        _music(folder / f"track-{i:02d}.flac", seed=i, seconds=0.1)
    layout, splits = plan_splits(folder)
    assert layout == "by-file"
    counts = {s: list(splits.values()).count(s) for s in ("train", "validation", "test")}
    assert counts == {"train": 16, "validation": 2, "test": 2}
    assert plan_splits(folder)[1] == splits  # same folder, same split
    for name in list(folder.iterdir())[:18]:
        name.unlink()
    with pytest.raises(WorkbenchError, match="cannot be split"):
        plan_splits(folder)


def test_bad_audio_names_the_file_and_registers_nothing(workspace, tmp_path, cli):
    music = tmp_path / "music"
    for split in ("train", "validation", "test"):
        _music(music / split / "ok.wav")
    (music / "train" / "broken.wav").write_bytes(b"RIFF0000WAVEnot really audio")
    result = cli("corpus", "add", music)
    assert result.code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.wav" in errors[0]
    assert not registry_path(workspace).exists()
    assert cli("corpus", "add", tmp_path / "nowhere").code == 2


def test_names_are_unique_unless_replaced(workspace, tmp_path):
    music = tmp_path / "music"
    for split in ("train", "validation", "test"):
        _music(music / split / "a.wav")
    add_corpus(workspace, music, name="one")
    with pytest.raises(WorkbenchError, match="already registered"):
        add_corpus(workspace, music, name="one")
    _music(music / "train" / "b.wav", seed=9)
    summary = add_corpus(workspace, music, name="one", replace=True)
    assert summary["splits"]["train"]["files"] == 2
    assert json.loads(registry_path(workspace).read_text())["corpora"].keys() == {"one"}
    with pytest.raises(WorkbenchError, match="not registered"):
        corpus_files(workspace, corpora=["two"])


def test_digest_depends_on_content_not_order_or_location(workspace, tmp_path):
    music = tmp_path / "music"
    for split in ("train", "validation", "test"):
        _music(music / split / "a.wav", seed=len(split))
    add_corpus(workspace, music, name="one")
    files = corpus_files(workspace)
    assert corpus_digest(files) == corpus_digest(list(reversed(files)))
    copy = tmp_path / "copy"
    for f in files:
        _music(copy / f.split / "a.wav", seed=len(f.split))
    add_corpus(workspace, copy, name="copy")
    assert corpus_digest(corpus_files(workspace, corpora=["copy"])) == corpus_digest(files)
    _music(copy / "test" / "a.wav", seed=99)
    add_corpus(workspace, copy, name="copy", replace=True)
    assert corpus_digest(corpus_files(workspace, corpora=["copy"])) != corpus_digest(files)


def test_without_a_corpus_the_synthetic_one_is_rendered_once(workspace, monkeypatch):
    import workbench.corpus as corpus

    # A few seconds per split instead of minutes: the same renderer and seeds, less music.
    monkeypatch.setattr(corpus, "SYNTHETIC_MINUTES", {"train": 6 / 60, "validation": 5 / 60, "test": 5 / 60})
    assert list_corpora(workspace) == []
    train = corpus_files(workspace, "train")
    assert train and {f.corpus for f in train} == {"synthetic"} and {f.split for f in train} == {"train"}
    assert all(f.path.is_relative_to(workspace.corpus_dir / "synthetic") for f in train)
    modified = {f.path: f.path.stat().st_mtime_ns for f in train}
    again = corpus_files(workspace, "train")
    assert again == train and all(f.path.stat().st_mtime_ns == modified[f.path] for f in again)
    assert [c["name"] for c in list_corpora(workspace)] == ["synthetic"]
    audio = np.concatenate([sf.read(f.path, dtype="float32")[0].reshape(-1) for f in train])
    assert np.sqrt(np.mean(audio ** 2)) > 1e-3  # music, not silence
