"""The image-token budget of a Qwen2-VL / Qwen2.5-VL request: pure arithmetic, no I/O.

vLLM resizes every image with Qwen2-VL's ``smart_resize`` (both sides a multiple of 28 = patch 14 × merge 2,
the area within ``min_pixels`` .. ``max_pixels``) and the image then costs ``(H/28)·(W/28)`` tokens, plus
the ``<|vision_start|>``/``<|vision_end|>`` pair. vLLM rejects a request whose prompt is longer than
``max_model_len`` ("Input length (5106) exceeds model's maximum context length (2048)."), and a prompt that
fits but leaves less than ``max_tokens`` cuts the answer short. So before a page is rendered we choose:

* the render size: at most the configured ``max_pixels``, lowered until image tokens + prompt tokens +
  ``max_tokens`` fit ``max_model_len`` (:func:`plan_render`);
* if even a legible page does not fit (a short context), a smaller ``max_tokens``, never below a floor;
* and after rendering, :func:`check_image` recomputes the exact token count of the real pixel size, so a
  request vLLM would reject is never sent.

Every choice that departs from the configuration comes with one line for the page's ``detail``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FACTOR = 28  # patch 14 × spatial merge 2 (Qwen2-VL, Qwen2.5-VL)
VISION_MARKERS = 2  # <|vision_start|> … <|vision_end|> around the image pads
MAX_ASPECT = 200  # smart_resize raises ValueError beyond this ratio; vLLM answers 400
# The smallest image we still call a page: 512 tokens ≈ 0.4 Mpx, small print stays legible. Below that we
# shorten the answer instead of the image.
LEGIBLE_TOKENS = 512
# The answer never gets fewer tokens than this from the budget; below it the page fails with the fix.
MIN_ANSWER_TOKENS = 256
# Kept free for what our count cannot see exactly (a chat template that adds a token or two).
SAFETY_TOKENS = 8


class BudgetError(ValueError):
    """The page cannot fit ``max_model_len`` at all; the message names the setting to change."""


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int,
                 factor: int = FACTOR) -> tuple[int, int]:
    """(height, width) after Qwen2-VL's resize, exactly as transformers' ``smart_resize`` computes it."""
    if min(height, width) <= 0:
        raise BudgetError(f"an image of {width}×{height} pixels has no area")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise BudgetError(f"an image of {width}×{height} pixels is narrower than 1:{MAX_ASPECT}, which "
                          "Qwen2-VL cannot take; crop the page")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_tokens(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = FACTOR) -> int:
    """Prompt tokens an image of width × height pixels costs, the two vision markers included."""
    h, w = smart_resize(height, width, min_pixels, max_pixels, factor)
    return (h // factor) * (w // factor) + VISION_MARKERS


@dataclass(frozen=True)
class Limits:
    """What the served model allows and what the configuration asks for."""

    max_model_len: int
    max_tokens: int  # the answer's length the config asks for
    min_pixels: int
    max_pixels: int  # what the server resizes to at most (--mm-processor-kwargs) and the adapter knows
    prompt_tokens: int  # the chat-templated prompt without the image


@dataclass(frozen=True)
class RenderPlan:
    max_pixels: int  # render the page with width × height at most this
    max_tokens: int  # the answer may use this many tokens
    detail: str  # "" when the configuration is followed as is


def plan_render(limits: Limits) -> RenderPlan:
    """How large to render a page (of any shape) and how long its answer may be, before rendering it.

    Raises :class:`BudgetError` when ``max_model_len`` cannot hold the prompt, a legible image and the
    shortest answer."""
    lim = limits
    room = lim.max_model_len - lim.prompt_tokens - SAFETY_TOKENS - VISION_MARKERS
    max_tokens = lim.max_tokens
    # at most what the server would make of any image; tokens ≤ pixels / 28² after smart_resize's floor
    full_tokens = lim.max_pixels // (FACTOR * FACTOR)
    image_room = room - max_tokens
    if image_room >= full_tokens:
        return RenderPlan(lim.max_pixels, max_tokens, "")
    legible = min(LEGIBLE_TOKENS, full_tokens)
    notes: list[str] = []
    if image_room < legible:
        floor = min(MIN_ANSWER_TOKENS, lim.max_tokens)
        max_tokens = max(floor, room - legible)
        image_room = room - max_tokens
        if image_room < max(1, lim.min_pixels // (FACTOR * FACTOR)):
            raise BudgetError(
                f"max_model_len {lim.max_model_len} cannot hold the prompt ({lim.prompt_tokens} tokens), a page "
                f"image and an answer of {floor} tokens; raise vllm.max_model_len or shorten the prompt")
        if max_tokens < lim.max_tokens:
            notes.append(f"the answer was limited to {max_tokens} tokens (max_tokens {lim.max_tokens})")
    pixels = _pixels_for_tokens(image_room)
    if pixels < lim.max_pixels:
        notes.insert(0, f"rendered at most {pixels / 1e6:.2f} Mpx ({image_room} image tokens) instead of "
                        f"max_pixels {lim.max_pixels / 1e6:.2f} Mpx")
    detail = "; ".join(notes) + (f" so that image + prompt + answer fit max_model_len {lim.max_model_len}"
                                 if notes else "")
    return RenderPlan(min(pixels, lim.max_pixels), max_tokens, detail)


def _pixels_for_tokens(tokens: int) -> int:
    # smart_resize may round each side up by up to half a factor: leave room for that on a page of any shape
    # (check_image measures the real size afterwards and the caller renders smaller if it still does not fit)
    return max(FACTOR * FACTOR, int(tokens * FACTOR * FACTOR * 0.9))


@dataclass(frozen=True)
class ImageCheck:
    fits: bool
    image_tokens: int
    max_tokens: int  # the answer's length that fits with this image
    smaller_pixels: int  # when it does not fit: render again with at most this many pixels


def check_image(width: int, height: int, limits: Limits, max_tokens: int) -> ImageCheck:
    """Does a rendered image of this exact size fit with an answer of ``max_tokens``?"""
    tokens = image_tokens(width, height, limits.min_pixels, limits.max_pixels)
    allowed = limits.max_model_len - limits.prompt_tokens - SAFETY_TOKENS - max_tokens
    if tokens <= allowed:
        return ImageCheck(True, tokens, max_tokens, 0)
    return ImageCheck(False, tokens, max_tokens, _pixels_for_tokens(max(1, allowed - VISION_MARKERS)))


def estimate_prompt_tokens(prompt: str) -> int:
    """An upper bound for the templated prompt without a tokenizer: one token per UTF-8 byte, plus the chat
    template's system turn (≈ 20 tokens for Qwen2-VL). Used until the server's /tokenize has answered."""
    return len(prompt.encode("utf-8")) + 32


def config_limits(max_model_len: int, max_tokens: int, min_pixels: int, max_pixels: int, prompt: str) -> Limits:
    """The limits a VLM engine starts with, from the config and its prompt (before the server has counted
    the templated prompt): what pages are rendered for and what ``dataset from-pages`` renders training
    pages with, so both see the same pixels."""
    return Limits(max_model_len=max_model_len, max_tokens=max_tokens, min_pixels=min_pixels,
                  max_pixels=max_pixels, prompt_tokens=estimate_prompt_tokens(prompt))


def adapter_plan(limits: Limits, image_max_pixels: int) -> RenderPlan:
    """The render plan for pages read by an adapter trained at ``image_max_pixels``: its pages are rendered
    at that budget, never larger (the model never saw larger) and never smaller (the point of recording it).
    A short ``max_model_len`` shortens the answer, down to :data:`MIN_ANSWER_TOKENS`, rather than the image.

    Raises :class:`BudgetError` with the setting to change when the engine cannot serve that budget."""
    lim = limits
    if image_max_pixels > lim.max_pixels:
        raise BudgetError(f"the adapter was trained on pages of up to {image_max_pixels} pixels but vllm.max_pixels "
                          f"is {lim.max_pixels}, so the engine would shrink its pages; set vllm.max_pixels = "
                          f"{image_max_pixels} and restart ftmllmd, or train again with --set "
                          f"image_max_pixels={lim.max_pixels}")
    room = lim.max_model_len - lim.prompt_tokens - SAFETY_TOKENS - VISION_MARKERS
    image = image_max_pixels // (FACTOR * FACTOR)
    if room - image >= lim.max_tokens:
        return RenderPlan(image_max_pixels, lim.max_tokens, "")
    floor = min(MIN_ANSWER_TOKENS, lim.max_tokens)
    if room - image < floor:
        need = image + lim.prompt_tokens + SAFETY_TOKENS + VISION_MARKERS + floor
        raise BudgetError(f"vllm.max_model_len {lim.max_model_len} cannot hold a page at the adapter's "
                          f"{image_max_pixels} pixels ({image} image tokens), the prompt ({lim.prompt_tokens} "
                          f"tokens) and a {floor}-token answer; set vllm.max_model_len to at least {need}")
    return RenderPlan(image_max_pixels, room - image,
                      f"the answer was limited to {room - image} tokens (max_tokens {lim.max_tokens}) so that a "
                      f"page at the adapter's {image_max_pixels} pixels fits max_model_len {lim.max_model_len}")
