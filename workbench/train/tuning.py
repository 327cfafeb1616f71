"""Optuna for fine-tuning: the search space as recipe data, studies in any storage, pruning, resumption.

The recipe's `[finetune.search]` table lists what a trial may change, each entry named by the recipe key
it overrides and giving its distribution:

    [finetune.search]
    "schedule.learning_rate" = { type = "float", low = 1e-5, high = 1e-3, log = true }
    "schedule.shape"         = { type = "categorical", choices = ["constant", "cosine"] }
    "finetune.freeze"        = { type = "categorical", choices = ["none", "encoders", "stage1"] }

Keys of `[schedule]` and `[data]` (e.g. `data.snr_db.low`) override the recipe; `finetune.freeze` (layer
groups that stay frozen, joined by "+") and `finetune.l2sp_alpha` (the pull toward the base weights) go
to the training loop. `[finetune.pruner]` picks Optuna's median or Hyperband pruner; the sampler is TPE
seeded from the recipe.

A study lives in the workspace's SQLite file, in any SQLAlchemy URL (PostgreSQL for many hosts) or in a
journal file (`journal:PATH`); `load_if_exists` lets several processes share it, and the target number
of trials counts finished trials of the whole study (MaxTrialsCallback), so re-running the command after
an interruption runs only what is missing. A trial whose process died leaves it RUNNING: on the next
start, such trials of dead processes on this host (and, for database storages, any whose heartbeat
stopped) are marked failed and their parameters enqueued again; the retry continues from the trial's
saved training state.

Several workers (processes, GPUs, hosts) share a study in PostgreSQL: each starts trials only while the
study is short of its target, waits for its peers' last trials (the heartbeat, every 30 s with a 120 s
grace unless WORKBENCH_HEARTBEAT_S / WORKBENCH_HEARTBEAT_GRACE_S say otherwise, fails those of a dead
worker and a live one retries them), and what must happen once per study is done under `study_lock`.

The fine-tuning study itself (`open_plan_study`, `tune`, `trial_objective`) runs a plan of
`workbench.finetune`: each trial trains the base (`train_with_params`) on the machine's train noise and
reports validation ΔSNR on its fixed validation mixtures (`validation_mixtures`) to the pruner, as a
nested MLflow run under the study's run (`study_run`). Only Optuna's public API is used: another
process's trial is failed through the public storage API of the storage `open_storage` opened.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import inspect
import json
import math
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from workbench import tracking
from workbench.errors import WorkbenchError
from workbench.evaluate.report import BASELINE_ATTR
from workbench.progress import Progress, no_progress
from workbench.recipes import DEFAULTS, apply_overrides
from workbench.train.data import Mixtures, TrainingExamples, recipe_validation_mixtures
from workbench.train.loop import PARAMETER_GROUPS, Schedule, read_state, train, uses_bf16, validate

if TYPE_CHECKING:  # the plan is finetune's, and finetune imports this module
    from workbench.finetune import Plan

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
DIMENSION_TYPES = ("float", "int", "categorical")
FINETUNE_KEYS = ("freeze", "l2sp_alpha")  # [finetune] keys a trial may set; the loop's Schedule takes them
FREEZE_NONE = "none"
PRUNERS = ("median", "hyperband", "none")
# Database storages beat every HEARTBEAT_S seconds; a RUNNING trial silent for GRACE_S is taken as dead.
# The environment variables change both for a deployment (a longer grace on hosts that stall; the tests
# use seconds).
HEARTBEAT_S = 30
GRACE_S = 120
HEARTBEAT_ENV = "WORKBENCH_HEARTBEAT_S"
GRACE_ENV = "WORKBENCH_HEARTBEAT_GRACE_S"
PEER_POLL_S = 1.0  # how often a worker that ran out of trials to start looks at its peers' running trials
# SQLite waits this long for another process's write (two `finetune` workers on one machine share the
# file); the driver's default of 5 s is too short beside a busy trainer on a loaded machine.
SQLITE_ENGINE = {"connect_args": {"timeout": 60}}
SCHEMA_RACE_ATTEMPTS = 5
WORKER_ATTR = "worker"
RETRY_OF_ATTR = "retry_of"
INTERRUPTED_ATTR = "interrupted"

DEFAULT_FINETUNE: dict[str, Any] = {
    "trials": 20,  # finished (completed or pruned) trials the study should reach
    "timeout": "",  # stop starting new trials after this long ("90s", "20m", "2h"; "" = no limit)
    "seed": 0,  # TPE sampler seed
    "validate_every": 0,  # report validation ΔSNR to the pruner every N steps (0 = [schedule] validate_every)
    "freeze": [],  # layer groups that stay frozen unless the search says otherwise
    "l2sp_alpha": 0.0,  # L2-SP weight unless the search says otherwise
    "hum_template": False,  # learn the machine's hum from its TRAIN noise, cancel it before the network
    "search": {},
    "pruner": {},
}
DEFAULT_PRUNER: dict[str, Any] = {"type": "median"}


# ------------------------------------------------------------------------------------------ search space

@dataclass(frozen=True)
class Dimension:
    """One searched recipe key and its distribution."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial):
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.name, list(self.choices))


