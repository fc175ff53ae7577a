"""Where jobs write: the one atomic file writer, and a job's output folder as a local directory or a URI
(`s3://bucket/runs/voc`, `gs://...`, anything pyarrow's `FileSystem.from_uri` opens), which is also Ray Train's
`storage_path` + `name`.

On a multi-node cluster an output folder must be storage every node reaches (S3, GCS, NFS): Ray Train's workers upload
their checkpoints into it, and the batch stages' actors write their per-image files into it, from any node. A local
file is written under a temporary name and renamed; an object store publishes an upload whole. Either way a reader
never sees a partial file, and a killed job leaves none behind that a rerun would take for finished.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from acr.errors import StorageError

# Ray Train V2's record of the run's checkpoints, in the run folder (ray.train.v2._internal.constants).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"

Writer = Callable[[BinaryIO], None]


def write_atomically(path: str | Path, data: bytes | Writer) -> Path:
    """Write a local file under a temporary name beside it and rename it into place. `data`: the bytes, or a function
    that writes them to the open file (torch.save, pyarrow.parquet.write_table)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data) if isinstance(data, (bytes, bytearray)) else data(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


@contextlib.contextmanager
def local_file(location: str | Path) -> Iterator[Path | None]:
    """A file named by a local path or a URI, as a local path for the block (a URI's file is downloaded into a
    temporary folder under its own name, so that its suffix still tells its format); None if there is no such file."""
    if not is_uri(location):
        path = Path(location).expanduser()
        yield path if path.is_file() else None
        return
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
        with fs.open_input_file(path) as f:
            data = f.read()
    except (FileNotFoundError, OSError, ValueError):
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / posixpath.basename(path)
        local.write_bytes(data)
        yield local


class RunFolder:
    """A job's output folder: `fs` (a pyarrow filesystem) and `path` on it. `parent`/`name` are what Ray Train's
    RunConfig takes (storage_path on `fs`, the run's name). Names given to its methods are relative to the folder
    ("summary.json", "masks/x.png")."""

    def __init__(self, location: str | Path):
        location = str(location)
        if is_uri(location):
            try:
                self.fs, path = pafs.FileSystem.from_uri(location)
            except (ValueError, OSError) as exc:
                raise StorageError(f"output folder {location}: {exc}") from exc
            parts = urlsplit(location)
            self.uri_prefix = f"{parts.scheme}://" if parts.scheme != "file" else ""
        else:
            self.fs, path = pafs.LocalFileSystem(), Path(location).expanduser().resolve().as_posix()
            self.uri_prefix = ""
        self.location = location
        self.path = path.rstrip("/") or "/"
        self.parent, self.name = posixpath.split(self.path)
        if not self.name or not self.parent:
            raise StorageError(f"output folder {location}: needs a folder under the bucket or root, e.g. "
                               "s3://my-bucket/runs/voc")

    @classmethod
    def of(cls, location: "str | Path | RunFolder") -> "RunFolder":
        """`location` as a RunFolder (itself if it is one)."""
        return location if isinstance(location, RunFolder) else cls(location)

    def __reduce__(self):  # sent to Ray actors by location (a pyarrow filesystem is rebuilt there); a local folder
        return (RunFolder, (self.location if is_uri(self.location) else self.path,))  # by its absolute path

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def local_path(self) -> Path:
        """The folder as a local Path (only for a local folder)."""
        if not self.is_local:
            raise StorageError(f"{self.location} is not a local folder")
        return Path(self.path)

    def sub(self, name: str) -> "RunFolder":
        """A folder inside this one (a stage's own folder), on the same storage (a URI keeps its query, e.g. an
        endpoint)."""
        if not is_uri(self.location):
            return RunFolder(f"{self.path}/{name}")
        parts = urlsplit(self.location)
        return RunFolder(urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}")))

    def uri(self, name: str = "", fs_path: str | None = None) -> str:
        """How to name a file of the folder (or any path on its filesystem) to the user: a local path or a URI."""
        p = fs_path if fs_path is not None else (f"{self.path}/{name}" if name else self.path)
        return f"{self.uri_prefix}{p}"

    def location_of(self, fs_path: str) -> str:
        """A path on the folder's filesystem as a location to open again: a local path, or a URI that keeps the
        folder's query (an endpoint, a region)."""
        query = urlsplit(self.location).query if is_uri(self.location) else ""
        return self.uri(fs_path=fs_path) + (f"?{query}" if query else "")

    def makedirs(self, name: str = "") -> None:
        try:
            self.fs.create_dir(f"{self.path}/{name}" if name else self.path, recursive=True)
        except OSError as exc:  # a bucket that does not exist or cannot be reached, no permission
            raise StorageError(f"output folder {self.uri(name)}: cannot create it ({exc})") from exc

    def write_bytes(self, name: str, data: bytes | Writer) -> None:
        """Write a file of the folder atomically (see the module docstring)."""
        if self.is_local:
            write_atomically(f"{self.path}/{name}", data)
            return
        buf = data if isinstance(data, (bytes, bytearray)) else _to_bytes(data)
        try:
            with self.fs.open_output_stream(f"{self.path}/{name}") as f:
                f.write(buf)
        except OSError as exc:
            raise StorageError(f"{self.uri(name)}: cannot write it ({exc})") from exc

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=1))

    def put_file(self, local: Path, name: str) -> None:
        self.write_bytes(name, Path(local).read_bytes())

    def put_tree(self, local: Path, name: str, last: str | None = None) -> None:
        """Copy the local folder `local` into the folder's `name`; the file `last` (a manifest) is written after
        every other one, so that a copy cut short is never taken for a complete one."""
        local = Path(local)
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != last)
        for p in files + ([local / last] if last and (local / last).is_file() else []):
            rel = p.relative_to(local).as_posix()
            self.put_file(p, f"{name}/{rel}" if name else rel)

    def save(self, name: str, make: Callable[[Path], None]) -> None:
        """A file made by `make(path)` (a picture), written into the folder under `name`."""
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(name).name
            make(local)
            if local.is_file():
                self.put_file(local, name)

    def read_bytes(self, name: str, fs_path: str | None = None) -> bytes | None:
        """A file of the folder (or a path on its filesystem), None if absent."""
        try:
            with self.fs.open_input_file(fs_path or f"{self.path}/{name}") as f:  # one sized read (an input
                return f.read()                                                 # stream reads S3 in small pieces)
        except (FileNotFoundError, OSError):
            return None

    def read_text(self, name: str, fs_path: str | None = None) -> str | None:
        data = self.read_bytes(name, fs_path)
        return None if data is None else data.decode()

    def read_json(self, name: str):
        """A JSON file of the folder, None if absent or cut short (a file being written is not yet there)."""
        text = self.read_text(name)
        try:
            return None if text is None else json.loads(text)
        except ValueError:
            return None

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{name}").type == pafs.FileType.File

    def names(self, subdir: str = "") -> set[str]:
        """The names of the files in a sub-folder (one listing, also on an object store); empty if it is absent."""
        try:
            base = f"{self.path}/{subdir}" if subdir else self.path
            infos = self.fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
        except OSError:
            return set()
        return {i.base_name for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".")}

    def delete_dir(self, subdir: str) -> None:
        try:
            self.fs.delete_dir(f"{self.path}/{subdir}")
        except (FileNotFoundError, OSError):
            pass

    def latest_checkpoint(self) -> str | None:
        """The checkpoint Ray Train resumes from when the run is restarted in this folder: the latest one recorded
        in Ray's checkpoint manager snapshot (a checkpoint folder without an entry there, e.g. an upload cut short,
        is never resumed from). None if the run has no recorded checkpoint."""
        text = self.read_text(RAY_SNAPSHOT)
        if not text:
            return None
        try:
            latest = json.loads(text).get("latest_checkpoint_result") or {}
        except (ValueError, AttributeError) as exc:
            raise StorageError(f"{self.uri(RAY_SNAPSHOT)} is not valid JSON ({exc}); remove the run folder or "
                               "choose another --output-dir") from exc
        name = latest.get("checkpoint_dir_name")
        return f"{self.path}/{name}" if name else None


def _to_bytes(writer: Writer) -> bytes:
    buf = io.BytesIO()
    writer(buf)
    return buf.getvalue()
