"""Old names (`ferkit.deprecations`): each still works where it was used, warns once per process, loses to
its new name, and shows in no listing.

The old names here come from the table itself, so that a new entry is tested without writing its name twice.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import save_file

from ferkit import cli, deprecations
from ferkit.deprecations import REMOVED_IN, RENAMES, OldNameWarning, rename_keys, resolve
from ferkit.models import count_parameters, create_model, list_models
from ferkit.train import PRESETS, TrainConfig
from ferkit.weights import METADATA_KEY, load_model, resolve_weights, shipped_models

OPTION_KINDS = {kind: kind.split()[1] for kind in RENAMES if kind.startswith("ferkit ")}
"""The table's command-line kinds ("ferkit train option") and their command ("train")."""


@pytest.fixture(autouse=True)
def fresh_warnings() -> Iterator[None]:
    """Each test starts as a new process would: no old name has warned yet."""
    deprecations.forget_warnings()
    yield
    deprecations.forget_warnings()


def old_name_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, OldNameWarning)]


@pytest.mark.parametrize(("kind", "old"), [(kind, old) for kind, table in RENAMES.items() for old in table])
def test_each_old_name_resolves_and_warns_exactly_once(kind: str, old: str) -> None:
    new = RENAMES[kind][old]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [resolve(kind, old) for _ in range(3)] == [new] * 3
    assert old_name_warnings(caught) == [f"the {kind} {old!r} is now called {new!r}; the old name goes in {REMOVED_IN}"]
    assert issubclass(OldNameWarning, FutureWarning)  # shown to users by default, unlike DeprecationWarning


def test_current_and_unknown_names_pass_through_silently() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve("architecture", "refcnn") == "refcnn"
        assert resolve("shipped model", "no-such-model") == "no-such-model"
        assert resolve("preset", "seed", warn=False) == "reference"  # a check that only compares names
    with pytest.warns(OldNameWarning):  # ... left the warning to the use that follows
        resolve("preset", "seed")


def test_where_both_names_are_given_the_new_one_wins() -> None:
    with pytest.warns(OldNameWarning, match="'out' is now called 'run_dir'"):
        assert rename_keys({"out": "old", "run_dir": "new", "epochs": 3}, "training option") == \
            {"run_dir": "new", "epochs": 3}
    assert rename_keys({"out": "old"}, "training option") == {"run_dir": "old"}
    with pytest.warns(OldNameWarning):
        config = TrainConfig.from_preset("reference", out="runs/old", run_dir="runs/new", tta="crops", views=2)
    assert (config.run_dir, config.views) == ("runs/new", 2)


@pytest.mark.parametrize("old", RENAMES["shipped model"])
def test_old_shipped_model_names_load_their_model(old: str) -> None:
    with pytest.warns(OldNameWarning):
        assert resolve_weights(old) == shipped_models()[RENAMES["shipped model"][old]]


def test_a_file_or_folder_on_disk_wins_over_an_old_model_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    old = next(iter(RENAMES["shipped model"]))
    Path(old).mkdir()  # a folder of that name, but no run in it: an error naming it, not the shipped model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=f"{old}: a folder without best.safetensors"):
            resolve_weights(old)


@pytest.mark.parametrize("old", RENAMES["architecture"])
def test_old_architecture_names_build_their_model(old: str) -> None:
    with pytest.warns(OldNameWarning):
        model = create_model(old)
    assert count_parameters(model) == count_parameters(create_model(RENAMES["architecture"][old]))


@pytest.mark.parametrize("old", RENAMES["preset"])
def test_old_preset_names_give_their_recipe(old: str) -> None:
    with pytest.warns(OldNameWarning):
        config = TrainConfig.from_preset(old)
    assert config == TrainConfig.from_preset(RENAMES["preset"][old])
    config = TrainConfig(preset=old)
    config.validate()  # accepted, silently: from_preset or fit resolves it


def test_old_training_options_set_their_fields() -> None:
    with pytest.warns(OldNameWarning) as caught:
        config = TrainConfig.from_preset("reference", out="runs/elsewhere", tta="flip")
    assert (config.run_dir, config.views) == ("runs/elsewhere", 2)
    assert len(caught) == len(RENAMES["training option"])


def test_a_format_1_metadata_field_is_read_under_its_new_name(tmp_path: Path) -> None:
    model = create_model("refcnn")
    path = tmp_path / "old.safetensors"
    old_metadata = json.dumps({"arch": "refcnn", "tta": "crops"})  # format 1 (ferkit 0.1)
    save_file(dict(model.state_dict()), str(path), metadata={METADATA_KEY: old_metadata})
    with pytest.warns(OldNameWarning, match="the weights metadata field 'tta' is now called 'views'"):
        assert load_model(path)[1].views == 10


OLD_VALUES = {"--views": ("flip", 2), "--detect-max-side": ("320", 320)}
"""A value to give each old option whose new option converts it, and what the new option gets."""


@pytest.mark.parametrize(("kind", "old"), [(kind, old) for kind in OPTION_KINDS for old in RENAMES[kind]])
def test_old_command_line_options_set_the_new_option(kind: str, old: str, capsys: pytest.CaptureFixture[str]) -> None:
    command, new = OPTION_KINDS[kind], RENAMES[kind][old]
    given, expected = OLD_VALUES.get(new, ("some/where", "some/where"))
    dest = new.removeprefix("--").replace("-", "_")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = cli.build_parser().parse_args([command, old, given, old, given])
    assert getattr(args, dest) == expected
    assert len(old_name_warnings(caught)) == 1
    # Both names: the new one wins, before or after the old one.
    other = "4" if new == "--detect-max-side" else "10" if new == "--views" else "else/where"
    for argv in ([command, new, other, old, given], [command, old, given, new, other]):
        assert str(getattr(cli.build_parser().parse_args(argv), dest)) == other


@pytest.mark.parametrize("command", sorted(set(OPTION_KINDS.values())))
def test_old_options_are_not_in_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    help_text = capsys.readouterr().out
    for old in RENAMES[f"ferkit {command} option"]:
        assert f"{old} " not in help_text and f"{old}\n" not in help_text and f"{old}," not in help_text
    for new in RENAMES[f"ferkit {command} option"].values():
        assert new in help_text


def test_the_command_prints_each_warning_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--debug", "export", "--out", "x.pt", "--out", "y.pt", "--help"])
    assert capsys.readouterr().err == ("ferkit: warning: the ferkit export option '--out' is now called '--output'; "
                                       f"the old name goes in {REMOVED_IN}\n")


def test_old_names_are_in_no_listing(capsys: pytest.CaptureFixture[str]) -> None:
    assert not set(RENAMES["architecture"]) & set(list_models())
    assert not set(RENAMES["preset"]) & set(PRESETS)
    assert not set(RENAMES["shipped model"]) & set(shipped_models())
    assert cli.main(["models", "--json", "--speed-seconds", "0"]) == 0
    listed = {row["name"] for row in json.loads(capsys.readouterr().out)}
    assert listed == set(shipped_models()) and not listed & set(RENAMES["shipped model"])
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    preset_help = re.search(r"\n  --preset PRESET\s+(.*?)\n  --", capsys.readouterr().out, re.S)
    assert preset_help and "reference" in preset_help.group(1)
    assert not set(re.findall(r"\w+", preset_help.group(1))) & set(RENAMES["preset"])
    with pytest.raises(ValueError) as err:
        create_model("no-such-architecture")
    assert not any(f"{old}," in str(err.value) or str(err.value).endswith(old) for old in RENAMES["architecture"])
