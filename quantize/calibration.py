"""Calibration and evaluation text: wikitext-2, c4, or a user's own file; seeded token windows.

The joined text of the chosen split is cut in two: calibration windows are drawn from the start,
and the last `held_out` fraction is kept apart for measuring perplexity, so quality is never
measured on text the quantizer has seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence

from .errors import BadInput
from .schema import Calibration
from .stages import Artifact, ArtifactStore, read_json, write_json

WIKITEXT_ENV = "QUANTIZE_WIKITEXT_DIR"  # a folder holding wikitext-2-raw-v1/ and/or wikitext-2-v1/
# The copy shipped with the package (same layout; test splits and wikitext-2-v1 validation only):
# see quantize/data/wikitext-2/LICENSE.md for its licence and provenance.
PACKAGED_WIKITEXT = Path(str(files("quantize") / "data" / "wikitext-2"))
_WIKITEXT_FILES = {
    ("wikitext-2-raw-v1", "test"): "wiki.test.raw",
    ("wikitext-2-raw-v1", "validation"): "wiki.valid.raw",
    ("wikitext-2-raw-v1", "train"): "wiki.train.raw",
    ("wikitext-2-v1", "test"): "wiki.test.tokens",
    ("wikitext-2-v1", "validation"): "wiki.valid.tokens",
    ("wikitext-2-v1", "train"): "wiki.train.tokens",
}
DATASET_URLS = {
    "wikitext": "https://huggingface.co/datasets/wikitext/viewer/{config}/{split}",
    "c4": "https://huggingface.co/datasets/allenai/c4",
}


@dataclass(frozen=True)
class CalibrationText:
    calibration: str  # windows for GPTQ/AWQ/imatrix are drawn from this
    evaluation: str  # held-out text for perplexity
    facts: dict[str, Any]  # dataset, config, split, where it came from, how it was split

    @property
    def label(self) -> str:
        return dataset_label(self.facts)


def dataset_label(facts: dict[str, Any]) -> str:
    if facts["dataset"] == "file":
        return Path(facts["path"]).name
    return facts["dataset"]


def dataset_url(facts: dict[str, Any]) -> str | None:
    template = DATASET_URLS.get(facts["dataset"])
    return template.format(**facts) if template else None


def _rows_from_lines(text: str) -> list[str]:
    """The Hub's wikitext row layout: one row per line, "" for a blank line, else the line with its newline."""
    return ["" if not line.strip() else line for line in text.splitlines(keepends=True)]


def _env_wikitext_dir() -> Path | None:
    """The folder QUANTIZE_WIKITEXT_DIR names, if set (BadInput when it is not a folder)."""
    value = os.environ.get(WIKITEXT_ENV)
    if not value:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise BadInput(f"{WIKITEXT_ENV}={value} is not a folder; point it at one holding "
                       "wikitext-2-raw-v1/ and/or wikitext-2-v1/, or unset it to use the copy shipped with quantize")
    return folder


def packaged_wikitext() -> list[str]:
    """The wikitext config/split pairs whose files the installed package holds."""
    return [f"{config}/{split}" for (config, split), name in _WIKITEXT_FILES.items()
            if (PACKAGED_WIKITEXT / config / name).is_file()]


def _local_wikitext(config: str, split: str) -> tuple[Path, str] | None:
    """The local file of a wikitext split and where it was found: QUANTIZE_WIKITEXT_DIR first, then the copy
    shipped with the package ("packaged"); None when neither has it (then only `datasets` can load it)."""
    name = _WIKITEXT_FILES.get((config, split))
    if name is None:
        return None
    env_dir = _env_wikitext_dir()
    for folder, where in ((env_dir, WIKITEXT_ENV), (PACKAGED_WIKITEXT, "packaged")):
        if folder is not None and (folder / config / name).is_file():
            return folder / config / name, where
    return None