def _flatten_search(table: dict, prefix: str = "") -> dict[str, dict]:
    """Accept both `"schedule.steps" = {...}` and nested `[finetune.search.schedule] steps = {...}`."""
    flat: dict[str, dict] = {}
    for key, value in table.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and "type" not in value:
            flat |= _flatten_search(value, name)
        else:
            flat[name] = value
    return flat


def _check_target(name: str, source: str) -> None:
    """A searched key must name something a trial can change."""
    section, _, rest = name.partition(".")
    if section == "finetune":
        if rest not in FINETUNE_KEYS:
            raise WorkbenchError(f"{source}: [finetune.search] {name}: a trial can set finetune.{' or finetune.'.join(FINETUNE_KEYS)}")
        return
    if section not in ("schedule", "data"):
        raise WorkbenchError(f"{source}: [finetune.search] {name}: searched keys start with schedule., data. or finetune.")
    node: Any = DEFAULTS[section]
    for part in rest.split("."):
        if not isinstance(node, dict) or part not in node:
            raise WorkbenchError(f"{source}: [finetune.search] {name}: [{section}] has no key {rest!r}")
        node = node[part]
    if isinstance(node, dict):
        raise WorkbenchError(f"{source}: [finetune.search] {name}: search its entries ({', '.join(f'{name}.{k}' for k in node)})")


