"""Study uploads: a multipart body parsed as it streams in, size-limited, validated, then stored.

The body is never held in memory and never spooled whole before the limit is checked: the parser
(python-multipart's streaming ``MultipartParser``) writes the file part, chunk by chunk, to a private
temporary file and stops at the first chunk past ``upload_limit_bytes`` (413). Only a file that loads as
a CT volume (:func:`dosebench.core.volume.load_volume`, which for zips applies the zip-slip and zip-bomb
guards of :mod:`dosebench.core.dicom`) is copied, in chunks, to the artifact store via fsspec: first to a
temporary key, then moved onto its final key. Whatever fails, the temporary file and any partial object
are deleted, so a refused upload stores nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from python_multipart.multipart import MultipartParser, parse_options_header

from ..core.errors import InputError
from ..core.volume import Volume, load_volume
from .problems import Problem

CHUNK_BYTES = 1024**2
KINDS = ("nifti", "dicom-zip", "dicom-ct-pd")


@dataclass
class ReceivedFile:
    """The uploaded file on local disk plus the form's other fields."""

    path: Path
    filename: str
    size: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)


def _suffix_of(filename: str) -> str:
    lower = filename.lower()
    for suffix in (".nii.gz", ".nii", ".zip"):
        if lower.endswith(suffix):
            return suffix
    return ""


