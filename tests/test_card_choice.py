"""Cards that answer "which file?": the same quality columns in every card, the release's size-vs-KLD
chart on every branch, and the choice computed from the measurements and the KV cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import HfApi

from quantize import api
from quantize.card import plan_card_inputs, render_cards
from quantize.card.chart import CHART_FILE, ChartPoint, render_chart
from quantize.card.choose import Candidate, KVCache, choose, contexts_for, knee, kv_cache, pareto_front
from quantize.card.original import OriginalCard, PromptTemplate
from quantize.card.render import render_card
from quantize.cli import main
from quantize.manifest import write_manifest
from quantize.plan import build_plan
from quantize.publish.layout import RECORD_FILE
from quantize.recipe import load_recipe
from quantize.source import SourceModel, facts_from_config

from .conftest import REPO, TINY_CONFIG, RecordingBackend
from .hub_server import hub  # noqa: F401  (fixture)
from .test_card import fake_manifest, provided_files, write_tiny_release

GB = 1_000_000_000
SMOLLM2_CONFIG = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "max_position_embeddings": 8192, "vocab_size": 49152}
QUIET = {"log": lambda message: None}
# Fabricated measurements, by variant name: (mean KLD, p99, top-1)
KLD = {"main": (0.05, 0.4, 0.95), "gptq-8bit--1g-actorder_True": (0.002, 0.02, 0.99),
       "Q4_K_M": (0.03, 0.3, 0.96), "Q8_0": (0.001, 0.01, 0.995)}


# --- memory: the KV cache from the config ------------------------------------------------------

def test_kv_cache_by_hand_on_smollm2():
    kv = kv_cache(SMOLLM2_CONFIG)
    assert (kv.layers, kv.kv_heads, kv.head_dim) == (30, 3, 64)  # head dim: 576 / 9
    assert kv.bytes_per_token == 30 * 3 * 64 * 2 * 2 == 23_040
    assert kv.bytes(4096) == 94_371_840 and kv.bytes(32768) == 754_974_720
    assert contexts_for(SMOLLM2_CONFIG) == (4096, 8192)  # 32k capped at the model's 8k


def test_kv_cache_fallbacks():
    no_gqa = {k: v for k, v in SMOLLM2_CONFIG.items() if k != "num_key_value_heads"}
    assert kv_cache(no_gqa).kv_heads == 9  # one KV head per attention head
    assert kv_cache({**SMOLLM2_CONFIG, "head_dim": 128}).head_dim == 128  # explicit (Gemma, Qwen3) wins
    falcon = {"n_layer": 32, "n_head": 71, "hidden_size": 4544, "multi_query": True}
    assert kv_cache(falcon) == KVCache(32, 1, 64)
    assert kv_cache({"text_config": SMOLLM2_CONFIG, "model_type": "llava"}) == kv_cache(SMOLLM2_CONFIG)
    assert kv_cache({"num_hidden_layers": 2}) is None and kv_cache(None) is None
    assert contexts_for(TINY_CONFIG) == (2048,) and contexts_for({}) == (4096, 32768)


# --- the choice on fabricated numbers ----------------------------------------------------------

def candidate(label: str, size_gb: float, kld: float | None, kinds=("VRAM",)) -> Candidate:
    return Candidate(label, label, f"https://example.com/{label}", int(size_gb * GB), kld, kinds)


BOTH = ("RAM", "VRAM")
FABRICATED = [candidate("Q2_K", 3.0, 0.60, BOTH), candidate("Q4_K_M", 4.9, 0.040, BOTH),
              candidate("Q8_0", 8.5, 0.001, BOTH), candidate("GPTQ-4bit", 4.5, 0.050),
              candidate("GPTQ-8bit", 8.0, 0.002), candidate("old", 5.0, None, BOTH)]
LLAMA_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
            "max_position_embeddings": 131072}


def test_lowest_kld_that_fits_each_budget_ram_and_vram():
    choice = choose(FABRICATED, LLAMA_8B)
    kv = choice.kv  # 32 x 8 x 128 x 2 x 2 = 131,072 bytes per token
    assert kv.bytes_per_token == 131_072 and choice.contexts == (4096, 32768)
    assert kv.bytes(4096) == 536_870_912 and kv.bytes(32768) == 4_294_967_296
    # needs: Q2_K 3.54 / 7.29 GB, GPTQ-4bit 5.04 / 8.79, Q4_K_M 5.44 / 9.19, GPTQ-8bit 8.54 / 12.29, Q8_0 9.04 / 12.79
    rows = {gb: {f"{kind} {tokens}": pick.label if pick else None for (kind, tokens), pick in picks.items()}
            for gb, picks in choice.budgets}
    assert list(rows) == [4, 6, 8, 12, 16]  # from the first where a file fits to where the best fits at 32k
    assert rows[4] == {"RAM 4096": "Q2_K", "RAM 32768": None, "VRAM 4096": "Q2_K", "VRAM 32768": None}
    assert rows[6] == {"RAM 4096": "Q4_K_M", "RAM 32768": None, "VRAM 4096": "Q4_K_M", "VRAM 32768": None}
    assert rows[8] == {"RAM 4096": "Q4_K_M", "RAM 32768": "Q2_K", "VRAM 4096": "Q4_K_M", "VRAM 32768": "Q2_K"}
    assert rows[12] == {"RAM 4096": "Q8_0", "RAM 32768": "Q4_K_M", "VRAM 4096": "Q8_0", "VRAM 32768": "Q4_K_M"}
    assert rows[16] == {"RAM 4096": "Q8_0", "RAM 32768": "Q8_0", "VRAM 4096": "Q8_0", "VRAM 32768": "Q8_0"}
    gptq_only = choose([c for c in FABRICATED if c.memory_kinds == ("VRAM",)], LLAMA_8B)
    assert gptq_only.kinds == ("VRAM",)
    assert {gb: picks[("VRAM", 4096)].label for gb, picks in gptq_only.budgets} == {6: "GPTQ-4bit", 8: "GPTQ-4bit",
                                                                                     12: "GPTQ-8bit", 16: "GPTQ-8bit"}
    assert [c.label for c, _ in choice.needs][0] == "Q2_K"
    assert dict((c.label, needs) for c, needs in choice.needs)["Q8_0"] == [int(8.5 * GB) + 536_870_912,
                                                                          int(8.5 * GB) + 4_294_967_296]


def test_best_quality_per_gb_is_the_knee_of_the_pareto_front():
    assert [c.label for c in pareto_front(FABRICATED)] == ["Q2_K", "GPTQ-4bit", "Q4_K_M", "GPTQ-8bit", "Q8_0"]
    # scaled over the front: x = (size - 3) / 5.5, y = (kld - 0.001) / 0.599; distance below the chord 1 - x - y:
    # GPTQ-4bit 1 - 0.273 - 0.082 = 0.645, Q4_K_M 1 - 0.345 - 0.065 = 0.590, GPTQ-8bit 0.09
    assert knee(FABRICATED).label == "GPTQ-4bit"
    assert knee(FABRICATED[:2]) is None  # fewer than three files on the front: no knee
    straight = [candidate("a", 1, 0.3), candidate("b", 2, 0.2), candidate("c", 3, 0.1)]
    assert knee(straight) is None  # on the chord: no file stands out


def test_nothing_measured_ranks_nothing_but_sizes_memory():
    choice = choose([candidate("old", 5.0, None, BOTH)], LLAMA_8B)
    assert not choice.ranked and choice.budgets == [] and choice.best_per_gb is None
    assert choice.needs[0][1] == [5 * GB + 536_870_912, 5 * GB + 4_294_967_296]


# --- the cards -----------------------------------------------------------------------------------

def measured_quality(variant) -> dict:
    kld, p99, top1 = KLD[variant.name]
    return {"perplexity": 11.5 + 10 * kld, "baseline_perplexity": 11.5, "kld_mean": kld, "kld_p99": p99,
            "top1_agreement": top1, "engine": "llama.cpp" if variant.format == "gguf" else "transformers",
            "eval_tokens": 8704, "eval_windows": 17, "eval_window": 512,
            "eval_text": "the last 3% of wikitext-2-raw-v1 test, held out from calibration"}


def tiny_release(tmp_path: Path):
    recipe_path, out = write_tiny_release(tmp_path, TINY_CONFIG, "Plain card\n",
                                          gptq=[{"bits": 4}, {"bits": 8, "group_size": "none"}],
                                          gguf={"types": ["Q4_K_M", "Q8_0"]})
    plan = build_plan(load_recipe(recipe_path), SourceModel(facts_from_config(TINY_CONFIG), None))
    sizes = {"main": 5_000_000, "gptq-8bit--1g-actorder_True": 9_000_000, "Q4_K_M": 5_500_000, "Q8_0": 8_000_000}
    manifests = {v.id: fake_manifest(v, sizes[v.name], measured_quality(v)) for v in plan.variants}
    return plan, out, manifests


def test_every_card_shows_the_same_quality_columns_note_and_choice(tmp_path):
    plan, out, manifests = tiny_release(tmp_path)
    for manifest in manifests.values():
        write_manifest(out, manifest)
    cards = {card.fmt: card for card in render_cards(plan, out)}
    gptq, gguf = cards["gptq"].text, cards["gguf"].text
    assert provided_files(gptq)[1].split(" | ")[8:12] == ["11.52", "0.002", "0.02", "99.0%"]
    assert provided_files(gguf, "GGUF")[0].split(" | ")[5:9] == ["11.80", "0.03", "0.3", "96.0%"]
    for text in (gptq, gguf):
        note = text.split("<!-- quality start -->")[1].split("<!-- quality end -->")[0]
        assert "8,704 held-out tokens" in note and "17 windows of 512 tokens" in note and "**11.50**" in note
        assert "GPTQ by transformers, GGUF by llama.cpp" in note
        section = text.split("<!-- which-file start -->")[1].split("<!-- which-file end -->")[0]
        assert f"![File size against KL divergence from fp16, every file of this release]({CHART_FILE})" in section
        assert "2 layers × 2 KV heads × 64 head dim × 2 (K and V) × 2 bytes (fp16) = 1,024 bytes per token" in section
        assert "| Memory | RAM (CPU), 2k context | VRAM (GPU), 2k context |" in section
        # 0.25 GB holds every file: the lowest KLD is Q8_0, in RAM and in VRAM (all layers offloaded)
        assert ("| 0.25 GB | [GGUF Q8_0](https://huggingface.co/tester/Tiny-Llama-GGUF/blob/main/Tiny-Llama.Q8_0.gguf)"
                " (KLD 0.001) | [GGUF Q8_0]") in section
        assert "Best quality per GB: **[GGUF Q4_K_M]" in section
        assert ("| [GPTQ 8-bit act-order](https://huggingface.co/tester/Tiny-Llama-GPTQ/tree/gptq-8bit--1g-actorder_True)"
                " | VRAM | 9.00 MB | 0.002 | 11.10 MB |") in section
    assert (out / "cards" / "Tiny-Llama-GPTQ" / CHART_FILE).read_bytes() == cards["gptq"].chart
    assert cards["gptq"].chart == cards["gguf"].chart and cards["gguf"].chart.startswith(b"\x89PNG")


def test_old_records_without_kld_render_with_dashes(tmp_path):
    plan, _, manifests = tiny_release(tmp_path)
    old = {key: m.model_copy(update={"quality": {"perplexity": 12.5, "baseline_perplexity": 11.0,
                                                 "engine": m.quality["engine"]}}) for key, m in manifests.items()}
    old["gguf/Q8_0"] = old["gguf/Q8_0"].model_copy(update={"quality": {}})  # measured nothing at all
    old["gguf/Q4_K_M"].quality["baseline_perplexity"] = 10.0  # the engines' baselines used to differ
    inputs = plan_card_inputs(plan, old, OriginalCard({}, "x\n"), PromptTemplate("None", "{prompt}"))
    for fmt in ("gguf", "gptq"):
        text = render_card(inputs, fmt)
        assert "not measured (made before quantize measured KL divergence and top-1 agreement)" in text
        assert "**11.00** with transformers, **10.00** with llama.cpp" in text and "same fp16 reference" not in text
        assert "No file of this release has a measured KL divergence yet" in text and CHART_FILE not in text
    rows = provided_files(render_card(inputs, "gguf"), "GGUF")
    assert rows[0].split(" | ")[5:9] == ["12.50", "—", "—", "—"] and rows[1].split(" | ")[5:9] == ["—"] * 4


def test_the_chart_is_deterministic_and_carries_no_software_or_date():
    points = [ChartPoint("GPTQ", "4-bit g128", 5_000_000, 0.05), ChartPoint("GGUF", "Q8_0", 8_000_000, 0.001),
              ChartPoint("GGUF", "F16", 16_000_000, 0.0)]  # a zero KLD still gets a point on the log axis
    first = render_chart(points, "Tiny: size and KLD")
    assert first == render_chart(points, "Tiny: size and KLD") and first.startswith(b"\x89PNG\r\n\x1a\n")
    assert b"Software" not in first and b"matplotlib" not in first.lower() and b"tIME" not in first
    script = ("import sys; from quantize.card.chart import ChartPoint, render_chart; "
              f"sys.stdout.buffer.write(render_chart({points!r}, 'Tiny: size and KLD'))")
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True,
                           env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "MPLBACKEND": "pdf"}).stdout
    assert other == first  # another process, another default backend: the same bytes
    assert render_chart(points[:2], "Tiny: size and KLD") != first


# --- published next to README.md, on every branch ---------------------------------------------------

class MeasuringBackend(RecordingBackend):
    """The recording backend, with the evaluation's quality keys (fabricated)."""

    def produce(self, variant, staging):
        produced = super().produce(variant, staging)
        produced.quality = measured_quality(variant)
        return produced