def search_space(recipe: dict) -> list[Dimension]:
    """The recipe's [finetune.search] as validated dimensions (one-line errors name the key)."""
    source = recipe.get("source", "recipe")
    table = recipe.get("finetune", {}).get("search", {})
    if not isinstance(table, dict):
        raise WorkbenchError(f"{source}: [finetune.search] must be a table")
    dimensions = []
    for name, spec in sorted(_flatten_search(table).items()):
        where = f"{source}: [finetune.search] {name}"
        if not isinstance(spec, dict):
            raise WorkbenchError(f'{where} must be a table like {{ type = "float", low = 1e-5, high = 1e-3, log = true }}')
        _check_target(name, source)
        kind = spec.get("type")
        if kind not in DIMENSION_TYPES:
            raise WorkbenchError(f"{where}: type must be one of {', '.join(DIMENSION_TYPES)} (got {kind!r})")
        allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
        unknown = set(spec) - allowed
        if unknown:
            raise WorkbenchError(f"{where}: unknown key {sorted(unknown)[0]!r} for a {kind} (known: {', '.join(sorted(allowed))})")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices or not all(
                    isinstance(c, (str, int, float, bool)) for c in choices):
                raise WorkbenchError(f"{where}: choices must be a non-empty list of strings or numbers")
            if name == "finetune.freeze":
                for choice in choices:
                    freeze_groups(str(choice), where)
            dimensions.append(Dimension(name, kind, choices=tuple(choices)))
            continue
        low, high = spec.get("low"), spec.get("high")
        numbers = (int,) if kind == "int" else (int, float)
        if not all(isinstance(v, numbers) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
            raise WorkbenchError(f"{where}: low and high must be {'integers' if kind == 'int' else 'numbers'} (got {low!r}, {high!r})")
        if low > high:
            raise WorkbenchError(f"{where}: low ({low}) is above high ({high})")
        log, step = bool(spec.get("log", False)), spec.get("step")
        if log and low <= 0:
            raise WorkbenchError(f"{where}: a log scale needs low > 0 (got {low})")
        if log and step is not None:
            raise WorkbenchError(f"{where}: use either log or step, not both")
        if step is not None and not (isinstance(step, numbers) and not isinstance(step, bool) and step > 0):
            raise WorkbenchError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'} (got {step!r})")
        dimensions.append(Dimension(name, kind, float(low) if kind == "float" else int(low),
                                    float(high) if kind == "float" else int(high), log, step))
    return dimensions


def freeze_groups(value: str | list, where: str = "finetune.freeze") -> tuple[str, ...]:
    """"encoders+bottlenecks" (or a list, or "none") as a tuple of the loop's parameter group names."""
    if isinstance(value, str):
        names = [] if value.strip() in ("", FREEZE_NONE) else [v.strip() for v in value.split("+")]
    else:
        names = [str(v) for v in value]
    for name in names:
        if name not in PARAMETER_GROUPS:
            raise WorkbenchError(f"{where}: unknown layer group {name!r} (known: {', '.join(PARAMETER_GROUPS)}, or none)")
    return tuple(names)


# ------------------------------------------------------------------------------------------ settings

def parse_duration(text: str | int | float | None, where: str = "--timeout") -> float | None:
    """"90", "90s", "20m", "1.5h", "1h30m" -> seconds; "" or None -> None (no limit)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", str(text))
        if not match or not any(match.groups()):
            raise WorkbenchError(f"{where}: {text!r} is not a duration (like 90s, 20m, 2h, 1h30m)")
        hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    if seconds <= 0:
        raise WorkbenchError(f"{where}: the duration must be positive (got {text!r})")
    return seconds


@dataclass(frozen=True)
class FinetuneSettings:
    trials: int
    timeout_s: float | None
    seed: int
    validate_every: int
    freeze: tuple[str, ...]
    l2sp_alpha: float
    hum_template: bool = False
    dimensions: list[Dimension] = field(default_factory=list)
    pruner: dict = field(default_factory=dict)


def finetune_settings(recipe: dict) -> FinetuneSettings:
    """The recipe's [finetune] section with defaults, validated."""
    source = recipe.get("source", "recipe")
    section = recipe.get("finetune", {})
    unknown = set(section) - set(DEFAULT_FINETUNE)
    if unknown:
        raise WorkbenchError(f"{source}: unknown key [finetune] {sorted(unknown)[0]} (known: {', '.join(DEFAULT_FINETUNE)})")
    merged = {**DEFAULT_FINETUNE, **section}
    for key in ("trials", "seed", "validate_every"):
        value = merged[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "trials" else 0):
            raise WorkbenchError(f"{source}: [finetune] {key} must be an integer >= {1 if key == 'trials' else 0} (got {value!r})")
    alpha = merged["l2sp_alpha"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha < 0:
        raise WorkbenchError(f"{source}: [finetune] l2sp_alpha must be a number >= 0 (got {alpha!r})")
    if not isinstance(merged["hum_template"], bool):
        raise WorkbenchError(f"{source}: [finetune] hum_template must be true or false (got {merged['hum_template']!r})")
    pruner = {**DEFAULT_PRUNER, **merged["pruner"]}
    if pruner["type"] not in PRUNERS:
        raise WorkbenchError(f"{source}: [finetune.pruner] type must be one of {', '.join(PRUNERS)} (got {pruner['type']!r})")
    make_pruner(pruner, source)  # validates its arguments
    validate_every = merged["validate_every"] or int(recipe["schedule"]["validate_every"])
    return FinetuneSettings(
        trials=merged["trials"], timeout_s=parse_duration(merged["timeout"], f"{source}: [finetune] timeout"),
        seed=merged["seed"], validate_every=validate_every,
        freeze=freeze_groups(merged["freeze"], f"{source}: [finetune] freeze"), l2sp_alpha=float(alpha),
        hum_template=merged["hum_template"],
        dimensions=search_space(recipe), pruner=pruner)


def make_pruner(spec: dict, source: str = "recipe") -> optuna.pruners.BasePruner:
    """Optuna's MedianPruner or HyperbandPruner (or none) with the recipe's arguments."""
    kind = spec.get("type", "median")
    if kind == "none":
        return optuna.pruners.NopPruner()
    cls = optuna.pruners.MedianPruner if kind == "median" else optuna.pruners.HyperbandPruner
    arguments = {k: v for k, v in spec.items() if k != "type"}
    known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in arguments:
        if key not in known:
            raise WorkbenchError(f"{source}: [finetune.pruner] {key}: not an argument of the {kind} pruner "
                                 f"(known: {', '.join(known)})")
    try:
        return cls(**arguments)
    except (TypeError, ValueError) as error:
        raise WorkbenchError(f"{source}: [finetune.pruner] {error}") from None


def trial_overrides(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a trial's parameters into recipe overrides ([schedule], [data]) and loop settings ([finetune])."""
    recipe_changes = {k: v for k, v in params.items() if not k.startswith("finetune.")}
    loop_changes = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("finetune.")}
    return recipe_changes, loop_changes


# ------------------------------------------------------------------------------------------ storage

@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def describe_storage(url: str) -> str:
    """The storage URL without a password, for messages and tags."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace) in seconds: the defaults, or the environment's WORKBENCH_HEARTBEAT_S and
    WORKBENCH_HEARTBEAT_GRACE_S."""
    values = {}
    for name, default in ((HEARTBEAT_ENV, HEARTBEAT_S), (GRACE_ENV, GRACE_S)):
        text = os.environ.get(name, "").strip()
        if not text:
            values[name] = default
            continue
        if not text.isdigit() or int(text) < 1:
            raise WorkbenchError(f"{name}={text!r}: must be a whole number of seconds >= 1")
        values[name] = int(text)
    interval, grace = values[HEARTBEAT_ENV], values[GRACE_ENV]
    if grace <= interval:
        raise WorkbenchError(f"{GRACE_ENV}={grace} must be longer than {HEARTBEAT_ENV}={interval} "
                             "(a trial is taken as dead when it missed beats for the whole grace period)")
    return interval, grace


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    """Whether the storage fails the trials of silent workers (`open_storage`'s database storages do)."""
    return isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None


@contextlib.contextmanager
def study_lock(url: str, study_name: str):
    """Mutual exclusion among all the workers of one study, wherever they run: a PostgreSQL advisory
    lock (released by the server if the holder dies), a file lock beside a SQLite database or a journal.

    For what must happen once per study although every worker may try: creating its MLflow run,
    registering its model. Other database storages get no lock (nothing is shared there yet).
    """
    if url.startswith("postgresql"):
        import sqlalchemy  # database storages only: a journal or SQLite study never loads SQLAlchemy here

        key = int.from_bytes(hashlib.sha256(f"workbench-study:{study_name}".encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        finally:
            engine.dispose()
        return
    path = None
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):]).expanduser()
    elif url.startswith("journal:"):
        path = Path(url[len("journal:"):]).expanduser()
    if path is None:
        yield
        return
    name = hashlib.sha256(study_name.encode()).hexdigest()[:12]
    with _file_lock(path.with_name(f"{path.name}.{name}.lock")):
        yield


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: sqlite:///, postgresql://, mysql://... (SQLAlchemy) or journal:PATH.

    Database storages get a heartbeat, so trials of workers that died anywhere are failed and retried.
    Raises a one-line WorkbenchError when the storage cannot be opened or reached.
    """
    shown = describe_storage(url)
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):]).expanduser()
        if not path.parent.is_dir():
            raise WorkbenchError(f"{shown}: cannot open Optuna journal (folder {path.parent} does not exist)")
        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as error:
            raise WorkbenchError(f"{shown}: cannot open Optuna journal ({error.strerror or error})") from None
    if "://" not in url:
        raise WorkbenchError(f"{shown}: not an Optuna storage (use sqlite:///FILE, postgresql://..., or journal:FILE)")
    lock = contextlib.nullcontext()
    if url.startswith("sqlite:///"):
        database = Path(url[len("sqlite:///"):]).expanduser()
        if not database.parent.is_dir():
            raise WorkbenchError(f"{shown}: cannot open Optuna storage (folder {database.parent} does not exist)")
        # Several processes creating a fresh SQLite store at once collide in its schema migration: the
        # first creates it under an exclusive lock, the others wait and find the tables there.
        lock = _file_lock(database.with_name(database.name + ".lock"))
    import sqlalchemy.exc  # database storages only: journal studies never load SQLAlchemy

    interval, grace = heartbeat_settings()
    try:
        for attempt in range(SCHEMA_RACE_ATTEMPTS):
            try:
                with lock, warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5; we need them
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        url, heartbeat_interval=interval, grace_period=grace,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
                        engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else SQLITE_ENGINE)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as error:
                # Workers started together on a fresh server database race to create Optuna's tables
                # (PostgreSQL: a duplicate key in pg_type, or "relation ... already exists" when the other
                # worker's CREATE TABLE committed first); the loser finds them there on the next try.
                lost_race = isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error)
                if not lost_race or attempt == SCHEMA_RACE_ATTEMPTS - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
    except ImportError:
        scheme = url.split("://", 1)[0]
        raise WorkbenchError(f"{shown}: cannot open Optuna storage (no database driver for {scheme} is installed; "
                             f"install its SQLAlchemy driver, e.g. psycopg[binary] for postgresql)") from None
    except Exception as error:  # SQLAlchemy's errors (unreachable host, refused login, bad URL) vary by driver
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise WorkbenchError(f"{shown}: cannot open Optuna storage ({type(error).__name__}: {reason})") from None


# ------------------------------------------------------------------------------------------ workers

def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (Linux /proc), so a recycled pid is not taken for the old one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of stat: starttime
    except (OSError, IndexError):
        return None


def worker_identity() -> dict[str, Any]:
    """Who runs a trial: host, pid and the process's start time."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid)}


def _is_alive(worker: dict) -> bool:
    if worker.get("host") != socket.gethostname():
        return True  # another host's worker: only a heartbeat can tell
    pid = int(worker.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _process_start(pid)
    return started is None or worker.get("start") is None or started == worker["start"]


def _heartbeat_retry_of(trial: optuna.trial.FrozenTrial) -> int | None:
    """The trial a heartbeat retry (database storages) re-runs, if it is one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def heartbeat_failed_trials(study: optuna.Study) -> set[int]:
    """The trials the heartbeat failed (their worker went silent) and enqueued again."""
    failed = set()
    for trial in study.get_trials(deepcopy=False):
        retried = _heartbeat_retry_of(trial)
        if retried is not None:
            failed |= {int(n) for n in trial.system_attrs.get("retry_history", [retried])}
    return failed


def root_trial_number(trial: optuna.trial.FrozenTrial) -> int:
    """The first trial of a retry chain: retries share its training folder and so resume its state."""
    if RETRY_OF_ATTR in trial.user_attrs:
        return int(trial.user_attrs[RETRY_OF_ATTR])
    retried = _heartbeat_retry_of(trial)
    return int(retried) if retried is not None else trial.number


def recover_abandoned_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Fail the RUNNING trials of dead processes on this host and re-enqueue interrupted trials once.

    `storage` is the study's own (`open_storage`): another process's trial is marked through Optuna's
    public storage API, by study name and trial number. Returns the numbers of the trials enqueued again.
    """
    trials = study.get_trials(deepcopy=False)
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in trials:
        if trial.state == TrialState.RUNNING and not _is_alive(trial.user_attrs.get(WORKER_ATTR, {})):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, "process died")
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {int(t.user_attrs[RETRY_OF_ATTR]) for t in trials if RETRY_OF_ATTR in t.user_attrs}
    retried |= {n for t in trials if (n := _heartbeat_retry_of(t)) is not None}
    again = []
    for trial in trials:
        root = root_trial_number(trial)
        latest_of_chain = max(t.number for t in trials if root_trial_number(t) == root)
        if (trial.state == TrialState.FAIL and INTERRUPTED_ATTR in trial.user_attrs
                and trial.number == latest_of_chain and trial.number not in retried and trial.params):
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF_ATTR: root}, skip_if_exists=False)
            again.append(trial.number)
    return again


