"""The ``dosebench`` command: a thin shell over the stage functions and the embedded runner."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .core.data import sample_ct
from .core.doses import parse_doses
from .core.errors import DosebenchError, InputError
from .core.protocol import load_protocol

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="How far can CT dose be lowered before a segmentation model changes its answer?")
err_console = Console(stderr=True)


class RichProgress:
    """Shows each reported step as a progress bar (rich)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, int] = {}

    def start(self, key: str, description: str, total: int) -> None:
        self._tasks[key] = self._progress.add_task(description, total=total)

    def advance(self, key: str, amount: int = 1) -> None:
        self._progress.advance(self._tasks[key], amount)

    def finish(self, key: str) -> None:
        task = self._tasks[key]
        self._progress.update(task, completed=self._progress.tasks[task].total)


def _fail(exc: DosebenchError) -> None:
    # the message quotes what the user typed: escape it so it is never read as rich markup
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _run(input_path: Path, doses: str, protocol: str, segmenter: str, seed: int, out: Path,
         reference_seg: Path | None, series: str | None, overwrite: bool, quiet: bool) -> None:
    from .pipeline import RunRequest, run_study  # heavy imports only when running

    try:
        if seed < 0:
            raise InputError(f"seed {seed} is negative", fix="give a seed >= 0, e.g. --seed 7")
        request = RunRequest(input_path=input_path, doses=parse_doses(doses), protocol=load_protocol(protocol),
                             segmenter=segmenter, seed=seed, out_dir=out, reference_seg=reference_seg,
                             series_uid=series, overwrite=overwrite)
        started = time.perf_counter()
        result = _run_with_progress(run_study, request, quiet)
    except DosebenchError as exc:
        _fail(exc)
        return
    if not quiet:
        sys.stdout.write(result.report_markdown)
        err_console.print(f"results in {result.out_dir} ({time.perf_counter() - started:.1f} s)")


InputOpt = Annotated[Path, typer.Option("--input", "-i", help="CT volume: NIfTI file, DICOM folder or zip")]
DosesOpt = Annotated[str, typer.Option(help="dose fractions, comma-separated; 1.0 (the reference) is always added")]
ProtocolOpt = Annotated[str, typer.Option(help="built-in protocol (demo, paper, tiny) or a YAML/JSON file")]
SegmenterOpt = Annotated[str, typer.Option(help="segmenter backend spec")]
SeedOpt = Annotated[int, typer.Option(help="random seed: same seed, same bytes")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="output folder (created; must not exist unless --overwrite)")]
RefOpt = Annotated[Path | None, typer.Option(help="reference segmentation (NIfTI) for extra metrics")]
SeriesOpt = Annotated[str | None, typer.Option(help="SeriesInstanceUID, when a DICOM folder holds several")]
OverwriteOpt = Annotated[bool, typer.Option(help="replace an existing output folder (only once the run succeeded)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress display and no report on stdout")]


def _run_with_progress(run, request, quiet: bool):
    """``run(request)``, with a progress bar per stage on stderr unless ``quiet``."""
    if quiet:
        return run(request)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=False) as bar:
        return run(request, RichProgress(bar))


@app.command()
def run(input: InputOpt, out: OutOpt, doses: DosesOpt = "0.2,0.4,0.6,0.8,1.0", protocol: ProtocolOpt = "demo",
        segmenter: SegmenterOpt = "threshold", seed: SeedOpt = 7, reference_seg: RefOpt = None,
        series: SeriesOpt = None, overwrite: OverwriteOpt = False, quiet: QuietOpt = False) -> None:
    """Simulate, reconstruct, segment and compare every dose level of one CT."""
    _run(input, doses, protocol, segmenter, seed, out, reference_seg, series, overwrite, quiet)


@app.command()
def demo(out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("demo-output"),
         overwrite: OverwriteOpt = False, quiet: QuietOpt = False) -> None:
    """`run` on the bundled real abdominal CT: doses 0.2-1.0, protocol demo, segmenter threshold."""
    _run(sample_ct(), "0.2,0.4,0.6,0.8,1.0", "demo", "threshold", 7, out, None, None, overwrite, quiet)


RawInputOpt = Annotated[Path, typer.Option(
    "--input", "-i", help="CT volume (NIfTI file, DICOM folder or zip) or a DICOM-CT-PD raw projection folder")]


@app.command()
def simulate(input: RawInputOpt, out: OutOpt, doses: DosesOpt = "0.2,0.4,0.6,0.8,1.0", protocol: ProtocolOpt = "demo",
             seed: SeedOpt = 7, series: SeriesOpt = None, overwrite: OverwriteOpt = False,
             quiet: QuietOpt = False) -> None:
    """Projections only: full-dose counts (OUT/counts) and each dose's line integrals (OUT/dose-0.20/...)."""
    from .simulation import SimulateRequest, simulate_projections  # heavy imports only when running

    try:
        if seed < 0:
            raise InputError(f"seed {seed} is negative", fix="give a seed >= 0, e.g. --seed 7")
        request = SimulateRequest(input_path=input, doses=parse_doses(doses), protocol=load_protocol(protocol),
                                  seed=seed, out_dir=out, series_uid=series, overwrite=overwrite)
        started = time.perf_counter()
        folder = _run_with_progress(simulate_projections, request, quiet)
    except DosebenchError as exc:
        _fail(exc)
        return
    if not quiet:
        err_console.print(f"projections in {folder} ({time.perf_counter() - started:.1f} s)")