@pytest.fixture
def measuring(monkeypatch):
    RecordingBackend.calls, RecordingBackend.fail_on = [], set()
    monkeypatch.setattr("quantize.runner.backend_class", lambda fmt: MeasuringBackend)
    return MeasuringBackend


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={repo}", *args], capture_output=True, text=True, check=True).stdout


BRANCHES = {"Tiny-Llama-GPTQ": ["main", "gptq-8bit--1g-actorder_True"], "Tiny-Llama-GGUF": ["main"]}


def test_local_publish_puts_the_chart_on_every_branch_and_a_republish_commits_nothing(tmp_path, measuring,
                                                                                     release_recipe):
    out = tmp_path / "out"
    api.release(release_recipe, out=out, **QUIET)
    chart = (out / "cards" / "Tiny-Llama-GGUF" / CHART_FILE).read_bytes()
    for name, branches in BRANCHES.items():
        repo = out / "repos" / f"{name}.git"
        for branch in branches:
            pointer = git(repo, "show", f"{branch}:{CHART_FILE}")  # binary: stored as LFS, as the Hub does
            sha = next(line.split(":")[1] for line in pointer.splitlines() if line.startswith("oid sha256:"))
            assert (repo / "lfs" / "objects" / sha[:2] / sha[2:4] / sha).read_bytes() == chart
            assert f"]({CHART_FILE})" in git(repo, "show", f"{branch}:README.md")
            assert CHART_FILE in json.loads(git(repo, "show", f"{branch}:{RECORD_FILE}"))["files"]
        assert f"/{CHART_FILE} filter=lfs" in git(repo, "show", "main:.gitattributes")
    heads = {name: git(out / "repos" / f"{name}.git", "for-each-ref") for name in BRANCHES}
    (out / "cards" / "Tiny-Llama-GGUF" / CHART_FILE).unlink()
    result = api.release(release_recipe, out=out, **QUIET)
    assert all(p.uploaded == [] for p in result.published)
    assert {name: git(out / "repos" / f"{name}.git", "for-each-ref") for name in BRANCHES} == heads
    assert (out / "cards" / "Tiny-Llama-GGUF" / CHART_FILE).read_bytes() == chart


