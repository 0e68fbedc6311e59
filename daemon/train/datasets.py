"""The daemon's LLaMA-Factory datasets: ``ftctl dataset add NAME FILE.json [--images DIR]``.

A dataset is checked record by record before it is registered, because LLaMA-Factory either drops a bad
record with a warning nobody reads ("Invalid role tag", "Invalid message count") or dies on it hours into
preprocessing ("The number of images does not match the number of <image> tokens"). What is checked:
sharegpt records (``messages`` with role/content, or ``conversations`` with from/value), turns that
alternate user/assistant after an optional system turn, the number of ``<image>`` tags against the number
of images, every image file present and readable (images.py), and ranking data (for DPO/RM) with a
``chosen`` and a ``rejected`` answer.

Registering copies the records into the daemon's dataset dir with image paths made absolute, then adds the
entry to ``dataset_info.json``. A dataset a member adds through ``ftctl`` arrives handed over (the records
file and every image or video it names, opened with the member's own rights: shared/handover.py), and its
media are kept in the dataset dir's ``media/`` folder by content, so a trainer reads only what the member
could read, frozen at the add. Both writes are atomic
and the read-modify-write of dataset_info.json holds a lock, so two adds never lose each other's entry.
This module owns every file in that dir, including who added each dataset (``NAME.about.json``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.core.atomic import write_atomic
from daemon.spool.spool import Spool
from daemon.train.images import ImageProblem, probe_image

DATASET_INFO = "dataset_info.json"
# Beside each added dataset: its media files, one absolute path a line, so a submit checks they are still
# there without parsing a JSON file of maybe 100k records (validate.py).
MEDIA_LIST_SUFFIX = ".media"
# Beside each dataset added through the daemon: who added it (only they or an admin may replace or remove
# it) and its counts, so `dataset list` need not parse big files.
ABOUT_SUFFIX = ".about.json"
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
MAX_LISTED_PROBLEMS = 10

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# handed-over media kept by content (<sha256><suffix>), shared by every dataset that names the same file
MEDIA_DIR = "media"
_SUFFIX_RE = re.compile(r"\.[a-z0-9]{1,8}")


@dataclass(frozen=True)
class Layout:
    """How a sharegpt file names its fields; what dataset_info.json's ``columns``/``tags`` say."""

    messages: str
    role: str
    content: str
    user: str
    assistant: str
    system: str
    observation: str
    function: str

    @property
    def odd(self) -> tuple[str, str]:  # turns 1, 3, 5 … (counting from 1, after the system turn)
        return (self.user, self.observation)

    @property
    def even(self) -> tuple[str, str]:
        return (self.assistant, self.function)


# The two layouts LLaMA-Factory's own examples use: mllm_demo.json and the original ShareGPT.
OPENAI_STYLE = Layout("messages", "role", "content", "user", "assistant", "system", "observation", "function")
SHAREGPT_STYLE = Layout("conversations", "from", "value", "human", "gpt", "system", "observation",
                        "function_call")


class DatasetProblem(ValueError):
    """Why a dataset cannot be added: one line per problem, each naming the file, record and fix."""

    def __init__(self, problems: Sequence[str], total: int | None = None) -> None:
        self.problems = list(problems)
        more = (total or len(self.problems)) - len(self.problems)
        text = "; ".join(self.problems) + (f"; and {more} more problems" if more > 0 else "")
        super().__init__(text)


@dataclass(frozen=True)
class DatasetSummary:
    name: str
    file: Path  # the registered copy under the daemon's dataset dir
    records: int
    images: int
    ranking: bool
    layout: str  # "messages" or "conversations"
    formats: dict[str, int] = field(default_factory=dict)  # image format -> count

    @property
    def message(self) -> str:
        kind = "ranking (for dpo/rm)" if self.ranking else "sft"
        return (f"dataset '{self.name}' added: {self.records} records, {self.images} images, {kind}; "
                f"train with --dataset {self.name}")


