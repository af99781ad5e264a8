"""Every consistency rule of the two manifests, one case each (`store/manifests.py`), and the
lookups that find a run's generator and verifier. A shared run whose manifest breaks a rule is
refused in one line naming the file, before any file it names is touched."""

from __future__ import annotations

import json
import shutil

import pytest

from disback_cli.config import BacktrackConfig
from disback_cli.errors import DisbackError
from disback_cli.store.manifests import (
    MAX_NETWORK_JSON,
    SCHEMA_VERSION,
    BacktrackManifest,
    TrajectoryManifest,
    _bounded_network,
    generator_file_of_run,
    now,
    read_manifest,
    run_names,
    verifier_of_run,
    write_manifest,
)

RUN = "t/backtrack/default"


def edited(source, tmp_path, change) -> dict:
    raw = json.loads((source / "manifest.json").read_text())
    change(raw)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    return raw


def refusal(tmp_path, model) -> str:
    with pytest.raises(DisbackError) as caught:
        read_manifest(tmp_path, model)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'manifest.json'}: ") and "\n" not in message
    return message


def recording(raw: dict, step: int = 30) -> None:
    """A recording in progress at `step` with its resume point (nodes 0 and 1 done)."""
    raw.update(status="recording", nodes=raw["nodes"][:2])
    raw["state"] = {
        "file": f"state/record-{step:08d}.safetensors",
        "sha256": "0" * 64,
        "step": step,
    }


def set_node(position: int, **values):
    return lambda raw: raw["nodes"][position].update(values)


TRAJECTORY_CASES = {
    "nodes out of order": (
        set_node(1, index=2, file="nodes/node-002.safetensors"),
        "nodes must be numbered 0, 1, 2, ... in order",
    ),
    "a node missing": (
        lambda raw: raw.update(nodes=raw["nodes"][:3]),
        "2 path nodes recorded, the config asks for 3",
    ),
    "a node too many": (
        lambda raw: raw.update(
            nodes=[
                *raw["nodes"],
                {**raw["nodes"][3], "index": 4, "file": "nodes/node-004.safetensors", "step": 61},
            ]
        ),
        "4 path nodes recorded, the config asks for 3",
    ),
    "node 0 another teacher": (set_node(0, sha256="f" * 64), "node 0 must be the teacher"),
    "node 0 trained": (set_node(0, step=1), "node 0 must be the teacher (its sha256, step 0)"),
    "node steps repeated": (set_node(2, step=20), "node steps must increase and stay within"),
    "node steps beyond iters": (set_node(3, step=61), "node steps must increase and stay within"),
    "node plan too short": (
        lambda raw: raw.update(node_plan=[20, 40]),
        "node_plan must list 3 increasing steps within iters",
    ),
    "node plan from step 0": (lambda raw: raw.update(node_plan=[0, 20, 40]), "node_plan must"),
    "node plan beyond iters": (lambda raw: raw.update(node_plan=[20, 40, 61]), "node_plan must"),
    "node plan not increasing": (lambda raw: raw.update(node_plan=[20, 20, 40]), "node_plan"),
    "a resume point in a finished recording": (
        lambda raw: raw.update(
            state={"file": "state/record-00000030.safetensors", "sha256": "0" * 64, "step": 30}
        ),
        "a resume point must lie inside a recording in progress",
    ),
    "a resume point at step 0": (
        lambda raw: recording(raw, 0),
        "a resume point must lie inside a recording in progress",
    ),
    "a resume point at the last step": (
        lambda raw: recording(raw, 60),
        "a resume point must lie inside a recording in progress",
    ),
    "a resume point under another name": (
        lambda raw: (recording(raw), raw["state"].update(file="state/record-00000031.safetensors")),
        "state file must be 'state/record-00000030.safetensors'",
    ),
}


@pytest.mark.parametrize("case", list(TRAJECTORY_CASES))
def test_a_trajectory_manifest_breaking_a_rule_is_refused(small_trajectory, tmp_path, case):
    change, message = TRAJECTORY_CASES[case]
    edited(small_trajectory, tmp_path, change)
    assert message in refusal(tmp_path, TrajectoryManifest)


def test_a_recording_in_progress_and_a_node_plan_are_accepted(small_trajectory, tmp_path):
    edited(
        small_trajectory, tmp_path, lambda raw: (recording(raw), raw.update(node_plan=[1, 2, 60]))
    )
    manifest = read_manifest(tmp_path, TrajectoryManifest)
    assert manifest.files() == {"nodes/node-001.safetensors", "state/record-00000030.safetensors"}
    assert manifest.last_node == 1