async def receive_upload(content_type: str, stream: AsyncIterator[bytes], limit: int, workdir: Path,
                         content_length: int | None = None) -> ReceivedFile:
    """Parse a ``multipart/form-data`` body from ``stream``: the part ``file`` goes to ``workdir``."""
    if content_length is not None and content_length > limit + 64 * 1024:
        # far over the limit even allowing for the multipart framing: refuse before reading a byte
        raise Problem(413, f"the upload is {content_length} bytes; this server accepts at most {limit} bytes",
                      fix="upload a smaller study, or raise DOSEBENCH_UPLOAD_LIMIT_BYTES on the server")
    media, params = parse_options_header(content_type)
    if media != b"multipart/form-data" or b"boundary" not in params:
        raise Problem(415, f"expected a multipart/form-data body with a 'file' part, got {content_type or 'none'!r}",
                      fix="send the study as a form upload: curl -F file=@ct.nii.gz ...")
    state: dict[str, Any] = {"name": None, "filename": None, "headers": {}, "header_field": b"",
                             "header_value": b"", "buffer": bytearray(), "handle": None}
    fields: dict[str, str] = {}
    received: dict[str, Any] = {"size": 0, "hash": hashlib.sha256(), "path": None, "filename": None,
                                "parts": 0}

    def on_part_begin() -> None:
        state.update(name=None, filename=None, headers={}, buffer=bytearray(), handle=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header_field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header_value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["header_field"].decode("latin-1").lower()] = state["header_value"]
        state["header_field"], state["header_value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(state["headers"].get("content-disposition", b""))
        state["name"] = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        if filename is not None:
            if state["name"] != "file" or received["path"] is not None:
                raise Problem(422, "send exactly one file, in the form field 'file'",
                              fix="curl -F file=@ct.nii.gz ...")
            name = os.path.basename(filename.decode("utf-8", "replace").replace("\\", "/"))
            suffix = _suffix_of(name)
            path = workdir / f"upload{suffix}"
            received.update(path=path, filename=name)
            state["handle"] = path.open("wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if state["handle"] is not None:
            received["size"] += len(chunk)
            if received["size"] > limit:
                raise Problem(413, f"the upload exceeds this server's limit of {limit} bytes",
                              fix="upload a smaller study, or raise DOSEBENCH_UPLOAD_LIMIT_BYTES on the server")
            received["hash"].update(chunk)
            state["handle"].write(chunk)
        else:
            state["buffer"] += chunk
            if len(state["buffer"]) > 64 * 1024:
                raise Problem(422, f"form field {state['name']!r} is too long", fix="send short text fields")

    def on_part_end() -> None:
        if state["handle"] is not None:
            state["handle"].close()
            state["handle"] = None
        elif state["name"]:
            fields[state["name"]] = bytes(state["buffer"]).decode("utf-8", "replace")

    parser = MultipartParser(params[b"boundary"], callbacks={
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        async for chunk in stream:
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except Problem:
        raise
    except Exception as exc:  # the parser's own errors: a malformed body
        raise Problem(400, f"malformed multipart body ({exc})",
                      fix="send a standard multipart/form-data upload") from exc
    finally:
        if state["handle"] is not None:
            state["handle"].close()
    if received["path"] is None:
        raise Problem(422, "the form has no file part named 'file'", fix="curl -F file=@ct.nii.gz ...")
    return ReceivedFile(path=received["path"], filename=received["filename"], size=received["size"],
                        sha256=received["hash"].hexdigest(), fields=fields)


def detect_kind(upload: ReceivedFile) -> str:
    """``nifti`` or ``dicom-zip`` from the declared ``kind`` field and the file name; 415 otherwise."""
    declared = upload.fields.get("kind", "").strip().lower() or None
    if declared is not None and declared not in KINDS:
        raise Problem(422, f"unknown kind {declared!r}", fix=f"use one of {', '.join(KINDS)} (or leave it out)")
    if declared == "dicom-ct-pd":
        raise Problem(415, "DICOM-CT-PD projection data is not supported yet: this version of dosebench has no "
                           "DICOM-CT-PD reader, so raw projections cannot be uploaded",
                      fix="upload the reconstructed CT instead (NIfTI, or the DICOM image series as a .zip)")
    suffix = _suffix_of(upload.filename)
    if suffix in (".nii", ".nii.gz"):
        kind = "nifti"
    elif suffix == ".zip":
        kind = "dicom-zip"
    else:
        raise Problem(415, f"cannot tell the format of {upload.filename!r}",
                      fix="upload a NIfTI file (.nii or .nii.gz) or a DICOM series zipped (.zip)")
    if declared is not None and declared != kind:
        raise Problem(422, f"the file {upload.filename!r} looks like {kind}, not {declared}",
                      fix="correct the kind field or the file name")
    return kind


def validate_volume(upload: ReceivedFile) -> Volume:
    """Load the upload as a CT volume (InputError -> 422 via the handlers)."""
    series_uid = upload.fields.get("series_uid", "").strip() or None
    try:
        return load_volume(upload.path, series_uid)
    except InputError as exc:
        if upload.path.suffix == ".zip" and _holds_dicom_ct_pd(upload.path):
            raise Problem(415, f"{upload.filename} holds DICOM-CT-PD raw projections, which cannot be uploaded "
                               "yet: jobs start from a reconstructed CT volume",
                          fix="upload the reconstructed CT instead (NIfTI, or its DICOM image series as a .zip), "
                              "or run `dosebench run` locally on the projections") from exc
        # the message names our private temporary path: name the user's file instead
        problem = exc.problem.replace(str(upload.path), upload.filename).replace(upload.path.name, upload.filename)
        raise InputError(problem, fix=exc.fix) from exc


def _holds_dicom_ct_pd(path: Path) -> bool:
    """Whether a zip (extracted with the zip-slip and bomb guards) holds a DICOM-CT-PD folder."""
    try:
        from ..core.dicom import _dicom_root
        from ..simulator.dicom_ct_pd import is_dicom_ct_pd
    except ImportError:
        return False
    try:
        with _dicom_root(path) as root:
            folders = [root, *(p for p in root.iterdir() if p.is_dir())]
            folders += [q for p in folders[1:] for q in p.iterdir() if q.is_dir()]
            return any(is_dicom_ct_pd(folder) for folder in folders[:50])
    except Exception:  # noqa: BLE001 - an unsafe or broken zip: the original error stands
        return False


def header_summary(volume: Volume, kind: str, upload: ReceivedFile) -> dict[str, Any]:
    """What the API tells about a study: geometry and HU statistics, nothing identifying the patient
    (no names, dates, UIDs or the original file name)."""
    from nibabel.orientations import aff2axcodes

    hu = volume.hu
    return {
        "format": kind,
        "bytes": upload.size,
        "sha256": upload.sha256,
        "shape": [int(s) for s in volume.source_shape],
        "spacing_mm": [round(s, 6) for s in volume.spacing_mm],
        "orientation": "".join(aff2axcodes(volume.source_affine)),
        "hu_min": float(np.min(hu)),
        "hu_max": float(np.max(hu)),
        "hu_mean": round(float(np.mean(hu)), 3),
    }


def nifti_of(volume: Volume, workdir: Path) -> Path:
    """The volume as a fresh NIfTI (its own orientation and affine; int16 when the HU are integers)."""
    hu = volume.hu
    integral = bool(np.array_equal(np.rint(hu), hu)) and float(hu.min()) >= -32768 and float(hu.max()) <= 32767
    path = workdir / "converted.nii.gz"
    volume.save_nifti(hu, path, dtype=np.int16 if integral else np.float32)
    return path


def store_object(local: Path, url: str) -> None:
    """Copy ``local`` to ``url`` in chunks: via a temporary key, moved onto ``url`` when complete."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = fs._parent(path)
    fs.makedirs(parent, exist_ok=True)
    temporary = f"{parent}/.partial-{uuid.uuid4().hex}"
    try:
        with local.open("rb") as src, fs.open(temporary, "wb") as dst:
            while chunk := src.read(CHUNK_BYTES):
                dst.write(chunk)
        fs.mv(temporary, path)
    except BaseException:
        delete_object(temporary, fs)
        raise


def delete_object(url_or_path: str, fs: Any = None) -> None:
    """Remove an object (or a folder of them) if it exists; never raises."""
    try:
        if fs is None:
            fs, url_or_path = fsspec.core.url_to_fs(url_or_path)
        if fs.exists(url_or_path):
            fs.rm(url_or_path, recursive=True)
    except Exception:  # noqa: BLE001 - best-effort cleanup
        pass


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="dosebench-upload-")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