def test_hub_publish_partial_release_and_card_from_hub_keep_the_whole_release_chart(hub, measuring, release_recipe,
                                                                                   tmp_path):
    data = yaml.safe_load(release_recipe.read_text())
    data["publish"] = {"target": "hub"}
    release_recipe.write_text(yaml.safe_dump(data))
    first = tmp_path / "first"
    api.release(release_recipe, out=first, **QUIET)
    chart = (first / "cards" / "Tiny-Llama-GPTQ" / CHART_FILE).read_bytes()
    for name, branches in BRANCHES.items():
        for branch in branches:
            files = hub.files(f"tester/{name}", branch)
            assert files[CHART_FILE] == chart and f"]({CHART_FILE})" in files["README.md"].decode()
    commits = len(hub.requests("POST", "/commit/"))
    api.release(release_recipe, out=first, **QUIET)
    assert len(hub.requests("POST", "/commit/")) == commits  # the same bytes: nothing to commit

    # a CI job in a fresh folder making one GGUF type: the chart still plots every format's files
    measuring.calls.clear()
    assert main(["release", str(release_recipe), "--out", str(tmp_path / "fresh"), "--variants", "Q8_0"]) == 0
    assert measuring.calls == ["gguf/Q8_0"]
    assert hub.files("tester/Tiny-Llama-GGUF", "main")[CHART_FILE] == chart
    assert hub.files("tester/Tiny-Llama-GPTQ", "gptq-8bit--1g-actorder_True")[CHART_FILE] == chart

    # card --from-hub reads the sibling repos' records: the same card and chart, restored on every branch
    hf = HfApi(endpoint=hub.endpoint, token=hub.token)
    card = hub.files("tester/Tiny-Llama-GGUF", "main")["README.md"]
    hf.upload_file(path_or_fileobj=b"\x89PNG\r\n\x1a\n\0 edited", path_in_repo=CHART_FILE,
                   repo_id="tester/Tiny-Llama-GGUF")
    assert main(["card", "--from-hub", "tester/Tiny-Llama-GGUF"]) == 0
    files = hub.files("tester/Tiny-Llama-GGUF", "main")
    assert files[CHART_FILE] == chart and files["README.md"] == card
    commits = len(hub.requests("POST", "/commit/"))
    assert main(["card", "--from-hub", "tester/Tiny-Llama-GPTQ"]) == 0
    assert len(hub.requests("POST", "/commit/")) == commits  # nothing changed: nothing pushed
