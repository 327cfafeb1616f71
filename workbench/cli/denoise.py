"""`workbench denoise`: restore long transfers with a checkpoint or a replay machine's champion model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from workbench.cli._app import app
from workbench.cli._render import console, err_console, json_option, progress_bars, render
from workbench.errors import WorkbenchError


@app.command("denoise", rich_help_panel="Restore")
def denoise(
    inputs: list[Path] = typer.Argument(..., metavar="INPUT...",
                                        help="Transfers to restore (WAV, BWF, RF64, W64, FLAC or AIFF, any rate), or folders of them: "
                                             "their outputs keep the folder layout under --out."),
    model: str | None = typer.Option(None, "--model", metavar="REF",
                                     help="A checkpoint (X.safetensors with X.json beside it) or an MLflow model "
                                          "URI: models:/NAME@ALIAS or models:/NAME/VERSION."),
    device: str | None = typer.Option(None, "--device", metavar="ID",
                                      help="Use this replay machine's champion: models:/tape-denoiser-ID@champion "
                                           "(while it has none, the general model @base, said on stderr)."),
    out: Path = typer.Option(Path("denoised"), "--out", metavar="DIR", show_default=False,
                             help="Folder for the restored copies, named STEM.denoised.SUFFIX "
                                  "(default: ./denoised in the current folder, created if missing)."),
    output: Path | None = typer.Option(None, "--output", "-o", metavar="FILE",
                                       help="Exact output file (one input only); instead of --out."),
    strength: float | None = typer.Option(None, "--strength", min=0.0, max=1.0, metavar="0..1",
                                          help="0..1: how much of the noise the model found is removed "
                                               "(default: 1, all of it)."),
    reduction_db: float | None = typer.Option(None, "--reduction-db", metavar="DB", min=0.0,
                                              help="Instead of --strength: lower the noise by DB decibels "
                                                   "(strength = 1 − 10^(−DB/20); 6 dB ≈ 0.5, 20 dB = 0.9)."),
    format: str | None = typer.Option(None, "--format", metavar="F",
                                      help="Output container: WAV, RF64, W64, FLAC or AIFF (default: the input's)."),
    subtype: str | None = typer.Option(None, "--subtype", metavar="S",
                                       help="Output sample type, e.g. PCM_16, PCM_24, FLOAT (default: the input's)."),
    chunk_seconds: float = typer.Option(5.0, "--chunk-seconds", min=0.1,
                                        help="Length of the pieces the model sees (rounded to its grid)."),
    accelerator: str = typer.Option("auto", "--accelerator", metavar="TORCH_DEVICE",
                                    help="Where the network runs: auto (CUDA, bf16, when torch sees a GPU), cpu, "
                                         "cuda, cuda:1."),
    precision: str = typer.Option("auto", "--precision", metavar="P",
                                  help="The network's arithmetic: auto (bf16 on a GPU, float32 on the CPU), "
                                       "float32, or bf16 (on a CPU with AMX, the paper size over twice as fast; "
                                       "its output about 1 % RMS from float32's, 0.1-0.2 dB less ΔSNR)."),
    batch: int | None = typer.Option(None, "--batch", min=1, metavar="N",
                                     help="Chunks per forward pass of the network (default: as many as fit "
                                          "1 GiB on the CPU, 60 % of free GPU memory); the output does not "
                                          "depend on it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs that already exist."),
    as_json: bool = json_option("the provenance records"),
) -> None:
    """Restore transfers of any length with a denoising model, keeping every sample accounted for.

    Examples:

        workbench denoise --device revox-a77 transfers/reel-041.wav --out restored/
        workbench denoise --model models:/tape-denoiser-revox-a77/3 --reduction-db 12 side-a.flac
        workbench denoise --model general.safetensors --strength 0.7 -o take1.clean.wav take1.wav

    Files stream from disk block by block, so hours-long transfers need no more memory than short ones.
    The model works at 44.1 kHz; the noise it removes is taken back to the input's rate and subtracted
    from the original samples, so the output keeps the input's sample rate, every channel, its exact
    length and (unless --format/--subtype) its format and sample type; content above 22 kHz in a
    high-rate transfer passes through untouched. --strength below 1 (or --reduction-db) leaves part of
    the removed noise in, as archivists often prefer.

    Source recordings are never written to: an output that would replace an input is refused, and so
    is an existing output unless --overwrite, or unless an earlier run finished it from the same input,
    model and settings (then it is kept: an interrupted folder is finished by running the command
    again). NaN or infinite samples, in the input or the model's output, refuse the file. Each output
    appears only when complete, with a provenance
    record beside it (OUTPUT.json: model name, version, URI and checkpoint sha256, settings, input and
    output sha256, software versions, time, compute device, real-time factor). Every input is checked
    and the model loaded before anything is written.
    """
    from workbench.denoise import denoise_files, strength_from_reduction_db

    if (model is None) == (device is None):
        raise WorkbenchError("give a model: either --model REF or --device ID (not both)")
    if strength is not None and reduction_db is not None:
        raise WorkbenchError("give either --strength or --reduction-db, not both")
    if reduction_db is not None:
        strength = strength_from_reduction_db(reduction_db)
    with progress_bars() as progress:
        records = denoise_files(inputs, model_ref=model, device_id=device, out_dir=out, output=output,
                                strength=1.0 if strength is None else strength, chunk_seconds=chunk_seconds,
                                format=format, subtype=subtype, accelerator=accelerator, overwrite=overwrite,
                                batch=batch, precision=precision, progress=progress)
    note = records[0]["model"].get("note") if records else None
    if note:  # on stderr, so that --json's stdout stays clean; the sidecars keep it too
        err_console.print(note, soft_wrap=True, markup=False, highlight=False)
    render(records, as_json, _show_records)


def _show_records(records: list[dict]) -> None:
    table = Table(title="denoise")
    for column in ("input", "output", "rate", "ch", "length", "real time ×", "clipped"):
        table.add_column(column, justify="left" if column in ("input", "output") else "right")
    for record in records:
        source, result = record["input"], record["output"]
        table.add_row(Path(source["path"]).name, _shown(result["path"]), f"{result['sample_rate']} Hz",
                      str(result["channels"]), f"{source['seconds']:.1f} s", f"{record['real_time_factor']:.1f}",
                      str(result["clipped_samples"]))
    console.print(table)
    model_record = records[0]["model"] if records else {}
    name = model_record.get("uri") or model_record.get("checkpoint")
    console.print(f"model {name} (sha256 {str(model_record.get('checkpoint_sha256'))[:12]}…); "
                  f"provenance beside each output as OUTPUT.json")


def _shown(path: str) -> str:
    """A path relative to the current folder when it lies below it (shorter in a table)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path
