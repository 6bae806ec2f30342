"""The llama.cpp tools: finding them, running them, and reading what they print.

Where the tools come from, first match wins:
1. `QUANTIZE_LLAMA_CPP`: a folder of the user's own llama.cpp build, holding convert_hf_to_gguf.py
   (with its conversion/ package and gguf-py/) and the binaries in the folder, bin/ or build/bin/.
   When it is set, nothing else is tried: a broken folder is an error, not a silent fallback.
2. The cache built by scripts/setup_llamacpp.sh: `$QUANTIZE_CACHE/llama.cpp-<version>/`
   (QUANTIZE_CACHE defaults to ~/.cache/quantize), llama.cpp as vendored in the pinned
   llama-cpp-python sdist.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput, WorkFailed
from ..toolenv import tool_env

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # keep in step with VERSION in scripts/setup_llamacpp.sh
FOLDER_ENV = "QUANTIZE_LLAMA_CPP"
CACHE_ENV = "QUANTIZE_CACHE"
BINARIES = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-gguf-split")
CONVERTER = "convert_hf_to_gguf.py"
BINARY_FOLDERS = (".", "bin", "build/bin")
SETUP_HINT = f"run scripts/setup_llamacpp.sh, or set {FOLDER_ENV} to your own llama.cpp build"
VERSION_TIMEOUT_S = 20

# llama-perplexity --kl-divergence: its closing statistics (perplexity.cpp, kl_divergence()).
KLD_STATISTICS = {
    "perplexity": re.compile(r"Mean PPL\(Q\)\s*:\s*([0-9.]+(?:[eE][+-]?\d+)?|nan|inf)"),
    "baseline_perplexity": re.compile(r"Mean PPL\(base\)\s*:\s*([0-9.]+(?:[eE][+-]?\d+)?|nan|inf)"),
    "kld_mean": re.compile(r"Mean\s+KLD:\s*(-?[0-9.]+(?:[eE][+-]?\d+)?|nan|inf)"),
    "kld_p99": re.compile(r"99\.0%\s+KLD:\s*(-?[0-9.]+(?:[eE][+-]?\d+)?|nan|inf)"),
    "top1_percent": re.compile(r"Same top p:\s*([0-9.]+|nan)"),
}
# what kl_divergence() logs before giving up (it still exits 0)
KLD_REFUSAL = re.compile(r"^.*kl_divergence: .*(?:inconsistent|failed|does not look|Increase it).*$", re.MULTILINE)
# llama-quantize, for rows a type can't hold:
# "warning: blk.0.ffn_down.weight - ncols 576 not divisible by 256 (required for type q6_K) -> falling back to q8_0"
FALLBACK = re.compile(r"(\S+)\s+-\s+ncols\s+(\d+)\s+not divisible by\s+(\d+)\s+\(required for type\s+(\S+)\s*\)"
                      r".*?falling back to\s+(\S+)")
FALLBACK_TOTAL = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")
TOOL_VERSION = re.compile(r"^version:\s*(.+?)\s*$", re.MULTILINE)  # "version: 0.5.0-dev (build 1, commit 0c1e570)"
REGISTERED = re.compile(r"\.register\(([^)]*)\)")
QUOTED = re.compile(r"[\"']([A-Za-z0-9_.-]+)[\"']")


@dataclass(frozen=True)
class LlamaCpp:
    """A usable llama.cpp installation: where each tool is and which version it is."""

    root: Path  # holds convert_hf_to_gguf.py, conversion/ and gguf-py/
    origin: str  # "QUANTIZE_LLAMA_CPP" or "cache"
    binaries: dict[str, Path]
    build_info: dict[str, str] = field(default_factory=dict)  # BUILD.json of a cached build

    @property
    def converter(self) -> Path:
        return self.root / CONVERTER

    def tool(self, name: str) -> Path:
        return self.binaries[name]

    def version(self) -> str:
        """e.g. "0c1e57098 (llama-cpp-python 0.3.36)", or for a user build "6500 (1a2b3c4)" as its tools say."""
        if self.build_info:
            return f"{self.build_info.get('llama_cpp_commit', 'unknown')} " \
                   f"(llama-cpp-python {self.build_info.get('llama_cpp_python', '?')})"
        return binary_version(self.tool("llama-perplexity")) or "unknown"

    def converter_env(self) -> dict[str, str]:
        """The converter's environment: minimal (no tokens), offline, its own gguf-py first (PyPI's gguf
        lags behind)."""
        paths = [str(self.root / "gguf-py")] if (self.root / "gguf-py").is_dir() else []
        pythonpath = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])
        return tool_env({"PYTHONPATH": pythonpath} if pythonpath else {}, hf_offline=True)


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "quantize")
    return Path(base).expanduser()


def cached_build_dir() -> Path:
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def _find_binary(root: Path, name: str) -> Path | None:
    for folder in BINARY_FOLDERS:
        candidate = root / folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
    return None


def _read_build_info(root: Path) -> dict[str, str]:
    try:
        return json.loads((root / "BUILD.json").read_text())
    except (OSError, ValueError):
        return {}


def _candidate_root() -> tuple[Path, str]:
    if os.environ.get(FOLDER_ENV):
        return Path(os.environ[FOLDER_ENV]).expanduser().resolve(), FOLDER_ENV
    return cached_build_dir(), "cache"


def find_llama_cpp() -> LlamaCpp:
    """The llama.cpp tools to use; BadInput (one line) when they are missing or incomplete."""
    root, origin = _candidate_root()
    where = f"{FOLDER_ENV}={root}" if origin == FOLDER_ENV else f"no llama.cpp build in {root}"
    if not root.is_dir():
        raise BadInput(f"llama.cpp tools not found ({where}{' does not exist' if origin == FOLDER_ENV else ''}): "
                       f"{SETUP_HINT}")
    binaries = {name: _find_binary(root, name) for name in BINARIES}
    missing = [name for name, path in binaries.items() if path is None]
    if not (root / CONVERTER).is_file():
        missing.append(CONVERTER)
    if missing:
        raise BadInput(f"llama.cpp tools incomplete in {root} (missing {', '.join(missing)}): {SETUP_HINT}")
    return LlamaCpp(root, origin, binaries, _read_build_info(root))


@functools.lru_cache(maxsize=None)
def binary_version(binary: Path) -> str | None:
    """What `<tool> --version` says, e.g. "0.5.0-dev (build 1, commit 0c1e570)"; None when it can't tell."""
    try:
        result = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                                errors="replace", timeout=VERSION_TIMEOUT_S, env=tool_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = TOOL_VERSION.search(result.stdout + result.stderr)
    return match.group(1) if match else None


