"""`workbench corpus add|list|remove` and `workbench pretrain`: the clean music and the general model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from workbench.cli._app import app
from workbench.cli._render import console, err_console, json_option, progress_bars, render

corpus_app = typer.Typer(
    help=(
        "The clean music that training mixes with tape noise.\n\n"
        "Register a folder of WAV/FLAC music (MusicNet's train_data/test_data layout is recognised; so are "
        "train/ validation/ test/ subfolders; anything else is split by file, 80/10/10). Without a registered "
        "corpus, training renders and uses the embedded synthetic one.\n\n"
        "Example: workbench corpus add ~/data/musicnet --name musicnet"
    ),
    no_args_is_help=True,
)
app.add_typer(corpus_app, name="corpus", rich_help_panel="Training")


@corpus_app.command("add")
def corpus_add(
    folder: Path = typer.Argument(..., help="Folder of clean music (WAV, FLAC, AIFF), read in place, never modified."),
    name: str = typer.Option(None, "--name", help="Name to register it under (default: the folder's name)."),
    replace: bool = typer.Option(False, "--replace", help="Register again over an existing corpus of that name."),
    as_json: bool = json_option("the corpus summary"),
) -> None:
    """Register a folder of clean music: every file is checked, hashed and given its split.

    Nothing is copied or modified; the workspace's corpus record keeps each file's sha256, length and split.

        workbench corpus add ~/data/musicnet --name musicnet
    """
    from workbench.corpus import add_corpus
    from workbench.workspace import find_workspace

    workspace = find_workspace()
    with progress_bars(not as_json) as progress:
        summary = add_corpus(workspace, folder, name=name, replace=replace, progress=progress)
    render(summary, as_json, _show_corpus)


def _show_corpus(summary: dict) -> None:
    splits = ", ".join(f"{split} {s['files']} files / {s['minutes']:g} min" for split, s in summary["splits"].items())
    console.print(f"registered corpus [bold]{summary['name']}[/] ({summary['layout']} layout): {splits}; "
                  f"digest {summary['digest']}")


@corpus_app.command("list")
def corpus_list(as_json: bool = json_option("the corpora")) -> None:
    """List the registered clean corpora (and the synthetic one, once rendered)."""
    from workbench.corpus import list_corpora
    from workbench.workspace import find_workspace

    render(list_corpora(find_workspace()), as_json, _show_corpora)


def _show_corpora(corpora: list[dict]) -> None:
    if not corpora:
        console.print("no clean corpus registered: training will render and use the embedded synthetic corpus "
                      "(`workbench corpus add DIR` to register real music)")
        return
    table = Table("name", "layout", "train", "validation", "test", "digest", "root")
    for c in corpora:
        cells = [f"{c['splits'][s]['files']} files, {c['splits'][s]['minutes']:g} min" for s in ("train", "validation", "test")]
        table.add_row(c["name"], c["layout"], *cells, c["digest"], c["root"])
    console.print(table)


@corpus_app.command("remove")
def corpus_remove(name: str = typer.Argument(..., help="The corpus name, as `corpus list` shows it.")) -> None:
    """Forget a registered corpus (its files are left untouched)."""
    from workbench.corpus import remove_corpus
    from workbench.workspace import find_workspace

    remove_corpus(find_workspace(), name)
    console.print(f"removed corpus {name}")


@app.command("pretrain", rich_help_panel="Training")
def pretrain_command(
    recipe: str = typer.Option("quickstart", "--recipe", "-r",
                               help="Recipe name (recipes/NAME.toml in the workspace or bundled) or path to a TOML file."),
    resume: bool = typer.Option(False, "--resume", help="Continue the last interrupted run of this recipe exactly."),
    steps: int = typer.Option(None, "--steps", min=1, help="Train this many steps instead of the recipe's."),
    accelerator: str = typer.Option("auto", "--accelerator", metavar="TORCH_DEVICE",
                                    help="Where to train: auto (CUDA when present), cpu, cuda, cuda:1."),
    workers: int = typer.Option(None, "--workers", min=0, help="DataLoader worker processes (default: the recipe's)."),
    alias: str = typer.Option(None, "--alias", help="Point this alias (e.g. base) at the new version."),
    noise_from: list[str] = typer.Option(None, "--noise-from", metavar="ID",
                                         help="Train on this machine's noise only (repeat for several; default: the "
                                              "recipe's data.devices, else every machine in the noise library)."),
    start_from: str = typer.Option(None, "--start-from", metavar="REF",
                                   help="Start from this model's weights instead of a fresh network: a checkpoint "
                                        "file or models:/NAME@ALIAS (of the recipe's network size)."),
    as_json: bool = json_option(),
) -> None:
    """Train the general tape-noise model on the noise library and clean corpus; register it in MLflow.

    Every device's noise (unless the recipe selects some) is mixed with clean music per the research's
    Eq. 1; validation loss and ΔSNR are measured on fixed, stored mixtures. The run is tracked in MLflow
    (recipe, data lineage, metrics) and the best weights are registered as a new version of
    tape-denoiser-general. Ctrl-C saves the state: `--resume` continues exactly.

    Examples:

        workbench pretrain --recipe quickstart
        workbench pretrain --recipe pretrain-paper --accelerator cuda
        workbench pretrain --noise-from uher-4000-l --noise-from revox-a77 --alias base
        workbench pretrain --recipe general-hum --start-from models:/tape-denoiser-general@base
        torchrun --nproc-per-node 4 -m workbench pretrain --recipe pretrain-paper
    """
    from workbench.train.distributed import is_main_process
    from workbench.train.pretrain import pretrain
    from workbench.workspace import find_workspace

    workspace = find_workspace()
    show = not as_json and is_main_process()
    try:
        with progress_bars(show) as progress:
            result = pretrain(workspace, recipe, resume=resume, steps=steps, accelerator=accelerator,
                              num_workers=workers, alias=alias, noise_devices=noise_from or None,
                              start_from=start_from, progress=progress)
    except KeyboardInterrupt:
        err_console.print(f"interrupted: state saved; continue with `workbench pretrain --recipe {recipe} --resume`")
        raise
    if is_main_process():  # the other ranks trained alongside; rank 0 speaks for them
        render(result, as_json, _show_pretrain)


def _show_pretrain(result) -> None:
    from workbench.train.distributed import world_size_from_env

    best, start = result.best, result.initial
    if result.trained_offline:
        offline = result.trained_offline
        where = offline["system"].get("gpu") or offline["system"].get("device", "elsewhere")
        took = f" in {offline['seconds']:.0f} s" if "seconds" in offline else ""
        console.print(f"adopted a run trained without MLflow: {result.step} steps on {where}{took}")
    else:
        console.print(f"trained {result.step} steps ({result.stopped}, {result.steps_per_s:.2f} steps/s"
                      f"{f', {world_size_from_env()} processes' if world_size_from_env() > 1 else ''})")
    if start:
        console.print(f"validation ΔSNR {start['val_delta_snr_db']:+.2f} dB at the start -> "
                      f"{best['val_delta_snr_db']:+.2f} dB at step {best['step']} (loss {start['val_loss']:.4f} -> {best['val_loss']:.4f})")
    else:
        console.print(f"best validation at step {best['step']}: ΔSNR {best['val_delta_snr_db']:+.2f} dB, loss {best['val_loss']:.4f}")
    console.print(f"registered [bold]{result.model_uri}[/] (MLflow run {result.run_id}); checkpoint {result.checkpoint}")
