"""Cards right for every release shape (no `main`, one variant, a BOM, an empty original card,
hostile recipe strings), checked on the rendered Markdown's structure: headings, table cells,
links, code fences, and the Python and shell the examples hold."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from quantize import api
from quantize.card import plan_card_inputs, validate_card
from quantize.card.escape import cell, fence, md, pystr, url
from quantize.card.original import (CardFormatError, OriginalCard, PromptTemplate, prompt_template,
                                    render_chat_template, split_card)
from quantize.card.render import render_card
from quantize.cli import main
from quantize.formats import get_format
from quantize.manifest import write_atomic
from quantize.plan import build_plan
from quantize.quant_types import BLOCK_LAYOUTS, GGUF_TYPES, K_QUANT_BLOCKS, block_bpw
from quantize.recipe import parse_recipe
from quantize.schema import ref_name_problem
from quantize.source import SourceModel, context_length, facts_from_config, tied_embeddings

from .conftest import TINY_CONFIG, tiny_recipe
from .test_card import fake_manifest

TOOLS = {"llama.cpp": "0c1e57098 (llama-cpp-python 0.3.36)", "transformers": "5.24.0", "optimum": "2.3.0",
         "gptqmodel": "7.6.0", "accelerate": "1.10.0"}


# --- reading Markdown back --------------------------------------------------------------------

def front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---\n")[1])


def ours(text: str) -> str:
    """The card without its front matter and without the appended original card."""
    body = text.split("\n---\n", 1)[1]
    return body.split("<!-- original-model-card start -->", 1)[0]


def blocks(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(lines outside code blocks, [(info string, content)] of the fenced code blocks); asserts each closes."""
    outside, found, fence_open, info, content = [], [], None, "", []
    for line in text.splitlines():
        match = re.match(r"^ {0,3}(`{3,})(.*)$", line)
        if fence_open is None:
            if match:
                fence_open, info, content = match.group(1), match.group(2).strip(), []
            else:
                outside.append(line)
        elif match and len(match.group(1)) >= len(fence_open) and not match.group(2).strip():
            found.append((info, "\n".join(content)))
            fence_open = None
        else:
            content.append(line)
    assert fence_open is None, f"a code block opened with {fence_open} never closes"
    return outside, found


def headings(text: str) -> list[tuple[int, str]]:
    outside, _ = blocks(ours(text))
    return [(len(m.group(1)), m.group(2)) for line in outside if (m := re.match(r"^(#{1,6}) (.*)$", line))]


def split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())
    assert cells[0] == "" and cells[-1] == "", line
    return [c.strip() for c in cells[1:-1]]


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every table outside code blocks as a list of {header: cell}; asserts each row has the header's cells."""
    outside, _ = blocks(ours(text))
    found, current = [], None
    for line in outside + [""]:
        if line.startswith("|"):
            current = (current or []) + [split_row(line)]
            continue
        if current:
            header, rule, *rows = current
            assert all(set(c) <= set("-: ") for c in rule), rule
            for row in rows:
                assert len(row) == len(header), (header, row)
            found.append([dict(zip(header, row)) for row in rows])
        current = None
    return found


def links(text: str, card: bool = True) -> list[tuple[str, str]]:
    """[(label, target)] of the links outside code blocks (of a whole card, or of a part of one)."""
    outside, _ = blocks(ours(text) if card else text)
    return re.findall(r"(?<!\\)\[((?:[^\]\\]|\\.)*)\]\(([^)\s]*)\)", "\n".join(outside))


def python_blocks(text: str) -> list[str]:
    return [content for info, content in blocks(ours(text))[1] if info == "python"]


def shell_blocks(text: str) -> list[str]:
    return [content for info, content in blocks(ours(text))[1] if info == "shell"]


def prompt_from_python(source: str) -> str:
    """Run a Python example's `prompt = ...` and `prompt_template = ...` lines: the text it would send."""
    compile(source, "<card example>", "exec")  # the whole example is valid Python
    lines = [line for line in source.splitlines(keepends=True)]
    start = next(i for i, line in enumerate(lines) if line.startswith("prompt_template = "))
    statement = "".join(lines[start:])
    for end in range(start + 1, len(lines) + 1):  # the assignment may span lines (a triple-quoted string)
        statement = "".join(lines[start:end])
        try:
            compile(statement, "<prompt_template>", "exec")
            break
        except SyntaxError:
            continue
    namespace = {"prompt": "Tell me about AI"}
    exec(statement, namespace)  # noqa: S102  (our own card's example)
    return namespace["prompt_template"]


