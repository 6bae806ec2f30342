"""One evaluation for every format: llama.cpp's --kl-divergence-base file written and read here, the
KL divergence computed as llama-perplexity computes it, its output parsed, and the quality gate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from quantize import api
from quantize.engines.llamacpp import parse_kl_divergence
from quantize.errors import BadInput, WorkFailed
from quantize.evaluate import (EVAL_WINDOW, FP16Reference, encode_log_probs, percentile, read_reference,
                               reference_bytes, row_width, score_windows, scored_per_window, write_reference)
from quantize.formats import Produced
from quantize.manifest import read_manifest
from quantize.plan import build_plan
from quantize.publish import local_manifests
from quantize.quality import gate_problem, paired_change, quality_record
from quantize.recipe import load_recipe
from quantize.source import inspect_source

from .conftest import RecordingBackend, tiny_recipe

WINDOW = 16  # 7 scored positions per window


class Logits(torch.nn.Module):
    """A 'model' whose logits at each position depend on that token and on the window's first one."""

    def __init__(self, vocab: int, seed: int, scale: float = 3.0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=generator) * scale)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table[input_ids] + self.table[input_ids[:, :1]]})()


def _reference(tmp_path, model, vocab: int, windows: int = 3, bos: int | None = None):
    torch.manual_seed(1)
    ids = [torch.randint(0, vocab, (WINDOW,)).tolist() for _ in range(windows)]
    from quantize.evaluate import reference_rows

    nll: list[float] = []
    path = tmp_path / "reference.kld"
    write_reference(path, WINDOW, vocab, ids, reference_rows(model, ids, bos, nll))
    return path, ids, float(np.exp(sum(nll) / (windows * scored_per_window(WINDOW))))


