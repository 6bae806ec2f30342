"""The product outside this checkout: package data (card templates, the WikiText-2 copy), where the
calibration text comes from, and a real wheel installed into a folder of its own."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml
from setuptools import find_packages

from quantize import calibration, doctor
from quantize.calibration import PACKAGED_WIKITEXT, WIKITEXT_ENV, load_texts
from quantize.errors import BadInput
from quantize.recipe import load_recipe

from .conftest import TINY_CONFIG, tiny_recipe

REPO = Path(__file__).resolve().parent.parent
SHIPPED = {"wikitext-2-raw-v1/test": "wikitext-2-raw-v1/wiki.test.raw",
           "wikitext-2-v1/test": "wikitext-2-v1/wiki.test.tokens",
           "wikitext-2-v1/validation": "wikitext-2-v1/wiki.valid.tokens"}
FIRST_HEADING = " = Robert Boulter = \n"  # the first article of the WikiText-2 test split
GPTQ_HEADER = "| Branch | Bits | GS | Act Order | Damp % | GPTQ Dataset | Seq Len | Size |"
GGUF_HEADER = "| Name | Quant method | Bits | Size | Max RAM required |"


def wikitext_recipe(tmp_path: Path, **calibration_fields) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    (model / "README.md").write_text("# The original card\n")
    data = tiny_recipe(model, gptq=[{"bits": 4}], gguf={"types": ["Q4_K_M"]})
    data["source"]["prompt_template"] = "{prompt}"
    data["calibration"].update(calibration_fields)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- packaging --------------------------------------------------------------------------------

def test_pyproject_lists_every_subpackage_and_maps_the_templates():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    missing = set(find_packages(where=str(REPO), include=["quantize*"])) - set(setuptools["packages"])
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    assert setuptools["package-dir"] == {"quantize.templates": "templates"}
    assert {"quantize.templates", "quantize.templates.partials", "quantize.data"} <= set(setuptools["packages"])
    assert not (REPO / "quantize" / "templates").exists()  # templates/ is their one source


def test_packaged_wikitext_matches_its_checksums_and_names_its_licence():
    sums = (PACKAGED_WIKITEXT / "SHA256SUMS").read_text().split("\n")
    expected = dict(reversed(line.split("  ", 1)) for line in sums if line)
    assert sorted(expected) == sorted(SHIPPED.values())
    for name, digest in expected.items():
        assert hashlib.sha256((PACKAGED_WIKITEXT / name).read_bytes()).hexdigest() == digest, name
    licence = (PACKAGED_WIKITEXT / "LICENSE.md").read_text()
    assert "CC BY-SA 3.0" in licence and "Pointer Sentinel Mixture Models" in licence and "Merity" in licence
    assert calibration.packaged_wikitext() == list(SHIPPED)


# --- where the wikitext comes from ------------------------------------------------------------

def test_the_packaged_copy_is_used_when_no_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv(WIKITEXT_ENV, raising=False)
    texts = load_texts(load_recipe(wikitext_recipe(tmp_path)).calibration)
    assert texts.calibration.startswith("\n\n" + FIRST_HEADING)  # row 0 is the blank line before it
    assert texts.facts["source"] == str(PACKAGED_WIKITEXT / SHIPPED["wikitext-2-raw-v1/test"])
    assert texts.facts["evaluation"] == "the last 10% of wikitext-2-raw-v1 test, held out from calibration"
    v1 = load_texts(load_recipe(wikitext_recipe(tmp_path, config="wikitext-2-v1", split="validation")).calibration)
    assert v1.facts["source"].endswith("wikitext-2-v1/wiki.valid.tokens") and " = Homarus gammarus = " in v1.calibration
    assert doctor.wikitext_report()["source"] == "packaged"


def test_quantize_wikitext_dir_comes_first_and_the_packaged_copy_backs_it_up(tmp_path, monkeypatch):
    folder = tmp_path / "wikitext"
    (folder / "wikitext-2-raw-v1").mkdir(parents=True)
    own = folder / "wikitext-2-raw-v1" / "wiki.test.raw"
    own.write_text(" = My own text = \n" + "word " * 5000 + "\n")
    monkeypatch.setenv(WIKITEXT_ENV, str(folder))
    texts = load_texts(load_recipe(wikitext_recipe(tmp_path)).calibration)
    assert texts.facts["source"] == str(own) and texts.calibration.startswith(" = My own text = ")
    report = doctor.wikitext_report()
    assert report["source"] == WIKITEXT_ENV and report["local_copy"] == str(own) and report["env_dir"] == str(folder)
    # a split the folder lacks: the packaged copy, and the manifest facts say so
    v1 = load_texts(load_recipe(wikitext_recipe(tmp_path, config="wikitext-2-v1")).calibration)
    assert v1.facts["source"] == str(PACKAGED_WIKITEXT / SHIPPED["wikitext-2-v1/test"])


def test_a_quantize_wikitext_dir_that_is_not_a_folder_is_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv(WIKITEXT_ENV, str(tmp_path / "no-such-folder"))
    with pytest.raises(BadInput, match=f"{WIKITEXT_ENV}=.*no-such-folder is not a folder"):
        load_texts(load_recipe(wikitext_recipe(tmp_path)).calibration)
    facts = doctor.wikitext_report()
    assert facts["source"] is None
    assert any("is not a folder" in problem for problem in doctor.problems(
        {"libraries": [], "llama_cpp": {"found": True}, "wikitext": facts}))


def test_a_split_not_shipped_needs_quantize_wikitext_dir_or_datasets(tmp_path, monkeypatch):
    monkeypatch.delenv(WIKITEXT_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(BadInput) as error:
        load_texts(load_recipe(wikitext_recipe(tmp_path, split="train")).calibration)
    message = str(error.value)
    assert "\n" not in message and "wikitext-2-raw-v1/train is not in the copy shipped with quantize" in message
    assert f"set {WIKITEXT_ENV} to a folder holding wikitext-2-raw-v1/wiki.train.raw" in message
    assert "install `datasets`" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(WIKITEXT_ENV, str(empty))
    with pytest.raises(BadInput, match=f"nor in {WIKITEXT_ENV}=.*empty \\(no wikitext-2-raw-v1/wiki.train.raw\\)"):
        load_texts(load_recipe(wikitext_recipe(tmp_path, split="train")).calibration)


# --- a real wheel, installed outside the checkout ---------------------------------------------

INSTALLED_CHECK = textwrap.dedent('''
    import json, sys
    import quantize
    from quantize import calibration, doctor
    from quantize.card.render import BUILTIN_TEMPLATES
    from quantize.recipe import load_recipe
    texts = calibration.load_texts(load_recipe(sys.argv[1]).calibration)
    print(json.dumps({
        "package": quantize.__file__, "templates": str(BUILTIN_TEMPLATES),
        "template_files": sorted(str(p.relative_to(BUILTIN_TEMPLATES)) for p in BUILTIN_TEMPLATES.rglob("*.j2")),
        "packaged": calibration.packaged_wikitext(), "source": texts.facts["source"],
        "first_lines": texts.calibration[:60], "doctor": doctor.wikitext_report(),
    }))
''')
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


@pytest.fixture
def source_copy(tmp_path) -> Path:
    """What a build needs, copied: building writes build/ and *.egg-info into the source folder."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("quantize", "templates"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return source


