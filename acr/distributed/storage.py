"""A training run's output folder: a local directory or a URI (`s3://bucket/runs/voc`, `gs://...`, anything
pyarrow's `FileSystem.from_uri` opens), which is also Ray Train's `storage_path` + `name`.

On a multi-node cluster the run folder must be storage every node reaches (S3, GCS, NFS): the workers upload their
checkpoints into it directly. The driver writes the run's own files there too (config.yaml, summary.json,
history.json, the pictures), so nothing of a cloud run stays only on the head node.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

# Ray Train V2's record of the run's checkpoints, in the run folder (ray.train.v2._internal.constants).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


class RunFolder:
    """Where a run writes: `fs` (a pyarrow filesystem) and `path` on it. `parent`/`name` are what Ray Train's
    RunConfig takes (storage_path on `fs`, the run's name)."""

    def __init__(self, location: str | Path):
        location = str(location)
        if is_uri(location):
            try:
                self.fs, path = pafs.FileSystem.from_uri(location)
            except (ValueError, OSError) as exc:
                raise ValueError(f"output folder {location}: {exc}") from exc
            parts = urlsplit(location)
            self.uri_prefix = f"{parts.scheme}://" if parts.scheme != "file" else ""
        else:
            self.fs, path = pafs.LocalFileSystem(), Path(location).expanduser().resolve().as_posix()
            self.uri_prefix = ""
        self.location = location
        self.path = path.rstrip("/") or "/"
        self.parent, self.name = posixpath.split(self.path)
        if not self.name or not self.parent:
            raise ValueError(f"output folder {location}: needs a folder under the bucket or root, e.g. "
                             "s3://my-bucket/runs/voc")

    @classmethod
    def of(cls, location: "str | Path | RunFolder") -> "RunFolder":
        """`location` as a RunFolder (itself if it is one)."""
        return location if isinstance(location, RunFolder) else cls(location)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def local_path(self) -> Path:
        """The folder as a local Path (only for a local folder)."""
        if not self.is_local:
            raise ValueError(f"{self.location} is not a local folder")
        return Path(self.path)

    def uri(self, name: str = "", fs_path: str | None = None) -> str:
        """How to name a file of the run (or any path on its filesystem) to the user: a local path or a URI."""
        p = fs_path if fs_path is not None else (f"{self.path}/{name}" if name else self.path)
        return f"{self.uri_prefix}{p}"

    def makedirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a file of the run; a local file is written under a temporary name and renamed (object stores
        publish an upload whole)."""
        target = f"{self.path}/{name}"
        tmp = target if not self.is_local else f"{self.path}/.{name}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        if tmp != target:
            self.fs.move(tmp, target)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def put_file(self, local: Path, name: str) -> None:
        self.write_bytes(name, Path(local).read_bytes())

    def read_text(self, name: str, fs_path: str | None = None) -> str | None:
        """A file of the run (or a path on its filesystem), None if absent."""
        p = fs_path or f"{self.path}/{name}"
        try:
            with self.fs.open_input_file(p) as f:  # one sized read (an input stream reads S3 in small pieces)
                return f.read().decode()
        except (FileNotFoundError, OSError):
            return None

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
            raise ValueError(f"{self.uri(RAY_SNAPSHOT)} is not valid JSON ({exc}); remove the run folder or choose "
                             "another --output-dir") from exc
        name = latest.get("checkpoint_dir_name")
        return f"{self.path}/{name}" if name else None