def _wikitext_rows(config: str, split: str) -> tuple[list[str], str]:
    local = _local_wikitext(config, split)
    if local is not None:
        return _rows_from_lines(local[0].read_text(encoding="utf-8")), str(local[0])
    name = _WIKITEXT_FILES.get((config, split))
    shipped = packaged_wikitext()
    need = (f"wikitext {config}/{split} is not in the copy shipped with quantize (it has {', '.join(shipped)})"
            if shipped else f"quantize's own wikitext copy is missing from {PACKAGED_WIKITEXT}")
    if name is None:
        need += f"; split {split!r} has no local file (test, validation, train do)"
    elif os.environ.get(WIKITEXT_ENV):
        need += f" nor in {WIKITEXT_ENV}={os.environ[WIKITEXT_ENV]} (no {config}/{name}); put it there"
    else:
        need += f"; set {WIKITEXT_ENV} to a folder holding {config}/{name}"
    try:
        import datasets  # optional: the online path
    except ImportError:
        raise BadInput(f"calibration: {need}, or install `datasets` (online)") from None
    try:
        rows = datasets.load_dataset("wikitext", config, split=split)["text"]
    except Exception as exc:  # datasets raises many kinds; all mean "not available"
        raise BadInput(f"calibration: {need} (`datasets` cannot load it: {type(exc).__name__})") from None
    return list(rows), f"datasets:wikitext/{config}/{split}"


def _c4_rows(split: str, limit: int = 20_000) -> tuple[list[str], str]:
    try:
        import datasets
    except ImportError:
        raise BadInput("calibration: dataset c4 needs the `datasets` package and the Hub") from None
    try:
        shard = "en/c4-validation.00000-of-00008.json.gz" if split != "train" else "en/c4-train.00000-of-01024.json.gz"
        data = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
    except Exception as exc:
        raise BadInput(f"calibration: cannot load c4 ({type(exc).__name__}); use dataset: file offline") from None
    return [row["text"] for row in data.select(range(min(limit, len(data))))], f"datasets:allenai/c4/{split}"


def _file_rows(path: Path) -> tuple[list[str], str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"calibration.path: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"calibration.path: cannot read {path} as UTF-8 text ({exc})") from None
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return _rows_from_lines(raw), str(path)
    rows = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise BadInput(f"calibration.path: {path} line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise BadInput(f"calibration.path: {path} line {number} has no string \"text\" field")
        rows.append(record["text"])
    return rows, str(path)


def check_available(calib: Calibration) -> None:
    """BadInput, before any work, when the calibration text can't be had (`calib.path` resolved):
    a missing file, or no local wikitext and no `datasets` package to fetch it."""
    import importlib.util

    if calib.dataset == "file":
        if calib.path is None or not calib.path.exists():
            raise BadInput(f"calibration.path: {calib.path} does not exist")
        if not calib.path.is_file():
            raise BadInput(f"calibration.path: {calib.path} is not a file")
        if not os.access(calib.path, os.R_OK):
            raise BadInput(f"calibration.path: {calib.path} cannot be read")
        return
    if calib.dataset == "wikitext" and _local_wikitext(calib.resolved_config, calib.split) is not None:
        return
    if calib.dataset == "wikitext" and (calib.resolved_config, calib.split) not in _WIKITEXT_FILES:
        raise BadInput(f"calibration.split: wikitext has no split {calib.split!r} (train, validation or test)")
    if importlib.util.find_spec("datasets") is None:
        where = f"no local copy of wikitext {calib.resolved_config}/{calib.split} (set {WIKITEXT_ENV})" \
            if calib.dataset == "wikitext" else f"dataset {calib.dataset} is read from the Hub"
        raise BadInput(f"calibration: {where} and the `datasets` package is not installed")


def load_texts(calib: Calibration) -> CalibrationText:
    """The calibration text and its held-out evaluation part (`calib.path` already resolved)."""
    config = calib.resolved_config
    if calib.dataset == "wikitext":
        rows, origin = _wikitext_rows(config, calib.split)
    elif calib.dataset == "c4":
        rows, origin = _c4_rows(calib.split)
    else:
        rows, origin = _file_rows(calib.path)
    joined = "\n\n".join(rows)
    if not joined.strip():
        raise BadInput(f"calibration: {origin} holds no text")
    cut = _cut_at_whitespace(joined, int(len(joined) * (1 - calib.held_out)))
    facts = {**calib.summary(), "source": origin, "characters": len(joined),
             "evaluation": f"the last {calib.held_out:.0%} of {_text_name(calib, origin)}, held out from calibration"}
    return CalibrationText(joined[:cut], joined[cut:], facts)


def _text_name(calib: Calibration, origin: str) -> str:
    if calib.dataset == "file":
        return Path(origin).name
    if calib.dataset == "wikitext":
        return f"{calib.resolved_config} {calib.split}"
    return f"{calib.dataset} {calib.split}"


def _cut_at_whitespace(text: str, position: int) -> int:
    """Move a cut forward to the next paragraph or line break so no sentence is split."""
    for marker in ("\n\n", "\n", " "):
        found = text.find(marker, position)
        if found != -1 and found - position < 5000:
            return found
    return position


def token_windows(token_ids: Sequence[int], samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """`samples` seeded random windows of `seq_len` tokens (the GPTQ paper's calibration scheme)."""
    if len(token_ids) <= seq_len:
        raise BadInput(f"calibration: seq_len {seq_len} needs more text than the calibration set holds "
                       f"({len(token_ids)} tokens); lower seq_len or use a larger dataset")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(token_ids) - seq_len) for _ in range(samples)]
    return [list(token_ids[start:start + seq_len]) for start in starts]


