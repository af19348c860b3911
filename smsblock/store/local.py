"""LocalStore: a store in a local directory (the embedded default).

Layout::

    STORE/config.json                      store settings (address algorithm, pack size...)
    STORE/lock                             flock: shared by runs and readers, exclusive by prune
    STORE/packs/<id[:2]>/<id>.pack         sealed packs (immutable)
    STORE/runs/<server_id>/<run_id>.manifest   one per completed run
    STORE/damaged/<pack_id>.json           damage records (what verify found damaged)
    STORE/tmp/                             packs and manifests being written

Packs and manifests are written in ``tmp/``, fsynced, then renamed into place (and the
folder fsynced): a rename is the local form of an atomic, immutable put.  Anything left in
``tmp/`` by a killed process is a leftover for prune.

Everything is created owner-only (files 0600, folders 0700), new files with ``O_EXCL``,
and every folder below the root is opened without following links and used through its
descriptor (see :mod:`smsblock.fsutil`): a link planted at ``tmp``, ``packs``,
``runs/SERVER`` or ``lock`` is refused with a StoreError, never written or deleted through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import uuid

from ..errors import RunNotFoundError, StoreError, StoreLockedError
from ..fsutil import (fsync_dir, make_root, open_lock_file, open_subdir, remove_file, replace_file,
                      subdir, write_new_file)
from ..pack import is_pack_id
from .base import RUN_ID_RE, SERVER_ID_RE, Store, check_run_id, check_server_id, no_store_error

MANIFEST_SUFFIX = ".manifest"
log = logging.getLogger(__name__)


def _where(e: OSError, default: str) -> str:
    """The path an error is about: the link or folder a helper named, else ``default``."""
    return e.filename if isinstance(e.filename, str) and os.path.isabs(e.filename) else default


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
            make_root(self.root)
            for sub in ("packs", "runs", "tmp"):
                os.close(open_subdir(self.root, sub, create=True))
            if self.exists():
                return
            if any(n not in ("packs", "runs", "tmp", "lock") for n in os.listdir(self.root)) \
                    and not self.exists():          # not a racing creator's store
                raise StoreError(f"{self.root}: directory is not empty and not a smsblock store")
            name = f"config-{uuid.uuid4().hex}.tmp"
            with subdir(self.root) as root_fd, subdir(self.root, "tmp") as tmp_fd:
                write_new_file(name, config_bytes, dir_fd=tmp_fd)
                try:    # a link never replaces a racing creator's config
                    os.link(name, "config.json", src_dir_fd=tmp_fd, dst_dir_fd=root_fd,
                            follow_symlinks=False)
                except FileExistsError:
                    pass
                os.unlink(name, dir_fd=tmp_fd)
                fsync_dir(root_fd)
        except OSError as e:
            raise StoreError(f"{_where(e, self.root)}: cannot create store: {e.strerror}") from None

    # -- lock ---------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, exclusive: bool, purpose: str):
        try:
            make_root(self.root)      # a first replicate locks before creating
            with subdir(self.root) as root_fd:
                fd = open_lock_file("lock", dir_fd=root_fd)
        except OSError as e:
            raise StoreError(f"{self._p('lock')}: cannot open lock file: {e.strerror}") from None
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
        if not is_pack_id(pack_id):     # it becomes a file name: never a path
            raise StoreError(f"{self.root}: {pack_id!r} is not a pack id (64 hex digits)")
        return self._p("packs", pack_id[:2], pack_id + ".pack")

    def pack_name(self, pack_id: str) -> str:
        return self._pack_path(pack_id)

    def staging_path(self, suffix: str) -> str:
        # the folder is checked (no link) and made here; the file itself is created with
        # O_EXCL | O_NOFOLLOW by whoever writes it (PackWriter)
        try:
            os.close(open_subdir(self.root, "tmp", create=True))
        except OSError as e:
            raise StoreError(f"{self._p('tmp')}: cannot stage: {e.strerror}") from None
        return self._p("tmp", f"{uuid.uuid4().hex}{suffix}")

    def _staged_name(self, staged_path: str) -> str:
        if os.path.dirname(os.path.abspath(staged_path)) != self._p("tmp"):
            raise StoreError(f"{staged_path}: not a file staged in {self._p('tmp')}")
        return os.path.basename(staged_path)

    def put_pack(self, pack_id: str, staged_path: str) -> None:
        dest = self._pack_path(pack_id)
        name = self._staged_name(staged_path)
        try:
            with subdir(self.root, "tmp") as tmp_fd, \
                    subdir(self.root, "packs", pack_id[:2], create=True) as folder_fd:
                # renameat replaces a name, never writes through a link that was there
                os.replace(name, pack_id + ".pack", src_dir_fd=tmp_fd, dst_dir_fd=folder_fd)
                fsync_dir(folder_fd)
        except OSError as e:
            raise StoreError(f"{_where(e, dest)}: cannot store pack: {e.strerror}") from None

    def list_packs(self) -> dict[str, int]:
        out = {}
        try:
            packs_fd = open_subdir(self.root, "packs")
        except FileNotFoundError:
            return out
        except OSError as e:
            raise StoreError(f"{self._p('packs')}: cannot list packs: {e.strerror}") from None
        try:
            for sub in os.listdir(packs_fd):
                try:
                    sub_fd = open_subdir(self.root, "packs", sub)
                except (NotADirectoryError, FileNotFoundError):
                    continue
                except OSError as e:    # a link: its packs are not this store's
                    log.warning("%s: %s; its packs are left out", self._p("packs", sub), e.strerror)
                    continue
                try:
                    with os.scandir(sub_fd) as entries:
                        for e in entries:
                            name = e.name
                            if (name.endswith(".pack") and is_pack_id(name[:-5])
                                    and name.startswith(sub) and not e.is_symlink()):
                                try:
                                    out[name[:-5]] = e.stat(follow_symlinks=False).st_size
                                except FileNotFoundError:
                                    continue
                finally:
                    os.close(sub_fd)
        finally:
            os.close(packs_fd)
        return out

    def read_pack(self, pack_id: str, offset: int, length: int) -> bytes:
        path = self._pack_path(pack_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
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
        path = self._pack_path(pack_id)
        self.forget_pack(pack_id)
        try:
            with subdir(self.root, "packs", pack_id[:2]) as folder_fd:
                remove_file(pack_id + ".pack", dir_fd=folder_fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"{_where(e, path)}: cannot delete pack: {e.strerror}") from None

    # -- manifests ----------------------------------------------------------------
    def _manifest_path(self, server_id: str, run_id: str) -> str:
        return self._p("runs", check_server_id(server_id), check_run_id(run_id) + MANIFEST_SUFFIX)

    def list_servers(self) -> list[str]:
        try:
            with subdir(self.root, "runs") as runs_fd:
                names = os.listdir(runs_fd)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"{self._p('runs')}: cannot list servers: {e.strerror}") from None
        out = []
        # other names (.DS_Store, lost+found...) are not servers: skipped, not an error
        for n in sorted(n for n in names if SERVER_ID_RE.fullmatch(n)):
            try:
                if self.list_run_ids(n):
                    out.append(n)
            except StoreError as e:     # a link at runs/SERVER: not this store's runs
                log.warning("%s (left out)", e)
        return out

    def list_run_ids(self, server_id: str) -> list[str]:
        try:
            with subdir(self.root, "runs", check_server_id(server_id)) as folder_fd:
                names = os.listdir(folder_fd)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"{self._p('runs', server_id)}: cannot list runs: {e.strerror}") from None
        ids = (n[:-len(MANIFEST_SUFFIX)] for n in names if n.endswith(MANIFEST_SUFFIX))
        return sorted(i for i in ids if RUN_ID_RE.fullmatch(i))

    def get_manifest_bytes(self, server_id: str, run_id: str) -> bytes:
        path = self._manifest_path(server_id, run_id)
        try:
            with subdir(self.root, "runs", server_id) as folder_fd, \
                    open(os.path.basename(path), "rb",
                         opener=lambda n, fl: os.open(n, fl | os.O_NOFOLLOW, dir_fd=folder_fd)) as f:
                return f.read()
        except FileNotFoundError:
            raise RunNotFoundError(f"{self.root}: no run {run_id!r} of server {server_id!r}") from None
        except OSError as e:
            raise StoreError(f"{path}: cannot read manifest: {e.strerror}") from None

    def put_manifest_bytes(self, server_id: str, run_id: str, data: bytes) -> None:
        path = self._manifest_path(server_id, run_id)
        try:
            with subdir(self.root, "tmp", create=True) as tmp_fd, \
                    subdir(self.root, "runs", server_id, create=True) as folder_fd:
                replace_file(os.path.basename(path), data, dir_fd=folder_fd, tmp_dir_fd=tmp_fd)
        except OSError as e:
            raise StoreError(f"{_where(e, path)}: cannot write manifest: {e.strerror}") from None

    def put_manifest_file(self, server_id: str, run_id: str, staged_path: str) -> None:
        path = self._manifest_path(server_id, run_id)
        name = self._staged_name(staged_path)
        try:
            with subdir(self.root, "tmp") as tmp_fd, \
                    subdir(self.root, "runs", server_id, create=True) as folder_fd:
                # renameat replaces a name, never writes through a link that was there
                os.replace(name, os.path.basename(path), src_dir_fd=tmp_fd, dst_dir_fd=folder_fd)
                fsync_dir(folder_fd)
        except OSError as e:
            raise StoreError(f"{_where(e, path)}: cannot write manifest: {e.strerror}") from None

    def _manifest_source(self, server_id: str, run_id: str):
        path = self._manifest_path(server_id, run_id)
        try:
            with subdir(self.root, "runs", server_id) as folder_fd:
                return os.open(os.path.basename(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=folder_fd)
        except FileNotFoundError:
            raise RunNotFoundError(f"{self.root}: no run {run_id!r} of server {server_id!r}") from None
        except OSError as e:
            raise StoreError(f"{path}: cannot read manifest: {e.strerror}") from None

    def delete_manifest(self, server_id: str, run_id: str) -> None:
        path = self._manifest_path(server_id, run_id)
        try:
            with subdir(self.root, "runs", server_id) as folder_fd:
                remove_file(os.path.basename(path), dir_fd=folder_fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"{path}: cannot delete manifest: {e.strerror}") from None

    # -- damage records ---------------------------------------------------------------
    def _damage_path(self, pack_id: str) -> str:
        if not is_pack_id(pack_id):
            raise StoreError(f"{self.root}: {pack_id!r} is not a pack id")
        return self._p("damaged", pack_id + ".json")

    def put_damage_record(self, pack_id: str, data: bytes) -> None:
        path = self._damage_path(pack_id)
        try:
            # a 0700 folder of the store, never a link; a new 0600 file renamed into place
            with subdir(self.root, "tmp", create=True) as tmp_fd, \
                    subdir(self.root, "damaged", create=True) as folder_fd:
                replace_file(os.path.basename(path), data, dir_fd=folder_fd, tmp_dir_fd=tmp_fd)
        except OSError as e:
            raise StoreError(f"{path}: cannot write damage record: {e.strerror}") from None

    def list_damage_records(self) -> dict[str, bytes]:
        out = {}
        try:
            with subdir(self.root, "damaged") as folder_fd:      # never through a link
                for n in os.listdir(folder_fd):
                    if not (n.endswith(".json") and is_pack_id(n[:-5])):
                        continue
                    try:
                        fd = os.open(n, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=folder_fd)
                    except FileNotFoundError:
                        continue
                    with os.fdopen(fd, "rb") as f:
                        out[n[:-5]] = f.read(1 << 20)
        except FileNotFoundError:
            return out
        except OSError as e:
            raise StoreError(f"{_where(e, self._p('damaged'))}: cannot read damage records: "
                             f"{e.strerror}") from None
        return out

    def delete_damage_record(self, pack_id: str) -> None:
        path = self._damage_path(pack_id)
        try:
            with subdir(self.root, "damaged") as folder_fd:
                remove_file(os.path.basename(path), dir_fd=folder_fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"{_where(e, path)}: cannot delete damage record: {e.strerror}") from None

    # -- leftovers --------------------------------------------------------------------
    def holds_path(self, path) -> bool:
        root, target = os.path.realpath(self.root), os.path.realpath(path)
        return os.path.commonpath([root, target]) == root

    def list_leftovers(self) -> list[str]:
        try:
            with subdir(self.root, "tmp") as tmp_fd:
                return sorted(os.listdir(tmp_fd))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StoreError(f"{self._p('tmp')}: cannot list leftovers: {e.strerror}") from None

    def remove_leftover(self, name: str) -> int:
        try:
            with subdir(self.root, "tmp") as tmp_fd:
                return remove_file(os.path.basename(name), dir_fd=tmp_fd)
        except FileNotFoundError:
            return 0
        except IsADirectoryError:
            log.warning("%s: a folder in the store's tmp, left alone", self._p("tmp", name))
            return 0
        except OSError as e:
            raise StoreError(f"{self._p('tmp', name)}: cannot remove leftover: {e.strerror}") from None