# --- building cards ---------------------------------------------------------------------------

def render(tmp_path: Path, original: OriginalCard | None = OriginalCard({}, "The original card.\n"),
           prompt: str = "<|user|>\n{prompt}\n<|assistant|>\n", config: dict | None = None, **sections) -> dict[str, str]:
    data = tiny_recipe(tmp_path, **sections)
    data["source"]["prompt_template"] = prompt
    recipe = parse_recipe(data, tmp_path)
    plan = build_plan(recipe, SourceModel(facts_from_config(config or TINY_CONFIG), None))
    manifests = {}
    for variant in plan.variants:
        manifest = fake_manifest(variant, 3_210_000)
        manifest.tools.update(TOOLS)
        manifests[variant.id] = manifest
    inputs = plan_card_inputs(plan, manifests, original, PromptTemplate("Custom", prompt))
    cards = {fmt: render_card(inputs, fmt) for fmt in plan.formats}
    for text in cards.values():
        assert validate_card(text) == []
    return cards


# --- release shapes ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_a_repo_without_main_never_sends_users_to_main(tmp_path, fmt):
    variants = ([{"bits": 4, "branch": "fast"}, {"bits": 8, "group_size": "none", "branch": "big"}] if fmt == "gptq"
                else [{"bits": 4, "branch": "fast"}, {"bits": 4, "group_size": 64, "branch": "big"}])
    text = render(tmp_path, **{fmt: variants})[fmt]
    body = ours(text)
    assert "main" not in re.sub(r"https://\S+", "", body.replace("domain", "")), \
        [line for line in body.splitlines() if "main" in line]
    rows = tables(text)[0]
    assert [r["Branch"].split("]")[0].lstrip("[") for r in rows] == ["fast", "big"]
    commands = "\n".join(shell_blocks(text))
    downloads = [line for line in commands.splitlines() if line.startswith("hf download")]
    assert downloads and all("--revision fast" in line or "--revision big" in line for line in downloads)
    assert "--revision fast --quantize" in commands and "vllm serve tester/Tiny-Llama-" in commands
    python = python_blocks(text)
    assert any('revision = "fast"  # or another branch, e.g. "big"' in block for block in python)
    assert "another branch" in body
    assert "How to download, including from branches" in [title for _, title in headings(text)]


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_a_single_variant_repo_has_no_other_branch(tmp_path, fmt):
    text = render(tmp_path, **{fmt: [{"bits": 4}]})[fmt]
    body = ours(text).lower()
    for phrase in ("another branch", "different branch", "other branch", "including from branches", "own branch"):
        assert phrase not in body, phrase
    titles = [h for _, h in headings(text)]
    assert "How to download" in titles
    assert len(tables(text)[0]) == 1
    assert "The model is on the `main` branch" in ours(text)
    assert any('revision = "main"\n' in block + "\n" for block in python_blocks(text))


def test_a_single_variant_not_on_main_names_its_branch(tmp_path):
    text = render(tmp_path, gptq=[{"bits": 4, "branch": "v1"}])["gptq"]
    commands = shell_blocks(text)
    assert "hf download tester/Tiny-Llama-GPTQ --revision v1 --local-dir Tiny-Llama-GPTQ" in commands
    assert "git clone --single-branch --branch v1 https://huggingface.co/tester/Tiny-Llama-GPTQ" in commands
    assert "`tester/Tiny-Llama-GPTQ:v1`" in ours(text)
    assert "main" not in re.sub(r"https://\S+", "", ours(text))


def test_awq_description_is_in_its_desc_column(tmp_path):
    text = render(tmp_path, awq=[{"bits": 4, "description": "Fast | small\nfor chat"}, {"bits": 4, "group_size": 64}])["awq"]
    rows = tables(text)[0]
    assert list(rows[0]) == ["Branch", "Bits", "GS", "AWQ Dataset", "Seq Len", "Size", "Desc"]
    assert rows[0]["Desc"] == "Fast \\| small for chat"
    assert rows[1]["Desc"] == "4-bit AWQ, group size 64g."


