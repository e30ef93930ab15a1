"""The README documents every server setting and keeps the two quickstart commands first."""

from pathlib import Path

from service.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table():
    missing = [f"MAE_{name.upper()}" for name in Settings.model_fields if f"`MAE_{name.upper()}`" not in README]
    assert not missing, missing


def test_quickstart_has_the_two_commands_first():
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    commands = [line.split("#")[0].strip() for line in quickstart.split("```sh", 1)[1].split("```", 1)[0].splitlines()]
    assert [c for c in commands if c][:2] == ["make serve", "make test"]