def run_change(step: int | None = None, **refs):
    def change(raw):
        if step is not None:
            raw["step"] = step
        for key, value in refs.items():
            raw[key] = value

    return change


def ref(kind: str, step: int) -> dict:
    return {"file": f"checkpoints/{kind}-{step:08d}.safetensors", "sha256": "0" * 64}


BACKTRACK_CASES = {
    "a step beyond iters": (
        lambda raw: raw.update(
            step=21, status="running", generator=None, generator_ema=None, state=None
        ),
        "step 21 is beyond iters 20",
    ),
    "complete without a generator": (
        lambda raw: raw.update(generator=None, generator_ema=None, state=None),
        "a complete run must name its generator",
    ),
    "a generator without its state": (
        lambda raw: raw.update(state=None),
        "generator, generator_ema and state are saved together",
    ),
    "a generator of another step": (
        lambda raw: raw.update(generator=ref("generator", 10)),
        "generator file must be 'checkpoints/generator-00000020.safetensors'",
    ),
    "an EMA under the generator's name": (
        lambda raw: raw.update(generator_ema=ref("generator", 20)),
        "generator-ema file must be 'checkpoints/generator-ema-00000020.safetensors'",
    ),
    "a head without a generator": (
        lambda raw: raw.update(
            status="running", generator=None, generator_ema=None, state=None, head=ref("head", 20)
        ),
        "a ratio network or head is saved with the generator",
    ),
    "a ratio network without a generator": (
        lambda raw: raw.update(
            status="running", generator=None, generator_ema=None, state=None, ratio=ref("ratio", 20)
        ),
        "a ratio network or head is saved with the generator",
    ),
    "a state of another step": (
        lambda raw: raw["state"].update(step=10, file="checkpoints/state-00000020.safetensors"),
        "the state's step must equal the run's step",
    ),
}


@pytest.mark.parametrize("case", list(BACKTRACK_CASES))
def test_a_backtrack_manifest_breaking_a_rule_is_refused(template, tmp_path, case):
    change, message = BACKTRACK_CASES[case]
    edited(template / RUN, tmp_path, change)
    assert message in refusal(tmp_path, BacktrackManifest)


def test_a_backtrack_manifest_names_its_checkpoint_files(template):
    manifest = read_manifest(template / RUN, BacktrackManifest)
    assert manifest.files() == {
        "checkpoints/generator-00000020.safetensors",
        "checkpoints/generator-ema-00000020.safetensors",
        "checkpoints/state-00000020.safetensors",
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([1, 2], "expected a disback.trajectory manifest, found 'list'"),
        ({"kind": "disback.trajectory", "schema_version": True}, "unknown schema_version True"),
    ],
)
def test_what_is_not_a_manifest_object_is_refused(tmp_path, raw, message):
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert message in refusal(tmp_path, TrajectoryManifest)


def test_runs_are_folders_with_a_manifest_and_a_plain_name(template, tmp_path):
    shutil.copytree(template / "t", tmp_path / "t", symlinks=True)
    runs = tmp_path / "t" / "backtrack"
    (runs / "empty").mkdir()
    (runs / "-odd").mkdir()
    (runs / "-odd" / "manifest.json").write_text("{}")
    (runs / "linked").symlink_to(runs / "default")
    (runs / "file").write_text("")
    shutil.copytree(runs / "default", runs / "second")
    assert run_names(tmp_path / "t") == ["default", "second"]
    assert run_names(tmp_path / "nowhere") == []


def test_a_runs_generator_is_its_latest_ema_or_raw_file(template):
    run = template / RUN
    manifest = read_manifest(run, BacktrackManifest)
    ema = generator_file_of_run(template / "t", "default", "ema")
    raw = generator_file_of_run(template / "t", "default", "raw")
    assert ema == (run / manifest.generator_ema.file, manifest.generator_ema.sha256)
    assert raw == (run / manifest.generator.file, manifest.generator.sha256)


def test_a_missing_run_lists_the_runs_there_and_a_run_folder_is_pointed_at_its_trajectory(
    template, tmp_path
):
    with pytest.raises(DisbackError) as caught:
        generator_file_of_run(template / "t", "other", "ema")
    assert str(caught.value) == (
        f"{template / 't/backtrack/other'}: no backtrack run named 'other' (runs here: default; "
        "run `disback backtrack`)"
    )
    with pytest.raises(DisbackError) as caught:
        generator_file_of_run(template / RUN, "default", "ema")
    assert str(caught.value).endswith(
        f"(it has no runs yet; run `disback backtrack`); {template / RUN} is a backtrack run: "
        f"pass -T {template / 't'} --name default"
    )