def test_original_card_with_a_bom(tmp_path):
    original = split_card("\ufeff---\nlicense: mit\nlicense_link: LICENSE.md\nlanguage: [en]\n---\n# Hello\n\nText.\n")
    assert original.metadata == {"license": "mit", "license_link": "LICENSE.md", "language": ["en"]}
    assert original.body == "# Hello\n\nText.\n"
    data = tiny_recipe(tmp_path, gptq=[{"bits": 4}])
    del data["source"]["license"]
    recipe = parse_recipe(data, tmp_path)
    plan = build_plan(recipe, SourceModel(facts_from_config(TINY_CONFIG), None))
    text = render_card(plan_card_inputs(plan, {}, original, PromptTemplate("None", "{prompt}"), include_planned=True),
                       "gptq")
    meta = front_matter(text)
    assert meta["license"] == "mit" and meta["language"] == ["en"]
    assert meta["license_link"] == "https://huggingface.co/test-lab/tiny-llama/blob/main/LICENSE.md"
    tail = text.split("<!-- original-model-card start -->\n", 1)[1]
    assert tail.splitlines()[:3] == ["# Original model card: Test Lab's Tiny Llama", "", "# Hello"]
    assert "\ufeff" not in text and "license: mit\n---" not in tail


def test_an_absolute_license_link_is_kept_and_another_licence_drops_it(tmp_path):
    original = OriginalCard({"license": "other", "license_name": "acme", "license_link": "https://acme.example/l"}, "x\n")
    meta = front_matter(render(tmp_path / "a", original, gptq=[{"bits": 4}])["gptq"])  # recipe: apache-2.0
    assert meta["license"] == "apache-2.0" and "license_link" not in meta and "license_name" not in meta
    data_dir = tmp_path / "b"
    data_dir.mkdir()
    data = tiny_recipe(data_dir, gptq=[{"bits": 4}])
    del data["source"]["license"]
    plan = build_plan(parse_recipe(data, data_dir), SourceModel(facts_from_config(TINY_CONFIG), None))
    text = render_card(plan_card_inputs(plan, {}, original, PromptTemplate("None", "{prompt}"), include_planned=True), "gptq")
    assert front_matter(text)["license_link"] == "https://acme.example/l"


@pytest.mark.parametrize("body", ["", "\n\n  \n"])
def test_an_empty_original_card_gets_no_section(tmp_path, body):
    cards = render(tmp_path, OriginalCard({"license": "mit"}, body), gptq=[{"bits": 4}], gguf={"types": ["Q8_0"]})
    for text in cards.values():
        assert "original-model-card" not in text
        assert not [h for _, h in headings(text) if h.startswith("Original model card")]
        assert text.rstrip().endswith("-->")


HOSTILE = {
    "name": "Evil\n# Injected heading",
    "creator": "Bad](https://evil.example) [x",
    "creator_url": "https://example.org/a(1)\"x",
    "prompt_template_name": "Mine\n## Also injected",
}
HOSTILE_PROMPT = "```\nSYSTEM: say '''hi''' \\n and \"bye\"\n{prompt}\n```` and {braces} $HOME `id`\n"


def test_hostile_recipe_strings_stay_text(tmp_path):
    data = tiny_recipe(tmp_path, gptq=[{"bits": 4, "description": "a | b\n## heading"}, {"bits": 8, "group_size": "none"}],
                       awq=[{"bits": 4}], gguf={"types": ["Q4_K_M", "Q8_0"]})
    data["source"].update(HOSTILE, prompt_template=HOSTILE_PROMPT)
    data["release"]["quantized_by"] = "me | <script>alert(1)</script>"
    recipe = parse_recipe(data, tmp_path)
    plan = build_plan(recipe, SourceModel(facts_from_config(TINY_CONFIG), None))
    manifests = {v.id: fake_manifest(v, 1_000_000) for v in plan.variants}
    inputs = plan_card_inputs(plan, manifests, OriginalCard({}, "orig\n"), prompt_template(recipe))
    for fmt in plan.formats:
        text = render_card(inputs, fmt)
        assert validate_card(text) == []
        title = get_format(fmt).title
        assert [t for level, t in headings(text) if level == 1] == [f"Evil # Injected heading - {title}"]
        assert "Prompt template: Mine ## Also injected" in [t for level, t in headings(text) if level == 2]
        assert not any(t.startswith(("Injected", "Also injected")) for _, t in headings(text))
        assert all("evil.example" not in target for _, target in links(text))
        creator_links = [(label, target) for label, target in links(text) if "example.org" in target]
        assert creator_links == [("Bad\\](https://evil.example) \\[x", "https://example.org/a%281%29%22x")]
        assert "<script>" not in ours(text)
        for table in tables(text):
            assert table  # parsed with the header's cell count
        _, code = blocks(ours(text))
        prompt_block = next(content for info, content in code if content.startswith("```\nSYSTEM"))
        assert prompt_block == HOSTILE_PROMPT  # (the block ends with the template's own last newline)
        for block in python_blocks(text):
            if "prompt_template = " in block:
                assert prompt_from_python(block) == HOSTILE_PROMPT.replace("{prompt}", "Tell me about AI")
        for command in shell_blocks(text):
            if " -p " in command:
                words = shlex.split(command)
                assert words[words.index("-p") + 1] == HOSTILE_PROMPT.replace("{prompt}", "Tell me about AI")
        assert front_matter(text)["model_name"] == HOSTILE["name"]  # YAML carries the string as it is
        if fmt == "gptq":
            assert tables(text)[0][0]["Desc"] == "a \\| b ## heading"


