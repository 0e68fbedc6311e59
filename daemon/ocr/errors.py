"""The one error type OCR code raises for a file or page that cannot be converted.

``code`` is stable and machine-readable (stored in the page/job row and the sidecar JSON); ``str(error)`` is
one line a person can act on: it names the file (and page) and says what to do next.
"""

from __future__ import annotations


class OcrError(Exception):
    """A page or file failed; engines raise this (or a subclass) and nothing else for expected failures."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Exceptions with extra __init__ arguments do not pickle by default; results cross process boundaries.
        return (type(self), (self.code, self.message))


class PdfError(OcrError):
    """MuPDF could not (or may not) read the file or page.

    Codes: ``not_pdf``, ``unreadable``, ``corrupt``, ``encrypted``, ``bad_password``, ``zero_pages``,
    ``page_range``, ``timeout``, ``crash``, ``internal`` (a bug in pymupdf4llm/rapidocr or here), ``closed``.
    """