def load_records(path: Path, shown: str = "") -> list[Any]:
    """A .json array or a .jsonl file of records; DatasetProblem names the file and the fix. ``shown``: the
    name the user knows the file by (a handed-over file lies in the spool under its hash)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetProblem([f"{path}: file not found; give the path of a sharegpt .json file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetProblem([f"{shown or path}: cannot be read as UTF-8 text ({exc}); save it as UTF-8 "
                              "JSON"]) from None
    path = Path(shown) if shown else path
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetProblem([f"{path}: line {lineno} is not JSON ({exc.msg}); fix that line"]) from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetProblem([f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                              "fix the syntax"]) from None
    if not isinstance(data, list):
        raise DatasetProblem([f"{path}: the top level must be a JSON array of records, not a "
                              f"{type(data).__name__}; wrap the records in [ … ]"])
    return data


def detect_layout(records: Sequence[Any]) -> Layout:
    for record in records[:1]:
        if isinstance(record, dict) and "messages" in record:
            return OPENAI_STYLE
        if isinstance(record, dict) and "conversations" in record:
            return SHAREGPT_STYLE
    raise DatasetProblem(["record 0: no 'messages' (role/content) or 'conversations' (from/value) list; "
                          "write records in LLaMA-Factory's sharegpt format (see data/mllm_demo.json)"])


@dataclass
class _Checker:
    source: Path
    media_root: Path
    layout: Layout
    ranking: bool
    # handed-over media: each path as the records write it -> the spool entry holding the file; None: the
    # records name files on this machine (media_root resolves relative ones)
    handed: Mapping[str, Path] | None = None
    # where a handed-over file is kept once the dataset is added (the path the registered records name)
    kept: Callable[[Path, str], Path] | None = None
    problems: list[str] = field(default_factory=list)
    count: int = 0
    images: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    _probed: dict[Path, str | None] = field(default_factory=dict)  # path -> problem (None = fine)
    _shown: dict[Path, str] = field(default_factory=dict)  # a spool entry -> the path the records give

    def problem(self, index: int, text: str) -> None:
        self.count += 1
        if len(self.problems) < MAX_LISTED_PROBLEMS:
            self.problems.append(f"{self.source.name}: record {index}: {text}")

    def check(self, index: int, record: Any) -> dict[str, Any] | None:
        """Check one record; return it with absolute media paths, or None if it has problems."""
        lay = self.layout
        if not isinstance(record, dict):
            self.problem(index, f"is a {type(record).__name__}, not an object; each record is {{...}}")
            return None
        before = self.count
        turns = record.get(lay.messages)
        if not isinstance(turns, list) or not turns:
            self.problem(index, f"'{lay.messages}' must be a non-empty list of turns")
            return None
        texts: list[str] = []
        roles: list[str] = []
        for t, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get(lay.role), str) \
                    or not isinstance(turn.get(lay.content), str):
                self.problem(index, f"turn {t} needs string fields '{lay.role}' and '{lay.content}'")
                return None
            roles.append(turn[lay.role])
            texts.append(turn[lay.content])
        if roles[0] == lay.system:
            if IMAGE_TAG in texts[0]:
                self.problem(index, f"the system turn holds {IMAGE_TAG}, which LLaMA-Factory does not count; "
                                    "move the tag into the first user turn")
            roles, texts = roles[1:], texts[1:]
        for t, role in enumerate(roles):
            expected = lay.odd if t % 2 == 0 else lay.even
            if role not in expected:
                self.problem(index, f"turn {t} has role '{role}' where '{expected[0]}' is expected: roles must "
                                    f"alternate {lay.user}/{lay.assistant} (after an optional {lay.system})")
                return None
        if self.ranking:
            if len(roles) % 2 == 0:
                self.problem(index, f"a ranking record's '{lay.messages}' must end with a {lay.user} turn "
                                    "(the answers go in 'chosen' and 'rejected')")
            answers = []
            for key in ("chosen", "rejected"):
                answer = record.get(key)
                if not isinstance(answer, dict) or answer.get(lay.role) not in lay.even \
                        or not isinstance(answer.get(lay.content), str):
                    self.problem(index, f"ranking data needs '{key}': {{\"{lay.role}\": \"{lay.assistant}\", "
                                        f"\"{lay.content}\": \"...\"}}")
                    return None
                answers.append(answer[lay.content])
            prompt_tags = sum(x.count(IMAGE_TAG) for x in texts)
            tag_counts = [prompt_tags + a.count(IMAGE_TAG) for a in answers]
            video_counts = [sum(x.count(VIDEO_TAG) for x in texts) + a.count(VIDEO_TAG) for a in answers]
        else:
            if len(roles) % 2 != 0:
                self.problem(index, f"ends with a {roles[-1]} turn; a training record ends with the "
                                    f"{lay.assistant}'s answer")
            tag_counts = [sum(x.count(IMAGE_TAG) for x in texts)]
            video_counts = [sum(x.count(VIDEO_TAG) for x in texts)]

        out = dict(record)
        for column, tag, counts in (("images", IMAGE_TAG, tag_counts), ("videos", VIDEO_TAG, video_counts)):
            paths = self._media(index, record.get(column), column)
            if paths is None:
                return None
            for n in sorted(set(counts)):
                if n != len(paths):
                    self.problem(index, f"has {n} {tag} tag(s) but {len(paths)} {column}; put one {tag} in the "
                                        f"text per file in '{column}'")
                    break
            if column == "images":
                for i, path in enumerate(paths):
                    self._check_image(index, i, path)
            elif column in record:
                for i, path in enumerate(paths):
                    if not path.is_file():
                        self.problem(index, f"videos[{i}] {path}: file not found; check the path")
            if column in record:
                kept = self.kept
                out[column] = [str(kept(p, self._shown[p]) if kept is not None else p) for p in paths]
        return out if self.count == before else None

    def _media(self, index: int, value: Any, column: str) -> list[Path] | None:
        if value is None:
            return []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
            self.problem(index, f"'{column}' must be a list of file paths")
            return None
        if self.handed is None:
            return [Path(v) if os.path.isabs(v) else (self.media_root / v) for v in items]
        paths = []
        for i, v in enumerate(items):
            entry = self.handed.get(v)
            if entry is None:
                self.problem(index, f"{column}[{i}] {v}: not among the files handed over with the records; "
                                    "add the dataset with ftctl of the daemon's version, which hands them over")
                return None
            self._shown[entry] = v
            paths.append(entry)
        return paths

    def _check_image(self, index: int, i: int, path: Path) -> None:
        if path not in self._probed:
            try:
                info = probe_image(path)
            except ImageProblem as exc:
                self._probed[path] = str(exc)
            else:
                self._probed[path] = None
                self.formats[info.format] = self.formats.get(info.format, 0) + 1
        self.images += 1
        problem = self._probed[path]
        if problem:
            self.problem(index, f"images[{i}] {self._shown.get(path, path)}: {problem}")


def check_records(
    records: Sequence[Any], *, source: Path, media_root: Path, ranking: bool | None = None,
    layout: Layout | None = None, handed: Mapping[str, Path] | None = None,
    kept: Callable[[Path, str], Path] | None = None,
) -> tuple[list[dict[str, Any]], DatasetSummary]:
    """Check every record; return them with absolute image paths. ``ranking=None`` detects it from the
    first record (``chosen`` present). Raises DatasetProblem listing the first problems by record index."""
    if not records:
        raise DatasetProblem([f"{source}: holds no records; add at least one"])
    layout = layout or detect_layout(records)
    looks_ranked = isinstance(records[0], dict) and "chosen" in records[0]
    if ranking is None:
        ranking = looks_ranked
    elif looks_ranked and not ranking:
        raise DatasetProblem([f"{source.name}: record 0 has 'chosen'/'rejected' (ranking data, for dpo/rm) but "
                              "was added as SFT data; add it as ranking data"])
    checker = _Checker(source=source, media_root=media_root, layout=layout, ranking=ranking, handed=handed,
                       kept=kept)
    out = [r for i, rec in enumerate(records) if (r := checker.check(i, rec)) is not None]
    if checker.problems:
        raise DatasetProblem(checker.problems, total=checker.count)
    summary = DatasetSummary(name="", file=source, records=len(out), images=checker.images, ranking=ranking,
                             layout=layout.messages, formats=dict(checker.formats))
    return out, summary


def dataset_info_entry(file_name: str, layout: Layout, ranking: bool, has_images: bool,
                       has_videos: bool) -> dict[str, Any]:
    columns: dict[str, str] = {"messages": layout.messages}
    if has_images:
        columns["images"] = "images"
    if has_videos:
        columns["videos"] = "videos"
    if ranking:
        columns.update(chosen="chosen", rejected="rejected")
    tags = {"role_tag": layout.role, "content_tag": layout.content, "user_tag": layout.user,
            "assistant_tag": layout.assistant, "system_tag": layout.system,
            "observation_tag": layout.observation, "function_tag": layout.function}
    return {"file_name": file_name, "formatting": "sharegpt", "ranking": ranking, "columns": columns,
            "tags": tags}


def add_dataset(
    name: str,
    file: Path,
    *,
    dataset_dir: Path,
    images_dir: Path | None = None,
    ranking: bool | None = None,
    replace: bool = False,
    handed: Mapping[str, Path] | None = None,
    shown: str = "",
    also_keep: Mapping[str, Path] | None = None,
) -> DatasetSummary:
    """Check FILE and register it as NAME in ``dataset_dir/dataset_info.json``.

    Relative image paths are read from ``images_dir`` (default: FILE's folder). With ``handed`` (a dataset a
    member handed over: FILE and every media file lie in the spool, ``shown`` is FILE's own name) each media
    path the records write must be a key of ``handed``, and the files are kept in ``dataset_dir/media``.
    Nothing is registered if any record has a problem, and an existing NAME is kept unless ``replace``.
    ``also_keep``: more handed-over files the dataset keeps (named as written -> spool entry) that no record
    names: the documents ``dataset from-pages`` rendered the pages from, for scoring an engine on them."""
    if not _NAME_RE.match(name):
        raise DatasetProblem([f"dataset name '{name}' is not allowed; use letters, digits, '_', '-' or '.' "
                              "(up to 64, starting with a letter or digit)"])
    file = file.expanduser().absolute()
    if images_dir is not None:
        images_dir = images_dir.expanduser().absolute()
        if not images_dir.is_dir():
            raise DatasetProblem([f"--images {images_dir}: not a directory; give the folder the image paths "
                                  "in the records are relative to"])
    records = load_records(file, shown)
    layout = detect_layout(records)
    keep: dict[Path, Path] = {}  # where a handed-over file is kept -> its spool entry

    def kept(entry: Path, written: str) -> Path:
        where = kept_path(dataset_dir, entry, written)
        keep[where] = entry
        return where

    checked, summary = check_records(records, source=Path(shown) if shown else file,
                                     media_root=images_dir or file.parent, ranking=ranking, layout=layout,
                                     handed=handed, kept=kept if handed is not None else None)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    with _locked(dataset_dir):
        info = read_dataset_info(dataset_dir)
        if name in info and not replace:
            raise DatasetProblem([f"dataset '{name}' already exists; choose another name or add it with "
                                  "--replace"])
        for where, entry in keep.items():
            _keep_media(entry, where)
        file_name = f"{name}.json"
        write_atomic(dataset_dir / file_name, json.dumps(checked, ensure_ascii=False, indent=1) + "\n", mode=0o600)
        # after the records: validate.py trusts the list only when it is not older than them
        media = dict.fromkeys(p for r in checked for col in ("images", "videos") for p in r.get(col, ()))
        for written, entry in (also_keep or {}).items():
            where = kept(entry, written)
            _keep_media(entry, where)
            media[str(where)] = None
        write_atomic(dataset_dir / f"{name}{MEDIA_LIST_SUFFIX}", "".join(f"{p}\n" for p in media), mode=0o600)
        info[name] = dataset_info_entry(file_name, layout, summary.ranking,
                                        has_images=any("images" in r for r in checked),
                                        has_videos=any("videos" in r for r in checked))
        write_atomic(dataset_dir / DATASET_INFO, json.dumps(info, ensure_ascii=False, indent=2) + "\n", mode=0o600)
        if replace:
            collect_media(dataset_dir)  # what only the replaced version named
    return DatasetSummary(name=name, file=dataset_dir / file_name, records=summary.records,
                          images=summary.images, ranking=summary.ranking, layout=summary.layout,
                          formats=summary.formats)


def kept_path(dataset_dir: Path, entry: Path, written: str) -> Path:
    """Where a handed-over file (spool ``entry``, named ``written`` by the user) is kept once added."""
    suffix = Path(written).suffix.lower()
    return dataset_dir / MEDIA_DIR / f"{entry.name}{suffix if _SUFFIX_RE.fullmatch(suffix) else ''}"


def handed_media(spool: Spool, manifest: str, uid: int) -> dict[str, Path]:
    """The media a client handed over with a dataset. ``manifest`` names a handed-over JSON object: each media
    path as the records write it -> the sha256 of that file as handed over; every entry must be ``uid``'s."""
    try:
        data = json.loads(spool.lookup(manifest, uid).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise DatasetProblem(["the list of handed-over media files is not a JSON object of path -> sha256; add the "
                              "dataset with ftctl of the daemon's version"])
    entries: dict[str, Path] = {}
    return {written: entries.get(digest) or entries.setdefault(digest, spool.lookup(digest, uid))
            for written, digest in data.items()}


def _keep_media(entry: Path, where: Path) -> None:
    """A handed-over media file into the dataset dir's media/ (named by content: one copy for every dataset
    that uses it). A link when the spool is on the same file system, else a copy."""
    if where.exists():
        return
    where.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = where.with_name(f".{where.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(entry, tmp)
    except OSError:
        shutil.copyfile(entry, tmp)
        os.chmod(tmp, 0o600)
    os.replace(tmp, where)


def collect_media(dataset_dir: Path) -> int:
    """Remove kept media no registered dataset names any more (after a remove or a replace); how many."""
    media_dir = dataset_dir / MEDIA_DIR
    if not media_dir.is_dir():
        return 0
    used: set[str] = set()
    for listing in dataset_dir.glob(f"*{MEDIA_LIST_SUFFIX}"):
        try:
            used.update(line for line in listing.read_text(encoding="utf-8").splitlines() if line)
        except OSError:
            return 0  # unsure what is used: keep everything
    removed = 0
    for path in media_dir.iterdir():
        if str(path) not in used and not path.name.startswith("."):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def read_dataset_info(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / DATASET_INFO
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise DatasetProblem([f"{path}: cannot be read ({exc}); fix or remove the file"]) from None
    if not isinstance(data, dict):
        raise DatasetProblem([f"{path}: must be a JSON object of dataset entries; fix or remove the file"])
    return data


def list_datasets(dataset_dir: Path) -> dict[str, Mapping[str, Any]]:
    return dict(sorted(read_dataset_info(dataset_dir).items()))


def dataset_file(dataset_dir: Path, entry: Mapping[str, Any]) -> Path | None:
    """The records file of a dataset_info.json entry; None for hub or script datasets (LLaMA-Factory fetches
    them itself)."""
    file_name = entry.get("file_name")
    if not isinstance(file_name, str):
        return None
    return Path(file_name) if os.path.isabs(file_name) else dataset_dir / file_name


def write_about(dataset_dir: Path, summary: DatasetSummary, *, owner: str, source: Path,
                extra: Mapping[str, Any] | None = None) -> None:
    """``extra``: more to keep (``dataset from-pages``: how its pages were rendered, its documents)."""
    about = {"owner": owner, "records": summary.records, "images": summary.images, "ranking": summary.ranking,
             "added": time.time(), "source": str(source), **(extra or {})}
    write_atomic(dataset_dir / f"{summary.name}{ABOUT_SUFFIX}", json.dumps(about, indent=1) + "\n", mode=0o600)


def read_about(dataset_dir: Path, name: str) -> dict[str, Any]:
    """What :func:`write_about` kept; {} for a dataset placed by hand."""
    try:
        data = json.loads((dataset_dir / f"{name}{ABOUT_SUFFIX}").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def count_records(path: Path) -> tuple[int, int]:
    """(records, media files) of a records file, read in full: for a dataset placed by hand."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0, 0
    try:
        media = sum(1 for line in path.with_suffix(MEDIA_LIST_SUFFIX).read_text(encoding="utf-8").splitlines()
                    if line)
    except OSError:
        media = 0
    return (len(records) if isinstance(records, list) else 0), media


def remove_dataset(name: str, dataset_dir: Path) -> None:
    with _locked(dataset_dir):
        info = read_dataset_info(dataset_dir)
        entry = info.pop(name, None)
        if entry is None:
            raise DatasetProblem([f"no dataset '{name}'; `ftctl dataset list` shows the names"])
        write_atomic(dataset_dir / DATASET_INFO, json.dumps(info, ensure_ascii=False, indent=2) + "\n", mode=0o600)
        (dataset_dir / f"{name}{ABOUT_SUFFIX}").unlink(missing_ok=True)
        if isinstance(entry, dict) and entry.get("file_name") == f"{name}.json":
            (dataset_dir / f"{name}.json").unlink(missing_ok=True)
            (dataset_dir / f"{name}{MEDIA_LIST_SUFFIX}").unlink(missing_ok=True)
        collect_media(dataset_dir)


@contextmanager
def _locked(dataset_dir: Path) -> Iterator[None]:
    dataset_dir.mkdir(parents=True, exist_ok=True)
    with (dataset_dir / ".dataset_info.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
