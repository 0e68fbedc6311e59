"""`ftctl dataset from-pages` through the real daemon and the real ftctl: a generated ground-truth corpus
(tests/ocrtruth.py) becomes a LLaMA-Factory dataset of page images rendered exactly as serving renders them,
split by document, with the pages lacking truth skipped and counted; and a member cannot build one from a
folder she cannot read (real Unix users). No trainer runs here."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pymupdf
import pytest

from daemon.train.from_pages import VAL_SUFFIX
from shared.protocol import DatasetList, DatasetsReply
from tests.daemon_proc import DaemonProc
from tests.ocrtruth import DOCS, write_born_digital
from tests.train_daemon.support import TrainDaemon, start_with_toml
from tests.trust.members import member_server

PROMPT = (Path(__file__).resolve().parents[2] / "configs" / "prompts" / "default.txt").read_text().strip()


@pytest.fixture(scope="module")
def plain() -> Iterator[TrainDaemon]:
    d = start_with_toml("fp", '[train]\nllamafactory_cli = "/nonexistent/llamafactory-cli"\n[hotfolder]\n'
                              'enabled = false\n[ocr]\nworkers = 1\n')
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def corpus() -> Iterator[Path]:
    """The corpus' born-digital documents, one page of 'report' with its truth blanked out, and a PDF with
    no truth beside it."""
    folder = Path(tempfile.mkdtemp(prefix="ftcorpus", dir="/tmp"))
    for doc in DOCS:
        write_born_digital(doc, folder)
    report = folder / "report.md"
    text = report.read_text()
    start = text.index("<!-- page 2 -->") + len("<!-- page 2 -->")
    end = text.find("<!-- page 3 -->")
    report.write_text(text[:start] + "\n\n" + (text[end:] if end >= 0 else ""))
    orphan = pymupdf.open()
    for k in range(2):
        orphan.new_page().insert_text((72, 72), f"no truth for this page {k}")
    orphan.save(folder / "orphan.pdf")
    orphan.close()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _pages(folder: Path, name: str) -> int:
    with pymupdf.open(folder / name) as doc:
        return int(doc.page_count)


def _records(d: DaemonProc, name: str) -> list[dict[str, object]]:
    return list(json.loads((d.paths.state_dir / "datasets" / f"{name}.json").read_text()))


def _about(d: DaemonProc, name: str) -> dict[str, object]:
    return dict(json.loads((d.paths.state_dir / "datasets" / f"{name}.about.json").read_text())["from_pages"])


def test_from_pages_renders_every_page_with_truth_splits_by_document_and_counts_what_it_skipped(
        plain: TrainDaemon, corpus: Path) -> None:
    r = plain.ftctl("dataset", "from-pages", "pages", str(corpus), "--val", "0.25", timeout=600)
    assert r.returncode == 0, r.stderr
    docs = {f"{doc.name}.pdf": _pages(corpus, f"{doc.name}.pdf") for doc in DOCS}
    truth_pages = sum(docs.values()) - 1  # report's page 2 was blanked
    assert f"skipped {1 + _pages(corpus, 'orphan.pdf')} page(s) without truth (1 document(s) without a .md)" \
        in r.stdout, r.stdout
    train, val = _about(plain, "pages"), _about(plain, f"pages{VAL_SUFFIX}")
    train_docs = {x["name"] for x in train["documents"]}  # type: ignore[attr-defined]
    val_docs = {x["name"] for x in val["documents"]}  # type: ignore[attr-defined]
    assert len(val_docs) == 1 and not train_docs & val_docs and train_docs | val_docs == set(docs)
    records = _records(plain, "pages") + _records(plain, f"pages{VAL_SUFFIX}")
    assert len(records) == truth_pages
    assert train["pages_skipped"] == 1 + _pages(corpus, "orphan.pdf")
    assert train["documents_without_truth"] == ["orphan.pdf"]
    render = train["render"]
    assert isinstance(render, dict)
    assert render["dpi"] == 144 and render["max_pixels"] == 1003520 and render["prompt"] == PROMPT
    assert render["mode"] == "page" and str(render["renderer"]).startswith("pymupdf ")
    # one sample a page: the serving prompt before the image, the page's truth as the answer
    first = _records(plain, f"pages{VAL_SUFFIX}")[0]
    (only,) = val_docs
    truth = (corpus / only.replace(".pdf", ".md")).read_text()
    page1 = truth.split("<!-- page 1 -->")[1].split("<!-- page 2 -->")[0].strip()
    assert first["messages"] == [{"role": "user", "content": PROMPT + "<image>"},
                                 {"role": "assistant", "content": page1}]
    image = Path(first["images"][0])  # type: ignore[index]
    with pymupdf.open(corpus / only) as doc:
        rect = doc[0].rect
    pix = pymupdf.Pixmap(image)
    assert pix.width * pix.height <= 1003520 and abs(pix.width / pix.height - rect.width / rect.height) < 0.01
    # the validation documents themselves are kept, for scoring an engine on them
    (kept,) = val["documents"]  # type: ignore[misc]
    assert Path(kept["pdf"]).read_bytes() == (corpus / only).read_bytes()
    assert {d.name for d in plain.c.call(DatasetList(), DatasetsReply).datasets} >= {"pages", "pages.val"}

    # the same documents and seed give the same split; the names are taken until --replace
    again = plain.ftctl("dataset", "from-pages", "pages", str(corpus), "--val", "0.25", timeout=600)
    assert again.returncode == 2 and "already exists" in again.stderr and "--replace" in again.stderr
    again = plain.ftctl("dataset", "from-pages", "pages", str(corpus), "--val", "0.25", "--replace", timeout=600)
    assert again.returncode == 0, again.stderr
    assert {x["name"] for x in _about(plain, f"pages{VAL_SUFFIX}")["documents"]} == val_docs  # type: ignore[attr-defined]


def test_a_folder_without_any_truth_is_refused_and_nothing_registered(plain: TrainDaemon) -> None:
    folder = Path(tempfile.mkdtemp(prefix="ftnotruth", dir="/tmp"))
    try:
        doc = pymupdf.open()
        doc.new_page().insert_text((72, 72), "hello")
        doc.save(folder / "lonely.pdf")
        r = plain.ftctl("dataset", "from-pages", "lonely", str(folder))
        assert r.returncode == 2 and "no page has truth" in r.stderr, r.stderr
        assert "lonely" not in {d.name for d in plain.c.call(DatasetList(), DatasetsReply).datasets}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_member_cannot_build_a_dataset_from_a_folder_or_truth_she_cannot_read() -> None:
    with member_server() as s:
        alice, bob = s.users.alice, s.users.bob
        private = s.folder(bob, "bobs", mode=0o700)
        shared = s.folder(bob, "shared", mode=0o755)
        for folder in (private, shared):
            write_born_digital(DOCS[0], folder)
            for f in folder.iterdir():
                f.chmod(0o644)
                shutil.chown(f, bob.uid, bob.gid)
        (shared / f"{DOCS[0].name}.md").chmod(0o600)  # bob's truth, not for alice

        r = s.ftctl(alice, "dataset", "from-pages", "stolen", str(private))
        assert r.returncode == 2 and "cannot read the folder" in r.stderr and str(private) in r.stderr, r.stderr
        r = s.ftctl(alice, "dataset", "from-pages", "stolen", str(shared))
        assert r.returncode == 2 and "permission denied" in r.stderr and ".md" in r.stderr, r.stderr
        listed = s.request(alice, {"type": "datasets"})
        assert listed["ok"] and listed["reply"]["datasets"] == []  # type: ignore[index]
        # what she may read she may build from
        mine = s.folder(alice, "alices")
        write_born_digital(DOCS[0], mine)
        for f in mine.iterdir():
            shutil.chown(f, alice.uid, alice.gid)
        r = s.ftctl(alice, "dataset", "from-pages", "mine", str(mine), timeout=300)
        assert r.returncode == 0 and "dataset 'mine' added" in r.stdout, r.stderr
