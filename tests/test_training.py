"""The training engine: recipes, data, the loop (resume, freezing, L2-SP, stopping) and `workbench pretrain`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_recipe
from workbench.audio.crops import loop_with_crossfades
from workbench.audio.io import sha256_file, write_audio
from workbench.errors import WorkbenchError
from workbench.recipes import apply_overrides, load_recipe, recipe_digest, recipe_params
from workbench.train.data import HumSpec, MixingSpec, StepBatches, TrainingExamples, stored_mixtures, training_batches
from workbench.train.loop import (PARAMETER_GROUPS, Schedule, _optimizer_from_flat, _optimizer_to_flat,
                                  learning_rate_at, parameter_group, read_state, train, uses_bf16)

RATE = 44_100


def training_recipe(steps: int, validate_every: int, batch_size: int = 4, checkpoint_every: int = 4) -> str:
    return tiny_recipe("test-tiny", steps=steps, batch_size=batch_size, validate_every=validate_every,
                       checkpoint_every=checkpoint_every,
                       schedule_extra="learning_rate = 5e-3\nwarmup_steps = 5\ngrad_clip = 1.0")


def write_recipe(folder: Path, steps: int = 6, validate_every: int = 3) -> Path:
    path = folder / "test-tiny.toml"
    path.write_text(training_recipe(steps, validate_every))
    return path


@dataclass(frozen=True)
class Clip:
    """A plain audio file as a training source (what corpus files and noise snippets look like to the data code)."""

    path: Path
    sha256: str
    frames: int
    sample_rate: int = RATE


def clip(path: Path, samples: np.ndarray) -> Clip:
    write_audio(path, samples[None, :].astype(np.float32), RATE, subtype="FLOAT")
    return Clip(path, sha256_file(path), samples.shape[0])


@pytest.fixture
def sources(tmp_path):
    """Clean 'music' (tones), one silent file, and two tape-hiss-like noise clips, one shorter than a segment."""
    rng = np.random.default_rng(0)
    t = np.arange(RATE * 2) / RATE
    music = [clip(tmp_path / f"music-{i}.wav", 0.2 * np.sin(2 * np.pi * (220 * (i + 1)) * t) * (1 + 0.5 * np.sin(t)))
             for i in range(3)]
    silence = clip(tmp_path / "silence.wav", np.zeros(RATE * 2))
    noise = [clip(tmp_path / "hiss-long.wav", 0.01 * rng.standard_normal(RATE * 2)),
             clip(tmp_path / "hiss-short.wav", 0.01 * rng.standard_normal(RATE // 10))]
    return {"music": music, "silence": silence, "noise": noise}


# ------------------------------------------------------------------------------------------------ recipes

def test_bundled_recipes_load_and_the_paper_recipe_is_the_paper():
    paper = load_recipe("pretrain-paper")
    assert paper["model"]["size"] == "paper" and paper["data"]["segment_seconds"] == 5.0
    s = paper["schedule"]
    assert (s["learning_rate"], s["betas"], s["decay_every"], s["decay_factor"], s["steps"], s["shape"]) == \
           (1e-4, [0.5, 0.9], 100_000, 10.0, 320_000, "step")
    assert paper["data"]["snr_db"] == {"distribution": "log-uniform", "low": 6.0, "high": 32.0}
    assert paper["data"]["gain_db"] == {"low": -6.0, "high": 0.0}
    quick = load_recipe("quickstart")
    assert quick["model"]["size"] == "tiny" and quick["schedule"]["steps"] <= 500
    params = recipe_params(quick)
    assert params["schedule.learning_rate"] == json.dumps(quick["schedule"]["learning_rate"])
    assert params["data.snr_db.distribution"] == "log-uniform" and params["recipe.name"] == "quickstart"


@pytest.mark.parametrize("text, message", [
    ("[model]\nsize = 'huge'", "size must be one of"),
    ("[schedule]\nsteps = -3", "steps must be >= 1"),
    ("[schedule]\nlearing_rate = 1e-3", "unknown key [schedule] learing_rate"),
    ("[data]\nsnr_db = { distribution = 'log-uniform', low = 0, high = 10 }", "must be > 0 dB"),
    ("[data]\nsnr_db = { low = 20, high = 10 }", "is above"),
    ("[schedule]\nbetas = [0.5]", "betas must be two numbers"),
    ("[schedule]\nlow_band_weight = -1", "low_band_weight must be >= 0"),
    ("[schedule]\nprecision = 'fp16'", "precision must be one of auto, float32, bf16"),
    ("[schedule]\nloss = 'mse'", "loss must be one of l1, snr"),
    ("[schedule]\nstage1_weight = -0.5", "stage1_weight must be >= 0"),
    ("[data]\nhum = { share = 1.5 }", "hum.share is a share of the examples, 0 to 1"),
    ("[data]\nhum = { share = 0.5, mains_hz = [] }", "hum.mains_hz must be a list of frequencies"),
    ("[data]\nhum = { level_db_low = 3, level_db_high = -3 }", "is above hum.level_db_high"),
    ("[data]\nhum = { harmonics = 0 }", "hum.harmonics must be >= 1"),
    ("[data]\nhum = { shares = 0.5 }", "unknown key [data] hum.shares"),
    ("[trainning]\nsteps = 3", "unknown key 'trainning'"),
    ("[schedule\nsteps = 3", "not valid TOML"),
    ("extends = 'no-such-recipe'\n", "extends 'no-such-recipe': recipe 'no-such-recipe' not found"),
    ("extends = 3\n", "extends must name a recipe"),
    ("extends = 'quickstart'\n[schedule]\nsteps = 0", "steps must be >= 1"),
])
def test_bad_recipes_fail_with_one_line_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(WorkbenchError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        load_recipe(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_recipes_resolve_workspace_before_bundled_and_keep_extension_sections(workspace):
    workspace.recipes_dir.mkdir()
    (workspace.recipes_dir / "quickstart.toml").write_text(
        "[schedule]\nsteps = 7\n[finetune]\ntrials = 3\n[finetune.search]\nlearning_rate = { low = 1e-5, high = 1e-3 }\n")
    recipe = load_recipe("quickstart")
    assert recipe["schedule"]["steps"] == 7 and recipe["source"] == str(workspace.recipes_dir / "quickstart.toml")
    assert recipe["finetune"]["search"]["learning_rate"]["high"] == 1e-3
    changed = apply_overrides(recipe, {"schedule.steps": 9, "data.snr_db.low": 4.0, "finetune.trials": 5})
    assert (changed["schedule"]["steps"], changed["data"]["snr_db"]["low"], changed["finetune"]["trials"]) == (9, 4.0, 5)
    with pytest.raises(WorkbenchError, match="no such key"):
        apply_overrides(recipe, {"schedule.stepz": 1})
    with pytest.raises(WorkbenchError, match="not found"):
        load_recipe("no-such-recipe")


def test_a_recipe_that_extends_another_states_only_what_differs(workspace):
    workspace.recipes_dir.mkdir()
    (workspace.recipes_dir / "short.toml").write_text(
        'extends = "finetune-cpu"\n[schedule]\nsteps = 7\n[data]\nsnr_db = { high = 30.0 }\n'
        '[finetune.search]\n"schedule.learning_rate" = { high = 2e-3 }\n')
    parent, short = load_recipe("finetune-cpu"), load_recipe("short")
    # Its own name, description and source; the parent's every other key, with this file's laid over them.
    assert (short["name"], short["description"]) == ("short", "")
    assert short["source"] == str(workspace.recipes_dir / "short.toml")
    assert short["schedule"]["steps"] == 7 and parent["schedule"]["steps"] != 7
    assert short["schedule"] == {**parent["schedule"], "steps": 7}
    assert short["data"]["snr_db"] == {**parent["data"]["snr_db"], "high": 30.0}
    assert short["finetune"]["search"]["schedule.learning_rate"] == \
        {**parent["finetune"]["search"]["schedule.learning_rate"], "high": 2e-3}
    assert short["finetune"]["hum_template"] == parent["finetune"]["hum_template"]
    expected = json.loads(json.dumps(parent))
    expected["schedule"]["steps"], expected["data"]["snr_db"]["high"] = 7, 30.0
    expected["finetune"]["search"]["schedule.learning_rate"]["high"] = 2e-3
    assert recipe_digest(short) == recipe_digest(expected)
    # Two levels, and a circle refused with one line.
    (workspace.recipes_dir / "shorter.toml").write_text('extends = "short"\n[schedule]\nbatch_size = 2\n')
    shorter = load_recipe("shorter")
    assert (shorter["schedule"]["steps"], shorter["schedule"]["batch_size"], shorter["name"]) == (7, 2, "shorter")
    (workspace.recipes_dir / "a.toml").write_text('extends = "b"\n')
    (workspace.recipes_dir / "b.toml").write_text('extends = "a"\n')
    with pytest.raises(WorkbenchError, match="cannot extend in a circle") as error:
        load_recipe("a")
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------------------------------- data

def test_looped_noise_keeps_its_level_across_crossfaded_seams():
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(4410).astype(np.float32)
    looped = loop_with_crossfades(noise, 44_100, 441)
    assert looped.shape == (44_100,) and looped.dtype == np.float32
    assert np.array_equal(looped[:4410 - 441], noise[:4410 - 441])
    power = np.mean(looped.astype(np.float64) ** 2) / np.mean(noise.astype(np.float64) ** 2)
    assert abs(10 * math.log10(power)) < 0.3


def test_examples_are_a_function_of_the_index_and_skip_silence(sources):
    examples = TrainingExamples(sources["music"] + [sources["silence"]], sources["noise"], RATE // 2, MixingSpec(), seed=3)
    first, again = examples[17], examples[17]
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(examples[18]["clean"], first["clean"])
    for index in range(40):
        item = examples[index]
        assert item["clean"].shape == item["noise"].shape == (RATE // 2,)
        assert item["clean"].pow(2).mean().sqrt() > 1e-3  # never the silent file
        assert item["noise"].pow(2).mean() > 0
        assert 6.0 <= float(item["snr_db"]) <= 32.0 and -6.0 <= float(item["gain_db"]) <= 0.0
    with pytest.raises(WorkbenchError, match="as long as"):
        TrainingExamples(sources["music"], sources["noise"], RATE * 10, MixingSpec(), seed=3)


def test_hum_families_go_into_a_share_of_the_noise_and_leave_every_other_draw_as_it_was(sources):
    """[data] hum: the examples given a hum family differ from the plain ones only by that family (a mains
    frequency from the list, the fundamental at the drawn level re the noise crop); every other example, and
    every clean crop, SNR and gain, is what it is without hum."""
    plain = TrainingExamples(sources["music"], sources["noise"], RATE // 2, MixingSpec(), seed=5)
    spec = HumSpec(share=0.5, mains_hz=(50.0, 60.0), level_db_low=-6.0, level_db_high=6.0, harmonics=5)
    hummed = TrainingExamples(sources["music"], sources["noise"], RATE // 2, MixingSpec(), seed=5, hum=spec)
    added = []
    for index in range(40):
        (item, origin), (expected, _) = hummed.example(index), plain.example(index)
        for key in ("clean", "snr_db", "gain_db"):
            assert torch.equal(item[key], expected[key])
        if origin.get("hum") is None:
            assert torch.equal(item["noise"], expected["noise"])
            continue
        hum = (item["noise"] - expected["noise"]).double().numpy()
        spectrum = np.abs(np.fft.rfft(hum * np.hanning(hum.size)))
        mains = origin["hum"]["mains_hz"]
        assert mains in (50.0, 60.0) and -6.0 <= origin["hum"]["level_db"] <= 6.0
        # bins are 2 Hz apart: the five harmonics hold the family's energy, nothing between them
        lines = np.zeros_like(spectrum, dtype=bool)
        for k in range(1, 6):
            lines[round(k * mains / 2) - 2:round(k * mains / 2) + 3] = True
        assert np.sum(spectrum[lines] ** 2) > 0.999 * np.sum(spectrum ** 2)
        noise_rms = float(expected["noise"].double().pow(2).mean().sqrt())
        t = np.arange(hum.size) / RATE
        basis = np.stack([np.sin(2 * np.pi * mains * t), np.cos(2 * np.pi * mains * t)], axis=1)
        fundamental = basis @ np.linalg.lstsq(basis, hum, rcond=None)[0]  # the fundamental alone, fitted
        level_db = 20 * math.log10(np.sqrt(np.mean(fundamental ** 2)) / noise_rms)
        assert abs(level_db - origin["hum"]["level_db"]) < 0.8  # the drift and the level's slow breathing
        added.append(mains)
    assert 10 <= len(added) <= 30 and set(added) == {50.0, 60.0}
    assert torch.equal(hummed.example(7)[0]["noise"], hummed.example(7)[0]["noise"])  # still a pure function


def test_batches_do_not_depend_on_workers_or_on_ddp_sharding(sources):
    examples = TrainingExamples(sources["music"], sources["noise"], RATE // 4, MixingSpec(), seed=4)
    in_process = list(training_batches(examples, 2, 5, 4, num_workers=0))
    with_workers = list(training_batches(examples, 2, 5, 4, num_workers=2))
    assert len(in_process) == len(with_workers) == 3
    for a, b in zip(in_process, with_workers):
        assert all(torch.equal(a[k], b[k]) for k in a)
    ranks = [list(StepBatches(2, 5, 4, rank=r, world_size=2)) for r in range(2)]
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == list(StepBatches(2, 5, 4))


def test_validation_mixtures_are_built_once_and_keyed_by_what_made_them(sources, tmp_path):
    args = (sources["music"], sources["noise"], 3, 0.5, MixingSpec(), 11)
    first = stored_mixtures(tmp_path / "mixtures", "validation", *args)
    assert first.path.is_file() and first.path.with_suffix(".json").is_file()
    stamp = first.path.stat().st_mtime_ns
    again = stored_mixtures(tmp_path / "mixtures", "validation", *args)
    assert again.path.stat().st_mtime_ns == stamp and torch.equal(again.noisy, first.noisy)
    residual = first.noisy - first.clean
    achieved = 10 * torch.log10(first.clean.pow(2).mean(-1) / residual.pow(2).mean(-1))
    assert torch.allclose(achieved, first.snr_db, atol=0.1)
    other = stored_mixtures(tmp_path / "mixtures", "validation", *args[:-1], 12)
    assert other.key != first.key and not torch.equal(other.noisy, first.noisy)


# --------------------------------------------------------------------------------------------------- loop

def test_schedule_shapes():
    step = Schedule(steps=300, batch_size=1, learning_rate=1e-4, decay_every=100, decay_factor=10)
    assert [learning_rate_at(s, step) for s in (0, 99, 100, 250)] == pytest.approx([1e-4, 1e-4, 1e-5, 1e-6])
    warm = Schedule(steps=100, batch_size=1, learning_rate=1e-3, warmup_steps=10, shape="cosine", min_learning_rate=1e-5)
    assert learning_rate_at(0, warm) == pytest.approx(1e-4) and learning_rate_at(9, warm) == pytest.approx(1e-3)
    assert learning_rate_at(10, warm) == pytest.approx(1e-3) and learning_rate_at(100, warm) == pytest.approx(1e-5)
    constant = Schedule(steps=10, batch_size=1, learning_rate=2e-4, shape="constant")
    assert {learning_rate_at(s, constant) for s in range(10)} == {2e-4}


def test_optimizer_state_round_trips_without_pickle():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors, meta = _optimizer_to_flat(optimizer)
    json.dumps(meta)  # everything that is not a tensor is plain JSON
    fresh = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    fresh.load_state_dict(_optimizer_from_flat(tensors, meta))
    restored, original = fresh.state_dict(), optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for index, entry in original["state"].items():
        assert all(torch.equal(entry[k], restored["state"][index][k]) for k in entry)


def test_parameter_groups_name_real_parameters():
    from workbench.model.unet import SIZES, TwoStageUNet

    model = TwoStageUNet(SIZES["tiny"])
    every = {name for name, _ in model.named_parameters()}
    stages = set(parameter_group(model, "stage1")) | set(parameter_group(model, "stage2"))
    assert stages == every and not set(parameter_group(model, "stage1")) & set(parameter_group(model, "stage2"))
    for group in PARAMETER_GROUPS:
        assert parameter_group(model, group)
    with pytest.raises(WorkbenchError, match="unknown parameter group"):
        parameter_group(model, "encoder")


def _tiny_run(sources, tmp_path, mixing=MixingSpec(), **schedule):
    from workbench.model.unet import SIZES, TwoStageUNet

    examples = TrainingExamples(sources["music"], sources["noise"], RATE // 4, mixing, seed=2)
    validation = stored_mixtures(tmp_path / "mixtures", "validation", sources["music"], sources["noise"], 2, 0.25,
                                 mixing, 9)
    torch.manual_seed(0)
    model = TwoStageUNet(SIZES["tiny"])
    settings = dict(steps=6, batch_size=2, learning_rate=2e-3, validate_every=2, checkpoint_every=4, grad_clip=1.0)
    return model, Schedule(**{**settings, **schedule}), examples, validation


@pytest.mark.slow  # end to end: whole runs of the training loop
def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_losses(sources, tmp_path):
    model, schedule, examples, validation = _tiny_run(sources, tmp_path)
    whole = train(model, schedule, examples, validation, tmp_path / "whole")
    assert sorted(whole.losses) == list(range(1, 7)) and whole.stopped == "completed"

    def ctrl_c_after_three(stage, done, total=None, **fields):
        if done == 3:
            raise KeyboardInterrupt

    model, schedule, examples, validation = _tiny_run(sources, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(model, schedule, examples, validation, tmp_path / "split", progress=ctrl_c_after_three)
    tensors, saved = read_state(tmp_path / "split")
    assert saved["step"] == 3 and [h["step"] for h in saved["history"]] == [2]
    assert any(k.startswith("optim.") for k in tensors) and "rng.torch" in tensors

    model, schedule, examples, validation = _tiny_run(sources, tmp_path)  # a fresh process would start so
    resumed = train(model, schedule, examples, validation, tmp_path / "split", resume=True)
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-6, abs=1e-7)
    assert [h["step"] for h in resumed.history] == [2, 4, 6]
    for a, b in zip(resumed.history, whole.history):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    with pytest.raises(WorkbenchError, match="no saved state"):
        train(*_tiny_run(sources, tmp_path), tmp_path / "never-ran", resume=True)


@pytest.mark.slow  # end to end: whole runs of the training loop
def test_frozen_groups_stay_put_and_l2sp_pulls_toward_the_base(sources, tmp_path):
    model, schedule, examples, validation = _tiny_run(sources, tmp_path, steps=3, validate_every=3, freeze=("stage1",))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, schedule, examples, validation, tmp_path / "frozen")
    after = model.state_dict()
    frozen = set(parameter_group(model, "stage1"))
    assert all(torch.equal(before[name], after[name]) for name in frozen)
    assert any(not torch.equal(before[name], after[name]) for name in after if name not in frozen)

    distances = {}
    for alpha in (0.0, 1e4):
        model, schedule, examples, validation = _tiny_run(sources, tmp_path, steps=3, validate_every=3, l2sp_alpha=alpha,
                                                          learning_rate=1e-2)
        base = {name: p.detach().clone() for name, p in model.named_parameters()}
        train(model, schedule, examples, validation, tmp_path / f"l2sp-{alpha}", base_weights=base)
        distances[alpha] = sum(float((p.detach() - base[n]).pow(2).sum()) for n, p in model.named_parameters())
    assert distances[1e4] < distances[0.0]


def test_a_later_key_at_its_neutral_value_leaves_the_recipe_digest_as_it_was():
    recipe = load_recipe("general")
    earlier = dict(recipe)
    earlier["schedule"] = {k: v for k, v in recipe["schedule"].items() if not k.startswith("low_band_")}
    assert recipe_digest(recipe) == recipe_digest(earlier)  # as digested before low_band_* existed
    assert recipe_digest(apply_overrides(recipe, {"schedule.low_band_weight": 5.0})) != recipe_digest(recipe)
    earlier["data"] = {k: v for k, v in recipe["data"].items() if k != "hum"}
    assert recipe_digest(recipe) == recipe_digest(earlier)  # as digested before [data] hum existed
    assert recipe_digest(apply_overrides(recipe, {"data.hum.share": 0.5})) != recipe_digest(recipe)


def test_the_schedules_low_band_weights_reach_training_and_validation(sources, tmp_path):
    losses = {}
    for weight in (0.0, 30.0):
        model, schedule, examples, validation = _tiny_run(sources, tmp_path, steps=1, validate_every=1,
                                                          low_band_hz=350.0, low_band_weight=weight)
        result = train(model, schedule, examples, validation, tmp_path / f"low-band-{weight:g}")
        losses[weight] = (result.losses[1], result.history[0]["val_loss"])
    # Same weights, same batch: only the loss's bin weights differ, in the training step and the validation.
    assert losses[30.0][0] != pytest.approx(losses[0.0][0], rel=1e-3)
    assert losses[30.0][1] != pytest.approx(losses[0.0][1], rel=1e-3)


def test_precision_auto_trains_in_bf16_where_the_hardware_multiplies_it_natively():
    from workbench.model.unet import SIZES

    cpu, cuda, tiny, small = torch.device("cpu"), torch.device("cuda"), SIZES["tiny"], SIZES["small"]
    assert uses_bf16("auto", cuda, tiny) and uses_bf16("bf16", cpu, tiny)
    assert not uses_bf16("float32", cuda, small) and not uses_bf16("float32", cpu, small)
    # On a CPU, only with bf16 in hardware (AMX or AVX-512 bf16) and only for a network wide enough for its
    # 16-channel blocks.
    capabilities = torch.cpu.get_capabilities()
    assert uses_bf16("auto", cpu, small) == (capabilities["amx_bf16"] or capabilities["avx512_bf16"])
    assert not uses_bf16("auto", cpu, tiny)
    # The digest of a recipe written before the key existed is kept at "auto"; another value changes it.
    recipe = load_recipe("general")
    assert recipe_digest(recipe) == recipe_digest({**recipe, "schedule": {k: v for k, v in recipe["schedule"].items()
                                                                          if k != "precision"}})
    assert recipe_digest(apply_overrides(recipe, {"schedule.precision": "float32"})) != recipe_digest(recipe)


def test_a_bf16_training_step_on_the_cpu_tracks_the_float32_one(sources, tmp_path):
    results = {}
    for precision in ("float32", "bf16"):
        model, schedule, examples, validation = _tiny_run(sources, tmp_path, steps=1, validate_every=1,
                                                          precision=precision)
        result = train(model, schedule, examples, validation, tmp_path / precision)
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        results[precision] = (result.losses[1], result.history[0]["val_loss"], weights)
    (loss32, val32, weights32), (loss16, val16, weights16) = results["float32"], results["bf16"]
    # The same step in bf16 arithmetic: close to float32's, and not the same (the network did run in bf16),
    # in the training step and in the validation; the weights stay float32.
    assert loss16 == pytest.approx(loss32, rel=2e-2) and loss16 != loss32
    assert val16 == pytest.approx(val32, rel=2e-2) and val16 != val32
    assert weights16.dtype == torch.float32 and torch.allclose(weights16, weights32, atol=5e-3)


@pytest.mark.slow  # end to end: whole runs of the training loop
def test_validation_callback_and_plateau_stop_the_run(sources, tmp_path):
    model, schedule, examples, validation = _tiny_run(sources, tmp_path, steps=8)
    seen = []
    result = train(model, schedule, examples, validation, tmp_path / "pruned",
                   on_validation=lambda step, metrics: seen.append((step, metrics)) or step >= 4)
    assert result.stopped == "callback" and result.step == 4 and [s for s, _ in seen] == [2, 4]
    assert {"val_loss", "val_delta_snr_db", "val_input_snr_db"} <= set(seen[0][1])

    model, schedule, examples, validation = _tiny_run(sources, tmp_path, steps=8, learning_rate=1e-12, patience=1)
    result = train(model, schedule, examples, validation, tmp_path / "plateau", validate_at_start=True)
    assert result.stopped == "plateau" and result.step == 2 and [h["step"] for h in result.history] == [0, 2]
    again = train(*_tiny_run(sources, tmp_path, steps=8, learning_rate=1e-12, patience=1)[:3], validation,
                  tmp_path / "plateau", resume=True)
    assert again.stopped == "plateau" and again.step == 2 and again.losses == {}  # stopped on purpose stays stopped


@pytest.mark.parametrize("loss", ["snr", "snr+l1"])
def test_the_db_losses_train_and_keep_their_best_validation_below_zero(sources, tmp_path, loss):
    """The "snr" and "snr+l1" losses are in dB, below zero for quiet examples (here 40 dB down): the best
    validation is still the lowest one (with a loss below zero, "better by a fraction of the best" is a
    fraction of its size)."""
    quiet = MixingSpec(gain_low=-40.0, gain_high=-40.0)
    model, schedule, examples, validation = _tiny_run(sources, tmp_path, quiet, steps=4, validate_every=1, loss=loss,
                                                      stage1_weight=0.0)
    result = train(model, schedule, examples, validation, tmp_path / "run", validate_at_start=True)
    losses = [h["val_loss"] for h in result.history]
    assert len(losses) == 5 and max(losses) < 0
    assert result.best["val_loss"] == min(losses) and min(losses) < losses[0]  # it learnt, by its own measure
    assert all(math.isfinite(loss) for loss in result.losses.values())


# ---------------------------------------------------------------------------------------------- pretrain

PRETRAIN_STEPS = 40


@pytest.mark.slow  # end to end: whole pretrain runs
def test_pretrain_learns_is_tracked_registers_and_the_registered_model_denoises_a_file(tiny_archive, tmp_path, cli):
    import mlflow
    import soundfile as sf

    from workbench import tracking
    from workbench.evaluate.metrics import snr_db

    recipe = write_recipe(tmp_path, steps=PRETRAIN_STEPS, validate_every=PRETRAIN_STEPS // 2)
    result = cli("pretrain", "--recipe", recipe, "--accelerator", "cpu", "--workers", "1", "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    initial, best, last = report["initial"], report["best"], report["last"]
    assert report["step"] == PRETRAIN_STEPS and report["stopped"] == "completed"
    assert initial["step"] == 0 and last["step"] == PRETRAIN_STEPS
    assert best["val_loss"] < initial["val_loss"] and best["step"] > 0
    assert best["val_delta_snr_db"] > initial["val_delta_snr_db"] + 1.0  # the estimate gains on the noisy input
    assert last["val_delta_snr_db"] > initial["val_delta_snr_db"]

    # MLflow: the recipe as params, a metric per step, the data as dataset inputs, the registered version.
    client = tracking.client(tiny_archive)
    run = client.get_run(report["run_id"])
    assert run.data.params["schedule.steps"] == str(PRETRAIN_STEPS) and run.data.params["model.size"] == "tiny"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == PRETRAIN_STEPS
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_delta_snr_db")] == [0, 20, 40]
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {
        "noise-library-training", "noise-library-validation", "clean-corpus-training", "clean-corpus-validation"}
    assert report["model_uri"] == f"models:/tape-denoiser-general/{report['version']}"
    version = client.get_model_version("tape-denoiser-general", str(report["version"]))
    assert version.run_id == report["run_id"] and float(version.tags["val_delta_snr_db"]) == pytest.approx(
        best["val_delta_snr_db"], abs=1e-3)
    assert "ΔSNR" in version.description and version.tags["recipe"] == "test-tiny"
    sidecar = json.loads(Path(report["checkpoint"]).with_suffix(".json").read_text())
    assert sidecar["lineage"]["noise_digest"] == version.tags["noise_digest"]

    # The registered model, loaded back by its URI, restores a file: the same as the pyfunc's prediction.
    mixture = read_mixture(tiny_archive)
    noisy_path, clean_path = tmp_path / "noisy.wav", tmp_path / "restored.wav"
    write_audio(noisy_path, mixture["noisy"][None], RATE, subtype="FLOAT")
    denoised = cli("denoise", "--model", report["model_uri"], "-o", clean_path, noisy_path, "--json")
    assert denoised.code == 0, denoised.stderr
    restored, rate = sf.read(clean_path, dtype="float32")
    assert rate == RATE and restored.shape == mixture["noisy"].shape
    predicted = mlflow.pyfunc.load_model(report["model_uri"]).predict(mixture["noisy"])
    assert np.abs(predicted - restored).max() < 1e-4
    # ... and better than the weights training started from (the recipe's seed makes them again).
    from workbench.model.overlap_add import ChunkPlan, process_whole
    from workbench.model.stft import HOP
    from workbench.model.unet import SIZES, TwoStageUNet, denoise_waveform

    torch.manual_seed(5)
    untrained = TwoStageUNet(SIZES["tiny"]).eval()
    plan = ChunkPlan.from_seconds(grid_frames=HOP * 2 ** untrained.config.depth)
    before = process_whole(lambda chunk: denoise_waveform(untrained, chunk), mixture["noisy"][None], plan)[0]
    noisy_snr = snr_db(mixture["clean"], mixture["noisy"])
    assert snr_db(mixture["clean"], restored) - noisy_snr > snr_db(mixture["clean"], before) - noisy_snr + 1.0


@pytest.mark.slow  # end to end: pretrain runs
def test_pretrain_starts_from_a_models_weights_and_records_them(tiny_archive, tmp_path, cli):
    """--start-from: step 0 validates the starting model itself (the boxed one here, tiny like the recipe), its
    sha256 goes into the registered model's lineage; a model of another size and a resume are refused."""
    from workbench.model.boxed import BOXED_CHECKPOINT
    from workbench.model.checkpoint import load_checkpoint, read_checkpoint_info
    from workbench.train.loop import validate
    from workbench.train.pretrain import _prepare_data, pretrain
    from workbench.train.distributed import Distributed

    recipe = write_recipe(tmp_path, steps=2, validate_every=2)
    started = cli("pretrain", "--recipe", recipe, "--accelerator", "cpu", "--workers", "0", "--json",
                  "--start-from", str(BOXED_CHECKPOINT))
    assert started.code == 0, started.stderr
    report = started.json()
    boxed, _ = load_checkpoint(BOXED_CHECKPOINT)
    data = _prepare_data(tiny_archive, load_recipe(recipe, tiny_archive), Distributed(), lambda *a, **k: None)
    expected = validate(boxed, data.validation, torch.device("cpu"), Distributed())
    assert report["initial"]["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    lineage = read_checkpoint_info(Path(report["checkpoint"]))["lineage"]
    assert lineage["start_from"]["weights_sha256"] == read_checkpoint_info(BOXED_CHECKPOINT)["weights_sha256"]

    small = tmp_path / "small.toml"
    small.write_text(training_recipe(2, 2).replace('size = "tiny"', 'size = "small"'))
    assert 'size = "small"' in small.read_text()
    refused = cli("pretrain", "--recipe", small, "--accelerator", "cpu", "--start-from", str(BOXED_CHECKPOINT))
    assert refused.code != 0 and "a 'tiny' network" in refused.stderr and "'small'" in refused.stderr
    with pytest.raises(WorkbenchError, match="a resumed run continues from its own"):
        pretrain(tiny_archive, recipe, resume=True, start_from=str(BOXED_CHECKPOINT))


def read_mixture(workspace) -> dict:
    from safetensors.numpy import load_file

    stored = sorted(workspace.mixtures_dir.glob("validation-*.safetensors"))
    tensors = load_file(str(stored[0]))
    return {"noisy": tensors["noisy"][0], "clean": tensors["clean"][0]}


@pytest.mark.slow  # end to end: whole pretrain runs
def test_pretrain_saves_on_ctrl_c_resumes_exactly_and_refuses_what_it_cannot(tiny_archive, tmp_path, cli):
    import os
    import signal
    import subprocess
    import sys
    import time

    from workbench.train.pretrain import pretrain

    recipe = tmp_path / "ctrl-c.toml"
    recipe.write_text(training_recipe(12, 6, batch_size=1, checkpoint_every=2))
    # A real Ctrl-C (SIGINT) to a real `workbench pretrain` with a DataLoader worker.
    env = {**os.environ, "WORKBENCH_HOME": str(tiny_archive.root)}
    process = subprocess.Popen([sys.executable, "-m", "workbench", "pretrain", "--recipe", str(recipe), "--workers", "1",
                                "--accelerator", "cpu", "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 300
    while not list(tiny_archive.runs_dir.glob("pretrain-test-tiny-*/state.safetensors")) and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr
    [run_dir] = tiny_archive.runs_dir.glob("pretrain-test-tiny-*")
    saved = json.loads((run_dir / "state.json").read_text())
    assert 2 <= saved["step"] < 12

    resumed = pretrain(tiny_archive, recipe, accelerator="cpu", num_workers=0, resume=True)
    assert resumed.step == 12 and resumed.run_dir == run_dir and resumed.version == 1
    assert [h["step"] for h in resumed.history] == [0, 6, 12]
    history = tracking_client(tiny_archive).get_metric_history(resumed.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 13))  # one MLflow run across the interruption
    with pytest.raises(WorkbenchError, match="no interrupted pretrain run"):
        pretrain(tiny_archive, recipe, accelerator="cpu", resume=True)
    bad = cli("pretrain", "--recipe", tmp_path / "missing.toml")
    assert bad.code == 2 and "no such recipe" in bad.stderr
    (tmp_path / "wrong.toml").write_text("[data]\ndevices = ['no-such-deck']\n")
    wrong = cli("pretrain", "--recipe", tmp_path / "wrong.toml")
    assert wrong.code == 2 and "no-such-deck" in wrong.stderr
    unknown = cli("pretrain", "--recipe", recipe, "--noise-from", "revox-a77", "--noise-from", "no-such-deck")
    assert unknown.code == 2 and "unknown device 'no-such-deck'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # end to end: a training process where MLflow cannot be imported, then its adoption
def test_a_run_trained_where_mlflow_is_not_installed_is_adopted_by_resume(tiny_archive, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from workbench.model.checkpoint import read_checkpoint_info
    from workbench.train.pretrain import pretrain

    recipe = tmp_path / "offline.toml"
    recipe.write_text(training_recipe(6, 3, batch_size=2))
    blocked = tmp_path / "without-mlflow" / "mlflow"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('MLflow is not installed on this machine')\n")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "pretrain_offline.py"
    out = tmp_path / "trained-elsewhere"
    done = subprocess.run([sys.executable, str(script), "--folder", str(tiny_archive.root), "--out", str(out),
                           "--recipe", str(recipe), "--workers", "0", "--steps", "6"],
                          env={**os.environ, "PYTHONPATH": str(blocked.parent)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [trained] = out.iterdir()
    record = json.loads((trained / "run.json").read_text())
    assert "run_id" not in record and record["trained_offline"]["steps"] == 6
    assert [h["step"] for h in record["history"]] == [0, 3, 6]
    # Brought home as a GPU machine's run would be (its record says where it trained).
    record["trained_offline"]["system"]["gpu"] = "NVIDIA H200"
    run_dir = tiny_archive.runs_dir / "pretrain-test-tiny-from-elsewhere"
    shutil.copytree(trained, run_dir)
    (run_dir / "run.json").write_text(json.dumps(record))

    adopted = pretrain(tiny_archive, recipe, accelerator="cpu", num_workers=0, resume=True)
    assert adopted.step == 6 and adopted.version == 1 and adopted.run_dir == run_dir
    client = tracking_client(tiny_archive)
    run = client.get_run(adopted.run_id)
    assert run.data.tags["trained_offline"] == "true" and run.data.tags["system.gpu"] == "NVIDIA H200"
    assert run.data.params["schedule.steps"] == "6"
    assert [m.step for m in client.get_metric_history(adopted.run_id, "val_delta_snr_db")] == [0, 3, 6]
    home = json.loads((run_dir / "run.json").read_text())
    assert home["run_id"] == adopted.run_id and home["finished"] and home["started"] == record["started"]
    lineage = read_checkpoint_info(adopted.checkpoint)["lineage"]
    assert lineage["trained_offline"]["system"]["gpu"] == "NVIDIA H200" and lineage["steps"] == 6
    with pytest.raises(WorkbenchError, match="no interrupted pretrain run"):  # adopted once, then finished
        pretrain(tiny_archive, recipe, accelerator="cpu", resume=True)


def tracking_client(workspace):
    from workbench import tracking

    return tracking.client(workspace)
