"""The large-model path on a GPU: a randomly initialised Llama of a real shape.

No weights can be downloaded here, so the model is random (its recall figures mean nothing;
what is measured is speed and memory). It is saved as a bf16 checkpoint and loaded the way a
user's model is (``TorchBackend.from_folder``: bf16, accelerate placement, or NF4), then:

* wake: median seconds per fact, facts written one at a time with the preset's settings;
* sleep: one cycle over those memories;
* peak GPU memory;
* generation tokens/s before any memory and after restarting on a folder of ``--memories``
  memories (merged into the weights at start-up, so the ratio should be 1.0);
* the same wake and generation figures with ``--four-bit`` (bitsandbytes NF4).

    python bench/gpu.py --tokenizer DIR                   # 8B shape, all 32 layers
    python bench/gpu.py --tokenizer DIR --shape tiny      # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import OUT, load_facts  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sleeptui.backends.torch_backend import TorchBackend  # noqa: E402

from sleeptui.engine import Engine  # noqa: E402
from sleeptui.models import ModelSource  # noqa: E402
from sleeptui.presets import PRESETS  # noqa: E402
from sleeptui.state import StateFolder  # noqa: E402

SHAPES = {
    # Llama-3.1-8B: the preset's layers and hyperparameters apply unchanged.
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
    ),
}
GEN_TOKENS = 128
GEN_RUNS = 3
console = Console()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer folder")
    p.add_argument("--facts", type=Path, default=None, help="facts file (default: the bench pool)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--layers", type=int, default=None, help="fewer layers, same widths")
    p.add_argument("--n", type=int, default=40, help="facts written one at a time")
    p.add_argument("--memories", type=int, default=200, help="memories for the generation ratio")
    p.add_argument("--four-bit-n", type=int, default=20, help="facts written in NF4 (0: skip)")
    p.add_argument("--cov-tokens", type=int, default=None, help="override the preset's")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--out", type=Path, default=OUT / "gpu.json")
    args = p.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="sleeptui-gpu-"))
    os.environ.setdefault("SLEEPTUI_CACHE", str(work / "cache"))
    facts = load_facts(args.facts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    preset = PRESETS["llama-3.1-8b"]
    edit = preset.edit
    if shape["num_hidden_layers"] <= max(edit.layers):  # keep the band at the same depth
        start = round(min(edit.layers) / 32 * shape["num_hidden_layers"])
        edit = replace(edit, layers=tuple(range(start, start + len(edit.layers))))
    if args.cov_tokens:
        edit = replace(edit, cov_tokens=args.cov_tokens)
    preset = replace(preset, edit=edit, name=f"random-{args.shape}")

    results: dict = {"device": _device_name(), "shape": shape, "edit_layers": list(edit.layers)}
    folder = work / "model"
    with _timed(results, "build_s"):
        _save_random_llama(shape, args.tokenizer, folder)
    console.print(f"random Llama ({args.shape}, {shape['num_hidden_layers']} layers) in {folder}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    results["bf16"] = run(folder, preset, facts, args.n, args.memories, device, False, work)
    args.out.write_text(json.dumps(results, indent=2))  # kept if the NF4 run fails
    if args.four_bit_n:
        results["nf4"] = run(folder, preset, facts, args.four_bit_n, 0, device, True, work)
        args.out.write_text(json.dumps(results, indent=2))
    print_table(results)
    console.print(f"wrote {args.out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def run(folder, preset, facts, n, memories, device, four_bit, work) -> dict:
    """Wake, sleep and generation figures for one way of loading the model."""
    tag = "nf4" if four_bit else "bf16"
    out: dict = {}
    source = ModelSource(preset=preset, path=folder)
    state = work / f"state-{tag}"
    shutil.rmtree(state, ignore_errors=True)
    _reset_peak()
    with _timed(out, "load_s"):
        backend = TorchBackend.from_folder(folder, device, preset.edit.layers, four_bit=four_bit)
    out["weights_gib"] = _gib(_cuda_bytes())
    prompt = backend.encode(backend.chat_text([{"role": "user", "content": "Tell me a story."}]))
    out["gen_tok_s_base"] = _generation_speed(backend, prompt)

    engine = Engine(backend, source, StateFolder.open(state))
    with _timed(out, "covariance_s"):
        engine.editor()
    latencies = []
    for i, fact in enumerate(facts[:n]):
        start = time.perf_counter()
        engine.remember([fact])
        latencies.append(time.perf_counter() - start)
        console.print(f"  {tag} wake {i + 1}/{n}: {latencies[-1]:.2f} s", highlight=False)
    out["wake_s_median"] = statistics.median(latencies)
    out["wake_s_first"] = latencies[0]
    out["wake_s_max"] = max(latencies)
    out["peak_gib_wake"] = _gib(_cuda_peak())
    if not four_bit:
        with _timed(out, "sleep_cycle_s"):
            report = engine.sleep()
        out["sleep"] = {"degraded": report.degraded, "rolled_back": report.rolled_back}
        out["peak_gib_sleep"] = _gib(_cuda_peak())
    more = facts[n:memories]
    if more:
        with _timed(out, "batched_wake_s"):
            for start in range(0, len(more), 20):
                engine.remember(more[start : start + 20], batch=True)
    out["memories"] = len(engine.memories)
    engine.close()
    del engine, backend
    _free()

    # Restart: a new process loads the base weights and merges every delta in one pass.
    backend = TorchBackend.from_folder(folder, device, preset.edit.layers, four_bit=four_bit)
    with _timed(out, "restart_apply_s"):
        engine = Engine(backend, source, StateFolder.open(state))
    out["gen_tok_s_memories"] = _generation_speed(backend, prompt)
    out["gen_ratio"] = out["gen_tok_s_memories"] / out["gen_tok_s_base"]
    out["peak_gib"] = _gib(_cuda_peak())
    engine.close()
    del engine, backend
    _free()
    return out


def _generation_speed(backend: TorchBackend, prompt: list[int]) -> float:
    """Median tokens/s of greedy generation of exactly ``GEN_TOKENS`` tokens."""
    ids = torch.tensor([prompt], device=backend._device)
    speeds = []
    for _ in range(GEN_RUNS + 1):  # the first run warms up
        _sync()
        start = time.perf_counter()
        with torch.inference_mode():
            backend.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=GEN_TOKENS,
                min_new_tokens=GEN_TOKENS,
                do_sample=False,
                pad_token_id=backend.pad_id,
            )
        _sync()
        speeds.append(GEN_TOKENS / (time.perf_counter() - start))
    return statistics.median(speeds[1:])


def _save_random_llama(shape: dict, tokenizer: Path, folder: Path) -> None:
    """A randomly initialised Llama saved as a bf16 checkpoint with ``tokenizer``'s files."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    config = LlamaConfig(**shape, tie_word_embeddings=False, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    _free()


def print_table(results: dict) -> None:
    table = Table(
        title=f"sleeptui on {results['device']}: random Llama, edit layers {results['edit_layers']}"
    )
    table.add_column("figure")
    modes = [m for m in ("bf16", "nf4") if isinstance(results.get(m), dict)]
    for m in modes:
        table.add_column(m, justify="right")
    keys = [k for k in results[modes[0]] if k != "sleep"]
    for k in keys:
        row = [_fmt(results[m].get(k)) for m in modes]
        table.add_row(k, *row)
    if "sleep" in results["bf16"]:
        table.add_row(
            "sleep (degraded, rolled back)", str(tuple(results["bf16"]["sleep"].values()))
        )
    console.print(table)


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


class _timed:
    def __init__(self, out: dict, key: str) -> None:
        self.out, self.key = out, key

    def __enter__(self):
        _sync()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        _sync()
        self.out[self.key] = time.perf_counter() - self.start


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _cuda_bytes() -> int | None:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else None


def _gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
