"""The converted-model caches (the GGUF dequantised for torch, its tokenizer for MLX) are
published as whole folders: a second sleeptui that starts while the first is converting
finds one complete folder, whoever finishes first."""

from __future__ import annotations

from pathlib import Path

import pytest
from sleeptui.backends import publish_folder


def converted(root: Path, name: str, text: str) -> Path:
    tmp = root / name
    tmp.mkdir()
    (tmp / "config.json").write_text(text, encoding="utf-8")
    return tmp


def test_the_first_conversion_to_finish_is_kept_and_the_second_is_cleared_away(tmp_path):
    folder = tmp_path / "models" / "abc"
    folder.parent.mkdir()
    publish_folder(converted(tmp_path, ".convert-1", "first"), folder)
    assert (folder / "config.json").read_text("utf-8") == "first"
    assert not (tmp_path / ".convert-1").exists()

    publish_folder(converted(tmp_path, ".convert-2", "second"), folder)  # no error
    assert (folder / "config.json").read_text("utf-8") == "first"
    assert not (tmp_path / ".convert-2").exists()


def test_a_failure_that_is_not_a_finished_folder_is_raised(tmp_path):
    tmp = converted(tmp_path, ".convert-1", "first")
    with pytest.raises(OSError):
        publish_folder(tmp, tmp_path / "no such parent" / "abc")
    assert tmp.is_dir()  # the caller clears it away, as the conversions do