def tool_report() -> dict:
    """For `quantize doctor`: where the tools are, their versions, or why they can't be used."""
    root, origin = _candidate_root()
    report = {"origin": origin, "root": str(root), "pinned": f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}",
              "found": False, "version": None, "problem": None, "tools": []}
    try:
        tools = find_llama_cpp()
    except BadInput as exc:
        report["problem"] = str(exc)
        return report
    report.update(found=True, version=tools.version())
    for name, path in tools.binaries.items():
        report["tools"].append({"name": name, "path": str(path), "version": binary_version(path) or report["version"]})
    report["tools"].append({"name": CONVERTER, "path": str(tools.converter), "version": gguf_py_version(tools.root)})
    return report


def gguf_py_version(root: Path) -> str | None:
    """The version of the converter's own gguf-py (from its pyproject.toml)."""
    try:
        text = (root / "gguf-py" / "pyproject.toml").read_text()
    except OSError:
        return None
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return f"gguf-py {match.group(1)}" if match else None


# --- running a tool -----------------------------------------------------------------------

@dataclass(frozen=True)
class ToolOutput:
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout + "\n" + self.stderr


def run_tool(command: list[str | Path], log_file: Path, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> ToolOutput:
    """Run one tool to completion; its full output goes to `log_file`; failure is a one-line WorkFailed.

    The tool gets `env`, else a minimal environment without tokens (quantize.toolenv), never ours.
    """
    args = [str(part) for part in command]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(args, cwd=cwd, env=env if env is not None else tool_env(), capture_output=True,
                            text=True, errors="replace")
    log_file.write_text(f"$ {' '.join(args)}\n# exit {result.returncode}\n--- stdout\n{result.stdout}\n"
                        f"--- stderr\n{result.stderr}\n")
    if result.returncode != 0:
        raise WorkFailed(f"{Path(args[1] if args[0] == sys.executable else args[0]).name} failed "
                         f"(exit {result.returncode}): {last_error_line(result.stderr or result.stdout)} "
                         f"[log: {log_file}]")
    return ToolOutput(result.stdout, result.stderr)


def last_error_line(output: str) -> str:
    """The line most likely to explain a failure: the last one mentioning an error, else the last one."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"error|failed|exception|not supported", line, re.IGNORECASE):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


# --- the steps ----------------------------------------------------------------------------

def convert_command(tools: LlamaCpp, model_dir: Path, outfile: Path, outtype: str, metadata: Path) -> list:
    return [sys.executable, tools.converter, model_dir, "--outfile", outfile, "--outtype", outtype,
            "--metadata", metadata]


def imatrix_command(tools: LlamaCpp, model: Path, text_file: str, outfile: Path, context: int,
                    chunks: int | None, threads: int) -> list:
    command = [tools.tool("llama-imatrix"), "-m", model, "-f", text_file, "-o", outfile,
               "-c", str(context), "-t", str(threads), "--no-ppl"]
    return command + (["--chunks", str(chunks)] if chunks else [])


def quantize_command(tools: LlamaCpp, source: Path, outfile: Path, type_name: str, threads: int,
                     imatrix: str | None = None, overrides: dict[str, str] | None = None) -> list:
    command: list = [tools.tool("llama-quantize")]
    if imatrix:
        command += ["--imatrix", imatrix]
    for key, value in (overrides or {}).items():
        command += ["--override-kv", f"{key}=str:{value}"]
    return command + [source, outfile, type_name, str(threads)]


def split_command(tools: LlamaCpp, source: Path, prefix: Path, max_bytes: int) -> list:
    megabytes = max(1, max_bytes // 1_000_000)  # gguf-split counts decimal megabytes
    return [tools.tool("llama-gguf-split"), "--split", "--split-max-size", f"{megabytes}M", source, prefix]


def kl_divergence_command(tools: LlamaCpp, model: Path, base_file: Path, context: int, threads: int) -> list:
    """Score `model` on the tokens of a --kl-divergence-base file, against the log-probs it holds."""
    return [tools.tool("llama-perplexity"), "-m", model, "--kl-divergence-base", base_file, "--kl-divergence",
            "-c", str(context), "-t", str(threads)]


# --- reading what the tools print -----------------------------------------------------------

def parse_kl_divergence(output: str) -> dict[str, float]:
    """llama-perplexity --kl-divergence's statistics: perplexity (the model's and the base's), mean and
    99th-percentile KL divergence, and top-1 agreement as a fraction; WorkFailed when it printed none."""
    refusal = KLD_REFUSAL.search(output)
    if refusal:
        raise WorkFailed(f"llama-perplexity refused the reference log-probs: {refusal.group(0).strip()[:300]}")
    found = {name: pattern.findall(output) for name, pattern in KLD_STATISTICS.items()}
    missing = [name for name, values in found.items() if not values]
    if missing:
        raise WorkFailed(f"llama-perplexity printed no KL divergence statistics (missing {', '.join(missing)})")
    values = {name: float(found_values[-1]) for name, found_values in found.items()}
    values["top1_agreement"] = values.pop("top1_percent") / 100
    return values


def parse_fallbacks(output: str) -> list[str]:
    """llama-quantize's fallbacks for rows a block type can't hold, one note per kind of tensor."""
    groups: dict[tuple[str, str, str, str, str], int] = {}
    for name, ncols, block, wanted, used in FALLBACK.findall(output):
        kind = re.sub(r"^blk\.\d+\.", "", name)
        key = (kind, ncols, block, wanted, used)
        groups[key] = groups.get(key, 0) + 1
    notes = [f"{count} × {kind} ({ncols} columns, not a multiple of {block}): {wanted} fell back to {used}"
             for (kind, ncols, block, wanted, used), count in groups.items()]
    total = FALLBACK_TOTAL.findall(output)
    if total:
        fallen, tensors = total[-1]
        notes.insert(0, f"llama-quantize used fallback types for {fallen} of {tensors} tensors")
    return notes


def registered_architectures(root: Path) -> set[str]:
    """Hugging Face architecture names the converter registers (its `@ModelBase.register(...)` lists)."""
    sources = [root / CONVERTER, *sorted((root / "conversion").glob("*.py"))]
    names: set[str] = set()
    for source in sources:
        try:
            text = source.read_text(encoding="utf-8")
        except OSError:
            continue
        for arguments in REGISTERED.findall(text):
            names.update(QUOTED.findall(arguments))
    return names
