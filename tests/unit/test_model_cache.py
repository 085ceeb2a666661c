"""The converted-model caches (the GGUF dequantised for torch, its tokenizer for MLX) are
published as whole folders: a second sleeptui that starts while the first is converting
finds one complete folder, whoever finishes first. The statistics cached beside them (Ĉ, M,
the priors) are single files, written the same way by each start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from sleeptui.backends import publish_folder

from sleeptui.covariance import _store


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


STORE_MANY = """
import sys
import numpy as np
from pathlib import Path
from sleeptui.covariance import _store
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    _store(Path(sys.argv[1]), {"layer.4": np.eye(16)})
"""


def test_two_first_starts_caching_the_same_statistics_at_once_both_finish(tmp_path):
    """Ĉ, M and the priors are cached by whichever start computes them first; two starts at
    once (the app and a CLI command on a fresh machine) write the same file together."""
    path = tmp_path / "covariance" / "m.safetensors"
    rounds = 300
    other = subprocess.Popen(
        [sys.executable, "-c", STORE_MANY, str(path), str(rounds)], stdout=subprocess.PIPE
    )
    try:
        assert other.stdout.readline() == b"ready\n"
        for _ in range(rounds):
            _store(path, {"layer.4": np.eye(16)})
    finally:
        assert other.wait(timeout=120) == 0
    np.testing.assert_array_equal(load_file(str(path))["layer.4"], np.eye(16, dtype=np.float32))
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_importing_bitsandbytes_under_sleeptui_says_nothing_of_hub_kernels():
    """bitsandbytes asks the Hub for a CPU kernel when it is imported (peft imports it for
    every consolidation); offline that fails and, unfiltered, says so on stderr."""
    pytest.importorskip("bitsandbytes")
    code = "import sleeptui.models, bitsandbytes, peft"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "kernels-community" not in proc.stderr


@pytest.mark.parametrize("module", ["sleeptui.backends.torch_backend", "sleeptui.cli"])
def test_any_sleeptui_import_puts_the_hub_offline_before_transformers_reads_it(module):
    """huggingface_hub reads HF_HUB_OFFLINE once, on its first import; a backend module
    imported first (as the benches do) used to load transformers before anything set it,
    and a shell's HF_HUB_OFFLINE=0 must not let a run reach the Hub either."""
    code = f"import {module}, huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
