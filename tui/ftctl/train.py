"""ftctl's training commands: train/eval/export jobs from LLaMA-Factory templates, datasets, eval-compare,
deploy and templates.

    ftctl templates                                   what can be submitted, one line each
    ftctl dataset add NAME FILE.json [--images DIR]   check a sharegpt file and register it
    ftctl dataset from-pages NAME DIR [--val 0.1]     x.pdf + corrected x.md pairs -> an OCR dataset
    ftctl train TEMPLATE --dataset NAME [--set k=v]… [--gpus N] [--wait|--follow]
    ftctl train --yaml my.yaml [--dataset NAME] …    your own LLaMA-Factory config, checked like a template
    ftctl eval [TEMPLATE] --adapter JOB|DIR --dataset NAME     BLEU/ROUGE of an adapter (or the base model)
    ftctl export [TEMPLATE] --adapter JOB|DIR                  merge an adapter into its base model
    ftctl eval-compare JOB JOB…                       the metrics of eval jobs side by side
    ftctl deploy JOB [--name NAME]                    a train job's adapter (or an export's model) into vLLM

``train``, ``eval`` and ``export`` are also ``ftctl submit train|eval|export``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from shared.client import Client
from shared.handover import Handover, HandoverRefused, HandoverUnavailable
from shared.overrides import SpecProblem, absolutize, parse_overrides
from shared.protocol import (
    DatasetAddSpooled,
    DatasetFromPages,
    DatasetList,
    DatasetRemove,
    DatasetsReply,
    Deploy,
    Done,
    EvalCompare,
    EvalCompareReply,
    EventBody,
    JobDetail,
    JobInfo,
    ListTemplates,
    ShowJob,
    Submit,
    TemplatesReply,
    TrainPoint,
    TrainProgress,
)
from tui.ftctl.args import Subparsers, add_submit_flags
from tui.ftctl.follow import View, follow
from tui.ftctl.output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    emit_json,
    err,
    handover_failed,
    job_exit,
    out,
)

DATASET_ADD_TIMEOUT_S = 900.0  # checking every image of a big dataset takes a while
MAX_LISTED_PROBLEMS = 10


# ------------------------------------------------------------------------------------------ submitting


def _spec(args: argparse.Namespace, kind: str) -> dict[str, Any] | None:
    try:
        overrides = parse_overrides(args.set or [])
    except SpecProblem as exc:
        err.print(f"ftctl: {exc}", markup=False)
        return None
    adapter = getattr(args, "adapter", None)
    spec: dict[str, Any] = {"gpus": args.gpus}
    if adapter:
        if adapter.isdigit():
            spec["adapter_job"] = int(adapter)
        else:
            overrides["adapter_name_or_path"] = adapter
    # relative paths mean this shell's directory, not the daemon's
    spec["set"] = absolutize(overrides, Path.cwd())
    yaml_file = getattr(args, "yaml", None)
    if yaml_file:
        if args.template:
            err.print(f"ftctl: give a template or --yaml {yaml_file}, not both", markup=False)
            return None
        loaded = read_user_yaml(Path(yaml_file))
        if loaded is None:
            return None
        spec["yaml"], spec["yaml_name"] = loaded, Path(yaml_file).name
    elif not args.template and kind == "train":
        err.print("ftctl: name a template (`ftctl templates`) or give your LLaMA-Factory config with --yaml FILE",
                  markup=False)
        return None
    if args.template:
        spec["template"] = args.template
    if args.dataset:
        spec["dataset"] = args.dataset
    if args.min_free_gib:
        spec["min_free_gib"] = args.min_free_gib
    if getattr(args, "nodes", 1) != 1:
        spec["nodes"] = args.nodes
    return spec


def read_user_yaml(path: Path) -> str | None:
    """The user's LLaMA-Factory YAML, read here with her own rights (the daemon reads no path a client names),
    with relative paths made absolute against this shell's directory, as `llamafactory-cli train` reads them.
    The daemon checks the keys and paths again, against what she may use."""
    import yaml  # only this command needs it: `ftctl status` starts without it

    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        err.print(f"ftctl: cannot read {path}: {why}; give the YAML you would pass to `llamafactory-cli train`",
                  markup=False)
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        err.print(f"ftctl: {path}: not valid YAML ({' '.join(str(exc).split())}); fix the file", markup=False)
        return None
    if not isinstance(data, dict):
        err.print(f"ftctl: {path}: a LLaMA-Factory config is a YAML mapping of keys; fix the file", markup=False)
        return None
    return yaml.safe_dump(absolutize(data, Path.cwd()), sort_keys=False, allow_unicode=True)


def cmd_submit_llamafactory(args: argparse.Namespace, c: Client) -> int:
    kind = args.lf_kind
    spec = _spec(args, kind)
    if spec is None:
        return EXIT_USAGE
    body = Submit(kind=kind, spec=spec, name=args.name or "", priority=getattr(args, "priority", 0),
                  interactive=bool(args.wait or args.follow))  # someone waits for it
    job = c.call(body, JobDetail).job
    if not (args.wait or args.follow):
        if args.json:
            emit_json(job)
        else:
            err.print(f"job {job.id} queued ({job.name}); `ftctl show {job.id}`, `ftctl logs {job.id} -f`, or "
                      f"--wait next time for a progress bar")
            print(job.id)
        return EXIT_OK
    err.print(f"job {job.id} queued ({job.name})")
    job = follow(c, job.id, TrainView(print_points=args.follow, quiet=args.json))
    if args.json:
        emit_json(job)
    else:
        report_end(c, job)
    return job_exit(job)


def point_line(p: TrainPoint) -> str:
    parts = [f"step {p.step}/{p.total_steps}"]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.eval_loss is not None:
        parts.append(f"eval_loss {p.eval_loss:.4f}")
    if p.lr is not None:
        parts.append(f"lr {p.lr:.3e}")
    if p.remaining_s is not None:
        parts.append(f"eta {time.strftime('%H:%M:%S', time.gmtime(p.remaining_s))}")
    return "  ".join(parts)


class TrainView(View):
    """A progress bar (step, loss, ETA) until the job ends, above the job's history lines; with
    ``print_points`` every loss point on stdout too."""

    def __init__(self, *, print_points: bool, quiet: bool) -> None:
        super().__init__(quiet=quiet)
        self.print_points = print_points
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[steps]}"),
                                 TextColumn("{task.fields[loss]}"), TimeRemainingColumn(), console=err,
                                 disable=quiet, transient=True)
        self.task: TaskID | None = None
        self.job_id = 0

    def topics(self, job_id: int) -> tuple[str, ...]:
        return (f"train.{job_id}",)

    def open(self, job: JobInfo) -> None:
        self.job_id = job.id
        self.progress.start()
        self.task = self.progress.add_task(_describe(job), total=None, steps="", loss="")

    def job_changed(self, job: JobInfo, what: str) -> None:
        assert self.task is not None
        super().job_changed(job, what)  # printed above the bar: err is the bar's console
        self.progress.update(self.task, description=_describe(job))

    def event(self, body: EventBody) -> None:
        if not (isinstance(body, TrainProgress) and body.point.job_id == self.job_id):
            return
        assert self.task is not None
        p = body.point
        loss = f"loss {p.loss:.4f}" if p.loss is not None else ""
        self.progress.update(self.task, completed=p.step, total=p.total_steps or None,
                             steps=f"{p.step}/{p.total_steps}", loss=loss)
        if self.print_points:
            sys.stdout.write(point_line(p) + "\n")
            sys.stdout.flush()

    def close(self) -> None:
        self.progress.stop()


def _describe(job: JobInfo) -> str:
    note = job.progress.note if job.state == "queued" else job.state
    return f"job {job.id} {note or job.state}"


def report_end(c: Client, job: JobInfo) -> None:
    if job.state == "succeeded":
        history = c.call(ShowJob(job_id=job.id), JobDetail).history
        summary = history[-1].what if history else ""
        err.print(f"job {job.id} succeeded: {summary}", markup=False)
    else:
        err.print(f"job {job.id} {job.state}{': ' + job.error if job.error else ''}", markup=False)
    for key, value in job.artifacts.items():
        if key != "saved":
            out.print(f"{key}: {value}", markup=False)


# --------------------------------------------------------------------------------------------- others


def cmd_eval_compare(args: argparse.Namespace, c: Client) -> int:
    if c.call(ShowJob(job_id=args.jobs[0]), JobDetail).job.kind == "ocr_eval":
        # OCR runs are scored by CER/WER/tables, not BLEU: the same table `ftctl ocr-compare` prints
        from tui.ftctl.quality import cmd_ocr_compare
        return cmd_ocr_compare(args, c)
    reply = c.call(EvalCompare(job_ids=args.jobs), EvalCompareReply)
    if args.json:
        emit_json(reply.columns)
    else:
        out.print(reply.table, markup=False)
    return EXIT_OK


def cmd_deploy(args: argparse.Namespace, c: Client) -> int:
    # loading an adapter into a busy engine, or restarting it, takes a while
    reply = c.call(Deploy(job_id=args.job, name=args.name or ""), Done, timeout=max(args.timeout, 600.0))
    if args.json:
        emit_json(reply)
    else:
        out.print(reply.message, markup=False)
    return EXIT_OK


def cmd_templates(args: argparse.Namespace, c: Client) -> int:
    reply = c.call(ListTemplates(), TemplatesReply)
    if args.json:
        emit_json(reply)
        return EXIT_OK
    if not reply.templates:
        err.print(f"no templates in {reply.templates_dir}; put LLaMA-Factory YAML files there")
        return EXIT_FAILED
    t = Table(box=None, pad_edge=False)
    for col in ("TEMPLATE", "SUBMIT WITH", "DESCRIPTION"):
        t.add_column(col, no_wrap=col != "DESCRIPTION")
    for e in reply.templates:
        how = f"ftctl {e.kind}" + (f" ({e.stage})" if e.stage else "")
        t.add_row(e.name, how, e.description)
    out.print(t)
    err.print(f"templates in {reply.templates_dir}; change any key with --set key=value")
    return EXIT_OK


def cmd_dataset_add(args: argparse.Namespace, c: Client) -> int:
    """The records file and every image or video it names are opened here, with the user's own rights, and
    handed to the daemon (shared/handover.py): what a trainer reads is what this user could read."""
    file = Path(args.file).expanduser().absolute()
    root = Path(args.images).expanduser().absolute() if args.images else file.parent
    if args.images and not root.is_dir():
        err.print(f"ftctl: --images {root}: not a directory; give the folder the image paths in the records are "
                  "relative to", markup=False)
        return EXIT_USAGE
    try:
        with Handover(c.paths) as handover:
            records = handover.file(file)
            media, problems = _hand_over_media(handover, file, root)
            if problems:
                err.print("ftctl: " + "; ".join(problems), markup=False)
                return EXIT_USAGE
            manifest = _hand_over_manifest(handover, media) if media else None
    except (HandoverRefused, HandoverUnavailable) as exc:
        return handover_failed(exc)
    body = DatasetAddSpooled(name=args.name, records=records.sha256, records_name=file.name,
                             media=manifest or "", ranking=args.ranking, replace=args.replace)
    return _send_dataset_request(c, args, body)


def _send_dataset_request(c: Client, args: argparse.Namespace, body: DatasetAddSpooled | DatasetFromPages) -> int:
    """What `dataset add` and `from-pages` end with once their files are handed over: the request (checking
    every image takes a while) and its message."""
    reply = c.call(body, DatasetsReply, timeout=max(args.timeout, DATASET_ADD_TIMEOUT_S))
    if args.json:
        emit_json(reply)
    else:
        out.print(reply.message, markup=False)
    return EXIT_OK


def _hand_over_media(handover: Handover, file: Path, root: Path) -> tuple[dict[str, str], list[str]]:
    """Every image and video the records name, handed over: ({path as written: sha256}, problems). Records
    the daemon will refuse anyway (not JSON, not a list) hand over nothing: its message says what is wrong."""
    try:
        text = file.read_text(encoding="utf-8")
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if file.suffix == ".jsonl" \
            else json.loads(text)
    except (OSError, ValueError):
        return {}, []
    media: dict[str, str] = {}
    problems: list[str] = []
    for index, record in enumerate(records if isinstance(records, list) else []):
        if not isinstance(record, dict):
            continue
        for column in ("images", "videos"):
            value = record.get(column)
            items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
            for i, written in enumerate(items):
                if not isinstance(written, str) or not written or written in media:
                    continue
                path = Path(written) if os.path.isabs(written) else root / written
                try:
                    media[written] = handover.file(path).sha256
                except HandoverRefused as exc:
                    if len(problems) < MAX_LISTED_PROBLEMS:
                        problems.append(f"{file.name}: record {index}: {column}[{i}] {exc}")
    return media, problems


def _hand_over_manifest(handover: Handover, media: dict[str, Any], name: str = "media.json") -> str:
    """Which handed-over file each path stands for, itself handed over (a dataset may name more files than
    one request may carry)."""
    fd = os.memfd_create("ftmllm-media", os.MFD_CLOEXEC)
    try:
        data = json.dumps(media, ensure_ascii=False).encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return handover.fd(fd, name).sha256
    finally:
        os.close(fd)


def cmd_dataset_from_pages(args: argparse.Namespace, c: Client) -> int:
    """Every x.pdf of DIR and its truth x.md are opened here, with the user's own rights, and handed to the
    daemon (shared/handover.py), which renders the pages as serving does (daemon/train/from_pages.py)."""
    folder = Path(args.dir).expanduser().absolute()
    try:
        names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".pdf" and p.is_file())
    except PermissionError:
        err.print(f"ftctl: you cannot read the folder {folder} (permission denied); give a folder of yours, or "
                  "ask its owner to share it", markup=False)
        return EXIT_USAGE
    except OSError as exc:
        err.print(f"ftctl: {folder}: {exc.strerror}; give the folder that holds x.pdf + x.md pairs", markup=False)
        return EXIT_USAGE
    if not names:
        err.print(f"ftctl: {folder} holds no .pdf files; put each x.pdf there with its corrected x.md",
                  markup=False)
        return EXIT_USAGE
    try:
        with Handover(c.paths) as handover:
            documents: dict[str, dict[str, str]] = {}
            for name in names:
                md = folder / (name[: -len(".pdf")] + ".md")
                documents[name] = {"pdf": handover.file(folder / name).sha256,
                                   "md": handover.file(md).sha256 if md.exists() else ""}
            manifest = _hand_over_manifest(handover, documents, "documents.json")
    except (HandoverRefused, HandoverUnavailable) as exc:
        return handover_failed(exc)
    body = DatasetFromPages(name=args.name, documents=manifest, folder=str(folder), val=args.val, seed=args.seed,
                            replace=args.replace)
    return _send_dataset_request(c, args, body)


def cmd_dataset_list(args: argparse.Namespace, c: Client) -> int:
    reply = c.call(DatasetList(), DatasetsReply)
    if args.json:
        emit_json(reply.datasets)
        return EXIT_OK
    if not reply.datasets:
        err.print(reply.message or "no datasets")
        return EXIT_OK
    t = Table(box=None, pad_edge=False)
    for col in ("NAME", "RECORDS", "IMAGES", "KIND", "FILE"):
        t.add_column(col, no_wrap=True)
    for d in reply.datasets:
        t.add_row(d.name, str(d.records), str(d.images), "ranking" if d.ranking else "sft", d.file)
    out.print(t)
    return EXIT_OK


def cmd_dataset_rm(args: argparse.Namespace, c: Client) -> int:
    reply = c.call(DatasetRemove(name=args.name), Done)
    if args.json:
        emit_json(reply)
    else:
        out.print(reply.message, markup=False)
    return EXIT_OK


# --------------------------------------------------------------------------------------------- parser

_KIND_HELP = {
    "train": ("train a model from a LLaMA-Factory template (sft, dpo, …)",
              "Train from a template in configs/llamafactory (`ftctl templates`). The daemon renders the "
              "template with your --set overrides and --dataset, checks every key, dataset and path in under a "
              "second, queues the job and runs `llamafactory-cli train` on the GPUs it assigns (the CPU when "
              "there are none). Example: ftctl train qwen2vl_lora_sft --dataset mydocs --set "
              "model_name_or_path=/models/Qwen2-VL-7B-Instruct --set num_train_epochs=2 --gpus 2 --wait. "
              "Or bring the YAML you give `llamafactory-cli train`: ftctl train --yaml my.yaml"),
    "eval": ("score an adapter (or the base model) with BLEU-4/ROUGE on a dataset",
             "Predict on a dataset and score BLEU-4 and ROUGE-1/2/L (template qwen2vl_eval unless named). "
             "--adapter JOB takes a train job's adapter and its base model; leave it out to score the base "
             "model (--set model_name_or_path=…). Compare runs with `ftctl eval-compare`."),
    "export": ("merge an adapter into its base model (llamafactory-cli export)",
               "Merge a LoRA adapter into its base model (template qwen2vl_export unless named): --adapter JOB "
               "takes a train job's adapter and base model. The merged model can be served with `ftctl deploy`."),
}


def _add_llamafactory_parser(parsers: Subparsers, kind: str) -> None:
    short, long = _KIND_HELP[kind]
    sp = parsers.add_parser(kind, help=short, description=long)
    sp.set_defaults(fn=cmd_submit_llamafactory, lf_kind=kind)
    sp.add_argument("template", nargs="?", default="",
                    help="a template name (`ftctl templates`)" + ("; or --yaml" if kind == "train" else
                                                                    f"; default qwen2vl_{kind}"))
    sp.add_argument("--yaml", metavar="FILE",
                    help="your own LLaMA-Factory config instead of a template (as for `llamafactory-cli "
                         f"{'export' if kind == 'export' else 'train'} FILE`), read with your rights and checked "
                         "like a template: keys, paths, the --set allow-list; output_dir and dataset_dir are the "
                         "daemon's; report_to: tensorboard or none")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a template key (repeatable); KEY= removes it; values are YAML (1e-4, true)")
    if kind != "export":
        sp.add_argument("--dataset", action="append", metavar="NAME",
                        help="a registered dataset (`ftctl dataset list`); repeat for several")
    else:
        sp.set_defaults(dataset=None)
    if kind != "train":
        sp.add_argument("--adapter", metavar="JOB|DIR", help="a train job's id (its adapter and base model) or an "
                                                            "adapter directory")
    sp.add_argument("--gpus", type=int, default=1, help="GPUs the job needs (default 1; ignored without GPUs)"
                    + ("; with --nodes, on each node" if kind == "train" else ""))
    if kind == "train":
        sp.add_argument("--nodes", type=int, default=1,
                        help="train over this many cluster nodes at once, --gpus on each (torchrun across them; "
                             "needs [cluster] backend = \"ray\"; default 1)")
    sp.add_argument("--min-free-gib", dest="min_free_gib", type=float, default=0.0,
                    help="free memory it needs on each GPU (default: the daemon's [scheduler] min_free_gib)")
    sp.add_argument("--follow", action="store_true", help="wait, and print every loss point as it arrives")
    add_submit_flags(sp)


def add_submit_parsers(kinds: Subparsers) -> None:
    """``ftctl submit train|eval|export``."""
    for kind in ("train", "eval", "export"):
        _add_llamafactory_parser(kinds, kind)


def add_parsers(commands: Subparsers) -> None:
    """``ftctl train|eval|export``, ``templates``, ``eval-compare``, ``deploy`` and ``dataset``."""
    for kind in ("train", "eval", "export"):
        _add_llamafactory_parser(commands, kind)

    sp = commands.add_parser("templates", help="list the job templates with a one-line description",
                             description="The LLaMA-Factory templates the daemon renders jobs from.")
    sp.set_defaults(fn=cmd_templates)
    sp.add_argument("--json", action="store_true")

    sp = commands.add_parser("eval-compare", help="eval jobs' BLEU-4/ROUGE (or ocr_eval jobs' CER/WER) side by side",
                             description="Print the metrics of finished eval jobs side by side (base model vs "
                             "adapters on the same dataset); ocr_eval jobs give the `ftctl ocr-compare` table.")
    sp.set_defaults(fn=cmd_eval_compare)
    sp.add_argument("jobs", type=int, nargs="+", metavar="JOB", help="eval job ids, compared side by side")
    sp.add_argument("--json", action="store_true")

    sp = commands.add_parser("deploy", help="serve a train job's adapter (or an export's model) in vLLM",
                             description="A finished train job's adapter is loaded into the running vLLM engine "
                             "as a runtime LoRA named --name (default jobN); an export job's merged model becomes "
                             "the engine's model (vLLM restarts; admins only).")
    sp.set_defaults(fn=cmd_deploy)
    sp.add_argument("job", type=int, help="a finished train or export job's id")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--name", help="the adapter's name in requests (OCR jobs: --adapter NAME)")

    ds = commands.add_parser("dataset", help="register, list and remove training datasets",
                             description="Datasets are sharegpt JSON files checked record by record and registered "
                             "in the daemon's dataset_info.json.")
    dsub = ds.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    sp = dsub.add_parser("add", help="check a sharegpt .json/.jsonl file and register it",
                         description="Check every record (roles alternate, one <image> tag per image, images "
                         "exist and open, ranking data has chosen/rejected) and register the file as NAME. The "
                         "file and every image it names are read by ftctl with your rights and handed to the "
                         "daemon, which keeps its own copy.")
    sp.set_defaults(fn=cmd_dataset_add)
    sp.add_argument("name", help="the name to submit it with (--dataset NAME)")
    sp.add_argument("file", help="the sharegpt records: a .json list or .jsonl")
    sp.add_argument("--images", metavar="DIR", help="the folder relative image paths are in (default: the file's)")
    sp.add_argument("--ranking", action=argparse.BooleanOptionalAction, default=None,
                    help="ranking data (chosen/rejected) for dpo/rm (default: detected from the first record)")
    sp.add_argument("--replace", action="store_true", help="replace a dataset of the same name (yours)")
    sp.add_argument("--json", action="store_true")
    sp = dsub.add_parser("from-pages", help="build an OCR dataset from x.pdf + corrected x.md pairs",
                         description="Every x.pdf in DIR with its truth x.md (the outbox's Markdown with its "
                         "'<!-- page N -->' markers, corrected) becomes one sample per page: the page rendered "
                         "exactly as the engine renders it for serving (dpi, pixel budget, prompt), answered by "
                         "the page's truth. Documents are split into NAME (training) and NAME.val (validation); "
                         "pages without truth are skipped and counted. The files are read by ftctl with your "
                         "rights and handed to the daemon.")
    sp.set_defaults(fn=cmd_dataset_from_pages)
    sp.add_argument("name", help="the training dataset's name; the validation pages become NAME.val")
    sp.add_argument("dir", metavar="DIR", help="the folder of x.pdf files, each with its truth x.md beside it")
    sp.add_argument("--val", type=float, default=0.1, metavar="SHARE",
                    help="share of the documents kept for validation (default 0.1, at least one of two or more)")
    sp.add_argument("--seed", type=int, default=0, help="which documents go to validation (default 0)")
    sp.add_argument("--replace", action="store_true", help="replace datasets of the same names (yours)")
    sp.add_argument("--json", action="store_true")
    sp = dsub.add_parser("list", help="the registered datasets")
    sp.set_defaults(fn=cmd_dataset_list)
    sp.add_argument("--json", action="store_true")
    sp = dsub.add_parser("rm", help="unregister a dataset (yours) and delete the daemon's copy")
    sp.set_defaults(fn=cmd_dataset_rm)
    sp.add_argument("name", help="the dataset's name (`ftctl dataset list`)")
    sp.add_argument("--json", action="store_true")
