"""The MLflow model registry, in one place: what the models are called, how a checkpoint becomes a
registered version, how a reference becomes a local checkpoint, and how people browse them.

    names.py          names, aliases, version-tag keys, descriptions, model URIs (imports nothing heavy)
    register.py       register_checkpoint / register_checkpoint_file, set_alias, get_alias_version, latest_version
    resolve.py        the one resolver: file, models:/ URI, other artifact URI or device champion -> checkpoint
    browse.py         `models list`, `models show DEVICE`, the `ui` server's command line
    device_models.py  registering a fine-tuned device model: finetune's last step, and what a rerun finds

Experiment and run tracking (the store, runs, metrics, lineage) is `workbench.tracking`.
"""

from workbench.model_registry.browse import list_models, show_model, ui_command
from workbench.model_registry.names import (
    BASE_ALIAS,
    CACHE_DIR,
    CHAMPION,
    GENERAL_BASE_URI,
    GENERAL_MODEL,
    MODEL_PREFIX,
    TAG_DEVICE,
    TAG_GATE,
    TAG_PROMOTED,
    TAG_REPORT,
    TAG_SPEEDS,
    champion_uri,
    delta_peaq_tag,
    delta_snr_tag,
    device_model_name,
    is_model_uri,
    model_uri,
)
from workbench.model_registry.register import (
    get_alias_version,
    is_not_found,
    latest_version,
    register_checkpoint,
    register_checkpoint_file,
    set_alias,
)
from workbench.model_registry.resolve import (
    fetch_checkpoint,
    load_device_model,
    load_model,
    resolve_base,
    resolve_checkpoint,
    resolve_model_version,
)

__all__ = [
    "BASE_ALIAS", "CACHE_DIR", "CHAMPION", "GENERAL_BASE_URI", "GENERAL_MODEL", "MODEL_PREFIX", "TAG_DEVICE",
    "TAG_GATE", "TAG_PROMOTED", "TAG_REPORT", "TAG_SPEEDS", "champion_uri", "delta_peaq_tag", "delta_snr_tag",
    "device_model_name", "fetch_checkpoint", "get_alias_version", "is_model_uri", "is_not_found", "latest_version",
    "list_models", "load_device_model", "load_model", "model_uri", "register_checkpoint", "register_checkpoint_file",
    "resolve_base", "resolve_checkpoint", "resolve_model_version", "set_alias", "show_model", "ui_command",
]
