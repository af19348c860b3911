"""LocalStore: a store in a local directory (the embedded default).

Layout::

    STORE/config.json                      store settings (address algorithm, pack size...)
    STORE/lock                             flock: shared by runs and readers, exclusive by prune
    STORE/packs/<id[:2]>/<id>.pack         sealed packs (immutable)
    STORE/runs/<server_id>/<run_id>.manifest   one per completed run
    STORE/tmp/                             packs and manifests being written

Packs and manifests are written in ``tmp/``, fsynced, then renamed into place (and the
folder fsynced): a rename is the local form of an atomic, immutable put.  Anything left in
``tmp/`` by a killed process is a leftover for prune.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import uuid

from ..errors import RunNotFoundError, StoreError, StoreLockedError
from ..fsutil import fsync_dir, remove_file
from ..pack import is_pack_id
from .base import RUN_ID_RE, SERVER_ID_RE, Store, check_run_id, check_server_id, no_store_error

MANIFEST_SUFFIX = ".manifest"


class LocalStore(Store):
    """A store in the directory ``root`` (created by :meth:`initialise`)."""

    def __init__(self, root):
        super().__init__()
        self.root = os.path.abspath(os.fspath(root))
        self.url = self.root

    def __repr__(self) -> str:
        return f"<LocalStore {self.root!r}>"

    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    # -- creation and config -------------------------------------------------
    def exists(self) -> bool:
        return os.path.isfile(self._p("config.json"))

    def _read_config(self) -> bytes:
        try:
            with open(self._p("config.json"), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise no_store_error(self.root) from None
        except OSError as e:
            raise StoreError(f"{self.root}: cannot read config.json: {e.strerror}") from None

    def _create(self, config_bytes: bytes) -> None:
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise StoreError(f"{self.root}: exists and is not a directory")
        try:
            for sub in ("packs", "runs", "tmp"):
                os.makedirs(self._p(sub), exist_ok=True)
            if self.exists():
                return
            if any(n not in ("packs", "runs", "tmp", "lock") for n in os.listdir(self.root)):
                raise StoreError(f"{self.root}: directory is not empty and not a smsblock store")
            tmp = self._p("tmp", f"config-{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(config_bytes)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self._p("config.json"))   # never replaces a racing creator's config
            except FileExistsError:
                pass
            os.unlink(tmp)
            fsync_dir(self.root)
        except OSError as e:
            raise StoreError(f"{self.root}: cannot create store: {e.strerror}") from None

    # -- lock ---------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, exclusive: bool, purpose: str):
        try:
            os.makedirs(self.root, exist_ok=True)      # a first replicate locks before creating
            fd = os.open(self._p("lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreError(f"{self.root}: cannot open lock file: {e.strerror}") from None
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    other = "a run or reader is using it" if exclusive else "prune is running"
                    raise StoreLockedError(f"{self.root}: store is locked, {other}; cannot {purpose} now") from None
                raise
            yield
        finally:
            os.close(fd)   # releases the flock

    # -- packs ----------------------------------------------------------------------
    def _pack_path(self, pack_id: str) -> str:
        return self._p("packs", pack_id[:2], pack_id + ".pack")

    def pack_name(self, pack_id: str) -> str:
        return self._pack_path(pack_id)

    def staging_path(self, suffix: str) -> str:
        os.makedirs(self._p("tmp"), exist_ok=True)
        return self._p("tmp", f"{uuid.uuid4().hex}{suffix}")

    def put_pack(self, pack_id: str, staged_path: str) -> None:
        dest = self._pack_path(pack_id)
        folder = os.path.dirname(dest)
        try:
            os.makedirs(folder, exist_ok=True)
            os.replace(staged_path, dest)
            fsync_dir(folder)
        except OSError as e:
            raise StoreError(f"{dest}: cannot store pack: {e.strerror}") from None

    def list_packs(self) -> dict[str, int]:
        out = {}
        base = self._p("packs")
        try:
            subdirs = os.listdir(base)
        except FileNotFoundError:
            return out
        for sub in subdirs:
            try:
                entries = list(os.scandir(os.path.join(base, sub)))
            except (NotADirectoryError, FileNotFoundError):
                continue
            for e in entries:
                name = e.name
                if name.endswith(".pack") and is_pack_id(name[:-5]) and name.startswith(sub):
                    try:
                        out[name[:-5]] = e.stat().st_size
                    except FileNotFoundError:
                        continue
        return out

    def read_pack(self, pack_id: str, offset: int, length: int) -> bytes:
        path = self._pack_path(pack_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise StoreError(f"{path}: pack is missing") from None
        except OSError as e:
            raise StoreError(f"{path}: cannot open pack: {e.strerror}") from None
        try:
            out = bytearray()
            while len(out) < length:
                chunk = os.pread(fd, length - len(out), offset + len(out))
                if not chunk:
                    break
                out += chunk
            return bytes(out)
        except OSError as e:
            raise StoreError(f"{path}: offset {offset}: read failed: {e.strerror}") from None
        finally:
            os.close(fd)

    def delete_pack(self, pack_id: str) -> None:
        self.forget_pack(pack_id)
        try:
            os.unlink(self._pack_path(pack_id))
        except FileNotFoundError:
            pass

    # -- manifests ----------------------------------------------------------------
    def _manifest_path(self, server_id: str, run_id: str) -> str:
        return self._p("runs", check_server_id(server_id), check_run_id(run_id) + MANIFEST_SUFFIX)

    def list_servers(self) -> list[str]:
        try:
            names = os.listdir(self._p("runs"))
        except FileNotFoundError:
            return []
        # other names (.DS_Store, lost+found...) are not servers: skipped, not an error
        return sorted(n for n in names if SERVER_ID_RE.match(n) and self.list_run_ids(n))

    def list_run_ids(self, server_id: str) -> list[str]:
        try:
            names = os.listdir(self._p("runs", check_server_id(server_id)))
        except FileNotFoundError:
            return []
        ids = (n[:-len(MANIFEST_SUFFIX)] for n in names if n.endswith(MANIFEST_SUFFIX))
        return sorted(i for i in ids if RUN_ID_RE.match(i))

    def get_manifest_bytes(self, server_id: str, run_id: str) -> bytes:
        path = self._manifest_path(server_id, run_id)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise RunNotFoundError(f"{self.root}: no run {run_id!r} of server {server_id!r}") from None
        except OSError as e:
            raise StoreError(f"{path}: cannot read manifest: {e.strerror}") from None

    def put_manifest_bytes(self, server_id: str, run_id: str, data: bytes) -> None:
        path = self._manifest_path(server_id, run_id)
        folder = os.path.dirname(path)
        tmp = self.staging_path(".manifest.tmp")
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(folder)
        except OSError as e:
            raise StoreError(f"{path}: cannot write manifest: {e.strerror}") from None

    def delete_manifest(self, server_id: str, run_id: str) -> None:
        try:
            os.unlink(self._manifest_path(server_id, run_id))
        except FileNotFoundError:
            pass

    # -- leftovers --------------------------------------------------------------------
    def holds_path(self, path) -> bool:
        root, target = os.path.realpath(self.root), os.path.realpath(path)
        return os.path.commonpath([root, target]) == root

    def list_leftovers(self) -> list[str]:
        try:
            return sorted(os.listdir(self._p("tmp")))
        except FileNotFoundError:
            return []

    def remove_leftover(self, name: str) -> int:
        return remove_file(self._p("tmp", os.path.basename(name)))