# ------------------------------------------------------------------------------------------ identity

IDENTITY_ATTR = "identity"
IDENTITY_PARTS = {"base": "base model", "recipe": "recipe", "noise": "noise library selection",
                  "corpus": "clean corpus selection"}


def study_identity(*, base: str, recipe: str, noise: str, corpus: str) -> dict[str, str]:
    """What one study's trials are measured on: the base model (its weights' sha256, with its version when
    registered), the recipe's digest, and the digests of the noise and clean music they train and
    validate on. Trials of studies that differ in any of these are not comparable."""
    identity = {"base": base, "recipe": recipe, "noise": noise, "corpus": corpus}
    assert set(identity) == set(IDENTITY_PARTS) and all(identity.values()), identity
    return identity


def identity_digest(identity: dict[str, str]) -> str:
    """A short name for an identity (part of the study's name): the same inputs always give the same one."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def check_identity(study: optuna.Study, identity: dict[str, str], storage_url: str) -> None:
    """Record `identity` on a study that has none; refuse (one line) to join a study that answers another question."""
    recorded = study.user_attrs.get(IDENTITY_ATTR)
    if recorded is None:  # a new study (or one made by hand under this name): it answers this run's question
        study.set_user_attr(IDENTITY_ATTR, identity)
        return
    differs = [f"{IDENTITY_PARTS[key]} ({recorded.get(key)} there, {identity[key]} here)"
               for key in IDENTITY_PARTS if recorded.get(key) != identity[key]]
    if differs:
        raise WorkbenchError(f"{describe_storage(storage_url)}: study {study.study_name} was started with another "
                             f"{'; another '.join(differs)}: its trials do not answer this run's question; delete "
                             "that study or give another --storage to start a new one")


def open_study(name: str, storage_url: str, *, seed: int, pruner: optuna.pruners.BasePruner,
               storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create or join the study `name` (maximising validation ΔSNR) with a seeded TPE sampler, in the
    storage at `storage_url` (or `storage`, the one `open_storage` already opened there)."""
    storage = storage or open_storage(storage_url)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=4)
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=True)
    except ValueError as error:  # e.g. an existing study of that name with another direction
        raise WorkbenchError(f"{describe_storage(storage_url)}: study {name}: {error}") from None
    return study


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def running_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """The stored record of a trial this process runs (its user and retry attributes as the storage has them)."""
    found = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number == number]
    assert len(found) == 1, f"trial {number} of {study.study_name} is not running"
    return found[0]