def test_python_examples_compile_for_every_prompt_shape(tmp_path):
    for index, prompt in enumerate(["{prompt}", "'''", "ends with '", "back\\slash", "tab\there\r\n{prompt}",
                                    "Ünïcödé {prompt} 🤗", "{prompt}" * 3]):
        folder = tmp_path / str(index)
        folder.mkdir()
        cards = render(folder, prompt=prompt, gptq=[{"bits": 4}], gguf={"types": ["Q4_K_M"]})
        for text in cards.values():
            for block in python_blocks(text):
                if "prompt_template = " in block:
                    assert prompt_from_python(block) == prompt.replace("{prompt}", "Tell me about AI")


# --- GGUF and GPTQ content ----------------------------------------------------------------------

def test_gguf_card_content(tmp_path):
    text = render(tmp_path, gguf={"types": ["Q2_K", "Q4_K_M", "Q5_K_M", "Q8_0"]})["gguf"]
    titles = [h for _, h in headings(text)]
    assert {"Compatibility", "Where GGUF files run", "Provided files", "How to run in llama.cpp",
            "How to run from Python"} <= set(titles)
    compatibility = ours(text).split("## Compatibility", 1)[1].split("<!--", 1)[0]
    assert "[0c1e57098](https://github.com/ggml-org/llama.cpp/commit/0c1e57098)" in compatibility
    clients = {label for label, _ in links(ours(text).split("### Where GGUF files run", 1)[1].split("<!--", 1)[0],
                                           card=False)}
    assert {"llama.cpp", "LM Studio", "text-generation-webui", "KoboldCpp", "Ollama", "llama-cpp-python"} <= clients
    rows = tables(text)[0]
    assert len({row["Use case"] for row in rows}) == len(rows) == 4
    assert "GGML\\_TYPE" not in rows[0]["Use case"] and "GGML_TYPE_Q3_K for attn_v" in rows[0]["Use case"]
    commands = "\n".join(shell_blocks(text))
    assert "llama-cli -hf tester/Tiny-Llama-GGUF:Q4_K_M -cnv" in commands
    completion = next(c for c in shell_blocks(text) if " -p " in c)
    words = shlex.split(completion)
    assert words[words.index("-p") + 1] == "<|user|>\nTell me about AI\n<|assistant|>\n"
    assert "GGML_TYPE_Q2_K" in dict(K_QUANT_BLOCKS) and "2.625 bits per weight" in ours(text)


def test_planned_gguf_card_says_the_commit_comes_later(tmp_path):
    data = tiny_recipe(tmp_path, gguf={"types": ["Q4_K_M"]})
    data["source"]["prompt_template"] = "{prompt}"
    plan = build_plan(parse_recipe(data, tmp_path), SourceModel(facts_from_config(TINY_CONFIG), None))
    text = render_card(plan_card_inputs(plan, {}, None, PromptTemplate("None", "{prompt}"), include_planned=True), "gguf")
    assert "recorded when they are made" in ours(text).split("## Compatibility", 1)[1]


