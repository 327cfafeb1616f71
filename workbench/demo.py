"""The whole mission end to end on the embedded synthetic archive: what `make demo` runs.

The demo lives in its own workspace (default `demo/`, git-ignored), so it never mixes synthetic models
into an archive's real registry. Each stage is one call into the library and reuses what an earlier run
finished: the archive is rendered once, ingest is idempotent, the boxed general model and the device's
champion are reused when registered. `fresh=True` deletes the demo workspace first.

Stages: render the archive → capture-noise for each blank tape → register the clean corpus → register
the boxed general model (models/general/, trained with `workbench pretrain --recipe general` on every
archive machine's noise but the one the demo fine-tunes) as @base, in seconds → fine-tune that device
with the finetune-demo recipe's Optuna study (finetune-cpu with fewer steps: the demo's ten minutes),
evaluate and register it → denoise a sample transfer with the device's champion → list the registry.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.progress import Progress, no_progress
from workbench.workspace import Workspace, init_workspace, is_workspace

DEFAULT_FOLDER = Path("demo")
CORPUS_NAME = "synthetic-archive"
# How capture-noise cuts each archive scale's blank tapes: (snippet seconds, train/validation/test split).
# The small scale's few seconds of tape only fill every split with short snippets and larger held-out parts.
INGEST_BY_SCALE = {"demo": (5.0, (80.0, 10.0, 10.0)), "small": (1.0, (60.0, 20.0, 20.0))}


@dataclass
class DemoSettings:
    folder: Path = DEFAULT_FOLDER
    scale: str = "demo"  # the synthetic archive's size: "demo" (minutes of audio) or "small" (tests)
    recipe: str = "finetune-demo"  # the fine-tuning recipe (the general model comes from the box)
    trials: int | None = None  # None: the recipe's own number
    seed: int = 0
    fresh: bool = False


@dataclass
class StageResult:
    name: str
    summary: str  # one line for people
    data: dict = field(default_factory=dict)  # everything for --json
    reused: bool = False
    seconds: float = 0.0  # wall time of the stage, set by run_demo

    def to_dict(self) -> dict:
        return {"name": self.name, "summary": self.summary, "reused": self.reused, "seconds": round(self.seconds, 1),
                "data": self.data}


@dataclass
class Stage:
    name: str
    title: str
    run: Callable[[Progress], StageResult]


def prepare_workspace(settings: DemoSettings) -> Workspace:
    """The demo's own workspace, created with the research devices (after deleting it when fresh)."""
    folder = settings.folder.expanduser().resolve()
    if settings.fresh and folder.exists():
        if not is_workspace(folder):
            raise WorkbenchError(f"{folder}: exists and is not a demo workspace; refusing to delete it")
        shutil.rmtree(folder)
    if is_workspace(folder):
        return Workspace(folder)
    return init_workspace(folder, with_research_devices=True)


