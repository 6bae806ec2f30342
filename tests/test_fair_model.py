"""The fair demo model: a function-preserving rebuild that takes the weights off the Q4_1 grid.

The fast test runs `make_function_preserving` on the tiny random Llama, first given random
non-unit norm weights (so folding matters), a sharp output distribution and weights on a Q4_1
grid (like SmolLM2's); the slow one checks the real SmolLM2 rebuild on wikitext.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model_builders import (RESIDUAL_TRANSFORMS, build_fair_smollm2, channel_outlier_ratio, decoder_linear_weights,
                            gaussian_like, logit_agreement, make_function_preserving, q4_1_relative_error,
                            q4_1_round_trip)
from .conftest import SHARED_WIKITEXT

KL_BOUND = 1e-3
TOP1_MIN = 0.99
RATIO_MAX = 1.25  # fair model's Q4_1 error against random weights' (either way)


@pytest.fixture(scope="module")
def grid_model(tiny_model):
    """The tiny Llama in float32 with random norm weights and its weights on a Q4_1 grid."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                # x10 on the final norm: sharp next-token distributions, so top-1 agreement means something
                parameter.copy_(torch.exp(0.5 * torch.randn(parameter.shape, generator=generator))
                                * (10 if name == "model.norm.weight" else 1))
        for weight in [*decoder_linear_weights(model).values(), model.model.embed_tokens.weight]:
            weight.copy_(q4_1_round_trip(weight))
    return model  # shared: copy it before changing it


def test_q4_1_round_trip_is_exact_on_its_grid_and_lossy_off_it():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    once = q4_1_round_trip(weight)
    assert torch.allclose(q4_1_round_trip(once), once, atol=1e-6)
    assert 0.05 < q4_1_relative_error([weight]) < 0.12
    assert q4_1_relative_error([once]) < 1e-5
    assert torch.equal(q4_1_round_trip(torch.ones(2, 32)), torch.ones(2, 32))  # constant block: no division by 0


@pytest.mark.parametrize("residual", sorted(RESIDUAL_TRANSFORMS))
def test_tiny_rebuild_computes_the_same_function_off_the_grid(grid_model, residual, tmp_path):
    from transformers import AutoModelForCausalLM

    original = grid_model
    rebuilt = make_function_preserving(copy.deepcopy(original), seed=0, residual=residual)
    rebuilt.to(torch.float16).save_pretrained(tmp_path / "fair")
    fair = AutoModelForCausalLM.from_pretrained(tmp_path / "fair", dtype=torch.float32).eval()

    assert fair.config.tie_word_embeddings is False
    assert not torch.equal(fair.lm_head.weight, fair.model.embed_tokens.weight)
    norms = [p for name, p in fair.named_parameters() if name.endswith("norm.weight")]
    assert len(norms) == 5 and all(torch.equal(p, torch.ones_like(p)) for p in norms)

    ids = torch.randint(0, original.config.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(2))
    kl, top1 = logit_agreement(original, fair, ids)
    assert kl < KL_BOUND and top1 >= TOP1_MIN, (kl, top1)
    retied = copy.deepcopy(fair)
    retied.lm_head.weight = retied.model.embed_tokens.weight
    assert logit_agreement(original, retied, ids)[0] > 0.1  # the check can fail: a tied head breaks the function

    grid = q4_1_relative_error(decoder_linear_weights(original).values())
    fair_error = q4_1_relative_error(decoder_linear_weights(fair).values())
    random_error = q4_1_relative_error(gaussian_like(list(decoder_linear_weights(fair).values())))
    assert grid < 1e-4
    assert 1 / RATIO_MAX < fair_error / random_error < RATIO_MAX, (fair_error, random_error)


def test_signed_permutation_keeps_outlier_channels_and_rotation_spreads_them(grid_model):
    original = copy.deepcopy(grid_model)
    with torch.no_grad():  # three residual channels with 30x the others' magnitude, as real checkpoints have
        original.model.embed_tokens.weight[:, :3] *= 30
    ids = torch.randint(0, original.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(3))
    attention_input = "self_attn.q_proj"  # the layers' averaged ratio of largest to median channel
    before = channel_outlier_ratio(original, ids, attention_input)
    permuted = channel_outlier_ratio(make_function_preserving(copy.deepcopy(original), residual="signed_permutation"),
                                     ids, attention_input)
    rotated = channel_outlier_ratio(make_function_preserving(copy.deepcopy(original), residual="rotation"),
                                    ids, attention_input)
    assert before > 10
    assert permuted > 0.5 * before  # the norm weights folded in change it a little, the permutation not at all
    assert rotated < 0.25 * permuted


def test_rebuild_rejects_an_unknown_residual_transform(grid_model):
    with pytest.raises(ValueError, match="residual must be one of"):
        make_function_preserving(copy.deepcopy(grid_model), residual="shuffle")


def test_a_folder_built_another_way_is_rebuilt_and_a_matching_one_kept(tiny_model, tmp_path):
    folder = tmp_path / "tiny-fair"
    build_fair_smollm2(folder, source=tiny_model, residual="rotation")
    assert "rotated by one random orthogonal matrix" in (folder / "README.md").read_text()
    rotated = (folder / "model.safetensors").read_bytes()

    build_fair_smollm2(folder, source=tiny_model)  # the default, signed_permutation: another build
    assert "permuted, with random signs" in (folder / "README.md").read_text()
    permuted = (folder / "model.safetensors").read_bytes()
    assert permuted != rotated
    modified = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_fair_smollm2(folder, source=tiny_model) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == modified  # kept, not rebuilt


def test_rebuild_is_seeded(grid_model):
    original = grid_model
    first, again, other = (make_function_preserving(copy.deepcopy(original), seed=s) for s in (0, 0, 1))
    weight = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.allclose(first.state_dict()[weight], other.state_dict()[weight])


@pytest.mark.slow
def test_fair_smollm2_matches_the_plain_rebuild(smollm2_folder, fair_smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = SHARED_WIKITEXT / "wikitext-2-raw-v1" / "wiki.test.raw"
    if not text.is_file():
        pytest.skip(f"no wikitext at {text}")
    folder = fair_smollm2_folder
    assert "function-preserving" in (folder / "README.md").read_text()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(text.read_text(encoding="utf-8")[-20_000:], return_tensors="pt").input_ids[:, -1024:]
    original = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    fair = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    kl, top1 = logit_agreement(original, fair, ids)
    assert kl < KL_BOUND and top1 >= TOP1_MIN, (kl, top1)
    assert q4_1_relative_error(decoder_linear_weights(original).values()) < 0.001
    fair_error = q4_1_relative_error(decoder_linear_weights(fair).values())
    random_error = q4_1_relative_error(gaussian_like(list(decoder_linear_weights(fair).values())))
    assert 1 / RATIO_MAX < fair_error / random_error < RATIO_MAX, (fair_error, random_error)