def test_a_run_without_a_generator_or_a_verifier_says_so(template, tmp_path):
    shutil.copytree(template / "t", tmp_path / "t", symlinks=True)
    run = tmp_path / RUN
    with pytest.raises(DisbackError, match="not a --loss diffratio run"):
        verifier_of_run(run)
    edited(
        run,
        run,
        lambda raw: raw.update(
            status="running", step=0, generator=None, generator_ema=None, state=None
        ),
    )
    with pytest.raises(DisbackError, match="the run has not saved a generator yet"):
        generator_file_of_run(tmp_path / "t", "default", "ema")


def test_a_stored_run_keeps_a_setting_refused_for_new_runs_since(template, tmp_path):
    """Adaptive switching with patience >= interval is refused for new settings only."""
    edited(
        template / RUN,
        tmp_path,
        lambda raw: raw["config"].update(switch="adaptive", switch_patience=10, interval=10),
    )
    manifest = read_manifest(tmp_path, BacktrackManifest)
    assert (manifest.config.switch, manifest.config.switch_patience) == ("adaptive", 10)


def test_a_diffratio_run_made_before_lr_ratio_trained_its_ratio_at_lr_fake(template, tmp_path):
    """Read back as it ran: the ratio network's rate was --lr-fake's (and no fake score had
    one), its gradient weighted as VSD's."""

    def before_lr_ratio(raw):
        raw["config"].update(loss="diffratio", data="builtin:ring2d", lr_fake=3e-4)
        del raw["config"]["lr_ratio"], raw["config"]["ratio_weighting"]

    edited(template / RUN, tmp_path, before_lr_ratio)
    config = read_manifest(tmp_path, BacktrackManifest).config
    assert (config.lr_ratio, config.lr_fake) == (3e-4, None)
    assert config.ratio_weighting == "denoiser"  # the only weighting then
    current = BacktrackConfig(loss="diffratio", data="builtin:ring2d", lr_fake=3e-4)
    assert (current.lr_ratio, current.lr_fake) == (None, 3e-4)  # new settings are not moved


def test_the_kind_and_the_schema_version_found_are_named(small_trajectory, tmp_path):
    edited(small_trajectory, tmp_path, lambda raw: raw.update(kind="disback.backtrack"))
    assert refusal(tmp_path, TrajectoryManifest).endswith(
        "expected a disback.trajectory manifest, found 'disback.backtrack'"
    )
    edited(small_trajectory, tmp_path, lambda raw: raw.update(schema_version=SCHEMA_VERSION + 9))
    assert refusal(tmp_path, TrajectoryManifest).endswith(
        f"schema_version {SCHEMA_VERSION + 9} was written by a newer disback (this one reads up "
        f"to {SCHEMA_VERSION}); upgrade disback"
    )


def test_a_network_description_is_bounded_inclusively():
    fits = {"arch": "x" * (MAX_NETWORK_JSON - len(json.dumps({"arch": ""})))}
    assert len(json.dumps(fits)) == MAX_NETWORK_JSON and _bounded_network(fits) == fits
    with pytest.raises(ValueError) as caught:
        _bounded_network({"arch": fits["arch"] + "x"})
    assert str(caught.value) == f"a network description longer than {MAX_NETWORK_JSON} characters"


def test_manifests_are_written_indented_with_their_file_names_for_fields(
    small_trajectory, tmp_path
):
    write_manifest(tmp_path, read_manifest(small_trajectory, TrajectoryManifest))
    text = (tmp_path / "manifest.json").read_text()
    assert text.startswith('{\n  "') and text.endswith("}\n")
    raw = json.loads(text)
    assert "generator_init" in raw and "g0" not in raw
    assert raw["updated_at"].endswith("+00:00")  # UTC
    assert now().endswith("+00:00")


def test_two_runs_are_listed_when_a_third_is_missing(template, tmp_path):
    shutil.copytree(template / "t", tmp_path / "t", symlinks=True)
    shutil.copytree(tmp_path / RUN, tmp_path / "t/backtrack/second")
    with pytest.raises(DisbackError, match=r"\(runs here: default, second; run `disback"):
        generator_file_of_run(tmp_path / "t", "third", "ema")


def test_a_diffratio_runs_verifier_is_its_ratio_file(template, tmp_path):
    shutil.copytree(template / "t", tmp_path / "t", symlinks=True)
    run = tmp_path / RUN
    ratio = {"file": "checkpoints/ratio-00000020.safetensors", "sha256": "a" * 64}
    edited(run, run, lambda raw: raw.update(ratio=ratio))
    assert verifier_of_run(run) == (run / ratio["file"], "a" * 64)
