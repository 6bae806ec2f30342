"""Plan + manifests + original card -> the data a card template renders. Pure: no I/O."""

from __future__ import annotations

from typing import Any

from ..calibration import dataset_label, dataset_url
from ..manifest import Manifest
from ..plan import Plan, Variant
from ..quant_types import GGUF_TYPES, K_QUANT_BLOCKS, RAM_OVERHEAD_BYTES, format_size
from .original import OriginalCard, PromptTemplate

HUB = "https://huggingface.co"
FORMAT_TITLES = {"gptq": "GPTQ", "awq": "AWQ", "gguf": "GGUF"}
REPO_ORDER = ("awq", "gptq", "gguf")


def _yes_no(value: bool) -> str:
    return "Yes" if value else "No"


def _join_words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _ppl(manifest: Manifest | None) -> str:
    value = manifest.quality.get("perplexity") if manifest else None
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


def _size(variant: Variant, manifest: Manifest | None) -> str:
    if manifest is not None:
        return format_size(manifest.total_size)
    return "~" + format_size(variant.estimated_bytes) if variant.estimated_bytes else "?"


def _dataset_cell(calibration: dict[str, Any] | None) -> str:
    if not calibration:
        return ""
    url = dataset_url(calibration)
    label = dataset_label(calibration)
    return f"[{label}]({url})" if url else label


def _calibration(variant: Variant, manifest: Manifest | None) -> dict[str, Any] | None:
    if manifest is not None and manifest.calibration:
        return {**variant.calibration, **manifest.calibration} if variant.calibration else manifest.calibration
    return variant.calibration


def _weight_row(variant: Variant, manifest: Manifest | None) -> dict[str, Any]:
    params = variant.params
    calibration = _calibration(variant, manifest)
    return {
        "branch": variant.branch, "url": f"{HUB}/{variant.repo_id}/tree/{variant.branch}",
        "bits": params["bits"], "group_size": params["group_size"] or "None",
        "act_order": _yes_no(params.get("act_order", False)), "damp": f"{params.get('damp', '')}",
        "dataset": _dataset_cell(calibration), "seq_len": calibration["seq_len"] if calibration else "",
        "size": _size(variant, manifest), "exllama": _yes_no(params.get("exllama", False)),
        "description": variant.description, "ppl": _ppl(manifest),
    }


def _gguf_row(variant: Variant, manifest: Manifest | None) -> dict[str, Any]:
    facts = GGUF_TYPES[variant.name]
    if manifest is not None:
        files = [f.path.rsplit("/", 1)[-1] for f in manifest.weight_files()]
        size = manifest.total_size
    else:
        files, size = [variant.file_name], variant.estimated_bytes
    prefix = "" if manifest is not None else "~"
    return {
        "files": [{"name": name, "url": f"{HUB}/{variant.repo_id}/blob/main/{name}"} for name in files],
        "method": variant.name, "bits": facts.bits,
        "size": prefix + format_size(size) if size else "?",
        "max_ram": prefix + format_size(size + RAM_OVERHEAD_BYTES) if size else "?",
        "use_case": variant.description, "ppl": _ppl(manifest),
        "bpw": manifest.params.get("bpw") if manifest else None,
        "imatrix": variant.params.get("imatrix", False), "split": len(files) > 1,
    }


def _repositories(plan: Plan, creator_title: str) -> list[dict[str, str]]:
    recipe = plan.recipe
    repos = []
    for fmt in REPO_ORDER:
        variants = plan.of_format(fmt)
        if not variants:
            continue
        if fmt == "gguf":
            bits = sorted({GGUF_TYPES[v.name].bits for v in variants})
            label = f"{_join_words([str(b) for b in bits])}-bit GGUF models for CPU+GPU inference"
        elif fmt == "gptq":
            label = "GPTQ models for GPU inference" + (", with multiple quantisation parameter options"
                                                      if len(variants) > 1 else "")
        else:
            label = "AWQ model(s) for GPU inference"
        repos.append({"label": label, "url": f"{HUB}/{recipe.release.repo_id(fmt)}"})
    base = recipe.source.base_model
    if base:
        repos.append({"label": f"{creator_title} original unquantised fp16 model in pytorch format, "
                               "for GPU inference and for further conversions", "url": f"{HUB}/{base}"})
    return repos


def _quality(manifests: list[Manifest]) -> dict[str, Any] | None:
    measured = [m for m in manifests if "perplexity" in m.quality]
    if not measured:
        return None
    quality = measured[0].quality
    return {"engine": quality.get("engine", ""), "baseline": quality.get("baseline_perplexity"),
            "evaluation": quality.get("eval_text") or (measured[0].calibration or {}).get("evaluation", ""),
            "dataset": quality.get("dataset")
            or (dataset_label(measured[0].calibration) if measured[0].calibration else "held-out")}


def card_context(plan: Plan, fmt: str, manifests: dict[str, Manifest], original: OriginalCard | None,
                 prompt: PromptTemplate, include_planned: bool = False,
                 header: str | None = None, footer: str | None = None) -> dict[str, Any]:
    """Everything a `<fmt>.md.j2` template needs, from data alone."""
    recipe = plan.recipe
    source = recipe.source
    name = source.display_name()
    creator = source.creator or (source.base_model.split("/")[0] if source.base_model else None)
    creator_title = f"{creator}'s" if creator else "The"
    creator_url = source.creator_url or (f"{HUB}/{source.base_model.split('/')[0]}" if source.base_model else None)
    variants = [v for v in plan.of_format(fmt) if include_planned or v.id in manifests]
    row = _gguf_row if fmt == "gguf" else _weight_row
    rows = [row(v, manifests.get(v.id)) for v in variants]
    branches = [v.branch for v in variants]
    example_branch = next((b for b in branches if b != "main"), branches[0] if branches else "main")
    gguf_files = [r["files"][0]["name"] for r in rows] if fmt == "gguf" else []
    preferred = next((r for r in rows if r.get("method") == "Q4_K_M"), rows[0] if rows else None)
    facts = plan.source.facts
    return {
        "fmt": fmt, "title": FORMAT_TITLES[fmt], "repo_id": recipe.release.repo_id(fmt),
        "repo_name": recipe.release.repo_id(fmt).split("/")[-1], "basename": recipe.release.basename,
        "model_name": name, "creator": creator, "creator_url": creator_url,
        "original_title": f"{creator_title} {name}" if creator else name,
        "base_model": source.base_model, "base_model_url": f"{HUB}/{source.base_model}" if source.base_model else None,
        "quantized_by": recipe.release.author, "prompt": prompt, "rows": rows,
        "has_ppl": any(r["ppl"] for r in rows), "planned_only": not any(v.id in manifests for v in variants),
        "example_branch": example_branch, "gguf_files": gguf_files,
        "example_gguf": preferred["method"] if preferred and fmt == "gguf" else None,
        "example_gguf_file": preferred["files"][0]["name"] if preferred and fmt == "gguf" else None,
        "k_quant_blocks": K_QUANT_BLOCKS, "repositories": _repositories(plan, creator_title),
        "quality": _quality([manifests[v.id] for v in variants if v.id in manifests]),
        "context_length": (facts.context_length if facts else None) or 4096,
        "model_type": plan.source.model_type,
        "original": original, "header": header, "footer": footer,
    }
