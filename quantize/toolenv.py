"""The environment quantize gives the programs it runs (llama.cpp's tools, the converter, git).

Only what they need to run: PATH, HOME, the locale, the temporary folder, thread and device
settings. Nothing else from our environment reaches them, so no token (HF_TOKEN, cloud or CI
credentials) is ever readable by a tool or by code a tool loads. The Hugging Face libraries a
tool imports run offline and look for a stored login in an empty folder.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

KEPT = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "SYSTEMROOT")
KEPT_PATTERN = re.compile(r"^(LC_\w+|OMP_\w+|MKL_\w+|OPENBLAS_\w+|GGML_\w+|CUDA_\w+|HIP_\w+|ROCR_\w+|"
                          r"NVIDIA_\w+|LD_LIBRARY_PATH|VIRTUAL_ENV)$")
# Names that must never pass, even if a pattern above would let them.
SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY", re.IGNORECASE)
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}


def tool_env(extra: dict[str, str] | None = None, hf_offline: bool = False) -> dict[str, str]:
    """A minimal environment for a subprocess; `hf_offline` for tools that import Hugging Face libraries."""
    env = {name: value for name, value in os.environ.items()
           if (name in KEPT or KEPT_PATTERN.match(name)) and not SECRET.search(name)}
    if hf_offline:
        home = Path(tempfile.gettempdir()) / f"quantize-tool-hf-home-{os.getuid()}"
        home.mkdir(mode=0o700, exist_ok=True)
        if home.stat().st_uid != os.getuid() or any(home.iterdir()):
            home = Path(tempfile.mkdtemp(prefix="quantize-tool-hf-home-"))
        env.update(OFFLINE, HF_HOME=str(home))  # no stored login to find there
    env.update(extra or {})
    return env