def run_study(study: optuna.Study, storage: optuna.storages.BaseStorage, objective: Callable[[optuna.Trial], float], *,
              trials: int, timeout_s: float | None = None, callbacks: list | None = None) -> None:
    """Run trials until the study holds `trials` finished ones (all workers together) or time runs out.

    With heartbeats (database storages) a worker starts a trial only while the finished and running
    trials of all workers fall short of the target, so several workers reach it without overshooting;
    one with nothing left to start waits for its peers' running trials. When a peer dies, the heartbeat
    fails its trial and enqueues a retry, which a waiting worker then runs. So every worker returns when
    the study is complete (or its time is up), and all of them have seen the same trials.
    `storage` is the study's (`open_storage`); `callbacks` are Optuna's (called with the study and each
    finished trial)."""
    recover_abandoned_trials(study, storage)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    heartbeat = has_heartbeat(storage)
    # Without heartbeats a dead peer's RUNNING trial would be waited for forever: count finished ones only.
    counted = (*FINISHED, TrialState.RUNNING) if heartbeat else FINISHED

    def tracked(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, worker_identity())
        try:
            return objective(trial)
        except KeyboardInterrupt:
            trial.set_user_attr(INTERRUPTED_ATTR, "Ctrl-C")
            raise
        except Exception as error:  # any failure of the trial is re-raised; only its cause is recorded here
            if tracking.unreachable_server(error) is not None:  # not the trial's fault: the next run retries it
                trial.set_user_attr(INTERRUPTED_ATTR, "tracking server unreachable")
            raise

    while finished_trials(study) < trials:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        if len(study.get_trials(deepcopy=False, states=counted)) < trials:
            # A trial's exception reaches our caller, which reports it in one line; Optuna would log its
            # traceback first.
            verbosity = optuna.logging.get_verbosity()
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            try:
                study.optimize(tracked, n_trials=None, timeout=remaining, gc_after_trial=True,
                               callbacks=[optuna.study.MaxTrialsCallback(trials, states=counted), *(callbacks or [])])
            finally:
                optuna.logging.set_verbosity(verbosity)
            continue
        if not heartbeat:
            return
        time.sleep(PEER_POLL_S)  # the peers' trials still run: wait for them, failing those gone silent
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


