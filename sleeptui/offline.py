"""Nothing sleeptui does may reach a model hub; imported first, by the package itself.

The Hugging Face libraries read ``HF_HUB_OFFLINE`` once, when ``huggingface_hub`` is first
imported, so it is set here, before any module of sleeptui (``sleeptui.backends`` included)
can import transformers. It is set, not defaulted: weights come from a local path or the
user's cache, and a shell's ``HF_HUB_OFFLINE=0`` must not let a run fetch anything.
"""

from __future__ import annotations

import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


class _NoHubKernels(logging.Filter):
    """Drops the two lines bitsandbytes and ``kernels`` log when bitsandbytes is imported
    (peft imports it for every consolidation) on a CPU with AVX512-BF16: it asks the Hub for
    a kernel, which offline can only fail, and says so on stderr, under the app too."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


for _logger in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_logger).addFilter(_NoHubKernels())
