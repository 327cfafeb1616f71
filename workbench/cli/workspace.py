"""`workbench init` and `workbench devices list|show|add`: the workspace and its device registry."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.table import Table

from workbench.cli._app import app
from workbench.cli._render import console, json_option, render
from workbench.devices import Device, format_speed, get_device, load_devices, playback_eq_by_speed, write_device
from workbench.workspace import find_workspace, init_workspace

devices_app = typer.Typer(help="The archive's replay machines: the device registry (registry/devices/ID.toml).",
                          no_args_is_help=True)
app.add_typer(devices_app, name="devices", rich_help_panel="Set-up")


@app.command("init", rich_help_panel="Set-up")
def init(
    directory: Path = typer.Argument(..., help="Folder for the new workspace (created if missing)."),
    research_devices: bool = typer.Option(False, "--research-devices",
                                          help="Pre-fill the device registry with the research data set's seven machines."),
    general_model: bool = typer.Option(True, "--general-model/--no-general-model",
                                       help="Register the boxed general model as tape-denoiser-general@base "
                                            "(models/general/; --no-general-model to pretrain your own)."),
) -> None:
    """Create a fresh workspace for another archive: registry/devices/ plus git-ignored stores, and the
    boxed general tape-noise model registered as the base every device model is fine-tuned from."""
    workspace = init_workspace(directory, with_research_devices=research_devices)
    console.print(f"workspace created at [bold]{workspace.root}[/]; add machines with `workbench devices add`")
    if general_model:
        from workbench.model.boxed import register_boxed_general

        console.print(register_boxed_general(workspace, alias="base").summary(), highlight=False)


@devices_app.command("list")
def devices_list(as_json: bool = json_option("the machines")) -> None:
    """Every registered replay machine with its format and speeds."""
    render([asdict(d) for d in load_devices(find_workspace()).values()], as_json, _show_devices)


def _show_devices(devices: list[dict]) -> None:
    table = Table(title="Replay machines")
    for column in ("id", "make", "model", "format", "tracks", "speeds (ips)"):
        table.add_column(column)
    for d in devices:
        table.add_row(d["id"], d["make"], d["model"], d["format"], d["tracks"],
                      ", ".join(format_speed(s) for s in d["speeds_ips"]))
    console.print(table)


@devices_app.command("show")
def devices_show(
    device_id: str = typer.Argument(..., metavar="ID", help="Device id, e.g. revox-a77."),
    as_json: bool = json_option("the machine's entry"),
) -> None:
    """One machine's full entry, including its playback EQ per speed."""
    device = get_device(find_workspace(), device_id)
    render(asdict(device), as_json, lambda _: _show_device(device))


def _show_device(device: Device) -> None:
    table = Table(title=device.id, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in ("make", "model", "format", "tracks", "channels", "notes"):
        table.add_row(key, str(getattr(device, key)))
    for speed in device.speeds_ips:
        table.add_row(f"{format_speed(speed)} ips", device.playback_eq.get(format_speed(speed), "EQ unknown"))
    for key, value in device.simulation.items():
        table.add_row(f"simulation.{key}", str(value))
    console.print(table)


@devices_app.command("add")
def devices_add(
    device_id: str = typer.Argument(..., metavar="ID", help="A slug: lowercase letters, digits and hyphens."),
    make: str = typer.Option(..., help="Manufacturer, e.g. Studer."),
    model: str = typer.Option(..., help="Model, e.g. A807."),
    format: str = typer.Option(..., "--format", help='1/4" reel, 1/2" reel, 1" reel, 2" reel, cassette or microcassette.'),
    speed: list[float] = typer.Option(..., "--speed", help="A speed in ips; repeat for each speed."),
    eq: list[str] = typer.Option([], "--eq", help="Playback EQ per speed as SPEED=CURVE, e.g. '7.5=NAB 3180+50 µs'."),
    channels: int = typer.Option(2, help="Channels the machine plays back."),
    tracks: str = typer.Option("", help="Track format, e.g. half-track stereo."),
    notes: str = typer.Option("", help="Anything an engineer should know."),
) -> None:
    """Register a replay machine (validated) in the device registry (registry/devices/ID.toml)."""
    device = Device(device_id, make, model, format, list(speed), channels, tracks, playback_eq_by_speed(eq), notes)
    path = write_device(find_workspace(), device)
    console.print(f"registered [bold]{device.id}[/] in {path}")
