"""`quantize doctor`: which tools and libraries this machine has for each format, and what is missing."""

from __future__ import annotations

import os
import platform
from typing import Any

from .calibration import PACKAGED_WIKITEXT, WIKITEXT_ENV, _local_wikitext, packaged_wikitext
from .errors import BadInput
from .manifest import installed_version

LIBRARIES = {"quantize": "all", "torch": "gptq, awq", "transformers": "all", "gptqmodel": "gptq, awq",
             "optimum": "gptq, awq (loading)", "huggingface_hub": "publish, cards", "gguf": "gguf (reading)"}


def report() -> dict[str, Any]:
    from huggingface_hub import constants, get_token

    from .engines.llamacpp import tool_report

    libraries = [{"name": name, "version": installed_version(name), "needed_for": use} for name, use in LIBRARIES.items()]
    return {
        "python": platform.python_version(),
        "libraries": libraries,
        "llama_cpp": tool_report(),
        "wikitext": wikitext_report(),
        "hub": {"endpoint": constants.ENDPOINT, "token": "found" if get_token() else "missing",
                "offline": bool(constants.HF_HUB_OFFLINE)},
        "cpu_cores": os.cpu_count(),
    }


def wikitext_report(config: str = "wikitext-2-raw-v1", split: str = "test") -> dict[str, Any]:
    """Where the default calibration text (wikitext-2-raw-v1 test) would be read from, and what else there is."""
    env_dir = os.environ.get(WIKITEXT_ENV) or None
    datasets_installed = installed_version("datasets") is not None
    try:
        local = _local_wikitext(config, split)
        env_problem = None
    except BadInput as exc:  # QUANTIZE_WIKITEXT_DIR set to something that is not a folder
        local, env_problem = None, str(exc)
    if local:
        source = local[1]
    else:
        source = "datasets (online)" if datasets_installed and not env_problem else None
    return {"text": f"{config}/{split}", "source": source, "local_copy": str(local[0]) if local else None,
            "env": WIKITEXT_ENV, "env_dir": env_dir, "env_problem": env_problem,
            "packaged_dir": str(PACKAGED_WIKITEXT), "packaged": packaged_wikitext(),
            "datasets_installed": datasets_installed}


def problems(facts: dict[str, Any]) -> list[str]:
    found = [f"{lib['name']} is not installed (needed for {lib['needed_for']})"
             for lib in facts["libraries"] if lib["version"] is None]
    if not facts["llama_cpp"]["found"]:
        found.append(f"llama.cpp: {facts['llama_cpp']['problem']}")
    wikitext = facts["wikitext"]
    if wikitext["env_problem"]:
        found.append(wikitext["env_problem"])
    elif wikitext["source"] is None:
        found.append(f"no wikitext {wikitext['text']}: not in the copy shipped with quantize "
                     f"({wikitext['packaged_dir']}); set {WIKITEXT_ENV} or install `datasets`")
    return found
