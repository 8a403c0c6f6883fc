"""docs/configuration.md is generated from the settings model and kept current."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from breakglass_tui import config_doc
from breakglass_tui.config import DEFAULT_COLD_PATH_POINTER, PREFIX, Settings


def test_the_reference_is_current() -> None:
    assert config_doc.DOC.read_text() == config_doc.render(), (
        "docs/configuration.md is out of date: run python -m breakglass_tui.config_doc"
    )


def test_every_setting_has_a_row_with_a_meaning() -> None:
    text = config_doc.DOC.read_text()
    rows = {row.variable: row for row in config_doc.rows()}
    for name in Settings.model_fields:
        variable = PREFIX + name.upper()
        assert f"| `{variable}` |" in text, variable
        assert len(rows[variable].meaning) > 10, variable


def test_check_mode_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(config_doc.render().replace("SSH port", "port"))
    assert config_doc.main(["--check", "--output", str(stale)]) == 1
    assert config_doc.main(["--output", str(stale)]) == 0
    assert config_doc.main(["--check", "--output", str(stale)]) == 0


class _Sample(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAMPLE_")

    # -- one section ---------------------------------------------------------------------------
    # How many widgets.
    widgets: int = Field(3, ge=1)
    colour: str = "blue"  # The widgets' colour.
    size: float = Field(1.5, description="Their size in metres.")
    secret_path: str = "x/y"  # noqa: RUF100, S105 - a path, not a secret


class _Undocumented(BaseSettings):
    documented: int = 1  # Says what it is.
    silent: int = 2


def test_rows_come_from_any_model_descriptions_then_comments() -> None:
    """Generic: settings added later to the model appear with no change to the generator."""
    rows = {row.variable: row for row in config_doc.rows(_Sample, "SAMPLE_")}
    assert rows["SAMPLE_WIDGETS"].meaning == "How many widgets."
    assert rows["SAMPLE_WIDGETS"].type == "`int` (≥ 1)"
    assert rows["SAMPLE_WIDGETS"].default == "`3`"
    assert rows["SAMPLE_WIDGETS"].section == "one section"
    assert rows["SAMPLE_COLOUR"].meaning == "The widgets' colour."
    assert rows["SAMPLE_SIZE"].meaning == "Their size in metres."
    assert rows["SAMPLE_SECRET_PATH"].meaning == "A path, not a secret."


def test_an_undocumented_setting_is_refused_by_name() -> None:
    with pytest.raises(config_doc.UndocumentedSetting, match="silent"):
        config_doc.rows(_Undocumented, "X_")


def test_the_cold_path_pointer_is_a_setting_whose_default_names_no_site(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().cold_path_pointer == DEFAULT_COLD_PATH_POINTER
    for site_specific in ("iDRAC", "infra/docs", "knock", "2026-05-30"):
        assert site_specific not in DEFAULT_COLD_PATH_POINTER
    monkeypatch.setenv("BREAKGLASS_COLD_PATH_POINTER", "Use the iDRAC; see runbooks/cold.md.")
    assert Settings().cold_path_pointer == "Use the iDRAC; see runbooks/cold.md."
