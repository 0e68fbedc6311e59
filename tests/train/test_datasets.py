"""`ftctl dataset add` logic: record checks by index, image checks, atomic registration."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from daemon.train.datasets import DatasetProblem, add_dataset, list_datasets, read_dataset_info, remove_dataset
from daemon.train.images import ImageProblem, probe_image
from tests.fixtures.tiny_dataset import png_bytes, write_dataset


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    return write_dataset(tmp_path / "src", records=4)


def _write(path: Path, records: object) -> Path:
    path.write_text(json.dumps(records))
    return path


def _sft(image: str = "images/img_0.png", question: str = "<image>What is it?") -> dict[str, object]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "A square."}],
            "images": [image]}


def test_sft_dataset_is_registered_with_absolute_image_paths(tiny: dict[str, Path], tmp_path: Path) -> None:
    dsdir = tmp_path / "datasets"
    summary = add_dataset("shapes", tiny["sft"], dataset_dir=dsdir)
    assert (summary.records, summary.images, summary.ranking) == (4, 4, False)
    assert summary.formats == {"png": 4}
    assert "--dataset shapes" in summary.message
    entry = read_dataset_info(dsdir)["shapes"]
    assert entry["file_name"] == "shapes.json" and entry["formatting"] == "sharegpt"
    assert entry["columns"] == {"messages": "messages", "images": "images"}
    assert entry["tags"]["user_tag"] == "user" and entry["ranking"] is False
    copied = json.loads((dsdir / "shapes.json").read_text())
    assert copied[0]["images"] == [str(tiny["images"] / "img_0.png")]
    assert sorted(p.name for p in dsdir.iterdir()) == [".dataset_info.lock", "dataset_info.json", "shapes.json",
                                                       "shapes.media"]
    assert (dsdir / "shapes.media").read_text().splitlines() == [str(tiny["images"] / f"img_{i}.png")
                                                                 for i in range(4)]


def test_ranking_data_is_detected_and_registered_with_chosen_rejected(tiny: dict[str, Path], tmp_path: Path) -> None:
    summary = add_dataset("pref", tiny["dpo"], dataset_dir=tmp_path / "ds")
    assert summary.ranking
    entry = list_datasets(tmp_path / "ds")["pref"]
    assert entry["ranking"] is True and entry["columns"]["chosen"] == "chosen"


def test_images_dir_option_resolves_relative_paths(tiny: dict[str, Path], tmp_path: Path) -> None:
    elsewhere = _write(tmp_path / "elsewhere.json", [_sft("img_1.png")])
    summary = add_dataset("x", elsewhere, dataset_dir=tmp_path / "ds", images_dir=tiny["images"])
    assert summary.images == 1


@pytest.mark.parametrize(("record", "expected"), [
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]},
     "turn 0 has role 'assistant' where 'user' is expected"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}]},
     "ends with a user turn"),
    (_sft(question="<image><image>Compare"), "has 2 <image> tag(s) but 1 images"),
    (_sft(question="No tag here"), "has 0 <image> tag(s) but 1 images"),
    (_sft(image="images/missing.png"), "images[0]"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "turn 0 needs string fields 'role' and 'content'"),
])
def test_bad_record_is_named_by_index_with_the_fix(tiny: dict[str, Path], tmp_path: Path, record: object,
                                                   expected: str) -> None:
    src = _write(tiny["dataset_dir"] / "bad.json", [_sft(), _sft(), record])
    with pytest.raises(DatasetProblem) as err:
        add_dataset("bad", src, dataset_dir=tmp_path / "ds")
    assert "bad.json: record 2: " in str(err.value) and expected in str(err.value)
    assert not (tmp_path / "ds" / "dataset_info.json").exists()  # nothing registered


def test_ranking_record_without_rejected_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    records = json.loads(tiny["dpo"].read_text())
    del records[1]["rejected"]
    src = _write(tiny["dataset_dir"] / "pref.json", records)
    with pytest.raises(DatasetProblem, match=r"record 1: ranking data needs 'rejected'"):
        add_dataset("pref", src, dataset_dir=tmp_path / "ds")


def test_original_sharegpt_layout_is_accepted(tiny: dict[str, Path], tmp_path: Path) -> None:
    rec = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>Colour?"},
                             {"from": "gpt", "value": "Red."}], "images": ["images/img_0.png"]}
    src = _write(tiny["dataset_dir"] / "sg.json", [rec])
    add_dataset("sg", src, dataset_dir=tmp_path / "ds")
    entry = read_dataset_info(tmp_path / "ds")["sg"]
    assert entry["columns"]["messages"] == "conversations"
    assert (entry["tags"]["role_tag"], entry["tags"]["user_tag"], entry["tags"]["assistant_tag"]) == \
        ("from", "human", "gpt")


def test_problems_are_capped_and_counted(tiny: dict[str, Path], tmp_path: Path) -> None:
    src = _write(tiny["dataset_dir"] / "many.json", [_sft(question="no tag")] * 25)
    with pytest.raises(DatasetProblem) as err:
        add_dataset("many", src, dataset_dir=tmp_path / "ds")
    assert len(err.value.problems) == 10 and "and 15 more problems" in str(err.value)


def test_existing_name_is_kept_unless_replace(tiny: dict[str, Path], tmp_path: Path) -> None:
    add_dataset("shapes", tiny["sft"], dataset_dir=tmp_path / "ds")
    with pytest.raises(DatasetProblem, match="already exists"):
        add_dataset("shapes", tiny["dpo"], dataset_dir=tmp_path / "ds")
    assert add_dataset("shapes", tiny["dpo"], dataset_dir=tmp_path / "ds", replace=True).ranking
    remove_dataset("shapes", tmp_path / "ds")
    assert list_datasets(tmp_path / "ds") == {}
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [".dataset_info.lock", "dataset_info.json"]


def test_bad_names_and_files_are_one_line_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DatasetProblem, match=r"name '\.\./x' is not allowed"):
        add_dataset("../x", tiny["sft"], dataset_dir=tmp_path / "ds")
    with pytest.raises(DatasetProblem, match="file not found"):
        add_dataset("x", tmp_path / "nope.json", dataset_dir=tmp_path / "ds")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DatasetProblem, match=r"not valid JSON .* line 1"):
        add_dataset("x", tmp_path / "broken.json", dataset_dir=tmp_path / "ds")
    _write(tmp_path / "obj.json", {"a": 1})
    with pytest.raises(DatasetProblem, match="top level must be a JSON array"):
        add_dataset("x", tmp_path / "obj.json", dataset_dir=tmp_path / "ds")


def test_concurrent_adds_keep_every_entry(tiny: dict[str, Path], tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            add_dataset(f"d{i}", tiny["sft"], dataset_dir=tmp_path / "ds")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(list_datasets(tmp_path / "ds")) == [f"d{i}" for i in range(6)]


def test_image_probe_reads_size_and_catches_truncation(tmp_path: Path) -> None:
    png = png_bytes(60, 40, lambda x, y: (x, y, 0))
    (tmp_path / "ok.png").write_bytes(png)
    info = probe_image(tmp_path / "ok.png")
    assert (info.format, info.width, info.height) == ("png", 60, 40)
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(ImageProblem, match="truncated PNG"):
        probe_image(tmp_path / "cut.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageProblem, match="empty"):
        probe_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("hello, not an image")
    with pytest.raises(ImageProblem, match="convert it to PNG or JPEG"):
        probe_image(tmp_path / "text.png")
    (tmp_path / "thin.png").write_bytes(png_bytes(1000, 2, lambda x, y: (0, 0, 0)))
    with pytest.raises(ImageProblem, match="aspect ratio"):
        probe_image(tmp_path / "thin.png")


def test_image_probe_reads_jpeg_made_by_pymupdf(tmp_path: Path) -> None:
    import pymupdf

    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 90, 30), False)
    pix.clear_with(200)
    jpg = pix.tobytes("jpeg")
    (tmp_path / "a.jpg").write_bytes(jpg)
    info = probe_image(tmp_path / "a.jpg")
    assert (info.format, info.width, info.height) == ("jpeg", 90, 30)
    (tmp_path / "cut.jpg").write_bytes(jpg[:-200])
    with pytest.raises(ImageProblem, match="truncated JPEG"):
        probe_image(tmp_path / "cut.jpg")
