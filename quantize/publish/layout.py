"""What each branch of each release repo must hold, from the manifests and the cards. Pure.

GPTQ/AWQ: one branch per variant, holding exactly that variant's folder, the repo's card and the
reproducibility record. GGUF: every file side by side on main, with the card and the record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..card.context import CardAssets
from ..card.original import PromptTemplate
from ..manifest import Manifest
from ..plan import Plan

CARD_FILE = "README.md"
RECORD_FILE = "quantize-release.json"
RECORD_VERSION = 2
# Files the Hub (and our local target) treat as LFS, as the Hub's default .gitattributes does.
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                ".model", ".npy", ".npz", ".zip", ".tar", ".gz", ".7z", ".arrow", ".parquet")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)


@dataclass
class BranchContent:
    repo_id: str
    branch: str
    files: dict[str, Path]  # path in the repo -> local file (weights, configs, tokenizer)
    generated: dict[str, bytes] = field(default_factory=dict)  # README.md, the record
    expected: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (size, sha256) from manifests

    def all_paths(self) -> list[str]:
        return sorted([*self.files, *self.generated])


def is_lfs(path: str) -> bool:
    return path.lower().endswith(LFS_SUFFIXES)


def release_record(plan: Plan, manifests: list[Manifest], prompt: PromptTemplate, assets: CardAssets) -> bytes:
    """Everything needed to rebuild or audit the branch (recipe, parameters, tools, seeds, hashes)
    and to re-render its card later without the source model (`quantize card --from-hub`)."""
    record: dict[str, Any] = {
        "record_version": RECORD_VERSION,
        "recipe": json.loads(plan.recipe.model_dump_json(exclude={"base_dir"})),
        "source_config": plan.source.facts.config if plan.source.facts else None,
        "prompt_template": {"name": prompt.name, "text": prompt.text},
        "card": assets.to_dict(),  # header, footer and template overrides, for regenerating the card
        "release_variants": [v.id for v in plan.variants],  # the whole release, in card order
        "variants": [json.loads(m.model_dump_json()) for m in manifests],
    }
    return (json.dumps(record, indent=2, sort_keys=False) + "\n").encode()


def branch_contents(plan: Plan, out_dir: Path, manifests: dict[str, Manifest], cards: dict[str, str],
                    prompt: PromptTemplate, assets: CardAssets) -> list[BranchContent]:
    """One BranchContent per (repo, branch) with a produced variant; `cards` maps repo_id -> README text."""
    contents: dict[tuple[str, str], BranchContent] = {}
    produced: dict[tuple[str, str], list[Manifest]] = {}
    for variant in plan.variants:
        manifest = manifests.get(variant.id)
        if manifest is None:
            continue
        key = (variant.repo_id, variant.branch)
        content = contents.setdefault(key, BranchContent(variant.repo_id, variant.branch, {}))
        produced.setdefault(key, []).append(manifest)
        for entry in manifest.files:
            in_repo = manifest.repo_path(entry)
            content.files[in_repo] = Path(out_dir) / entry.path
            content.expected[in_repo] = (entry.size, entry.sha256)
    for key, content in contents.items():
        if content.repo_id not in cards:
            raise ValueError(f"no card rendered for {content.repo_id}")
        content.generated[CARD_FILE] = cards[content.repo_id].encode("utf-8")
        content.generated[RECORD_FILE] = release_record(plan, produced[key], prompt, assets)
    return list(contents.values())
