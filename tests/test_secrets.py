"""Secrets and untrusted input: the model's own code, tokens in tools' environments, symlinks out of the
model folder, recipe templates, the example CI workflow."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from quantize.cli import main
from quantize.engines.llamacpp import LlamaCpp, run_tool

from .conftest import REPO

SECRET = "hf_do_not_leak_0123456789"
EVIL_TOKENIZER = """import os, pathlib
pathlib.Path(os.environ.get("CANARY_FILE", "/tmp/quantize-canary")).write_text(str(os.environ.get("HF_TOKEN")))
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def set_recipe(path: Path, change) -> None:
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))


def test_a_model_with_its_own_code_is_refused_and_never_run(tmp_path, recording, release_recipe, monkeypatch,
                                                            capsys):
    model = release_recipe.parent / "model"
    canary = tmp_path / "canary"
    (model / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    (model / "tokenization_evil.py").write_text(EVIL_TOKENIZER)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("CANARY_FILE", str(canary))
    for command in (["plan", str(release_recipe)], ["release", str(release_recipe), "--out", str(tmp_path / "out")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "tokenizer_config.json has an auto_map" in err and "source.trust_remote_code: true" in err
        assert len(err.strip().splitlines()) == 1
    assert not canary.exists() and recording.calls == [] and not (tmp_path / "out").exists()

    (model / "tokenizer_config.json").write_text("{}")  # a .py file alone is refused as well
    assert main(["plan", str(release_recipe)]) == 2
    assert "tokenization_evil.py is Python code" in capsys.readouterr().err
    set_recipe(release_recipe, lambda d: d["source"].update(trust_remote_code=True))
    assert main(["plan", str(release_recipe)]) == 0  # the user said they trust it


def test_loaders_are_told_whether_to_trust_the_models_code(tmp_path, release_recipe, monkeypatch):
    from quantize import api
    from quantize.formats import ReleaseContext

    seen = []
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, path, **kwargs: seen.append(kwargs)))
    plan = api.plan(release_recipe)
    ReleaseContext(plan, tmp_path / "out").tokenizer
    set_recipe(release_recipe, lambda d: d["source"].update(trust_remote_code=True))
    ReleaseContext(api.plan(release_recipe), tmp_path / "out").tokenizer
    assert seen == [{"trust_remote_code": False}, {"trust_remote_code": True}]


SHOW_ENV = "import json, os, sys; print(json.dumps(dict(os.environ))); from huggingface_hub import get_token; " \
           "print(json.dumps(get_token()))"


def test_tools_get_a_minimal_environment_without_tokens(tmp_path, monkeypatch):
    stored = tmp_path / "hf-home"
    stored.mkdir()
    (stored / "token").write_text(SECRET)  # a stored `hf auth login`
    for name, value in {"HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET, "GITHUB_TOKEN": SECRET,
                        "AWS_SECRET_ACCESS_KEY": SECRET, "HF_HOME": str(stored), "OMP_NUM_THREADS": "3"}.items():
        monkeypatch.setenv(name, value)
    script = tmp_path / "show_env.py"
    script.write_text(SHOW_ENV)
    output = run_tool([sys.executable, script], tmp_path / "logs" / "tool.log")
    env = json.loads(output.stdout.splitlines()[0])
    assert SECRET not in output.stdout and SECRET not in (tmp_path / "logs" / "tool.log").read_text()
    assert env["PATH"] == os.environ["PATH"] and env["OMP_NUM_THREADS"] == "3"
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY"} & set(env)

    root = tmp_path / "llama.cpp"
    (root / "gguf-py").mkdir(parents=True)
    converter_env = LlamaCpp(root, "cache", {}).converter_env()
    output = run_tool([sys.executable, script], tmp_path / "logs" / "convert.log", env=converter_env)
    env = json.loads(output.stdout.splitlines()[0])
    assert SECRET not in output.stdout and json.loads(output.stdout.splitlines()[1]) is None  # no login found
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(root / "gguf-py") and env["HF_HUB_OFFLINE"] == "1"


def test_symlinks_out_of_the_model_folder_are_refused(tmp_path, release_recipe, capsys):
    model = release_recipe.parent / "model"
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (model / "tokenizer.json").symlink_to(secret)
    assert main(["plan", str(release_recipe)]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json is a symlink to" in err and "outside the model folder" in err
    (model / "tokenizer.json").unlink()
    (model / "inside.json").write_text("{}")
    (model / "tokenizer.json").symlink_to(model / "inside.json")  # inside: fine
    assert main(["plan", str(release_recipe)]) == 0


def test_a_hugging_face_cache_snapshot_with_links_into_its_blobs_is_accepted(tmp_path, release_recipe):
    cache = tmp_path / "hub" / "models--test-lab--tiny-llama"
    snapshot, blobs = cache / "snapshots" / "abc123", cache / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in (release_recipe.parent / "model").iterdir():
        (blobs / path.name).write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("../../blobs") / path.name)
    set_recipe(release_recipe, lambda d: d["source"].update(path=str(snapshot)))
    assert main(["plan", str(release_recipe)]) == 0


def test_recipe_templates_render_in_a_sandbox(tmp_path, release_recipe, capsys):
    canary = tmp_path / "canary"
    templates = release_recipe.parent / "my-templates" / "partials"
    templates.mkdir(parents=True)
    (templates / "title.md.j2").write_text(
        "{{ cycler.__init__.__globals__.os.system('touch " + str(canary) + "') }}\n")
    set_recipe(release_recipe, lambda d: d.update(card={"templates": "my-templates"}))
    assert main(["card", str(release_recipe), "--out", str(tmp_path / "out"), "--planned"]) == 2
    assert "card template" in capsys.readouterr().err
    assert not canary.exists()


def test_the_example_workflow_passes_inputs_through_env():
    workflow = yaml.safe_load((REPO / "scripts" / "ci" / "github-workflow.yml").read_text())
    steps = [step for job in workflow["jobs"].values() for step in job["steps"]]
    for step in steps:
        assert "${{" not in step.get("run", ""), step["run"]
    release = next(step for step in steps if "release.sh" in step.get("run", ""))
    assert "inputs.model_dir" in release["env"]["MODEL_DIR"] and '"$MODEL_DIR"' in release["run"]
