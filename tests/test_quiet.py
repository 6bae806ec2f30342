"""A quiet terminal: the libraries' output goes to <out>/.work/logs/, -v also streams it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

import quantize
from quantize.cli import main
from quantize.formats import Backend, Produced
from quantize.stages import Artifact

# what a library does, one marker per channel
LIBRARY_MARKERS = ("PRINTED-STDOUT", "PRINTED-STDERR", "FD1-WRITE", "FD2-WRITE", "THREAD-WRITE", "CHILD-PROCESS",
                   "LIB-INFO", "LIB-WARNING", "LIB-PYWARN")


class NoisyArtifact(Artifact):
    name = "noisy_artifact"

    def inputs(self) -> dict[str, Any]:
        return {}

    def compute(self, store, folder: Path) -> Any:
        print("ARTIFACT-PRINT")
        os.write(2, b"ARTIFACT-FD2\n")
        return 1


class NoisyBackend(Backend):
    """Makes a small 'model' per variant, printing on every channel a library uses on the way."""

    fail_on: set[str] = set()

    def check(self, variants):
        print("SETUP-BANNER")  # GPTQModel's banner comes at import, during the checks

    def produce(self, variant, staging: Path) -> Produced:
        tag = variant.id
        print(f"PRINTED-STDOUT {tag}")
        print(f"PRINTED-STDERR {tag}", file=sys.stderr)
        os.write(1, f"FD1-WRITE {tag}\n".encode())
        os.write(2, f"FD2-WRITE {tag}\n".encode())
        thread = threading.Thread(target=lambda: os.write(2, f"THREAD-WRITE {tag}\n".encode()))
        thread.start()
        thread.join()
        subprocess.run(["sh", "-c", f"echo CHILD-PROCESS {tag}; echo CHILD-PROCESS-ERR >&2"], check=True)
        logger = logging.getLogger("gptqmodel.looper")
        logging.getLogger("gptqmodel").setLevel(logging.INFO)
        logger.info(f"LIB-INFO {tag}")
        logging.getLogger("transformers.modeling_utils").warning(f"LIB-WARNING {tag}")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(f"LIB-PYWARN {tag}", UserWarning)  # raised here: not quantize's own code
            warnings.warn_explicit(f"OWN-WARNING {tag}", UserWarning,
                                   str(Path(quantize.__file__).parent / "runner.py"), 1)
        self.context.store.get(NoisyArtifact())  # shared work: its output goes to shared.log
        if variant.id in NoisyBackend.fail_on:
            raise RuntimeError(f"simulated crash in {tag}")
        path = staging / (variant.file_name or "model.safetensors")
        path.write_bytes(b"x" * 100)
        files = [path]
        if not variant.file_name:
            (staging / "config.json").write_text(json.dumps({"quantization_config": variant.params}))
            files.append(staging / "config.json")
        return Produced(files, quality={"perplexity": 10.0})


@pytest.fixture
def noisy(monkeypatch):
    NoisyBackend.fail_on = set()
    monkeypatch.setattr("quantize.runner.backend_class", lambda fmt: NoisyBackend)
    return NoisyBackend


def _release(recipe: Path, out: Path, capfd, *extra: str) -> tuple[int, str]:
    code = main(["release", str(recipe), "--out", str(out), "--no-publish", *extra])
    captured = capfd.readouterr()
    return code, captured.out + captured.err


def _variant_log(out: Path, variant_id: str) -> str:
    return (out / ".work" / "logs" / f"{variant_id}.log").read_text()


def test_library_output_goes_to_the_variants_log_files_not_the_terminal(noisy, release_recipe, tmp_path, capfd):
    out = tmp_path / "out"
    code, terminal = _release(release_recipe, out, capfd)
    assert code == 0
    for marker in (*LIBRARY_MARKERS, "ARTIFACT-PRINT", "ARTIFACT-FD2", "SETUP-BANNER"):
        assert marker not in terminal, marker
    assert "gptq/main: " in terminal and "Release in" in terminal  # our progress and the table are there
    assert "OWN-WARNING gptq/main" in terminal  # quantize's own warnings still reach the user
    for variant_id in ("gptq/main", "gguf/Q4_K_M"):
        log = _variant_log(out, variant_id)
        for marker in LIBRARY_MARKERS:
            assert f"{marker} {variant_id}" in log, (variant_id, marker)
        other = "gguf/Q4_K_M" if variant_id == "gptq/main" else "gptq/main"
        assert f"FD1-WRITE {other}" not in log  # each variant's output in its own file
        assert "ARTIFACT-PRINT" not in log
    shared = (out / ".work" / "logs" / "shared.log").read_text()
    assert "ARTIFACT-PRINT" in shared and "ARTIFACT-FD2" in shared and "SETUP-BANNER" in shared
    # the streams, loggers and warnings are ours again once the release is over
    assert logging.getLogger("transformers").handlers == [] or all(
        type(h).__name__ != "_FdHandler" for h in logging.getLogger("transformers").handlers)
    print("AFTER-RELEASE")
    os.write(2, b"AFTER-FD2\n")
    after = capfd.readouterr()
    assert "AFTER-RELEASE" in after.out and "AFTER-FD2" in after.err


def test_verbose_streams_the_library_output_and_still_logs_it(noisy, release_recipe, tmp_path, capfd):
    out = tmp_path / "out"
    code, terminal = _release(release_recipe, out, capfd, "-v")
    assert code == 0
    for variant_id in ("gptq/main", "gguf/Q4_K_M"):
        log = _variant_log(out, variant_id)
        for marker in LIBRARY_MARKERS:
            assert f"{marker} {variant_id}" in terminal, (variant_id, marker)
            assert f"{marker} {variant_id}" in log, (variant_id, marker)
        assert terminal.count(f"OWN-WARNING {variant_id}") == 1
    assert "ARTIFACT-PRINT" in terminal and "gptq/main: " in terminal


def test_a_failed_variant_names_its_log_file_which_holds_the_traceback(noisy, release_recipe, tmp_path, capfd):
    noisy.fail_on = {"gguf/Q8_0"}
    out = tmp_path / "out"
    code, terminal = _release(release_recipe, out, capfd)
    assert code == 1
    log_path = out / ".work" / "logs" / "gguf" / "Q8_0.log"
    assert str(log_path) in terminal
    assert "simulated crash in gguf/Q8_0" in log_path.read_text() and "Traceback" in log_path.read_text()
    assert "Traceback" not in terminal


def test_json_output_stays_alone_on_stdout(noisy, release_recipe, tmp_path, capfd):
    code = main(["release", str(release_recipe), "--out", str(tmp_path / "out"), "--no-publish", "--json"])
    captured = capfd.readouterr()
    assert code == 0
    assert json.loads(captured.out)["status"] == "ok"  # nothing but the JSON on stdout
    assert "FD1-WRITE" not in captured.err
