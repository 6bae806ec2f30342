"""`quantize doctor`: which tools and libraries this machine has for each format, and what is missing."""

from __future__ import annotations

import os
import platform
from typing import Any

from .calibration import WIKITEXT_ENV, _local_wikitext
from .manifest import installed_version

LIBRARIES = {"quantize": "all", "torch": "gptq, awq", "transformers": "all", "gptqmodel": "gptq, awq",
             "optimum": "gptq, awq (loading)", "huggingface_hub": "publish, cards", "gguf": "gguf (reading)"}


def report() -> dict[str, Any]:
    from huggingface_hub import constants, get_token

    from .engines.llamacpp import tool_report

    libraries = [{"name": name, "version": installed_version(name), "needed_for": use} for name, use in LIBRARIES.items()]
    wikitext = _local_wikitext("wikitext-2-raw-v1", "test")
    return {
        "python": platform.python_version(),
        "libraries": libraries,
        "llama_cpp": tool_report(),
        "wikitext": {"local_copy": str(wikitext) if wikitext else None, "env": WIKITEXT_ENV,
                     "datasets_installed": installed_version("datasets") is not None},
        "hub": {"endpoint": constants.ENDPOINT, "token": "found" if get_token() else "missing",
                "offline": bool(constants.HF_HUB_OFFLINE)},
        "cpu_cores": os.cpu_count(),
    }


def problems(facts: dict[str, Any]) -> list[str]:
    found = [f"{lib['name']} is not installed (needed for {lib['needed_for']})"
             for lib in facts["libraries"] if lib["version"] is None]
    if not facts["llama_cpp"]["found"]:
        found.append(f"llama.cpp: {facts['llama_cpp']['problem']}")
    if not facts["wikitext"]["local_copy"] and not facts["wikitext"]["datasets_installed"]:
        found.append(f"no wikitext: set {WIKITEXT_ENV} or install `datasets`")
    return found