def test_gptq_card_gives_minimum_and_tested_versions(tmp_path):
    text = render(tmp_path, gptq=[{"bits": 4}], awq=[{"bits": 4}])
    gptq = ours(text["gptq"])
    assert "Requires: transformers 4.49.0 or later, optimum 1.24.0 or later, gptqmodel 1.4.3 or later, accelerate." in gptq
    assert "made and verified with transformers 5.24.0, optimum 2.3.0, gptqmodel 7.6.0, accelerate 1.10.0" in gptq
    assert "pip3 install -U transformers optimum gptqmodel accelerate" in shell_blocks(text["gptq"])
    assert "transformers 5.0.0 or later" in ours(text["awq"])


def test_context_length_of_other_config_families(tmp_path):
    config = {**TINY_CONFIG}
    del config["max_position_embeddings"]
    config["max_seq_len"] = 8192
    text = render(tmp_path, config=config, gguf={"types": ["Q8_0"]})["gguf"]
    assert "-c 8192" in "\n".join(shell_blocks(text))
    assert context_length({"n_positions": 1024}) == 1024
    assert context_length({"text_config": {"max_position_embeddings": 4096}, "max_position_embeddings": 512}) == 4096
    assert context_length({"seq_length": 32768}) == 32768


GEMMA_7B = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 3072,
            "intermediate_size": 24576, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
            "head_dim": 256, "vocab_size": 256000, "max_position_embeddings": 8192, "hidden_act": "gelu"}


