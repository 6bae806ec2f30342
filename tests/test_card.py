"""Cards: the reference release's table cell for cell, the original card byte for byte, front matter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from quantize.card import plan_card_inputs, split_card, validate_card
from quantize.card.original import OriginalCard, prompt_template
from quantize.card.render import render_card
from quantize.cli import main
from quantize.manifest import FileEntry, Manifest, write_manifest
from quantize.plan import build_plan
from quantize.recipe import load_recipe
from quantize.source import SourceModel, facts_from_config

from .conftest import REPO, TINY_CONFIG, tiny_recipe

WIKITEXT = "[wikitext](https://huggingface.co/datasets/wikitext/viewer/wikitext-2-v1/test)"
TREE = "https://huggingface.co/TheBloke/Airoboros-c34B-3.1.2-GPTQ/tree"
# The provided-files rows of shared/reference/gptq-card-example.md.
REFERENCE_ROWS = [
    f"| [main]({TREE}/main) | 4 | None | Yes | 0.1 | {WIKITEXT} | 4096 | 17.69 GB | Yes | 4-bit, with Act Order. No group size, to lower VRAM requirements. |",
    f"| [gptq-4bit-128g-actorder_True]({TREE}/gptq-4bit-128g-actorder_True) | 4 | 128 | Yes | 0.1 | {WIKITEXT} | 4096 | 18.33 GB | Yes | 4-bit, with Act Order and group size 128g. Uses even less VRAM than 64g, but with slightly lower accuracy. |",
    f"| [gptq-4bit-32g-actorder_True]({TREE}/gptq-4bit-32g-actorder_True) | 4 | 32 | Yes | 0.1 | {WIKITEXT} | 4096 | 20.28 GB | Yes | 4-bit, with Act Order and group size 32g. Gives highest possible inference quality, with maximum VRAM usage. |",
    f"| [gptq-3bit-128g-actorder_True]({TREE}/gptq-3bit-128g-actorder_True) | 3 | 128 | Yes | 0.1 | {WIKITEXT} | 4096 | 14.14 GB | No | 3-bit, with group size 128g and act-order. Higher quality than 128g-False. |",
    f"| [gptq-8bit--1g-actorder_True]({TREE}/gptq-8bit--1g-actorder_True) | 8 | None | Yes | 0.1 | {WIKITEXT} | 4096 | 34.30 GB | No | 8-bit, with Act Order. No group size, to lower VRAM requirements. |",
    f"| [gptq-3bit-32g-actorder_True]({TREE}/gptq-3bit-32g-actorder_True) | 3 | 32 | Yes | 0.1 | {WIKITEXT} | 4096 | 15.99 GB | No | 3-bit, with group size 64g and act-order. Highest quality 3-bit option. |",
    f"| [gptq-8bit-128g-actorder_True]({TREE}/gptq-8bit-128g-actorder_True) | 8 | 128 | Yes | 0.1 | {WIKITEXT} | 4096 | 35.07 GB | No | 8-bit, with group size 128g for higher inference quality and with Act Order for even higher accuracy. |",
]
REFERENCE_SIZES_GB = [17.69, 18.33, 20.28, 14.14, 34.30, 15.99, 35.07]
TRICKY_BODY = (
    "# Tricky card {{ not_a_variable }} {% if x %}never{% endif %} {# comment #}\n\n"
    "<details><summary>Open</summary>\n\ninside</details>\n</details>\n"
    "<div style=\"color: red\">HTML &amp; entities</div>\n"
    "Ünïcödé — 日本語 ✓ 🤗\r\nWindows line\r\n"
    "```\n{%- raw %}{{ x }}{% endraw -%}\n```\n"
    "<!-- header start --> a stray marker\n"
)


def reference_plan():
    recipe = load_recipe(REPO / "recipes" / "airoboros-c34b-gptq.yaml")
    config = json.loads((REPO / "tests" / "data" / "codellama-34b-config.json").read_text())
    return build_plan(recipe, SourceModel(facts_from_config(config), None))


def fake_manifest(variant, size: int, quality: dict | None = None) -> Manifest:
    name = variant.file_name or "model.safetensors"
    return Manifest(variant_id=variant.id, format=variant.format, repo_id=variant.repo_id, branch=variant.branch,
                    name=variant.name, subdir=variant.subdir, description=variant.description,
                    requested=variant.params, params_digest=variant.digest, calibration=variant.calibration_summary,
                    files=[FileEntry(path=f"{variant.subdir}/{name}", size=size, sha256="0" * 64)], quality=quality or {})


def render_reference(original: OriginalCard | None = None) -> str:
    plan = reference_plan()
    manifests = {v.id: fake_manifest(v, round(gb * 1e9)) for v, gb in zip(plan.variants, REFERENCE_SIZES_GB)}
    return render_card(plan_card_inputs(plan, manifests, original, prompt_template(plan.recipe)), "gptq")


def provided_files(text: str, title: str = "GPTQ") -> list[str]:
    """The rows of a card's provided-files table."""
    section = text.split(f"<!-- README_{title}.md-provided-files start -->")[1].split("-provided-files end -->")[0]
    return [line for line in section.splitlines() if line.startswith("| [")]