@app.command("reconstruct")
def reconstruct_command(
    projections: Annotated[Path, typer.Option(help="line-integral projection store folder (a dose's line_integrals)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder: recon.nii.gz (HU) and recon.json")],
    fov_mm: Annotated[float | None, typer.Option(help="in-plane field of view, mm (default: the scan field)")] = None,
    matrix: Annotated[int | None, typer.Option(help="in-plane matrix (default 512)")] = None,
    thickness_mm: Annotated[float | None, typer.Option(help="slice thickness (FWHM of the profile), mm")] = None,
    increment_mm: Annotated[float | None, typer.Option(help="slice increment, mm")] = None,
    kernel: Annotated[str, typer.Option(help="ram-lak, shepp-logan, cosine or hann")] = "shepp-logan",
    backend: Annotated[str, typer.Option(help="auto (torch on CUDA, else numba), numba or torch")] = "auto",
    max_memory_mb: Annotated[int, typer.Option(help="bound on the backprojector's per-slab working set")] = 1024,
    overwrite: OverwriteOpt = False, quiet: QuietOpt = False) -> None:
    """Reconstruct a line-integral projection store (helical WFBP) to a HU NIfTI in the scanner frame (as RAS)."""
    from pydantic import ValidationError

    from .core.protocol import ReconstructionSettings
    from .reconstructor.store_io import reconstruct_store

    try:
        try:
            settings = ReconstructionSettings(kernel=kernel, fov_mm=fov_mm, matrix=matrix,
                                              slice_thickness_mm=thickness_mm, slice_increment_mm=increment_mm)
        except ValidationError as exc:
            raise InputError(f"invalid reconstruction settings: {str(exc).splitlines()[:3]}",
                             fix="see `dosebench reconstruct --help`") from exc
        if backend not in ("auto", "numba", "torch"):
            raise InputError(f"unknown backend {backend!r}", fix="use auto, numba or torch")
        started = time.perf_counter()
        target = reconstruct_store(str(projections), out, settings, backend=backend,  # type: ignore[arg-type]
                                   max_slab_bytes=max_memory_mb << 20, overwrite=overwrite)
    except DosebenchError as exc:
        _fail(exc)
        return
    if not quiet:
        err_console.print(f"reconstruction in {target} ({time.perf_counter() - started:.1f} s)")


# click options take one value each, so `--runs a b c` reads as `--runs a` plus the arguments b and c:
# the command takes run folders from any number of --runs options and from its arguments alike.
RunsOpt = Annotated[list[Path] | None, typer.Option(
    "--runs", show_default=False,
    help="run folders (outputs of `dosebench run`): `--runs a b c`, `--runs a --runs b`, or plain arguments")]
MoreRunsArg = Annotated[list[Path] | None, typer.Argument(
    metavar="RUN_DIR", show_default=False, help="more run folders (what follows --runs a)")]


@app.command()
def table(out: Annotated[Path, typer.Option("--out", "-o", help="Markdown table; its CSV goes beside it (.csv)")],
          runs: RunsOpt = None, more_runs: MoreRunsArg = None,
          quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no table on stdout")] = False) -> None:
    """Table 1 over several runs (one study each): median ± MAD over studies of each study's mean Dice."""
    from .segmenter.table import table_from_runs, write_table

    try:
        summary, doses, rows = table_from_runs([*(runs or []), *(more_runs or [])])
        markdown_path, csv_path = write_table(summary, doses, out, n_studies=len({row["study"] for row in rows}))
    except DosebenchError as exc:
        _fail(exc)
        return
    if not quiet:
        sys.stdout.write(markdown_path.read_text(encoding="utf-8"))
        err_console.print(f"table in {markdown_path} and {csv_path}")


from .segmenter.weights import weights_app  # noqa: E402  (the `dosebench weights ...` commands)

app.add_typer(weights_app, name="weights")

from .core.service_cli import beat_command, db_app, worker_command  # noqa: E402  (service commands)

app.add_typer(db_app, name="db")
app.command("worker")(worker_command)
app.command("beat")(beat_command)

from .api.commands import serve_command, submit_command, token_app  # noqa: E402  (the REST gateway)
from .core.cohort_cli import (  # noqa: E402  (cohorts, schedules, evaluation runs)
    cohort_app,
    evaluate_cohort_command,
    schedule_app,
    study_app,
)

app.command("serve")(serve_command)
app.command("submit")(submit_command)
app.add_typer(token_app, name="token")
app.add_typer(study_app, name="study")
app.add_typer(cohort_app, name="cohort")
app.add_typer(schedule_app, name="schedule")
app.command("evaluate-cohort")(evaluate_cohort_command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted: no partial output was kept")
        sys.exit(130)


if __name__ == "__main__":
    main()