# --- shared work: the text, its tokens, the seeded windows ------------------------------------

CALIBRATION_FILE = "calibration.txt"
EVALUATION_FILE = "evaluation.txt"
FACTS_FILE = "facts.json"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def text_inputs(calib: Calibration) -> dict[str, Any]:
    """What the text depends on (not samples/seq_len/seed): which text, by content where it is a local
    file (so another QUANTIZE_WIKITEXT_DIR copy or an edited file redoes it, a moved one does not),
    and how much is held out."""
    inputs: dict[str, Any] = {"dataset": calib.dataset, "config": calib.resolved_config, "split": calib.split,
                              "held_out": calib.held_out}
    local = calib.path if calib.dataset == "file" else None
    if calib.dataset == "wikitext":
        found = _local_wikitext(calib.resolved_config, calib.split)
        local = found[0] if found else None
    inputs["text"] = _file_digest(local) if local is not None and local.is_file() else "online"
    return inputs


@dataclass(frozen=True, repr=False)
class CalibrationTextArtifact(Artifact):
    """The release's calibration text and held-out evaluation text, as two files."""

    calib: Calibration

    @property
    def name(self) -> str:
        return "calibration_text"

    def inputs(self) -> dict[str, Any]:
        return text_inputs(self.calib)

    def compute(self, store: ArtifactStore, folder: Path) -> Any:
        texts = load_texts(self.calib)
        (folder / CALIBRATION_FILE).write_text(texts.calibration, encoding="utf-8")
        (folder / EVALUATION_FILE).write_text(texts.evaluation, encoding="utf-8")
        return texts.facts

    def load(self, store: ArtifactStore, folder: Path, value: Any) -> CalibrationText:
        return CalibrationText((folder / CALIBRATION_FILE).read_text(encoding="utf-8"),
                               (folder / EVALUATION_FILE).read_text(encoding="utf-8"), value)


@dataclass(frozen=True)
class Tokens:
    calibration: list[int]
    evaluation: list[int]


@dataclass(frozen=True, repr=False)
class TokensArtifact(Artifact):
    """Both texts tokenized once with the source model's tokenizer."""

    text: CalibrationTextArtifact
    source_identity: str

    @property
    def name(self) -> str:
        return "tokens"

    def inputs(self) -> dict[str, Any]:
        return {"tokenizer": self.source_identity}

    def needs(self) -> tuple[Artifact, ...]:
        return (self.text,)

    def compute(self, store: ArtifactStore, folder: Path) -> Any:
        texts = store.value(self.text)
        tokenizer = store.context.tokenizer
        ids = {part: list(tokenizer(getattr(texts, part), add_special_tokens=False)["input_ids"])
               for part in ("calibration", "evaluation")}
        write_json(folder / "tokens.json", ids)
        return {part: len(values) for part, values in ids.items()}

    def load(self, store: ArtifactStore, folder: Path, value: Any) -> Tokens:
        return Tokens(**read_json(folder / "tokens.json"))


@dataclass(frozen=True, repr=False)
class WindowsArtifact(Artifact):
    """`samples` seeded windows of `seq_len` calibration tokens, shared by every variant that uses them."""

    tokens: TokensArtifact
    samples: int
    seq_len: int
    seed: int

    @property
    def name(self) -> str:
        return f"windows_{self.seq_len}"

    def inputs(self) -> dict[str, Any]:
        return {"samples": self.samples, "seq_len": self.seq_len, "seed": self.seed}

    def needs(self) -> tuple[Artifact, ...]:
        return (self.tokens,)

    def compute(self, store: ArtifactStore, folder: Path) -> Any:
        windows = token_windows(store.value(self.tokens).calibration, self.samples, self.seq_len, self.seed)
        write_json(folder / "windows.json", windows)
        return {"windows": len(windows)}

    def load(self, store: ArtifactStore, folder: Path, value: Any) -> list[list[int]]:
        return read_json(folder / "windows.json")