def test_reference_release_table_matches_cell_for_cell():
    text = render_reference()
    rows = provided_files(text)
    assert rows == REFERENCE_ROWS
    header = [line for line in text.splitlines() if line.startswith("| Branch")]
    assert header == ["| Branch | Bits | GS | Act Order | Damp % | GPTQ Dataset | Seq Len | Size | ExLlama | Desc |"]


def test_reference_rows_match_the_shared_reference_card_when_present():
    reference = REPO.parent / "shared" / "reference" / "gptq-card-example.md"
    if not reference.is_file():
        pytest.skip("shared/reference is not beside this checkout")
    expected = [line for line in reference.read_text().splitlines() if line.startswith("| [")]
    assert expected == REFERENCE_ROWS


def test_gptq_size_estimates_are_close_to_the_reference_sizes():
    for variant, gb in zip(reference_plan().variants, REFERENCE_SIZES_GB):
        assert variant.estimated_bytes == pytest.approx(gb * 1e9, rel=0.04), variant.id


def test_front_matter_and_sections():
    original = OriginalCard({"license": "other", "datasets": ["jondurbin/airoboros-3.1"], "language": ["en"]}, "Body\n")
    text = render_reference(original)
    data = yaml.safe_load(text.split("---\n")[1])
    assert data["base_model"] == "jondurbin/airoboros-c34b-3.1.2"
    assert data["base_model_relation"] == "quantized"
    assert data["license"] == "llama2"  # the recipe's license wins over the original card's
    assert data["datasets"] == ["jondurbin/airoboros-3.1"] and data["language"] == ["en"]
    assert data["model_creator"] == "Jon Durbin" and data["model_name"] == "Airoboros c34B 3.1.2"
    assert data["model_type"] == "llama" and data["quantized_by"] == "TheBloke" and data["inference"] is False
    assert data["prompt_template"].startswith("[INST] <<SYS>>\nYou are a helpful") and "{prompt} [/INST]" in data["prompt_template"]
    assert "gptq" in data["tags"]
    assert validate_card(text) == []
    for section in ("description", "repositories-available", "prompt-template", "README_GPTQ.md-provided-files",
                    "README_GPTQ.md-download-from-branches", "README_GPTQ.md-text-generation-webui",
                    "README_GPTQ.md-use-from-tgi", "README_GPTQ.md-use-from-python", "README_GPTQ.md-compatibility"):
        assert f"<!-- {section} start -->" in text and f"<!-- {section} end -->" in text
    assert "## Prompt template: Airoboros-Llama-2-Chat" in text
    assert "# Original model card: Jon Durbin's Airoboros c34B 3.1.2" in text
    assert "[Jon Durbin's Airoboros c34B 3.1.2](https://huggingface.co/jondurbin/airoboros-c34b-3.1.2)" in text
    assert "--revision gptq-4bit-128g-actorder_True" in text


def test_original_card_is_appended_byte_for_byte_and_never_evaluated():
    original = split_card(TRICKY_BODY)
    assert original.body == TRICKY_BODY and original.metadata == {}
    text = render_reference(original)
    assert TRICKY_BODY in text
    assert text.index(TRICKY_BODY) > text.index("# Original model card:")
    assert validate_card(text) == []  # a stray marker inside the original card is not ours to balance


def test_original_card_front_matter_is_split_and_inherited(tmp_path):
    raw = "---\nlicense: mit\ndatasets:\n- my-org/my-data\nlanguage: [en, fr]\ntags: [chat]\n---\n" + TRICKY_BODY
    original = split_card(raw)
    assert original.metadata["license"] == "mit" and original.metadata["datasets"] == ["my-org/my-data"]
    assert original.body.endswith(TRICKY_BODY) and "license: mit" not in original.body


