"""Placeholder: this area's commands are being written."""

from workbench.cli._app import app  # noqa: F401
