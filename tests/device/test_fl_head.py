"""Which package a SuperNode's head fine-tuning reads (node-config ``model-package``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.device.core.errors import ConfigError
from edgefleet.device.fl.head import load_head, package_dir


def test_an_updater_folder_resolves_to_its_active_slot(tmp_path: Path) -> None:
    (tmp_path / "slots.json").write_text(json.dumps({"active": "b", "slots": {}}))
    assert package_dir(str(tmp_path)) == tmp_path / "slots" / "b"
    assert package_dir(str(tmp_path / "pkg")) == tmp_path / "pkg"


@pytest.mark.parametrize("pointer", ['{"active": null}', '{"active": "../x"}', "garbage"])
def test_no_active_slot_is_a_clear_error(tmp_path: Path, pointer: str) -> None:
    (tmp_path / "slots.json").write_text(pointer)
    with pytest.raises(ConfigError, match="no active model slot"):
        package_dir(str(tmp_path))


def test_a_head_round_on_a_node_without_a_package_is_refused() -> None:
    with pytest.raises(ConfigError, match="names no model-package"):
        load_head("", "0" * 64)


def test_a_package_without_a_trainable_head_is_refused(digits_package: Path) -> None:
    with pytest.raises(ConfigError, match="has no trainable head"):
        load_head(str(digits_package), "0" * 64)