def write_tiny_release(tmp_path: Path, tiny_model_config: dict, card_text: str, **sections) -> tuple[Path, Path]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_model_config))
    (model / "README.md").write_text(card_text, encoding="utf-8", newline="")
    data = tiny_recipe(model, **sections)
    del data["source"]["license"]
    data["source"]["prompt_template"] = "<|user|>\n{prompt}\n<|assistant|>\n"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    return recipe_path, tmp_path / "out"


def test_quantize_card_renders_every_produced_repo(tmp_path, capsys):
    raw = "---\nlicense: mit\ndatasets:\n- my-org/my-data\n---\n" + TRICKY_BODY
    recipe_path, out = write_tiny_release(tmp_path, TINY_CONFIG, raw, gptq=[{"bits": 4}, {"bits": 8, "group_size": "none"}],
                                          awq=[{"bits": 4}], gguf={"types": ["Q4_K_M", "Q8_0"]})
    plan = build_plan(load_recipe(recipe_path), SourceModel(facts_from_config(TINY_CONFIG), None))
    quality = {"perplexity": 12.3456, "baseline_perplexity": 11.5, "engine": "llama.cpp",
               "eval_text": "last 10% of wikitext-2-raw-v1 test"}
    for variant in plan.variants:
        if variant.id != "gptq/gptq-8bit--1g-actorder_True":  # one planned variant not produced yet
            write_manifest(out, fake_manifest(variant, 3_210_000, quality if variant.format == "gguf" else None))

    assert main(["card", str(recipe_path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 planned variant(s) not produced yet" in captured.err

    cards = {p.parent.name: p.read_bytes().decode() for p in (out / "cards").glob("*/README.md")}
    assert set(cards) == {"Tiny-Llama-GPTQ", "Tiny-Llama-AWQ", "Tiny-Llama-GGUF"}
    for text in cards.values():
        assert validate_card(text) == []
        front = yaml.safe_load(text.split("---\n")[1])
        assert front["license"] == "mit" and front["datasets"] == ["my-org/my-data"]
        assert front["base_model"] == "test-lab/tiny-llama"
        assert text.endswith(TRICKY_BODY + "<!-- original-model-card end -->\n")
    gptq_rows = provided_files(cards["Tiny-Llama-GPTQ"])
    assert len(gptq_rows) == 1 and gptq_rows[0].startswith("| [main]")
    gguf = cards["Tiny-Llama-GGUF"]
    assert ("| [Tiny-Llama.Q4_K_M.gguf](https://huggingface.co/tester/Tiny-Llama-GGUF/blob/main/Tiny-Llama.Q4_K_M.gguf)"
            " | Q4_K_M | 4 | 3.21 MB | 2.50 GB | 12.35 | — | — | — |") in gguf  # an old manifest: no KLD
    assert "| Name | Quant method | Bits | Size | Max RAM required | PPL | KLD | KLD p99 | Top-1 | Use case |" in gguf
    assert "llama-cli -hf tester/Tiny-Llama-GGUF:Q4_K_M" in gguf and "GGML_TYPE_Q4_K" in gguf
    assert "**11.50**" in gguf and "last 10% of wikitext-2-raw-v1 test" in gguf
    # every card of the release shows the same quality columns and the same note, measured or not
    assert "| Branch | Bits | GS | AWQ Dataset | Seq Len | Size | PPL | KLD | KLD p99 | Top-1 | Desc |" in cards["Tiny-Llama-AWQ"]
    assert provided_files(cards["Tiny-Llama-AWQ"], "AWQ")[0].endswith("| 3.21 MB | — | — | — | — | 4-bit AWQ, group size 128g. |")
    for text in cards.values():
        assert "**11.50**" in text and "## Which file should I choose?" in text
        assert "No file of this release has a measured KL divergence yet" in text and "size-vs-kld.png" not in text
    assert not list((out / "cards").glob("*/size-vs-kld.png"))


def test_planned_preview_and_nothing_produced(tmp_path, capsys):
    recipe_path, out = write_tiny_release(tmp_path, TINY_CONFIG, "Plain card\n", gptq=[{"bits": 4}])
    assert main(["card", str(recipe_path), "--out", str(out)]) == 0
    assert "no variant has been produced yet" in capsys.readouterr().err
    assert main(["card", str(recipe_path), "--out", str(out), "--planned"]) == 0
    text = (out / "cards" / "Tiny-Llama-GPTQ" / "README.md").read_text()
    assert "**Preview:**" in text and "| ~" in text


def test_prompt_template_from_the_tokenizer_chat_template(tiny_model, tmp_path):
    data = tiny_recipe(tiny_model, gptq=[{"bits": 4}])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    template = prompt_template(load_recipe(path))
    assert template.name == "ChatML"
    assert "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n" in template.text