# ------------------------------------------------------------------------------------------ the fine-tuning study
# One study per plan (`workbench.finetune.make_plan`): its trials train the base on the machine's train
# noise and are scored on its fixed validation mixtures; each trial is a nested MLflow run under the
# study's run.

STUDY_RUN_ATTR = "mlflow_run_id"  # the study's MLflow run (a study attr), and each trial's (a trial attr)
STUDY_KEY_ATTR = "workbench_key"  # the study's own id: names its training folders


def validation_mixtures(plan: Plan) -> Mixtures:
    """The machine's fixed validation mixtures (the recipe's mixing, never a trial's), built once."""
    return recipe_validation_mixtures(plan.recipe, plan.workspace.mixtures_dir, f"validation-{plan.device.id}",
                                      plan.clean["validation"], plan.noise["validation"])


def trial_schedule(plan: Plan, params: dict):
    """A trial's recipe and Schedule: the recipe with the trial's overrides, the loop's finetune settings."""
    recipe_changes, loop_changes = trial_overrides(params)
    recipe = apply_overrides(plan.recipe, recipe_changes) if recipe_changes else plan.recipe
    freeze = freeze_groups(loop_changes.get("freeze", list(plan.settings.freeze)))
    schedule = Schedule.from_recipe(recipe, validate_every=plan.settings.validate_every, freeze=freeze,
                                    l2sp_alpha=float(loop_changes.get("l2sp_alpha", plan.settings.l2sp_alpha)))
    return recipe, schedule


