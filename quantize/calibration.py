"""Calibration and evaluation text: wikitext-2, c4, or a user's own file; seeded token windows.

The joined text of the chosen split is cut in two: calibration windows are drawn from the start,
and the last `held_out` fraction is kept apart for measuring perplexity, so quality is never
measured on text the quantizer has seen.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import BadInput
from .schema import Calibration
from .stages import Artifact, ArtifactStore, read_json, write_json

WIKITEXT_ENV = "QUANTIZE_WIKITEXT_DIR"  # a folder holding wikitext-2-raw-v1/ and/or wikitext-2-v1/
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


def _local_wikitext(config: str, split: str) -> Path | None:
    candidates = []
    if os.environ.get(WIKITEXT_ENV):
        candidates.append(Path(os.environ[WIKITEXT_ENV]))
    candidates.append(Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2")
    name = _WIKITEXT_FILES.get((config, split))
    for folder in candidates:
        if name and (folder / config / name).is_file():
            return folder / config / name
    return None


def _wikitext_rows(config: str, split: str) -> tuple[list[str], str]:
    local = _local_wikitext(config, split)
    if local is not None:
        return _rows_from_lines(local.read_text(encoding="utf-8")), str(local)
    try:
        import datasets  # optional: the online path
    except ImportError:
        raise BadInput(f"calibration: no local copy of wikitext {config}/{split} (set {WIKITEXT_ENV}) "
                       "and the `datasets` package is not installed") from None
    try:
        rows = datasets.load_dataset("wikitext", config, split=split)["text"]
    except Exception as exc:  # datasets raises many kinds; all mean "not available"
        raise BadInput(f"calibration: cannot load wikitext {config}/{split} ({type(exc).__name__}); "
                       f"set {WIKITEXT_ENV} to a local copy") from None
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


def text_inputs(calib: Calibration) -> dict[str, Any]:
    """What the text depends on: where it comes from and how much is held out (not samples/seq_len/seed)."""
    inputs = {"dataset": calib.dataset, "config": calib.resolved_config, "split": calib.split,
              "held_out": calib.held_out, "path": str(calib.path) if calib.path else None}
    if calib.path is not None and calib.path.is_file():
        stat = calib.path.stat()
        inputs["file"] = [stat.st_size, stat.st_mtime_ns]
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