@pytest.mark.parametrize("vocab", [50, 51])  # an odd vocabulary is padded to an even row
def test_reference_file_has_llama_cpps_layout_and_round_trips(tmp_path, vocab):
    model = Logits(vocab, seed=0)
    path, ids, _ = _reference(tmp_path, model, vocab)
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_"
    assert np.frombuffer(raw[8:20], dtype=np.int32).tolist() == [WINDOW, vocab, 3]
    assert np.frombuffer(raw[20:20 + 4 * 3 * WINDOW], dtype=np.int32).tolist() == sum(ids, [])
    assert len(raw) == reference_bytes(3, vocab, WINDOW) == 20 + 4 * 3 * WINDOW + 2 * 3 * 7 * (2 * ((vocab + 1) // 2) + 4)
    reference = read_reference(path)
    assert (reference.window, reference.n_vocab, reference.windows) == (WINDOW, vocab, 3)
    assert reference.tokens.tolist() == ids
    with torch.no_grad():
        exact = torch.log_softmax(model(torch.tensor([ids[1]])).logits[0, WINDOW // 2:WINDOW - 1], dim=-1)
    decoded = reference.rows(1)
    kept = exact > exact.max(dim=-1, keepdim=True).values - 16
    step = 16 / 65535
    assert torch.allclose(decoded[kept], exact[kept], atol=step)  # uint16 steps of at most 16/65535 nats
    assert bool((decoded[~kept] <= exact.max(dim=-1, keepdim=True).values.expand_as(exact)[~kept] - 16 + step).all())
    path.write_bytes(raw[:-2])
    with pytest.raises(ValueError, match="expected"):
        read_reference(path)


def test_encoding_is_llama_cpps_for_a_flat_row():
    rows = encode_log_probs(torch.zeros(2, 8))  # all logits equal: scale 0, every step 0
    assert rows.shape == (2, row_width(8)) and not rows[:, 4:].any()
    scale, minimum = rows[0, :4].view(np.float32)
    assert scale == 0 and minimum == pytest.approx(-np.log(8))


def test_a_model_scored_against_its_own_reference_agrees_and_another_one_gives_the_true_kl(tmp_path):
    vocab = 40
    same, other = Logits(vocab, seed=0), Logits(vocab, seed=0)
    with torch.no_grad():
        other.table.add_(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(5)) * 0.5)
    path, ids, baseline = _reference(tmp_path, same, vocab, windows=4)
    reference = read_reference(path)
    itself = score_windows(same, reference, None, baseline)
    assert itself.kld_mean < 1e-4 and itself.top1_agreement == 1.0  # uint16 steps and the -16 floor only
    assert itself.perplexity == pytest.approx(baseline, rel=1e-6) and itself.eval_tokens == 4 * 7
    scored = score_windows(other, reference, None, baseline)
    positions = slice(WINDOW // 2, WINDOW - 1)
    with torch.no_grad():
        log_p = torch.cat([torch.log_softmax(same(torch.tensor([w])).logits[0, positions], -1) for w in ids])
        log_q = torch.cat([torch.log_softmax(other(torch.tensor([w])).logits[0, positions], -1) for w in ids])
    true_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert scored.kld_mean == pytest.approx(float(true_kl.mean()), rel=1e-3)
    assert scored.kld_p99 == pytest.approx(float(np.percentile(true_kl.numpy(), 99)), rel=1e-3)
    agreement = float((log_p.argmax(-1) == log_q.argmax(-1)).float().mean())
    assert scored.top1_agreement == pytest.approx(agreement) and scored.kld_mean > 0.01
    targets = torch.tensor([w[WINDOW // 2 + 1:] for w in ids])
    window_nll = -log_q.reshape(4, 7, vocab).gather(2, targets[..., None]).squeeze(2).mean(1)
    assert scored.window_nll == pytest.approx(window_nll.tolist(), rel=1e-5)
    assert math.exp(float(window_nll.mean())) == pytest.approx(scored.perplexity, rel=1e-5)
    change, error = paired_change(itself.window_nll, scored.window_nll)
    assert change == pytest.approx(100 * (scored.perplexity / itself.perplexity - 1), rel=1e-6) and error > 0
    assert quality_record(scored, "test")["window_nll"] == pytest.approx(list(scored.window_nll), abs=1e-6)


def test_paired_change_is_the_perplexity_ratio_with_the_spread_of_the_window_differences():
    base, other = [2.0, 3.0, 4.0, 5.0], [2.1, 3.1, 4.3, 5.1]  # differences 0.1, 0.1, 0.3, 0.1
    change, error = paired_change(base, other)
    assert change == pytest.approx(100 * (math.exp(0.15) - 1))
    assert error == pytest.approx(100 * math.exp(0.15) * 0.1 / 2)  # stdev 0.1 over sqrt(4) windows
    shifted = [value + 1.0 for value in base]  # windows differ a lot, the differences do not
    assert paired_change(shifted, [value + 0.05 for value in shifted])[1] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="same windows"):
        paired_change(base, other[:3])


def test_bos_replaces_each_windows_first_token_as_llama_cpp_does(tmp_path):
    vocab = 30
    model = Logits(vocab, seed=2)
    path, ids, _ = _reference(tmp_path, model, vocab, bos=0)
    reference = read_reference(path)
    assert reference.tokens.tolist() == ids  # the file keeps the text's own tokens
    assert score_windows(model, reference, 0, 1.0).kld_mean < 1e-5  # uint16 steps only
    assert score_windows(model, reference, None, 1.0).kld_mean > 0.1  # the text's own first token instead


def test_percentile_interpolates_as_llama_cpp():
    values = torch.tensor([4.0, 1.0, 3.0, 2.0])
    assert percentile(values, 0.99) == pytest.approx(1 + 0.99 * 3 * 1)  # between 3.0 and 4.0
    assert percentile(values, 0.0) == 1.0


KLD_OUTPUT = """kl_divergence: computing over 20 chunks, n_ctx=512, batch_size=2048, n_seq=4
====== Perplexity statistics ======
Mean PPL(Q)                   :  27.123456 ±   0.512345
Mean PPL(base)                :  26.470000 ±   0.498765
Cor(ln(PPL(Q)), ln(PPL(base))):  99.12%

====== KL divergence statistics ======
Mean    KLD:   0.031234 ±   0.000456
Maximum KLD:   2.345678
99.9%   KLD:   1.234567
99.0%   KLD:   0.345678
95.0%   KLD:   0.111111
Median  KLD:   0.012345

====== Token probability statistics ======
Same top p: 91.234 ± 0.395 %
"""


def test_kl_divergence_statistics_are_parsed():
    assert parse_kl_divergence(KLD_OUTPUT) == {"perplexity": 27.123456, "baseline_perplexity": 26.47,
                                               "kld_mean": 0.031234, "kld_p99": 0.345678,
                                               "top1_agreement": pytest.approx(0.91234)}


@pytest.mark.parametrize("output, message", [
    ("kl_divergence: inconsistent vocabulary (49152 vs 32000)\n" + KLD_OUTPUT, "inconsistent vocabulary"),
    ("kl_divergence: computing over 1 chunks\n", "no KL divergence statistics"),
])
def test_kl_divergence_failures_are_not_figures(output, message):
    with pytest.raises(WorkFailed, match=message):
        parse_kl_divergence(output)


# --- the recipe, the plan, the gate -------------------------------------------------------------

def test_quality_options_are_validated(tiny_model, write_recipe):
    for quality, message in (({"max_kld": 0}, "max_kld"), ({"windows": 0}, "windows"), ({"max_kl": 1}, "max_kl")):
        with pytest.raises(BadInput, match=message):
            load_recipe(write_recipe({**tiny_recipe(tiny_model, gptq=[{"bits": 4}]), "quality": quality}))


def test_every_format_shares_one_reference_whose_size_the_plan_shows(tiny_model, write_recipe):
    data = tiny_recipe(tiny_model, gptq=[{"bits": 4}], gguf={"types": ["Q8_0"]})
    data["quality"] = {"windows": 10}
    recipe = load_recipe(write_recipe(data))
    plan = build_plan(recipe, inspect_source(recipe))
    references = [a for a in plan.artifacts.values() if isinstance(a, FP16Reference)]
    assert [a.name for a in references] == ["fp16_reference"]
    assert plan.artifacts["gguf_reference"].reference is references[0] or \
        plan.artifacts["gguf_reference"].reference.inputs() == references[0].inputs()
    assert references[0].estimated_bytes() == reference_bytes(10, 49152, EVAL_WINDOW)  # ~250 MB
    assert 249e6 < references[0].estimated_bytes() < 252e6


def test_the_gate_reads_the_mean_kl_divergence():
    assert gate_problem({"kld_mean": 0.5}, 1.0) is None
    assert "2.0000" in gate_problem({"kld_mean": 2.0}, 1.0) and "quality.max_kld 1" in gate_problem({"kld_mean": 2.0}, 1.0)
    assert gate_problem({"kld_mean": float("nan")}, 1.0)
    assert gate_problem({"perplexity": 10.0}, 1.0) is None  # a format that measures no KL divergence


class GatedBackend(RecordingBackend):
    kld = {"gguf/Q4_K_M": 2.5}

    def produce(self, variant, staging) -> Produced:
        produced = super().produce(variant, staging)
        produced.quality = {**produced.quality, "kld_mean": self.kld.get(variant.id, 0.01)}
        return produced


def test_a_variant_above_the_gate_fails_keeps_its_files_and_publishes_after_a_raised_threshold(
        tmp_path, monkeypatch, release_recipe):
    GatedBackend.calls = []
    monkeypatch.setattr("quantize.runner.backend_class", lambda fmt: GatedBackend)
    out = tmp_path / "out"
    result = api.release(release_recipe, out=out, log=lambda m: None)
    statuses = {o.variant.id: o.status for o in result.outcomes}
    assert statuses == {"gptq/main": "done", "gptq/gptq-8bit--1g-actorder_True": "done",
                        "gguf/Q4_K_M": "failed", "gguf/Q8_0": "done"}
    (failed,) = result.failed
    assert "2.5000" in failed.error and "quality.max_kld" in failed.error
    assert read_manifest(out, "gguf/Q4_K_M") is not None and (out / "gguf" / "Tiny-Llama.Q4_K_M.gguf").is_file()
    assert not result.published and not (out / "repos").exists()

    gate = load_recipe(release_recipe)  # a selection that leaves the gated variant out never publishes it
    plan = build_plan(gate, inspect_source(gate))
    logged = []
    assert set(local_manifests(plan, out, set(), logged.append)) == {
        "gptq/main", "gptq/gptq-8bit--1g-actorder_True", "gguf/Q8_0"}
    assert any("gguf/Q4_K_M: not published: quality gate" in line for line in logged)

    data = yaml.safe_load(release_recipe.read_text())
    data["quality"] = {"max_kld": 3.0}
    release_recipe.write_text(yaml.safe_dump(data))
    GatedBackend.calls = []
    result = api.release(release_recipe, out=out, log=lambda m: None)
    assert GatedBackend.calls == []  # nothing made again
    assert [o.status for o in result.outcomes] == ["skipped"] * 4
    assert any("Tiny-Llama.Q4_K_M.gguf" in p.files for p in result.published)