def train_with_params(plan: Plan, params: dict, run_dir: Path, *, base_model, validation, progress: Progress,
                      stage: str, on_validation=None, log_metrics=None):
    """Train a copy of the base with one trial's parameters (resuming `run_dir` if it holds a state)."""
    recipe, schedule = trial_schedule(plan, params)
    data = recipe["data"]
    examples = TrainingExamples.from_recipe(plan.clean["train"], plan.noise["train"], data)
    model = copy.deepcopy(base_model)
    base_weights = {name: p.detach().clone() for name, p in base_model.named_parameters()} if schedule.l2sp_alpha > 0 else None
    resume = read_state(run_dir) is not None
    return train(model, schedule, examples, validation, run_dir, device=plan.accelerator, resume=resume,
                 num_workers=data["num_workers"], base_weights=base_weights, progress=progress,
                 log_metrics=log_metrics, on_validation=on_validation, stage=stage), model


def trial_objective(plan: Plan, study: optuna.Study, base_model, validation: Mixtures, progress: Progress):
    """The Optuna objective: train one trial's schedule, report validation ΔSNR, prune or return the best."""
    def objective(trial: optuna.Trial) -> float:
        import mlflow  # heavy (≈1.4 s): only a process that runs trials pays for it

        params = {d.name: d.suggest(trial) for d in plan.settings.dimensions}
        run_dir = plan.study_dir / f"trial-{root_trial_number(running_trial(study, trial.number)):04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        saved = read_state(run_dir)
        for record in (saved[1]["history"] if saved else []):  # a retried trial: the pruner sees its past
            trial.report(record["val_delta_snr_db"], record["step"])
        if saved and trial.should_prune():
            raise optuna.TrialPruned(f"on resume, at step {saved[1]['step']}")

        def on_validation(step: int, record: dict) -> bool:
            trial.report(record["val_delta_snr_db"], step)
            return trial.should_prune()

        with tracking.start_run(plan.experiment, run_name=f"trial {trial.number}", nested=True, workspace=plan.workspace,
                                tags={"optuna.study": plan.study_name, "optuna.trial": str(trial.number),
                                      "workbench.kind": "finetune-trial", "run_dir": str(run_dir)}) as run:
            trial.set_user_attr(STUDY_RUN_ATTR, run.info.run_id)
            mlflow.log_params({k: str(v) for k, v in params.items()})
            result, _ = train_with_params(plan, params, run_dir, base_model=base_model, validation=validation,
                                          progress=progress, stage=f"trial {trial.number}", on_validation=on_validation,
                                          log_metrics=tracking.log_metrics)
            pruned = result.stopped == "callback"
            mlflow.set_tags({"optuna.state": "PRUNED" if pruned else "COMPLETE",
                             "training.autocast": result.autocast or "none"})
            if not pruned:
                mlflow.log_metrics({"best_val_delta_snr_db": result.best["val_delta_snr_db"],
                                    "best_val_loss": result.best["val_loss"], "best_step": result.best["step"]})
        if pruned:
            raise optuna.TrialPruned(f"at step {result.step}")
        trial.set_user_attr("best_step", int(result.best["step"]))
        return float(result.best["val_delta_snr_db"])

    return objective


