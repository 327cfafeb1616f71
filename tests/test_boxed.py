"""The general checkpoint in the box: it loads with its card, the card describes it, and `workbench init`
registers it as tape-denoiser-general@base (once)."""

from __future__ import annotations

import json
import shutil

import pytest

from workbench import model_registry, tracking
from workbench.errors import WorkbenchError
from workbench.model.boxed import BOXED_CHECKPOINT, BOXED_TAG, CARD_FILE, load_card, register_boxed_general
from workbench.model.checkpoint import load_checkpoint, read_checkpoint_info
from workbench.model.unet import count_parameters, get_config
from workbench.recipes import load_recipe, recipe_digest
from workbench.workspace import Workspace

DEMO_TARGET = "technics-tr575-a"  # the deck the demo and benchmarks/machine_fit.py fine-tune on


def test_boxed_checkpoint_loads_with_its_card():
    card = load_card()
    model, info = load_checkpoint(BOXED_CHECKPOINT)
    assert info["weights_sha256"] == card["weights_sha256"]
    assert model.config == get_config(card["size"]) and count_parameters(model.config) == card["parameters"]
    assert BOXED_CHECKPOINT.stat().st_size < 5_000_000  # a few MB at most: it travels in the repository
    # The recipe committed beside it is the one that trained it, and its data never held the demo's deck.
    recipe = load_recipe(card["recipe"]["name"])
    assert recipe_digest(recipe) == card["recipe"]["digest"] == info["lineage"]["recipe_digest"]
    assert card["data"]["devices"] == info["lineage"]["devices"] == recipe["data"]["devices"]
    assert DEMO_TARGET not in card["data"]["devices"]
    assert card["data"]["noise_digest"] == info["lineage"]["noise_digest"]
    assert card["steps"] == info["lineage"]["steps"] > 0 and card["training"]["seconds"] > 0
    # Its evaluation covers every machine it heard and at least one it never heard, at 10 and 16 dB.
    rows = card["evaluation"]["machines"]
    assert {r["machine"] for r in rows if r["seen"]} == set(card["data"]["devices"])
    assert any(not r["seen"] and r["machine"].startswith(DEMO_TARGET) for r in rows)
    for row in rows:
        assert set(row["by_snr"]) == {"10", "16"}
        for cell in row["by_snr"].values():
            for metric in ("delta_snr_db", "delta_si_sdr_db"):
                value = cell[metric]
                assert value["ci_low"] <= value["mean"] <= value["ci_high"] and value["n"] >= 2


def test_a_card_that_does_not_match_its_weights_is_refused(tmp_path):
    for path in (BOXED_CHECKPOINT, BOXED_CHECKPOINT.with_suffix(".json"), CARD_FILE):
        shutil.copy(path, tmp_path / path.name)
    card = json.loads(CARD_FILE.read_text())
    (tmp_path / CARD_FILE.name).write_text(json.dumps({**card, "weights_sha256": "0" * 64}))
    with pytest.raises(WorkbenchError, match="card.json: describes weights 0000"):
        load_card(tmp_path / CARD_FILE.name)


def test_init_registers_the_boxed_model_as_base_once(tmp_path, cli, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = cli("init", tmp_path / "archive")
    assert result.code == 0, result.stderr
    assert "tape-denoiser-general version 1 (@base)" in " ".join(result.stdout.split())
    workspace = Workspace(tmp_path / "archive")
    assert model_registry.get_alias_version(model_registry.GENERAL_MODEL, "base", workspace) == 1
    version = tracking.client(workspace).get_model_version(model_registry.GENERAL_MODEL, "1")
    assert version.tags[BOXED_TAG] == read_checkpoint_info(BOXED_CHECKPOINT)["weights_sha256"]
    again = register_boxed_general(workspace)
    assert again.reused and again.version == 1
    assert model_registry.latest_version(model_registry.GENERAL_MODEL, workspace) == 1

    bare = cli("init", tmp_path / "bare", "--no-general-model")
    assert bare.code == 0, bare.stderr
    assert not (Workspace(tmp_path / "bare").registry / "mlflow.db").exists()  # nothing was registered there
