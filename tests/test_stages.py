"""The stage layer: artifacts computed at most once per release, cached, keyed by their inputs;
variant fingerprints that cover every setting that changes a variant's bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from quantize import api
from quantize.errors import BadInput
from quantize.plan import build_plan
from quantize.recipe import load_recipe
from quantize.source import inspect_source
from quantize.stages import Artifact, ArtifactStore, content_key

from .conftest import REPO, TINY_CONFIG, tiny_recipe


@dataclass(frozen=True, repr=False)
class Counted(Artifact):
    label: str
    setting: int
    base: "Counted | None" = None
    calls: list = None  # shared list: one entry per compute

    @property
    def name(self) -> str:
        return self.label

    def inputs(self) -> dict[str, Any]:
        return {"setting": self.setting}

    def needs(self) -> tuple[Artifact, ...]:
        return (self.base,) if self.base else ()

    def compute(self, store, folder: Path) -> Any:
        self.calls.append(self.label)
        below = store.value(self.base) if self.base else 0
        (folder / "data.txt").write_text(str(self.setting + below))
        return {"sum": self.setting + below}

    def load(self, store, folder: Path, value: Any) -> int:
        return int((folder / "data.txt").read_text())


def test_an_artifact_is_computed_once_per_release_and_reused_by_later_runs(tmp_path):
    calls: list[str] = []
    base = Counted("base", 1, calls=calls)
    top = Counted("top", 10, base, calls=calls)
    store = ArtifactStore(tmp_path, log=lambda _: None)
    assert store.value(top) == 11 and store.value(top) == 11 and store.value(base) == 1
    assert calls == ["base", "top"]
    again = ArtifactStore(tmp_path, log=lambda _: None)  # a later run of the same release
    assert again.value(top) == 11 and calls == ["base", "top"] and again.get(top).reused


def test_a_changed_input_redoes_the_artifact_and_everything_made_from_it(tmp_path):
    calls: list[str] = []
    ArtifactStore(tmp_path, log=lambda _: None).value(Counted("top", 10, Counted("base", 1, calls=calls), calls=calls))
    changed = Counted("top", 10, Counted("base", 2, calls=calls), calls=calls)
    assert ArtifactStore(tmp_path, log=lambda _: None).value(changed) == 12
    assert calls == ["base", "top", "base", "top"]


def test_a_damaged_cache_or_an_interrupted_computation_is_never_reused(tmp_path):
    calls: list[str] = []
    artifact = Counted("base", 1, calls=calls)
    store = ArtifactStore(tmp_path, log=lambda _: None)
    store.value(artifact)
    (store.folder(artifact) / "data.txt").write_text("1234")  # other size than recorded
    (tmp_path / ".work" / "base.partial").mkdir()  # a crash mid-computation leaves this behind
    assert ArtifactStore(tmp_path, log=lambda _: None).value(artifact) == 1
    assert calls == ["base", "base"] and not (tmp_path / ".work" / "base.partial").exists()


def test_a_failed_artifact_fails_once_and_is_not_retried_within_the_release(tmp_path):
    attempts = []

    @dataclass(frozen=True, repr=False)
    class Broken(Artifact):
        @property
        def name(self) -> str:
            return "broken"

        def inputs(self):
            return {}

        def compute(self, store, folder):
            attempts.append(1)
            raise BadInput("calibration: too short")

    store = ArtifactStore(tmp_path, log=lambda _: None)
    for _ in range(2):
        with pytest.raises(BadInput, match="too short"):
            store.get(Broken())
    assert attempts == [1] and not (tmp_path / ".work" / "broken").exists()


def test_content_key_is_stable_and_order_free():
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


# --- variant fingerprints -------------------------------------------------------------------

def _model(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    (folder / "README.md").write_text("# card\n")
    return folder


def _digests(write_recipe, data: dict) -> dict[str, str]:
    recipe = load_recipe(write_recipe(data))
    return {v.id: v.digest for v in build_plan(recipe, inspect_source(recipe)).variants}


@pytest.mark.parametrize("change, redone", [
    (lambda d: d["gguf"].update(imatrix_chunks=8), {"gguf/Q4_K_M", "gguf/Q8_0"}),
    (lambda d: d["gguf"].update(imatrix=False), {"gguf/Q4_K_M", "gguf/Q8_0"}),
    (lambda d: d["gguf"].update(outtype="bf16"), {"gguf/Q4_K_M", "gguf/Q8_0"}),
    (lambda d: d["release"].update(split_max_size_gb=2), {"gguf/Q4_K_M", "gguf/Q8_0"}),
    (lambda d: d["source"].update(license="mit"), {"gguf/Q4_K_M", "gguf/Q8_0"}),
    (lambda d: d["source"].update(name="Another Name"), {"gguf/Q4_K_M", "gguf/Q8_0"}),  # general.name in the file
    (lambda d: d["calibration"].update(seed=1), {"gptq/main", "gguf/Q4_K_M", "gguf/Q8_0"}),
    (lambda d: d["gptq"][0].update(damp=0.05), {"gptq/main"}),
    # GPTQModel's loop and its one-forward-per-layer form make the same files: switching redoes nothing
    (lambda d: d["gptq"][0].update(hessian="batched"), set()),
    (lambda d: d["gptq"][0].update(hessian="sequential"), set()),
    (lambda d: d["gptq"][0].update(hessian="shared"), {"gptq/main"}),
    (lambda d: d["gptq"][0].update(description="Another text"), set()),  # the card changes, not the files
    (lambda d: d["release"].update(tags=["x"]), set()),
])
def test_the_fingerprint_covers_what_changes_the_bytes(tmp_path, write_recipe, change, redone):
    data = tiny_recipe(_model(tmp_path / "model"), gptq=[{"bits": 4}],
                       gguf={"types": ["Q4_K_M", "Q8_0"], "imatrix": True, "imatrix_chunks": 4})
    before = _digests(write_recipe, data)
    change(data)
    after = _digests(write_recipe, data)
    assert {variant for variant in before if before[variant] != after[variant]} == redone


def test_the_awq_scale_search_is_part_of_the_awq_fingerprint_only(tmp_path, write_recipe):
    data = tiny_recipe(_model(tmp_path / "model"), gptq=[{"bits": 4}], awq=[{"bits": 4}])
    before = _digests(write_recipe, data)
    data["awq"][0]["scale_search"] = "full"
    after = _digests(write_recipe, data)
    assert {variant for variant in before if before[variant] != after[variant]} == {"awq/main"}


def test_a_retrained_model_in_the_same_folder_redoes_every_variant(tmp_path, write_recipe):
    model = _model(tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"weights v1")
    data = tiny_recipe(model, gptq=[{"bits": 4}], gguf={"types": ["Q8_0"]})
    before = _digests(write_recipe, data)
    (model / "model.safetensors").write_bytes(b"weights v2, longer")
    after = _digests(write_recipe, data)
    assert all(before[v] != after[v] for v in before)


def test_a_changed_imatrix_setting_redoes_only_the_gguf_variants(recording, release_recipe, tmp_path):
    data = yaml.safe_load(release_recipe.read_text())
    data["gguf"]["imatrix"] = True
    data["publish"] = {"target": "none"}
    release_recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    api.release(release_recipe, out=out, log=lambda _: None)
    recording.calls.clear()
    data["gguf"]["imatrix_chunks"] = 3
    release_recipe.write_text(yaml.safe_dump(data))
    result = api.release(release_recipe, out=out, log=lambda _: None)
    assert sorted(recording.calls) == ["gguf/Q4_K_M", "gguf/Q8_0"]
    assert {o.variant.id: o.status for o in result.outcomes} == {
        "gptq/main": "skipped", "gptq/gptq-8bit--1g-actorder_True": "skipped",
        "gguf/Q4_K_M": "done", "gguf/Q8_0": "done"}


def test_the_plan_warns_of_shared_hessians_where_they_were_measured_far_behind(tmp_path, write_recipe):
    data = tiny_recipe(_model(tmp_path / "model"),
                       gptq=[{"bits": 4, "group_size": 64, "hessian": "shared"},
                             {"bits": 3, "group_size": 64, "hessian": "shared"},
                             {"bits": 4, "group_size": "none", "hessian": "shared"},
                             {"bits": 8, "group_size": "none", "hessian": "shared"},  # measured as good
                             {"bits": 3, "group_size": 32}])  # sequential: no warning
    recipe = load_recipe(write_recipe(data))
    warnings = [w for w in build_plan(recipe, inspect_source(recipe)).warnings if "hessian: shared" in w]
    assert len(warnings) == 1
    assert warnings[0].startswith("gptq/gptq-3bit-64g-actorder_True, gptq/gptq-4bit--1g-actorder_True: ")
    plan = build_plan(recipe, inspect_source(recipe))
    assert not [w for w in plan.select(names=["gptq/main"]).warnings if "hessian: shared" in w]
    only_3bit = [w for w in plan.select(names=["gptq/gptq-3bit-64g-actorder_True"]).warnings if "hessian: shared" in w]
    assert len(only_3bit) == 1 and only_3bit[0].startswith("gptq/gptq-3bit-64g-actorder_True: ")
    data["gptq"] = [data["gptq"][0]]
    recipe = load_recipe(write_recipe(data))
    assert not [w for w in build_plan(recipe, inspect_source(recipe)).warnings if "hessian: shared" in w]


def test_the_plan_declares_the_shared_work_of_each_variant(tmp_path, write_recipe):
    data = tiny_recipe(_model(tmp_path / "model"),
                       gptq=[{"bits": 4, "hessian": "shared"}, {"bits": 8, "seq_len": 64, "hessian": "shared"}],
                       awq=[{"bits": 4}], gguf={"types": ["Q4_K_M"], "imatrix": True})
    recipe = load_recipe(write_recipe(data))
    plan = build_plan(recipe, inspect_source(recipe))
    needs = {v.id: [a.name for a in v.needs] for v in plan.variants}
    assert needs == {"gptq/main": ["windows_128", "gptq_hessians_128", "fp16_reference"],
                     "gptq/gptq-8bit-128g-actorder_True": ["windows_64", "gptq_hessians_64", "fp16_reference"],
                     "awq/main": ["windows_128", "fp16_reference"],
                     "gguf/Q4_K_M": ["gguf_convert", "gguf_imatrix", "gguf_reference"]}
    assert list(plan.artifacts) == ["calibration_text", "tokens", "windows_128", "gptq_hessians_128", "fp16_reference",
                                    "windows_64", "gptq_hessians_64", "gguf_convert", "gguf_imatrix", "gguf_reference"]
    assert [a.name for a in plan.artifacts["gguf_reference"].needs()] == ["gguf_convert", "fp16_reference"]
    # per layer, float32: 3 inputs of width 256 (attention in, attention out, MLP in) and one of 512
    assert plan.artifacts["gptq_hessians_128"].estimated_bytes() == 2 * (3 * 256 ** 2 + 512 ** 2) * 4
    assert plan.working_bytes == sum(plan.artifacts[name].estimated_bytes()
                                     for name in ("gguf_convert", "gptq_hessians_128", "gptq_hessians_64", "fp16_reference"))


def test_sequential_gptq_needs_no_hessians(tmp_path, write_recipe):
    data = tiny_recipe(_model(tmp_path / "model"), gptq=[{"bits": 4}])  # sequential is the default
    recipe = load_recipe(write_recipe(data))
    (variant,) = build_plan(recipe, inspect_source(recipe)).variants
    assert [a.name for a in variant.needs] == ["windows_128", "fp16_reference"]


# --- a new format is one module and one template --------------------------------------------

TOY_FORMAT = '''
from pathlib import Path
from quantize.formats.base import Backend, Format, Produced, Variant
from quantize.schema import Strict


class ToySpec(Strict):
    levels: list[int]


class ToyParams(Strict):
    level: int


class ToyBackend(Backend):
    def check(self, variants):
        pass

    def produce(self, variant, staging: Path) -> Produced:
        path = staging / variant.file_name
        path.write_text("toy weights at level %d" % variant.spec.level)
        return Produced([path], measured={"chars": len(path.read_text())})


class ToyFormat(Format):
    name = "toy"
    title = "TOY"
    order = 40
    card_order = 40
    section = ToySpec | None
    one_branch_per_variant = False
    location_label = "File"

    def expand(self, recipe, source):
        repo_id = recipe.release.repo_id(self.title)
        return [Variant(id=f"toy/L{level}", format="toy", repo_id=repo_id, branch="main", name=f"L{level}",
                        spec=ToyParams(level=level), calibration=None, description=f"level {level}",
                        estimated_bytes=100, subdir=self.output_subdir("main"),
                        source_identity=source.identity, file_name=f"model.L{level}.toy")
                for level in recipe.toy.levels]

    def backend(self, context):
        return ToyBackend(context)

    def method(self, variant):
        return "TOY"

    def describe(self, variant):
        return f"level {variant.spec.level}"

    def card_row(self, entry, model_type):
        return {"file": entry.files[0], "level": entry.params["level"], "ppl": ""}

    def repository_label(self, section):
        return "Toy files"


FORMAT = ToyFormat()
'''

TOY_TEMPLATE = '''{% include "partials/title.md.j2" %}
<!-- toy-files start -->
| File | Level |
| ---- | ----- |
{% for row in rows %}
| {{ row.file }} | {{ row.level }} |
{% endfor %}
<!-- toy-files end -->
{% include "partials/original.md.j2" %}
'''

TOY_RUN = '''
import json, sys
import quantize.formats
quantize.formats.__path__.append(sys.argv[1])  # the plugin module, outside the package
from quantize import api
result = api.release(sys.argv[2], out=sys.argv[3], log=lambda message: None)
print(json.dumps(result.to_dict()))
'''


def test_a_new_format_plugs_in_with_one_module_and_one_template(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "toy.py").write_text(TOY_FORMAT)
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "toy.md.j2").write_text(TOY_TEMPLATE)
    model = _model(tmp_path / "model")
    data = tiny_recipe(model, toy={"levels": [1, 2]})
    data["source"]["prompt_template"] = "{prompt}"
    data["card"] = {"templates": "templates"}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", TOY_RUN, str(plugins), str(recipe), str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(v["id"], v["status"]) for v in summary["variants"]] == [("toy/L1", "done"), ("toy/L2", "done")]
    assert (out / "toy" / "model.L2.toy").read_text() == "toy weights at level 2"
    manifest = json.loads((out / "manifests" / "toy" / "L2.json").read_text())
    assert manifest["requested"] == {"level": 2} and manifest["measured"] == {"chars": 22}
    card = (out / "cards" / "Tiny-Llama-TOY" / "README.md").read_text()
    assert "| model.L1.toy | 1 |" in card and "| model.L2.toy | 2 |" in card
    refs = subprocess.run(["git", "--git-dir", str(out / "repos" / "Tiny-Llama-TOY.git"), "ls-tree", "--name-only",
                           "main"], capture_output=True, text=True)
    assert set(refs.stdout.split()) >= {"README.md", "model.L1.toy", "model.L2.toy"}


def test_calibration_text_is_known_by_its_content(tmp_path, write_recipe):
    text = tmp_path / "calibration.txt"
    text.write_text("some calibration text\n" * 50)
    data = tiny_recipe(_model(tmp_path / "model"), gptq=[{"bits": 4}])
    data["calibration"] = {"dataset": "file", "path": str(text)}
    before = _digests(write_recipe, data)
    moved = tmp_path / "elsewhere" / "calibration.txt"
    moved.parent.mkdir()
    text.rename(moved)
    data["calibration"]["path"] = str(moved)
    assert _digests(write_recipe, data) == before  # the same text somewhere else: nothing to redo
    moved.write_text("other calibration text\n" * 50)
    assert _digests(write_recipe, data) != before