def test_tied_embeddings_follow_the_model_family_default():
    assert facts_from_config(GEMMA_7B).param_count / 1e9 == pytest.approx(8.54, abs=0.005)
    assert tied_embeddings({"model_type": "gemma"}) and not tied_embeddings({"model_type": "llama"})
    assert not tied_embeddings({"model_type": "gemma", "tie_word_embeddings": False})
    llama = {**GEMMA_7B, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    assert facts_from_config(llama).param_count - facts_from_config(GEMMA_7B).param_count == 256000 * 3072


def test_bits_per_weight_come_from_block_layouts():
    assert block_bpw("Q2_K") == 2.625 and block_bpw("Q3_K") == 3.4375 and block_bpw("Q4_K") == 4.5
    assert block_bpw("Q6_K") == 6.5625 and block_bpw("Q8_0") == 8.5 and GGUF_TYPES["Q6_K"].bpw == 6.5625
    gguf = pytest.importorskip("gguf")
    for name, layout in BLOCK_LAYOUTS.items():
        assert gguf.constants.GGML_QUANT_SIZES[gguf.constants.GGMLQuantizationType[name]] == layout, name
    assert GGUF_TYPES["Q2_K"].bpw < GGUF_TYPES["Q3_K_M"].bpw < GGUF_TYPES["Q4_K_M"].bpw < GGUF_TYPES["Q5_K_M"].bpw


# --- escaping helpers ---------------------------------------------------------------------------

def test_escaping_by_place():
    assert md("a\n# b") == "a # b" and md("[x](y)") == "\\[x\\](y)" and md("_x_ snake_case") == "\\_x\\_ snake_case"
    assert cell("a|b") == "a\\|b"
    assert url("javascript:alert(1)") == "#" and url("https://x.org/a b(1)") == "https://x.org/a%20b%281%29"
    assert fence("no ticks") == "```" and fence("```` here") == "`````"
    for text in ["'''", "a'", "x\\y", "plain\ntext", "\r"]:
        assert eval(pystr(text)) == text  # noqa: S307


NAMES = ["main", "a..b", "x.lock", "x.", "-x", "a b", "a~b", "a^b", "a:b", "a?b", "a*b", "a[b", "a\\b", "a@{b",
         "feature/x", "/x", "x/", "a//b", ".hidden", "a/.b", "ok-1.2_3", "a/b.lock/c", "v1.0"]


@pytest.mark.parametrize("name", NAMES)
def test_ref_names_follow_git_check_ref_format(name):
    try:
        result = subprocess.run(["git", "check-ref-format", "--branch", name], capture_output=True)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    assert (ref_name_problem(name, allow_slash=True) is None) == (result.returncode == 0), name


def test_the_ref_name_at_alone_is_refused():
    assert ref_name_problem("@") == "cannot be '@'"  # git-check-ref-format(1) rule 9

# --- the commands -------------------------------------------------------------------------------

def test_card_dry_run_writes_nothing_and_shows_the_diff(tmp_path, write_recipe, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    data = tiny_recipe(model, gptq=[{"bits": 4}])
    data["source"]["prompt_template"] = "{prompt}"
    recipe = write_recipe(data)
    out = tmp_path / "out"
    assert main(["card", str(recipe), "--out", str(out), "--planned", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert not out.exists()
    assert "+# Tiny Llama - GPTQ" in captured.out and "new (dry run: not written)" in captured.err


def test_hub_source_out_of_reach_is_said_plainly(tmp_path, write_recipe, capsys):
    data = tiny_recipe(tmp_path, gptq=[{"bits": 4}])
    data["source"] = {"hub": "nobody/unreachable-model", "name": "Unreachable"}
    recipe = write_recipe(data)
    assert main(["card", str(recipe), "--out", str(tmp_path / "out"), "--planned"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "the card lacks" in line]
    assert len(warning) == 1
    for missing in ("licence", "original model card", "prompt template", "file sizes",
                    "could not reach nobody/unreachable-model"):
        assert missing in warning[0], missing


def test_a_local_folder_that_names_its_repo(tmp_path, write_recipe, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**TINY_CONFIG, "_name_or_path": "org/Tiny-Original"}))
    data = tiny_recipe(model, gptq=[{"bits": 4}])
    del data["source"]["repo_id"]
    data["source"]["prompt_template"] = "{prompt}"
    plan = api.plan(write_recipe(data))
    assert plan.recipe.source.base_model == "org/Tiny-Original"
    assert any("using org/Tiny-Original from config.json's _name_or_path" in w for w in plan.warnings)


def test_variants_take_gguf_types_in_any_case(tmp_path, recording, release_recipe):
    result = api.release(release_recipe, out=tmp_path / "out", variants=["q4_k_m"], publish=False, log=lambda m: None)
    assert recording.calls == ["gguf/Q4_K_M"]
    assert [o.variant.id for o in result.outcomes] == ["gguf/Q4_K_M"]


def test_a_card_error_stops_the_release_before_any_work(tmp_path, recording, release_recipe, capsys):
    data = yaml.safe_load(release_recipe.read_text())
    data["card"] = {"header": "no-header.md"}
    release_recipe.write_text(yaml.safe_dump(data))
    assert main(["release", str(release_recipe), "--out", str(tmp_path / "out")]) == 2
    assert recording.calls == [] and not (tmp_path / "out").exists()
    assert "card.header" in capsys.readouterr().err


def test_cards_and_manifests_are_world_readable(tmp_path, recording, release_recipe):
    previous = os.umask(0o022)
    try:
        api.release(release_recipe, out=tmp_path / "out", publish=False, log=lambda m: None)
        write_atomic(tmp_path / "plain.txt", b"x")
    finally:
        os.umask(previous)
    files = [*(tmp_path / "out" / "cards").rglob("README.md"), *(tmp_path / "out" / "manifests").rglob("*.json"),
             tmp_path / "plain.txt"]
    assert len(files) == 2 + 4 + 1
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_a_runaway_chat_template_is_stopped(monkeypatch):
    nested = "{% set x = range(100000)|list %}{% for a in x %}{% for b in x %}{% endfor %}{% endfor %}"
    with pytest.raises(Exception, match="ran longer than 0.3 s"):
        render_chat_template(nested, {}, seconds=0.3)
    assert render_chat_template("{{ messages[0].content }}!", {}) == "{prompt}!"


def test_front_matter_problems_are_named():
    with pytest.raises(CardFormatError, match="malformed YAML at line 3"):
        split_card("---\nlicense: [mit\n---\n")
    with pytest.raises(CardFormatError, match="YAML list"):
        split_card("---\n- a\n---\n")
    assert split_card("---\n---\nBody").body == "Body"
    assert split_card("No front matter\n---\nx: 1\n---\n").metadata == {}


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gpt2",
                                        "starcoder2", "falcon"])
def test_the_tied_embeddings_table_matches_transformers_defaults(model_type):
    import inspect

    mapping = pytest.importorskip("transformers.models.auto.configuration_auto").CONFIG_MAPPING
    parameter = inspect.signature(mapping[model_type].__init__).parameters.get("tie_word_embeddings")
    default = parameter.default if parameter is not None else True  # PretrainedConfig's own default
    assert tied_embeddings({"model_type": model_type}) == default
