"""Settings parse typed values, name the variable on bad input, and the README documents all."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import SETTINGS, Settings, SettingsError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_are_embedded():
    settings = Settings.from_env({})
    assert settings.database_url.startswith("sqlite:///")
    assert settings.redis_url == ""
    assert settings.storage_url.endswith("var/storage")


def test_typed_parsing():
    settings = Settings.from_env({"MASKMILL_MAX_BODY_BYTES": "2048"})
    assert settings.max_body_bytes == 2048


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MASKMILL_MAX_BODY_BYTES": "lots"}, "MASKMILL_MAX_BODY_BYTES"),
        ({"MASKMILL_MAX_BODY_BYTES": "10"}, ">= 1024"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


def test_readme_documents_every_setting_with_its_default():
    text = README.read_text()
    rows = {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"^\| `(MASKMILL_[A-Z_]+)` \| `?([^|`]*)`? \|", text, re.M)
    }
    for setting in SETTINGS:
        assert setting.env in rows, f"README lacks {setting.env}"
        assert rows[setting.env] == (setting.default or "(empty)"), setting.env