def run_python(args: list[str], cwd: Path, pythonpath: str | None = None) -> str:
    """A fresh interpreter in `cwd`, without QUANTIZE_WIKITEXT_DIR and with only `pythonpath` added."""
    env = {key: value for key, value in os.environ.items() if key not in (WIKITEXT_ENV, "PYTHONPATH")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def check_installed(facts: dict, package: Path, templates: Path) -> None:
    assert Path(facts["package"]).parent == package  # that install's package, not this checkout's
    assert Path(facts["templates"]) == templates
    assert {"gptq.md.j2", "awq.md.j2", "gguf.md.j2", "partials/title.md.j2"} <= set(facts["template_files"])
    assert facts["packaged"] == list(SHIPPED)
    assert facts["source"] == str(package / "data" / "wikitext-2" / SHIPPED["wikitext-2-raw-v1/test"])
    assert facts["first_lines"].startswith("\n\n" + FIRST_HEADING)
    assert facts["doctor"]["source"] == "packaged" and facts["doctor"]["env_dir"] is None


def test_a_wheel_installed_elsewhere_renders_cards_plans_and_reads_its_wikitext(tmp_path, source_copy):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source_copy)],
                   check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("quantize-*.whl")
    subprocess.run([*PIP, "install", "--no-deps", "--no-compile", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    installed = target / "quantize"
    assert (installed / "templates" / "gptq.md.j2").read_bytes() == (REPO / "templates" / "gptq.md.j2").read_bytes()
    assert (installed / "templates" / "partials" / "title.md.j2").is_file()
    assert (installed / "data" / "wikitext-2" / "LICENSE.md").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    recipe = wikitext_recipe(elsewhere)
    facts = json.loads(run_python(["-c", INSTALLED_CHECK, str(recipe)], elsewhere, str(target)))
    check_installed(facts, installed, installed / "templates")

    plan = json.loads(run_python(["-m", "quantize.cli", "plan", str(recipe), "--json"], elsewhere, str(target)))
    assert [v["id"] for v in plan["variants"]] == ["gptq/main", "gguf/Q4_K_M"]
    assert plan["release"]["repos"] == {"gptq": "tester/Tiny-Llama-GPTQ", "gguf": "tester/Tiny-Llama-GGUF"}
    assert plan["source"]["parameters"] == 13_763_840 and plan["variants"][0]["estimated_bytes"] > 0
    out = elsewhere / "out"
    run_python(["-m", "quantize.cli", "card", str(recipe), "--planned", "--out", str(out)], elsewhere, str(target))
    gptq = (out / "cards" / "Tiny-Llama-GPTQ" / "README.md").read_text()
    gguf = (out / "cards" / "Tiny-Llama-GGUF" / "README.md").read_text()
    assert gptq.startswith("---\n") and GPTQ_HEADER in gptq and "**Preview:**" in gptq
    assert GGUF_HEADER in gguf and "Tiny-Llama.Q4_K_M.gguf" in gguf


def test_an_editable_install_reads_the_checkouts_templates_and_its_packaged_wikitext(tmp_path, source_copy):
    # --target, never --prefix: pip would uninstall this environment's own quantize to "upgrade" it
    target = tmp_path / "site"
    subprocess.run([*PIP, "install", "--no-deps", "--no-build-isolation", "-q", "--target", str(target),
                    "-e", str(source_copy)], check=True, capture_output=True, text=True)
    # -S: no site-packages .pth files, so only this editable install's finder provides quantize; the
    # dependencies come from this environment's site-packages, added after it as a plain path (its
    # own editable install, if any, has a finder module of the same name).
    bootstrap = (f"import site, sys; site.addsitedir({str(target)!r}); "
                 f"sys.path.append({sysconfig.get_path('purelib')!r}); "
                 f"sys.argv[1:] = [{str(wikitext_recipe(tmp_path))!r}]\n")
    facts = json.loads(run_python(["-S", "-c", bootstrap + INSTALLED_CHECK], tmp_path))
    check_installed(facts, source_copy / "quantize", source_copy / "templates")