def close_abandoned_runs(study: optuna.Study, client) -> None:
    """The MLflow runs of trials whose process died stay RUNNING forever: mark them KILLED."""
    # heavy: mlflow is imported only where runs are touched.
    from mlflow.exceptions import MlflowException

    silent = heartbeat_failed_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(STUDY_RUN_ATTR)
        if run_id and (INTERRUPTED_ATTR in trial.user_attrs or trial.number in silent):
            try:
                if client.get_run(run_id).info.status == "RUNNING":
                    client.set_terminated(run_id, "KILLED")
            except MlflowException as error:  # the run is gone (deleted, another store): nothing to close
                if error.get_http_status_code() != 404:
                    raise


def study_run(plan: Plan, study: optuna.Study) -> tuple[str, bool]:
    """The MLflow run that holds the study's trials, and whether this call created it: the one recorded
    in the study if it still exists, else a new one. Under the study's lock, so that workers started
    together share one run."""
    # heavy: mlflow is imported only where runs are touched.
    from mlflow.exceptions import MlflowException

    registry = tracking.client(plan.workspace)
    with study_lock(plan.storage_url, plan.study_name):
        run_id = study.user_attrs.get(STUDY_RUN_ATTR)  # read from the storage each time: another worker may have set it
        if run_id:
            try:
                registry.get_run(run_id)
                return run_id, False
            except MlflowException as error:  # deleted, or recorded in another tracking store: start a new one
                if error.get_http_status_code() != 404:
                    raise
        run = registry.create_run(
            tracking.experiment_id(plan.experiment, plan.workspace), run_name=plan.study_name,
            tags={"workbench.kind": "finetune-study", "optuna.study": plan.study_name,
                  "optuna.storage": describe_storage(plan.storage_url), "device": plan.device.id})
        study.set_user_attr(STUDY_RUN_ATTR, run.info.run_id)
        return run.info.run_id, True


def open_plan_study(plan: Plan) -> optuna.Study:
    """Create or join the plan's study; its key (a study attribute) names the trials' training folders."""
    study = open_study(plan.study_name, plan.storage_url, seed=plan.settings.seed,
                       pruner=make_pruner(plan.settings.pruner), storage=plan.storage)
    with study_lock(plan.storage_url, plan.study_name):  # workers started together: the first one sets the key
        check_identity(study, plan.identity, plan.storage_url)
        if STUDY_KEY_ATTR not in study.user_attrs:
            study.set_user_attr(STUDY_KEY_ATTR, uuid.uuid4().hex[:12])
            study.set_user_attr("device", plan.device.id)
            study.set_user_attr("speeds", [float(s) for s in plan.speeds])
        plan.study_key = study.user_attrs[STUDY_KEY_ATTR]
    return study


def tune(plan: Plan, study: optuna.Study, validation: Mixtures, progress: Progress = no_progress) -> None:
    """Run the study's missing trials (after recovering those of dead workers); at least one must complete."""
    def study_progress(*_):
        progress(f"study {plan.study_name}", finished_trials(study), plan.trials)

    recover_abandoned_trials(study, plan.storage)
    close_abandoned_runs(study, tracking.client(plan.workspace))
    if BASELINE_ATTR not in study.user_attrs:  # the line every trial must clear, drawn in the report
        progress("validate the base model", 0, 1)
        accelerator = torch.device(plan.accelerator)  # scored in the arithmetic its trials validate in
        scores = validate(copy.deepcopy(plan.base_model).to(accelerator), validation, accelerator,
                          bf16=uses_bf16(plan.recipe["schedule"]["precision"], accelerator, plan.base_model.config))
        study.set_user_attr(BASELINE_ATTR, scores["val_delta_snr_db"])
        progress("validate the base model", 1, 1)
    study_progress()
    run_study(study, plan.storage, trial_objective(plan, study, plan.base_model, validation, progress),
              trials=plan.trials, timeout_s=plan.timeout_s, callbacks=[study_progress])
    close_abandoned_runs(study, tracking.client(plan.workspace))  # those of peers the heartbeat found dead
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        counts = {s.name.lower(): n for s in FINISHED if (n := len(study.get_trials(deepcopy=False, states=(s,))))}
        raise WorkbenchError(f"study {plan.study_name}: no trial completed ({counts or 'none ran'}); widen "
                             "[finetune.search], loosen [finetune.pruner] or give more --trials / --timeout")