def demo_stages(workspace: Workspace, settings: DemoSettings) -> Iterator[Stage]:
    """The demo's stages in order; each closes over what the earlier ones produced."""
    from workbench import model_registry

    archive_folder = workspace.root / "archive"
    state: dict = {}

    def render_archive(progress: Progress) -> StageResult:
        from workbench.devices import load_devices
        from workbench.synth.archive import build_archive

        result = build_archive(archive_folder, load_devices(workspace), seed=settings.seed, scale=settings.scale,
                               progress=progress)
        state["manifest"] = result.manifest
        minutes = sum(t["seconds"] for t in result.manifest["blank_tapes"]) / 60
        music = sum(c["seconds"] for c in result.manifest["corpus"].values()) / 60
        return StageResult("archive", f"{len(result.manifest['blank_tapes'])} blank tapes ({minutes:.1f} min), "
                           f"{music:.1f} min of clean music, {len(result.manifest['transfers'])} transfers "
                           f"in {archive_folder}", result.to_dict(), result.reused)

    def capture(progress: Progress) -> StageResult:
        from workbench.noise.ingest import capture_noise

        snippet_seconds, split = INGEST_BY_SCALE[settings.scale]
        reports, added = [], 0
        for tape in state["manifest"]["blank_tapes"]:
            report = capture_noise(workspace, [archive_folder / tape["path"]], tape["device"], tape["speed_ips"],
                                   tape="synthetic", snippet_seconds=snippet_seconds, split=split,
                                   progress=progress)
            reports.append(report.to_dict())
            added += sum(f.added for f in report.files)
        return StageResult("capture-noise", f"{len(reports)} recordings ingested, {added} new snippets",
                           {"reports": reports}, reused=added == 0)

    def corpus(progress: Progress) -> StageResult:
        from workbench.corpus import add_corpus, list_corpora

        if any(c["name"] == CORPUS_NAME for c in list_corpora(workspace)):
            return StageResult("corpus", f"corpus {CORPUS_NAME} already registered", {}, reused=True)
        summary = add_corpus(workspace, archive_folder / "corpus", name=CORPUS_NAME, progress=progress)
        return StageResult("corpus", f"registered corpus {CORPUS_NAME}", summary)

    def general_model(progress: Progress) -> StageResult:
        from workbench.model.boxed import register_boxed_general

        registered = register_boxed_general(workspace, alias="base")
        heard = registered.card["data"]["devices"]
        # The demo measures what fitting adds for a machine the general model never heard.
        assert fine_tuned_device(state["manifest"]) not in heard, "the boxed model heard the demo's target machine"
        return StageResult("general", f"{registered.summary()}, trained on the noise of {', '.join(heard)}",
                           {"version": registered.version,
                            "model_uri": model_registry.model_uri(model_registry.GENERAL_MODEL, registered.version),
                            "card": registered.card}, reused=registered.reused)

    def finetune(progress: Progress) -> StageResult:
        from workbench.finetune import finetune_device
        from workbench.model_registry.names import BASE_MODEL

        device = fine_tuned_device(state["manifest"])
        name = model_registry.device_model_name(device)
        champion = model_registry.get_alias_version(name, model_registry.CHAMPION, workspace)
        if champion is not None:
            state["device"] = device
            return StageResult("finetune", f"{name} already has a champion (version {champion})",
                               {"model_uri": model_registry.model_uri(name, alias=model_registry.CHAMPION)}, reused=True)
        result = finetune_device(workspace, device, recipe=settings.recipe, trials=settings.trials, progress=progress)
        state["device"] = device
        verdict = "promoted to champion" if result.promoted else f"not promoted: {result.reason}"
        gains = result.paired.get(BASE_MODEL, {})  # input SNR -> fine-tuned − base, paired over fragments
        shown = "; ".join(f"{snr} dB input: {g['mean']:+.2f} dB [{g['ci_low']:+.2f}, {g['ci_high']:+.2f}]"
                          for snr, g in gains.items())
        hum = "" if result.hum_template == "none" else f"; hum template: {result.hum_template}"
        return StageResult("finetune", f"{name} version {result.version} registered, {verdict}; fine-tuned − base "
                           f"ΔSNR per fragment (95 % interval) at {shown}{hum}; report {result.report_html}",
                           {**result.to_dict(), "paired_gain_vs_base_db": gains},
                           reused=not result.registered_now)  # a refused version is found again, not retrained

    def denoise(progress: Progress) -> StageResult:
        from workbench.denoise import denoise_files

        transfer = state["manifest"]["transfers"][0]
        source = archive_folder / transfer["path"]
        out_dir = workspace.root / "restored"
        expected = out_dir / f"{source.stem}.denoised{source.suffix}"
        if expected.exists() and expected.with_name(expected.name + ".json").exists():
            return StageResult("denoise", f"{expected} already restored", {"output": str(expected)}, reused=True)
        # What `workbench denoise --device` does: the champion, else the general model @base, said plainly
        # (a version the gate refused may make recordings worse, so it restores nothing).
        records = denoise_files([source], device_id=state["device"], out_dir=out_dir, overwrite=True, workspace=workspace,
                                progress=progress)
        model = records[0]["model"]
        ref = model["uri"]
        which = ref + (f" ({model['note']})" if model.get("note") else "")
        return StageResult("denoise", f"restored {source.name} with {which} → {records[0]['output']['path']}",
                           {"records": records, "model_uri": ref})

    def registry(progress: Progress) -> StageResult:
        from workbench.model_registry import list_models, show_model

        models = list_models(workspace)
        shown = show_model(workspace, state["device"])
        return StageResult("registry", f"{len(models)} registered models; report: {shown['report_path']}",
                           {"models": models, "device_model": shown})

    yield Stage("archive", "Render the synthetic archive", render_archive)
    yield Stage("capture-noise", "Ingest the blank tapes into the noise library", capture)
    yield Stage("corpus", "Register the clean corpus", corpus)
    yield Stage("general", "Register the boxed general tape-noise model as @base", general_model)
    yield Stage("finetune", "Fine-tune one machine with an Optuna study", finetune)
    yield Stage("denoise", "Restore a sample transfer with the champion", denoise)
    yield Stage("registry", "The model registry", registry)


def fine_tuned_device(manifest: dict) -> str:
    """The demo fine-tunes the machine its first sample transfer was played on."""
    return manifest["transfers"][0]["device"]


def general_model_devices(manifest: dict) -> list[str]:
    """The machines whose noise the demo's general model learns: every archive machine but the fine-tuned one.

    An archive's own machines are new to the published general model (trained on the research's decks);
    holding the demo's target out of pretraining plays that situation, so the demo measures what fitting
    adds for a machine the base model never heard.
    """
    target = fine_tuned_device(manifest)
    heard = sorted({tape["device"] for tape in manifest["blank_tapes"]} - {target})
    assert heard, "the synthetic archive has blank tape for more machines than the fine-tuned one"
    return heard


def run_demo(settings: DemoSettings, progress: Progress = no_progress,
             on_stage: Callable[[Stage], None] | None = None,
             on_result: Callable[[StageResult], None] | None = None) -> list[StageResult]:
    """Run every stage, timing each; `on_stage` is called before each (the CLI prints a heading) and
    `on_result` after it (the CLI prints its summary)."""
    workspace = prepare_workspace(settings)
    results = []
    for stage in demo_stages(workspace, settings):
        if on_stage:
            on_stage(stage)
        started = time.perf_counter()
        result = stage.run(progress)
        result.seconds = time.perf_counter() - started
        results.append(result)
        if on_result:
            on_result(result)
    return results
