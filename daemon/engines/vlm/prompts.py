"""The OCR prompt: a text file in ``configs/prompts/`` (``default``, ``zh``) or any path (ocr.prompt)."""

from __future__ import annotations

from pathlib import Path

from daemon.ocr.errors import OcrError

PROMPTS_DIR = Path(__file__).resolve().parents[3] / "configs" / "prompts"


def prompt_names(directory: Path = PROMPTS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.txt"))


def load_prompt(name: str, directory: Path = PROMPTS_DIR) -> str:
    """The prompt text for a name ("default", "zh") or a file path; OcrError('prompt') if it is missing."""
    looks_like_path = "/" in name or name.endswith(".txt")
    path = Path(name).expanduser() if looks_like_path else directory / f"{name}.txt"
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OcrError("prompt", f"the OCR prompt {path} cannot be read ({reason}); set ocr.prompt to one of "
                       f"{', '.join(prompt_names(directory)) or 'the files in ' + str(directory)} or to "
                       "the path of a UTF-8 text file") from None
    if not text:
        raise OcrError("prompt", f"the OCR prompt {path} is empty; write the instruction for the model into it")
    return text
