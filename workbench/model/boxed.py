"""The general tape-noise checkpoint that ships in the box (models/general/), and its registration.

`models/general/general.safetensors` (+ `general.json`, the checkpoint sidecar) was trained with the
project's own `workbench pretrain --recipe general` (recipes/general.toml); `card.json` beside it is its
model card as data (recipe and its digest, data digests, steps, training time, hardware, and ΔSNR /
ΔSI-SDR per machine from the project's own evaluation) and `MODEL_CARD.md` the same for people.

`register_boxed_general(workspace)` registers it as `tape-denoiser-general` with the alias `base` (what
`workbench finetune` starts from), in seconds and without training: `workbench init` and the demo call
it. It is idempotent: a workspace whose general model already holds these exact weights (same sha256) is
left as it is. Archives that train their own general model still use `workbench pretrain`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workbench import tracking
from workbench.errors import WorkbenchError
from workbench.model_registry import (
    BASE_ALIAS,
    GENERAL_MODEL,
    get_alias_version,
    register_checkpoint_file,
    set_alias,
)
from workbench.model_registry.names import TAG_KIND, TAG_RECIPE, TAG_RECIPE_DIGEST
from workbench.workspace import PACKAGE_ROOT, Workspace

BOXED_DIR = PACKAGE_ROOT.parent / "models" / "general"
BOXED_CHECKPOINT = BOXED_DIR / "general.safetensors"
CARD_FILE = BOXED_DIR / "card.json"
# Version tags of the boxed model: BOXED_TAG holds the weights' sha256, how a rerun knows it is registered.
BOXED_TAG = "boxed_sha256"
TAG_BOXED = "boxed"
TAG_STEPS = "steps"
TAG_DEVICES = "devices"
TAG_NOISE_DIGEST = "noise_digest"
TAG_CORPUS_DIGEST = "corpus_digest"


@dataclass
class BoxedRegistration:
    version: int
    reused: bool  # the workspace already had these weights registered
    alias: str | None
    card: dict

    def summary(self) -> str:
        steps, recipe = self.card.get("steps"), self.card.get("recipe", {}).get("name")
        start = self.card.get("start_from")
        if start:  # continued from an earlier model: the steps of both
            steps = f"{start.get('steps')} + {steps}"
        where = "already registered as" if self.reused else "registered as"
        alias = f" (@{self.alias})" if self.alias else ""
        return (f"the boxed general model (recipe {recipe}, {steps} steps) {where} "
                f"{GENERAL_MODEL} version {self.version}{alias}")


def load_card(card_path: Path = CARD_FILE) -> dict:
    """The boxed checkpoint's model card (card.json), checked against the weights it describes."""
    from workbench.model.checkpoint import read_checkpoint_info

    if not card_path.is_file():
        raise WorkbenchError(f"{card_path}: the boxed general model's card is missing (a broken install?)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WorkbenchError(f"{card_path}: not a readable model card ({error})") from None
    info = read_checkpoint_info(card_path.parent / card["checkpoint"])
    if info.get("weights_sha256") != card.get("weights_sha256"):
        raise WorkbenchError(f"{card_path}: describes weights {card.get('weights_sha256')} but "
                             f"{card['checkpoint']} holds {info.get('weights_sha256')}")
    return card


def _registered_version(workspace: Workspace, sha256: str) -> int | None:
    """The version of the general model that holds these weights, if any."""
    # A model not registered yet has no versions: MLflow's search answers [] (no "not found" to catch).
    versions = tracking.client(workspace).search_model_versions(f"name = '{GENERAL_MODEL}'", max_results=1000)
    matching = [int(v.version) for v in versions if (v.tags or {}).get(BOXED_TAG) == sha256]
    return max(matching, default=None)


def register_boxed_general(workspace: Workspace, alias: str | None = BASE_ALIAS, card_path: Path = CARD_FILE
                           ) -> BoxedRegistration:
    """Register the boxed checkpoint as tape-denoiser-general (alias `base`), or find it registered."""
    card = load_card(card_path)
    sha256 = card["weights_sha256"]
    version = _registered_version(workspace, sha256)
    reused = version is not None
    if version is None:
        version = register_checkpoint_file(workspace, card_path.parent / card["checkpoint"],
                                           name=GENERAL_MODEL, description=card_description(card))
        registry = tracking.client(workspace)
        tags = {BOXED_TAG: sha256, TAG_KIND: "pretrain", TAG_BOXED: "true", TAG_RECIPE: card["recipe"]["name"],
                TAG_RECIPE_DIGEST: card["recipe"]["digest"], TAG_STEPS: card["steps"],
                TAG_DEVICES: ",".join(card["data"]["devices"]), TAG_NOISE_DIGEST: card["data"]["noise_digest"],
                TAG_CORPUS_DIGEST: card["data"]["corpus_digest"]}
        for key, value in tags.items():
            registry.set_model_version_tag(GENERAL_MODEL, str(version), key, str(value))
    # A fresh registration takes the alias; a found one takes it only if nothing holds it (an archive that
    # moved @base to its own general model keeps it there).
    if alias and (not reused or get_alias_version(GENERAL_MODEL, alias, workspace) is None):
        set_alias(GENERAL_MODEL, alias, version, workspace)
    return BoxedRegistration(version, reused, alias, card)


def card_description(card: dict) -> str:
    """The registered version's description: where the weights came from and what they score."""
    rows = "; ".join(
        f"{row['machine']} ({'trained on' if row['seen'] else 'unseen'}): "
        + ", ".join(f"{snr} dB {cell['delta_snr_db']['mean']:+.2f}" for snr, cell in row["by_snr"].items())
        for row in card.get("evaluation", {}).get("machines", []))
    return (f"The boxed general tape-noise model (models/general/), from `workbench pretrain --recipe "
            f"{card['recipe']['name']}` ({card['size']} size, {card['steps']} steps, {card['training']['seconds'] / 60:.0f} "
            f"min on {card['training']['hardware']}"
            + (f"; continued from the weights {card['start_from']['weights_sha256'][:12]}…, recipe "
               f"{card['start_from']['recipe']}, {card['start_from']['steps']} steps" if card.get("start_from") else "")
            + f"), on the noise of {', '.join(card['data']['devices'])}. "
            f"ΔSNR by input SNR on each machine's test noise: {rows}.")
