"""The image-token budget: Qwen2-VL's resize arithmetic and the render/answer plan that fits max_model_len."""

from __future__ import annotations

import math

import pytest

from daemon.engines.vlm.budget import (
    FACTOR,
    LEGIBLE_TOKENS,
    MIN_ANSWER_TOKENS,
    SAFETY_TOKENS,
    VISION_MARKERS,
    BudgetError,
    Limits,
    check_image,
    estimate_prompt_tokens,
    image_tokens,
    plan_render,
    smart_resize,
)


def limits(**kw: int) -> Limits:
    base = {"max_model_len": 8192, "max_tokens": 4096, "min_pixels": 3136, "max_pixels": 1003520,
            "prompt_tokens": 60}
    base.update(kw)
    return Limits(**base)


def test_smart_resize_matches_the_values_vllm_reported() -> None:
    # a 331×468 page cost 253 prompt tokens in vLLM (47 of them the templated prompt): 204 pads + 2 markers
    assert smart_resize(468, 331, 3136, 12845056) == (476, 336)
    assert image_tokens(331, 468, 3136, 12845056) == 204 + VISION_MARKERS
    # a 56×56 image is 4 pad tokens (shared/notes/cpu-test-stack.md)
    assert image_tokens(56, 56, 3136, 12845056) == 4 + VISION_MARKERS


def test_smart_resize_keeps_within_max_pixels_and_multiples_of_28() -> None:
    for w, h in [(1190, 1684), (4000, 3000), (2083, 2083), (100, 5000), (29, 29)]:
        rh, rw = smart_resize(h, w, 3136, 1003520)
        assert rh % FACTOR == 0 and rw % FACTOR == 0
        assert rh * rw <= 1003520 or rh == FACTOR or rw == FACTOR
        assert rh * rw >= 3136


def test_extreme_aspect_ratio_is_a_clear_error() -> None:
    with pytest.raises(BudgetError, match="1:200"):
        smart_resize(10, 3000, 3136, 1003520)


def test_plan_keeps_config_when_everything_fits() -> None:
    plan = plan_render(limits())
    assert (plan.max_pixels, plan.max_tokens, plan.detail) == (1003520, 4096, "")


def test_plan_shrinks_the_image_to_fit_a_short_context() -> None:
    lim = limits(max_model_len=2048, max_tokens=256, max_pixels=4_000_000, prompt_tokens=47)
    plan = plan_render(lim)
    assert plan.max_tokens == 256
    assert plan.max_pixels < 4_000_000 and "max_model_len 2048" in plan.detail
    # any page shape rendered within the cap fits with room for the whole answer
    for ratio in (0.5, 0.707, 1.0, 1.414, 3.0):
        w = int(math.sqrt(plan.max_pixels * ratio))
        h = int(plan.max_pixels / w)
        assert w * h <= plan.max_pixels
        tokens = image_tokens(w, h, lim.min_pixels, lim.max_pixels)
        assert tokens + lim.prompt_tokens + plan.max_tokens + SAFETY_TOKENS <= lim.max_model_len, (w, h, tokens)


def test_plan_shortens_the_answer_rather_than_an_illegible_image() -> None:
    lim = limits(max_model_len=2048, max_tokens=1900, max_pixels=4_000_000, prompt_tokens=47)
    plan = plan_render(lim)
    assert MIN_ANSWER_TOKENS <= plan.max_tokens < 1900
    assert plan.max_pixels >= int(LEGIBLE_TOKENS * FACTOR * FACTOR * 0.9)
    assert "answer was limited" in plan.detail


def test_plan_that_cannot_fit_names_the_setting() -> None:
    with pytest.raises(BudgetError, match="max_model_len"):
        plan_render(limits(max_model_len=300, max_tokens=256, prompt_tokens=200))


def test_check_image_says_how_small_to_render_again() -> None:
    lim = limits(max_model_len=2048, max_tokens=256, max_pixels=12_845_056, prompt_tokens=47)
    check = check_image(2083, 2083, lim, 256)
    assert not check.fits and check.image_tokens > 2048
    side = int(math.sqrt(check.smaller_pixels))
    again = check_image(side, side, lim, 256)
    assert again.fits, again
    assert check_image(800, 600, lim, 256).fits


def test_prompt_estimate_is_an_upper_bound() -> None:
    # 47 tokens counted by vLLM for this prompt through the Qwen2-VL template (tiny BPE tokenizer)
    assert estimate_prompt_tokens("Convert this page to Markdown.") >= 47
    assert estimate_prompt_tokens("请将这一页文档转换为 Markdown 格式。") > 20
