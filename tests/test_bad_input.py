"""Every input fault is caught before any work: exit 2, one line naming the field or file, nothing
written, in well under a second. One table, run through the CLI in-process."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from quantize.cli import main

from .conftest import TINY_CONFIG, tiny_recipe


class Setup:
    """A good release (tiny Llama folder, GPTQ + GGUF, nothing published) that each case spoils once."""

    def __init__(self, root: Path):
        self.root = root
        self.model = root / "model"
        self.model.mkdir()
        self.config = dict(TINY_CONFIG)
        self.readme: bytes = b"---\nlicense: mit\n---\n# The original card\n"
        self.recipe = tiny_recipe(self.model, gptq=[{"bits": 4}], gguf={"types": ["Q4_K_M"]},
                                  publish={"target": "none"})
        self.recipe["source"]["prompt_template"] = "<|user|>\n{prompt}\n<|assistant|>\n"
        self.recipe_bytes: bytes | None = None  # written as is instead of the recipe
        self.recipe_path = root / "recipe.yaml"
        self.write_recipe = True
        self.out = root / "out"
        self.command = "release"
        self.extra: list[str] = []

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def chat_template(self, template: str) -> None:
        del self.recipe["source"]["prompt_template"]
        (self.model / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))

    def argv(self) -> list[str]:
        (self.model / "config.json").write_text(json.dumps(self.config))
        (self.model / "README.md").write_bytes(self.readme)
        if self.recipe_bytes is not None:
            self.recipe_path.write_bytes(self.recipe_bytes)
        elif self.write_recipe and not self.recipe_path.exists():
            self.recipe_path.write_text(yaml.safe_dump(self.recipe, sort_keys=False))
        if self.command == "plan":
            return ["plan", str(self.recipe_path), *self.extra]
        if self.command == "card":
            return ["card", str(self.recipe_path), "--out", str(self.out), *self.extra]
        if self.command == "from-hub":
            return ["card", *self.extra]
        return ["release", str(self.recipe_path), "--out", str(self.out), "--no-publish", *self.extra]


@dataclass
class Case:
    id: str
    spoil: Callable[[Setup], None]
    expect: str  # in the one line on stderr


def recipe_change(**sections) -> Callable[[Setup], None]:
    def spoil(s: Setup) -> None:
        for section, value in sections.items():
            if isinstance(value, dict) and isinstance(s.recipe.get(section), dict):
                s.recipe[section] = {**s.recipe[section], **value}
            else:
                s.recipe[section] = value
    return spoil


def config_change(**keys) -> Callable[[Setup], None]:
    return lambda s: s.config.update(keys)


def do(*steps: Callable[[Setup], None]) -> Callable[[Setup], None]:
    def spoil(s: Setup) -> None:
        for step in steps:
            step(s)
    return spoil


def attr(name: str, value) -> Callable[[Setup], None]:
    return lambda s: setattr(s, name, value)


def no_repo_id(s: Setup) -> None:
    del s.recipe["source"]["repo_id"]


def good_yaml(s: Setup) -> str:
    return yaml.safe_dump(s.recipe, sort_keys=False)


BERT = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 512, "vocab_size": 30522, "max_position_embeddings": 512}

CASES = [
    # the recipe file
    Case("recipe-not-utf8", lambda s: setattr(s, "recipe_bytes", good_yaml(s).encode() + b"# caf\xe9\n"),
         "recipe.yaml is not UTF-8 text"),
    Case("duplicate-top-level-key", lambda s: setattr(s, "recipe_bytes", (good_yaml(s) + "gptq:\n- {bits: 8}\n").encode()),
         "duplicate key 'gptq'"),
    Case("duplicate-nested-key", lambda s: setattr(s, "recipe_bytes", good_yaml(s).replace(
        "  name: Tiny Llama\n", "  name: Tiny Llama\n  name: Other\n").encode()), "duplicate key 'name'"),
    Case("malformed-yaml", attr("recipe_bytes", b"source:\n  path: [unclosed\n"), "malformed YAML at line"),
    Case("recipe-is-a-list", attr("recipe_bytes", b"- source\n- release\n"), "expected a mapping of keys"),
    Case("recipe-missing", attr("write_recipe", False), "recipe file not found"),
    Case("recipe-is-a-folder", lambda s: (s.root / "folder.yaml").mkdir() or setattr(s, "recipe_path", s.root / "folder.yaml"),
         "is a folder, not a recipe file"),
    Case("unknown-key", recipe_change(surprise=1), "surprise: unknown key"),
    # names the Hub refuses
    Case("basename-dots", recipe_change(release={"basename": "a..b"}), "release.basename"),
    Case("basename-300-chars", recipe_change(release={"basename": "a" * 300}), "at most 96"),
    Case("basename-double-dash", recipe_change(release={"basename": "a--b"}), "cannot contain '--' or '..'"),
    Case("basename-too-long-with-suffix", recipe_change(release={"basename": "b" * 93}),
         "release.basename: the repo name"),
    Case("namespace-dots", recipe_change(release={"namespace": "a..b"}), "release.namespace"),
    Case("namespace-space", recipe_change(release={"namespace": "my org"}), "release.namespace"),
    Case("hub-id-not-an-id", recipe_change(source={"path": None, "hub": "justaname", "repo_id": None}),
         "source.hub: not a Hub model id"),
    Case("repo-id-double-dash", recipe_change(source={"repo_id": "a--b/model"}), "source.repo_id"),
    Case("revision-git-refuses", recipe_change(source={"path": None, "hub": "org/model", "revision": "a..b"}),
         "source.revision"),
    # branch names git refuses
    Case("branch-dot-dot", recipe_change(gptq=[{"bits": 4, "branch": "a..b"}]), "gptq[0].branch"),
    Case("branch-dot-lock", recipe_change(gptq=[{"bits": 4, "branch": "x.lock"}]), "'.lock'"),
    Case("branch-trailing-dot", recipe_change(gptq=[{"bits": 4, "branch": "x."}]), "cannot end with '.'"),
    Case("branch-leading-dash", recipe_change(gptq=[{"bits": 4, "branch": "-x"}]), "cannot start with '-'"),
    Case("branch-space", recipe_change(awq=[{"bits": 4, "branch": "my branch"}]), "awq[0].branch"),
    # values
    Case("creator-url-javascript", recipe_change(source={"creator_url": "javascript:alert(1)"}), "source.creator_url"),
    Case("gptq-bits", recipe_change(gptq=[{"bits": 5}]), "gptq[0].bits"),
    Case("iq-type-without-imatrix", recipe_change(gguf={"types": ["IQ2_XS"]}), "need an importance matrix"),
    # the source model
    Case("local-source-without-repo-id", no_repo_id, "source.repo_id: required when source.path is a local folder"),
    Case("config-zero-heads", config_change(num_attention_heads=0), "num_attention_heads must be a positive integer"),
    Case("config-negative-layers", config_change(num_hidden_layers=-5), "num_hidden_layers must be a positive integer"),
    Case("config-string-size", config_change(hidden_size="256"), "hidden_size must be a positive integer"),
    Case("config-kv-heads-not-dividing", config_change(num_key_value_heads=3), "not a multiple of num_key_value_heads"),
    Case("config-not-json", lambda s: setattr(s, "argv", _raw_config(s, b"{broken")),
         "is not valid JSON"),
    Case("config-a-list", lambda s: setattr(s, "argv", _raw_config(s, b"[1, 2]")), "is not a JSON object"),
    Case("bert-for-gguf", do(attr("config", BERT), recipe_change(gptq=None)), "not a text-generation (causal LM) model"),
    Case("plan-zero-heads", do(config_change(num_attention_heads=0), attr("command", "plan")), "num_attention_heads"),
    Case("model-is-a-file", lambda s: s.extra.extend(["--model", str(s.file("weights.bin", b"x"))]),
         "is a file, not a model folder"),
    Case("source-path-is-a-file", lambda s: s.recipe["source"].update(path=str(s.file("model.bin", b"x"))),
         "source.path: "),
    Case("model-missing", lambda s: s.extra.extend(["--model", str(s.root / "nowhere")]), "does not exist"),
    # the original card
    Case("card-front-matter-malformed", attr("readme", b"---\nlicense: [mit\n---\n# Card\n"),
         "front matter is malformed YAML"),
    Case("card-front-matter-a-list", attr("readme", b"---\n- mit\n- apache\n---\n# Card\n"), "a YAML list, not a mapping"),
    Case("card-front-matter-duplicate-key", attr("readme", b"---\nlicense: mit\nlicense: gpl\n---\n"), "duplicate key"),
    Case("card-not-utf8", attr("readme", b"# Caf\xe9\n"), "is not UTF-8 text"),
    Case("source-card-missing", recipe_change(source={"card": "no-such-card.md"}), "source.card"),
    # the prompt template
    Case("chat-template-runaway", lambda s: s.chat_template("{% for i in range(1000000) %}x{% endfor %}"),
         "source.prompt_template: the tokenizer's chat template fails"),
    Case("chat-template-raises", lambda s: s.chat_template("{{ raise_exception('System role not supported') }}"),
         "System role not supported"),
    Case("chat-template-huge-string", lambda s: s.chat_template("{{ 'x' * 1000000000 }}"), "chat template fails"),
    Case("tokenizer-config-not-json", lambda s: (s.recipe["source"].pop("prompt_template"), s.file(
        "model/tokenizer_config.json", "{nope")), "tokenizer_config.json is not valid JSON"),
    # the card inputs
    Case("templates-folder-missing", recipe_change(card={"templates": "no-templates/"}), "card.templates"),
    Case("templates-is-a-file", lambda s: (s.file("tpl.txt", "x"), s.recipe.update(card={"templates": "tpl.txt"})),
         "is not a folder"),
    Case("header-missing", recipe_change(card={"header": "header.md"}), "card.header"),
    Case("header-not-utf8", lambda s: (s.file("header.md", b"\xff\xfe"), s.recipe.update(card={"header": "header.md"})),
         "card.header"),
    Case("template-syntax-error", lambda s: (s.file("tpl/gptq.md.j2", "{% if %}"), s.recipe.update(card={"templates": "tpl"})),
         "card template gptq.md.j2"),
    Case("template-undefined-variable", lambda s: (s.file("tpl/partials/title.md.j2", "# {{ no_such_thing }}\n"),
                                                   s.recipe.update(card={"templates": "tpl"})), "no_such_thing"),
    Case("template-breaks-front-matter", lambda s: (s.file("tpl/gguf.md.j2", "<!-- x start -->\n"),
                                                    s.recipe.update(card={"templates": "tpl"})), "section x is never closed"),
    # the calibration text
    Case("imatrix-calibration-file-missing", recipe_change(gptq=None, gguf={"types": ["Q4_K_M"], "imatrix": True},
                                                           calibration={"dataset": "file", "path": "missing.txt"}),
         "calibration.path"),
    # the command line
    Case("variants-one-unknown", lambda s: s.extra.extend(["--variants", "gptq/main,gguf/Q9_Z"]), "'gguf/Q9_Z'"),
    Case("variants-empty", lambda s: s.extra.extend(["--variants", ","]), "--variants: no variant named"),
    Case("only-unknown-format", lambda s: s.extra.extend(["--only", "exl2"]), "--only: unknown format 'exl2'"),
    Case("release-out-is-a-file", lambda s: setattr(s, "out", s.file("out", "not a folder")), "--out: "),
    Case("card-out-is-a-file", lambda s: (setattr(s, "out", s.file("out", "not a folder")), setattr(s, "command", "card")),
         "is a file, not a folder"),
    Case("from-hub-malformed-id", lambda s: (setattr(s, "command", "from-hub"), s.extra.extend(["--from-hub", "a..b/x-GPTQ"])),
         "card --from-hub"),
    Case("from-hub-three-parts", lambda s: (setattr(s, "command", "from-hub"), s.extra.extend(["--from-hub", "a/b/c"])),
         "must be namespace/name"),
    Case("card-dry-run-bad-header", lambda s: (setattr(s, "command", "card"), s.extra.append("--dry-run"),
                                               s.recipe.update(card={"header": "nope.md"})), "card.header"),
]


def _raw_config(s: Setup, content: bytes):
    """Make argv() write `content` as config.json instead of the dict."""
    original = Setup.argv

    def argv() -> list[str]:
        args = original(s)
        (s.model / "config.json").write_bytes(content)
        return args
    return argv


@pytest.fixture(scope="module", autouse=True)
def warm_imports(tmp_path_factory):
    """Run the good release's checks once (`release --dry-run`), so that each case's time is its own,
    not that of the modules the CLI imports on first use; and prove the unspoilt setup is good."""
    setup = Setup(tmp_path_factory.mktemp("good"))
    assert main([*setup.argv(), "--dry-run", "--json"]) == 0
    assert not setup.out.exists()


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_exit_2_one_line_nothing_written(case, tmp_path, capsys, recording):
    setup = Setup(tmp_path)
    case.spoil(setup)
    argv = setup.argv()
    before = setup.out.read_bytes() if setup.out.is_file() else None
    capsys.readouterr()
    started = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ") and case.expect in lines[0], lines[0]
    assert "unexpected" not in lines[0] and "Traceback" not in captured.err
    assert captured.out == ""
    if before is None:
        assert not setup.out.exists(), sorted(p.name for p in setup.out.rglob("*"))
    else:
        assert setup.out.read_bytes() == before
    assert recording.calls == []  # no variant was started
    assert elapsed < 1.0, f"{elapsed:.2f} s"
