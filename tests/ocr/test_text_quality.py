"""Text-layer usability, UTF-8 safety of MuPDF strings, SASLprep of passwords."""

from __future__ import annotations

from daemon.ocr.saslprep import saslprep
from daemon.ocr.text_quality import clean_text, text_layer_usable

PROSE = "The quick brown fox jumps over the lazy dog. " * 3


def test_lone_surrogates_become_replacement_characters_and_pairs_are_joined() -> None:
    assert clean_text("ok \udc80 end") == "ok \ufffd end"
    assert clean_text("\ud83d\ude00") == "😀"
    assert clean_text("plain") == "plain"
    clean_text("warning \ud800").encode("utf-8")  # must not raise


def test_prose_is_usable_and_replacement_characters_are_not() -> None:
    assert text_layer_usable(PROSE, 0.0) == (True, 1.0)
    garbled = "\ufffd" * 40 + "ab"
    assert text_layer_usable(garbled, 0.0)[0] is False
    private_use = "".join(chr(0xE000 + i) for i in range(40))
    assert text_layer_usable(private_use, 0.0)[0] is False


def test_a_scan_with_a_thin_text_layer_goes_to_ocr() -> None:
    assert text_layer_usable("Scanned by ACME Corp. page 1 of 3", 0.95)[0] is False
    assert text_layer_usable(PROSE * 5, 0.95)[0] is True  # an OCR'd scan with a real (invisible) text layer


def test_a_short_text_alone_on_a_page_is_usable_but_not_beside_images_or_forms() -> None:
    assert text_layer_usable("Hello world", 0.0)[0] is True
    assert text_layer_usable("Hello world", 0.5)[0] is False
    assert text_layer_usable("1", 0.0, has_annotations=True)[0] is False
    assert text_layer_usable("", 0.0)[0] is False


def test_saslprep_follows_rfc4013_examples() -> None:
    assert saslprep("I\u00adX") == "IX"  # soft hyphen mapped to nothing
    assert saslprep("user") == "user"
    assert saslprep("\u00aa") == "a"  # NFKC
    assert saslprep("\u2168") == "IX"
    assert saslprep("\u0007") is None  # prohibited control character
    assert saslprep("\u0627\u0031") is None  # RandALCat must start and end the string
    assert saslprep("SªSL\u00adprep") == "SaSLprep"  # pdf.js saslprep-r6.pdf
