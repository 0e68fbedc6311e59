"""SASLprep (RFC 4013) for PDF passwords.

PDF 2.0 (AES-256, revisions 5 and 6) says a user password is SASLprep-processed and UTF-8 encoded before
hashing. MuPDF applies no SASLprep, so a password such as ``SªSL\\u00adprep`` (pdf.js' saslprep-r6.pdf)
opens nothing until it is prepared to ``SaSLprep``. The worker tries the password as given first, then this.
"""

from __future__ import annotations

import stringprep
import unicodedata

_PROHIBITED = (
    stringprep.in_table_c12,
    stringprep.in_table_c21,
    stringprep.in_table_c22,
    stringprep.in_table_c3,
    stringprep.in_table_c4,
    stringprep.in_table_c5,
    stringprep.in_table_c6,
    stringprep.in_table_c7,
    stringprep.in_table_c8,
    stringprep.in_table_c9,
)


def saslprep(text: str) -> str | None:
    """The prepared form of ``text`` (query profile: unassigned code points allowed), or None if prohibited."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    prepared = unicodedata.normalize("NFKC", mapped)
    if any(check(ch) for ch in prepared for check in _PROHIBITED):
        return None
    # Bidirectional rule (RFC 3454 section 6): RandAL text must not mix with L and must start and end RandAL.
    if any(stringprep.in_table_d1(ch) for ch in prepared):
        if any(stringprep.in_table_d2(ch) for ch in prepared):
            return None
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            return None
    return prepared
