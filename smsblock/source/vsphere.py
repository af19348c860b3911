"""The vSphere source: a vCenter service account lists VMs, snapshots them, streams their disks.

* :class:`VCenterSettings` holds the connection settings (address, username, password
  source, CA bundle, ``insecure``); the password never appears in ``repr``, logs or
  :meth:`VCenterSettings.to_config`.
* :class:`VSphereSource` logs in through pyVmomi, lists VMs for the server catalog
  (:meth:`~VSphereSource.list_vms`) and opens runs (:meth:`~VSphereSource.open_run`).
* :class:`VSphereRun` takes a snapshot (no memory, no quiesce), opens the snapshot's disks
  through the datastore HTTP file service (see :mod:`.datastore_http`), asks changed block
  tracking for the changed areas when the VM has it on (handed to the engine as
  :attr:`SourceDisk.changed_extents <smsblock.source.SourceDisk.changed_extents>`: only
  they are read and hashed), and removes the snapshot on exit.

Snapshot removal does not read the removal task's ``info``: pyVmomi 9 cannot parse the
TaskInfo that older vCenters (and vcsim 0.24) send for ``RemoveSnapshot_Task`` (its
``entity`` is a snapshot, not a managed entity), and the failure leaves the SOAP connection
unusable.  Instead we poll the VM's snapshot tree until the snapshot is gone, which works
the same on every vCenter; a removal that fails on the server leaves the snapshot there, so
the poll times out and names it.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import ssl
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urlsplit

from ..fsutil import first_line, read_small_file
from ..disk.base import Disk
from ..errors import Cancelled, ConnectorError, UsageError, VSphereError
from ..progress import check_cancel
from ..scanner import check_changed_extents
from . import SourceDisk, VmRecord
from .datastore_http import AreaOverlayDisk, DatastoreEndpoint, DatastoreFile, open_datastore_disk

log = logging.getLogger(__name__)

PASSWORD_ENV = "SMSBLOCK_VCENTER_PASSWORD"
SNAPSHOT_PREFIX = "smsblock-"
#: the privileges of the guide's list, and where each one is needed
VM_PRIVILEGES = ("VirtualMachine.State.CreateSnapshot", "VirtualMachine.State.RemoveSnapshot",
                 "VApp.Export")
DATASTORE_PRIVILEGES = ("Datastore.Browse", "Datastore.FileManagement")
#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME: accept expired (or not yet valid) certificates
_NO_CHECK_TIME = 0x200000


# --- settings -----------------------------------------------------------------------

def redact_address(address) -> str:
    """``address`` with any ``user:password@`` part replaced by ``***@``: how every error
    names a --vcenter address (the text may hold a password even when it does not parse)."""
    text = str(address)
    start = text.find("://")
    start = start + 3 if start >= 0 else 0
    # up to the last "@" of all: a password may hold "/", "?", "#" or "@" itself, and
    # hiding a path's "@" too costs nothing
    at = text.rfind("@", start)
    return text if at < 0 else text[:start] + "***" + text[at:]


def parse_address(address: str) -> tuple[str, str, int, str]:
    """``HOST``, ``HOST:PORT``, ``[v6]:PORT`` or an ``https://``/``http://`` URL →
    (scheme, host, port, SOAP path)."""
    text = (address or "").strip()
    if not text:
        raise UsageError("--vcenter: empty address")
    shown = repr(redact_address(text))     # never the password a URL may carry
    if "://" not in text:
        text = "https://" + text
    try:
        parts = urlsplit(text)
    except ValueError as e:
        raise UsageError(f"--vcenter {shown}: {redact_address(e)}") from None
    if parts.username or parts.password:
        raise UsageError(f"--vcenter {shown}: put the username in --username and the password "
                         f"in --password-file or {PASSWORD_ENV}, not in the address")
    if parts.scheme not in ("https", "http"):
        raise UsageError(f"--vcenter {shown}: scheme must be https or http")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"--vcenter {shown}: bad port") from None
    try:
        host = parts.hostname
    except ValueError as e:
        raise UsageError(f"--vcenter {shown}: {redact_address(e)}") from None
    if not host:
        raise UsageError(f"--vcenter {shown}: no host name")
    port = port or (443 if parts.scheme == "https" else 80)
    path = parts.path.rstrip("/") or "/sdk"
    return parts.scheme, host, port, path


@dataclass(frozen=True)
class VCenterSettings:
    """How to reach and log in to vCenter.  ``password`` never leaves this object."""

    address: str
    username: str
    password: str = field(repr=False, default="")
    password_file: str | None = None
    ca_bundle: str | None = None
    insecure: bool = False
    timeout: float = 60.0

    def __post_init__(self):
        parse_address(self.address)     # every way in: never an address holding a password

    @classmethod
    def from_options(cls, address: str, username: str | None, *, password_file: str | None = None,
                     ca_bundle: str | None = None, insecure: bool = False,
                     environ=None, timeout: float = 60.0) -> "VCenterSettings":
        """Settings from CLI-style options; the password comes from ``password_file`` or,
        without one, from the environment variable SMSBLOCK_VCENTER_PASSWORD."""
        parse_address(address)
        if not username:
            raise UsageError("--username is required with --vcenter")
        environ = os.environ if environ is None else environ
        if password_file:
            try:
                # a regular file, read without blocking, bounded: not a FIFO, not /dev/zero
                line = first_line(read_small_file(password_file, 64 * 1024), 4096).decode("utf-8")
                password = line.rstrip("\r\n")
                if "\0" in password or (len(line) == 4096 and not line.endswith("\n")):
                    raise UsageError(f"--password-file {password_file}: the first line is not a "
                                     "password (NUL bytes, or longer than 4096 characters)")
            except OSError as e:
                raise UsageError(f"--password-file {password_file}: {e.strerror}") from None
            except UnicodeDecodeError:
                raise UsageError(f"--password-file {password_file}: not UTF-8 text") from None
            if not password:
                raise UsageError(f"--password-file {password_file}: the first line is empty")
        else:
            password = environ.get(PASSWORD_ENV, "")
            if not password:
                raise UsageError(f"no vCenter password: give --password-file FILE or set "
                                 f"{PASSWORD_ENV}")
        if ca_bundle and not os.path.isfile(ca_bundle):
            raise UsageError(f"--ca-bundle {ca_bundle}: no such file")
        return cls(address=address, username=username, password=password,
                   password_file=os.path.abspath(password_file) if password_file else None,
                   ca_bundle=os.path.abspath(ca_bundle) if ca_bundle else None,
                   insecure=insecure, timeout=timeout)

    @classmethod
    def from_config(cls, config: dict, environ=None) -> "VCenterSettings":
        """Inverse of :meth:`to_config`: the password is read again from its source."""
        return cls.from_options(config["address"], config["username"],
                                password_file=config.get("passwordFile"),
                                ca_bundle=config.get("caBundle"),
                                insecure=bool(config.get("insecure")), environ=environ)

    def to_config(self) -> dict[str, Any]:
        """What a connector stores: everything but the password (only where it comes from)."""
        return {"address": self.address, "username": self.username,
                "passwordFile": self.password_file,
                "passwordEnv": None if self.password_file else PASSWORD_ENV,
                "caBundle": self.ca_bundle, "insecure": self.insecure}

    @property
    def endpoint(self) -> tuple[str, str, int, str]:
        return parse_address(self.address)

    @property
    def display(self) -> str:
        scheme, host, port, _ = self.endpoint
        return f"{scheme}://{_hostport(host, port)}"

    def ssl_context(self) -> ssl.SSLContext:
        """Verification against the CA bundle (or the system's CAs); ``insecure`` turns
        off only the hostname and validity-period checks, as the guide's switch does."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca_bundle)
        except (ssl.SSLError, OSError) as e:
            raise UsageError(f"--ca-bundle {self.ca_bundle}: not a readable PEM certificate file "
                             f"({getattr(e, 'reason', None) or e})") from None
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_flags |= _NO_CHECK_TIME
        return ctx


def settings_from_args(args, environ=None) -> "VCenterSettings | None":
    """Settings from ``smsblock connector register``'s vCenter options (``vcenter``,
    ``username``, ``password_file``, ``ca_bundle``, ``insecure``); None without --vcenter."""
    if not getattr(args, "vcenter", None):
        for opt in ("username", "password_file", "ca_bundle"):
            if getattr(args, opt, None):
                raise UsageError(f"--{opt.replace('_', '-')} is only valid with --vcenter")
        return None
    return VCenterSettings.from_options(args.vcenter, args.username,
                                        password_file=args.password_file,
                                        ca_bundle=args.ca_bundle, insecure=args.insecure,
                                        environ=environ)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- errors ---------------------------------------------------------------------------

def _fault_name(e: BaseException) -> str:
    return type(e).__name__


def _translate(e: BaseException, settings: VCenterSettings, action: str) -> VSphereError:
    """One clear line for an exception raised while talking to vCenter."""
    err = _translate_any(e, settings, action)
    text = " ".join(str(err).split())        # pyVmomi faults print over many lines
    if text != str(err):
        err = VSphereError(text)
    return err


def _translate_any(e: BaseException, settings: VCenterSettings, action: str) -> VSphereError:
    from pyVmomi import vim, vmodl
    where = settings.display
    if isinstance(e, VSphereError):
        return e
    if isinstance(e, vim.fault.InvalidLogin):
        return VSphereError(f"vCenter {where}: login failed for user {settings.username!r}: "
                            "wrong username or password")
    if isinstance(e, vim.fault.NoPermission):
        priv = getattr(e, "privilegeId", None) or "an unnamed privilege"
        obj = getattr(e, "object", None)
        on = f" on {obj._moId}" if obj is not None else ""
        return VSphereError(f"vCenter {where}: {action}: the account {settings.username!r} lacks "
                            f"the privilege {priv}{on}")
    if isinstance(e, vim.fault.NotAuthenticated):
        return VSphereError(f"vCenter {where}: {action}: the session is not authenticated "
                            "(expired or logged out)")
    if isinstance(e, ssl.SSLCertVerificationError):
        reason = (e.verify_message or str(e.reason or e)).rstrip(".")
        if "mismatch" in reason.lower() or "expired" in reason or "not yet valid" in reason:
            hint = ("--insecure ignores hostname mismatches and expired certificates "
                    "(the chain is still checked)")
        else:
            hint = "give the CA certificate that signed vCenter's certificate with --ca-bundle"
        return VSphereError(f"vCenter {where}: certificate verification failed: {reason}; {hint}")
    if isinstance(e, ssl.SSLError):
        return VSphereError(f"vCenter {where}: TLS handshake failed: {e.reason or e} "
                            "(is it an https endpoint?)")
    if isinstance(e, socket.gaierror):
        return VSphereError(f"vCenter {where}: host name does not resolve: {e.strerror}")
    if isinstance(e, (ConnectionRefusedError, ConnectionResetError, TimeoutError,
                      socket.timeout)) or (isinstance(e, OSError) and e.errno is not None):
        reason = e.strerror or str(e) or type(e).__name__
        return VSphereError(f"vCenter {where}: unreachable: {reason}")
    if isinstance(e, (http.client.HTTPException, ConnectionError)):
        return VSphereError(f"vCenter {where}: not a vSphere API endpoint or connection "
                            f"dropped ({type(e).__name__}: {e})")
    if "not a VIM server" in str(e):
        return VSphereError(f"vCenter {where}: does not answer as a vSphere API endpoint "
                            "(wrong port, or http/https mixed up?)")
    if isinstance(e, vmodl.MethodFault):
        msg = getattr(e, "msg", None) or "; ".join(
            m.message for m in (getattr(e, "faultMessage", None) or []) if m.message) \
            or "no message"
        return VSphereError(f"vCenter {where}: {action} failed: {_fault_name(e)}: {msg}")
    return VSphereError(f"vCenter {where}: {action} failed: {type(e).__name__}: {e}")


def _is_unsupported(e: BaseException) -> bool:
    from pyVmomi import vmodl
    return isinstance(e, (vmodl.fault.NotSupported, vmodl.fault.NotImplemented,
                          vmodl.fault.MethodNotFound)) or "not implemented" in str(e).lower() \
        or "MethodNotFound" in str(e)


# --- the source -------------------------------------------------------------------------

class VSphereSource:
    """A logged-in vCenter session: the catalog's VMs and the runs' snapshots."""

    kind = "vsphere"
    manager_type = "VSPHERE"

    def __init__(self, settings: VCenterSettings):
        self.settings = settings
        self._si = None
        self._connect()

    @classmethod
    def from_config(cls, config: dict, environ=None) -> "VSphereSource":
        """Reopen a connector's source from its stored (secret-free) config."""
        if not isinstance(config, dict) or not isinstance(config.get("address"), str):
            raise ConnectorError(f"vSphere source config has no address: {sorted(config or {})}")
        return cls(VCenterSettings.from_config(config, environ=environ))

    def config(self) -> dict:
        """What the connector stores to reopen this source: no password, only its source."""
        return self.settings.to_config()

    # -- session -------------------------------------------------------------------
    def _connect(self) -> None:
        from pyVim.connect import SmartConnect
        scheme, host, port, path = self.settings.endpoint
        kwargs: dict[str, Any] = {}
        if scheme == "https":
            kwargs["sslContext"] = self.settings.ssl_context()
        try:
            self._si = SmartConnect(protocol=scheme, host=host, port=port, path=path,
                                    user=self.settings.username, pwd=self.settings.password,
                                    httpConnectionTimeout=self.settings.timeout,
                                    connectionPoolTimeout=-1, **kwargs)
            content = self._si.RetrieveContent()
            about = content.about
        except Exception as e:   # pyVmomi raises faults, socket, ssl and http errors
            raise _translate(e, self.settings, "login") from None
        self.content = content
        #: vmManagerName, as SMS showed it: the host name the connector was given
        self.manager_name = host
        self.manager_id = about.instanceUuid or host
        self.api_version = about.apiVersion
        self.product = about.fullName

    def _cookie(self) -> str:
        raw = self._si._stub.cookie or ""
        return raw.split(";", 1)[0].strip()

    def close(self) -> None:
        si, self._si = self._si, None
        if si is not None:
            try:
                from pyVim.connect import Disconnect
                Disconnect(si)
            except Exception:    # logging out of a dead session is not an error worth raising
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def get(self, obj, *paths: str) -> dict[str, Any]:
        """Properties of one object through the property collector: unset ones are simply
        absent (reading an unset property as an attribute crashes vcsim 0.24's Fetch)."""
        from pyVmomi import vmodl
        pc = vmodl.query.PropertyCollector
        spec = pc.FilterSpec(objectSet=[pc.ObjectSpec(obj=obj, skip=False)],
                             propSet=[pc.PropertySpec(type=type(obj), pathSet=list(paths))])
        result = self.content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
        if result is None or not result.objects:
            return {}
        for missing in result.objects[0].missingSet or []:
            if isinstance(missing.fault, vmodl.MethodFault) and \
                    not isinstance(missing.fault, vmodl.fault.InvalidProperty):
                raise missing.fault
        return {p.name: p.val for p in result.objects[0].propSet}

    def with_login(self, fn, *args, **kwargs):
        """``fn(...)``, logging in again once if the session expired (vCenter ends idle
        sessions, by default after 30 minutes; a long disk stream can outlast one)."""
        from pyVmomi import vim
        try:
            return fn(*args, **kwargs)
        except vim.fault.NotAuthenticated:
            self.relogin()
            return fn(*args, **kwargs)

    def relogin(self) -> str:
        """Log in again on the same connection, so every object keeps working; returns the
        new session cookie (for the datastore file service)."""
        try:
            self.content.sessionManager.Login(self.settings.username, self.settings.password)
        except Exception as e:
            raise _translate(e, self.settings, "log in again after the session ended") from None
        log.info("session to %s renewed", self.settings.display)
        return self._cookie()

    def call(self, action: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` against vCenter with this source's session (logged in
        again once when it ended) and its errors (VSphereError naming ``action``); what a
        run on this source calls too."""
        try:
            return self.with_login(fn, *args, **kwargs)
        except (VSphereError, Cancelled):
            raise
        except Exception as e:
            raise _translate(e, self.settings, action) from None

    # -- inventory -----------------------------------------------------------------
    def _retrieve(self, types: list, props: dict) -> dict:
        """{moid: (obj, {prop: value})} for every object of ``types`` under the root folder."""
        from pyVmomi import vmodl
        content = self.content
        view = content.viewManager.CreateContainerView(content.rootFolder, types, True)
        try:
            traverse = vmodl.query.PropertyCollector.TraversalSpec(
                name="view", path="view", skip=False, type=type(view))
            spec = vmodl.query.PropertyCollector.FilterSpec(
                objectSet=[vmodl.query.PropertyCollector.ObjectSpec(
                    obj=view, skip=True, selectSet=[traverse])],
                propSet=[vmodl.query.PropertyCollector.PropertySpec(type=t, pathSet=list(p))
                         for t, p in props.items()])
            out = {}
            result = content.propertyCollector.RetrievePropertiesEx(
                [spec], vmodl.query.PropertyCollector.RetrieveOptions())
            while result is not None:
                for oc in result.objects:
                    out[oc.obj._moId] = (oc.obj, {p.name: p.val for p in oc.propSet})
                if not result.token:
                    break
                result = content.propertyCollector.ContinueRetrievePropertiesEx(result.token)
            return out
        finally:
            view.Destroy()

    def _paths(self) -> dict[str, tuple[str, str]]:
        """moid → (name, parent moid) of every folder, datacenter and vApp (a vApp sits in
        the VM folder it was placed in), plus the root."""
        from pyVmomi import vim
        objs = self._retrieve([vim.Folder, vim.Datacenter, vim.VirtualApp],
                              {vim.Folder: ["name", "parent"], vim.Datacenter: ["name", "parent"],
                               vim.VirtualApp: ["name", "parentFolder", "parentVApp"]})
        tree = {}
        for moid, (_, p) in objs.items():
            parent = p.get("parent") or p.get("parentFolder") or p.get("parentVApp")
            tree[moid] = (p.get("name", moid), parent._moId if parent is not None else None)
        root = self.content.rootFolder
        tree.setdefault(root._moId, (self.call("inventory", lambda: root.name), None))
        return tree

    @staticmethod
    def _path_of(name: str, parent: str | None, tree) -> str:
        parts = [name]
        seen = set()
        while parent is not None and parent in tree and parent not in seen:
            seen.add(parent)
            pname, parent = tree[parent]
            parts.append(pname)
        return "/" + "/".join(reversed(parts))

    _VM_PROPS = ("name", "parent", "parentVApp", "config.template", "config.instanceUuid",
                 "config.uuid", "config.guestId", "config.hardware.device")

    def _vm_record(self, moid: str, p: dict, tree) -> VmRecord:
        parent = p.get("parent") or p.get("parentVApp")
        name = p.get("name", moid)
        return VmRecord(
            vmId=moid, vmName=name,
            vmPath=self._path_of(name, parent._moId if parent else None, tree),
            vmManagerName=self.manager_name, vmManagerId=self.manager_id,
            vmManagerType=self.manager_type,
            # guestOS as the datastore source names it: the service's license rule reads it
            identity={k: v for k, v in (("instanceUuid", p.get("config.instanceUuid")),
                                        ("biosUuid", p.get("config.uuid")),
                                        ("guestOS", p.get("config.guestId"))) if v},
            warnings=_device_warnings(p.get("config.hardware.device") or []))

    def list_vms(self) -> list[VmRecord]:
        """Every VM (templates skipped), sorted by path, with catalog fields and warnings."""
        from pyVmomi import vim

        def fetch():
            return self._paths(), self._retrieve([vim.VirtualMachine],
                                                 {vim.VirtualMachine: list(self._VM_PROPS)})
        tree, vms = self.call("list virtual machines", fetch)
        records = [self._vm_record(moid, p, tree) for moid, (_, p) in vms.items()
                   if not p.get("config.template")]
        records.sort(key=lambda r: (r.vmPath, r.vmId))
        return records

    def describe_vm(self, obj) -> VmRecord:
        """The catalog record of one VM object (where a moved VM is now)."""
        return self.call("read VM", lambda: self._vm_record(
            obj._moId, self.get(obj, *self._VM_PROPS), self._paths()))

    # -- finding a VM again -----------------------------------------------------------
    def find_vm(self, vm: VmRecord | dict) -> tuple[Any, list[str]]:
        """The VM object for a catalog record, following it if its id changed (a
        cross-vCenter vMotion, an unregister/register) through its instance or BIOS UUID."""
        from pyVmomi import vim
        rec = vm.to_dict() if isinstance(vm, VmRecord) else dict(vm)
        vm_id, name = rec.get("vmId"), rec.get("vmName") or rec.get("vmId")
        ident = rec.get("identity") or {}
        inst, bios = ident.get("instanceUuid"), ident.get("biosUuid")
        notes: list[str] = []
        if vm_id:
            obj = vim.VirtualMachine(vm_id, self._si._stub)
            try:
                now = self.get(obj, "config.instanceUuid").get("config.instanceUuid")
            except vim.fault.NoPermission:
                now = None
            except Exception as e:
                if not _is_gone(e):
                    raise _translate(e, self.settings, f"look up VM {vm_id}") from None
                now = None
            else:
                if inst is None or now == inst:
                    return obj, notes
        index = self.content.searchIndex
        for label, value, instance in (("instance UUID", inst, True), ("BIOS UUID", bios, False)):
            if not value:
                continue
            found = self.call("search VM by UUID", index.FindByUuid, None, value, True, instance)
            if found is not None:
                notes.append(f"VM {name} ({vm_id}) was moved (vMotion or re-registration): "
                             f"found again by its {label} as {found._moId}")
                return found, notes
        raise VSphereError(
            f"vCenter {self.settings.display}: VM {name} ({vm_id}) is no longer visible: it was "
            f"moved (vMotion to a host, cluster or vCenter this account cannot see) or deleted; "
            f"no VM with instance UUID {inst or '-'} or BIOS UUID {bios or '-'} is visible to "
            f"{self.settings.username!r}")

    # -- privileges ------------------------------------------------------------------------
    def missing_privileges(self, vm_obj, datastores) -> list[str]:
        """"privilege on object" for each privilege of the guide the session lacks."""
        auth = self.content.authorizationManager
        if auth is None:
            return []
        session = self.call("read session", lambda: self.content.sessionManager.currentSession)
        checks = [(vm_obj, VM_PRIVILEGES)] + [(ds, DATASTORE_PRIVILEGES) for ds in datastores]
        missing = []
        for entity, privs in checks:
            try:
                granted = self.with_login(auth.HasPrivilegeOnEntity, entity, session.key,
                                          list(privs))
            except Exception as e:
                if _is_unsupported(e):
                    return []      # old servers: faults on the calls themselves name privileges
                raise _translate(e, self.settings, "check privileges") from None
            missing += [f"{p} on {entity._moId}" for p, ok in zip(privs, granted) if not ok]
        return missing

    # -- runs -------------------------------------------------------------------------------
    def open_run(self, vm: VmRecord | dict, *, previous: dict | None = None,
                 previous_disks: dict[str, Disk] | None = None, cancel=None,
                 run_id: str | None = None) -> "VSphereRun":
        """A :class:`VSphereRun` for one VM; enter it to take the snapshot."""
        return VSphereRun(self, vm, previous=previous, previous_disks=previous_disks,
                          cancel=cancel, run_id=run_id)

    def datastore_endpoint(self, dc_path: str, ds_name: str) -> DatastoreEndpoint:
        scheme, host, port, _ = self.settings.endpoint
        return DatastoreEndpoint(
            base_url=f"{scheme}://{_hostport(host, port)}", dc_path=dc_path, ds_name=ds_name,
            cookie=self._cookie(),
            ssl_context=self.settings.ssl_context() if scheme == "https" else None,
            timeout=self.settings.timeout)

    def tls_error(self, e: Exception) -> VSphereError:
        """The one-line error for a TLS failure on the datastore file service (requests
        wraps the ssl error a few levels deep)."""
        return _translate(_find_ssl_error(e) or e, self.settings, "datastore download")


def _find_ssl_error(e: BaseException | None, depth: int = 0) -> ssl.SSLError | None:
    if e is None or depth > 8:
        return None
    if isinstance(e, ssl.SSLError):
        return e
    inner = [e.__cause__, e.__context__, getattr(e, "reason", None)]
    inner += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    for i in inner:
        if isinstance(i, BaseException):
            found = _find_ssl_error(i, depth + 1)
            if found is not None:
                return found
    return None


def _is_gone(e: BaseException) -> bool:
    from pyVmomi import vmodl
    return isinstance(e, vmodl.fault.ManagedObjectNotFound) \
        or "has already been deleted" in str(e) \
        or "ManagedObjectNotFound" in type(e).__name__


def _device_warnings(devices) -> list[str]:
    from pyVmomi import vim
    out = []
    for d in devices:
        if isinstance(d, vim.vm.device.VirtualCdrom) and d.connectable is not None and \
                (d.connectable.connected or d.connectable.startConnected):
            label = d.deviceInfo.label if d.deviceInfo else f"CD-ROM {d.key}"
            out.append(f"{label} is connected: disconnect CD-ROMs before replicating "
                       "(a snapshot of a VM with a connected CD-ROM can fail or pin the ISO)")
    return out


@dataclass
class _DiskBacking:
    key: int
    label: str
    file_name: str            # "[ds] path/disk.vmdk"
    datastore: Any
    capacity: int
    change_id: str | None
    chain: list[str]          # the delta chain, top first (backing.parent)


_BUS_RANK = (("VirtualSCSIController", 0), ("VirtualSATAController", 1),
             ("VirtualNVMEController", 2), ("VirtualIDEController", 3))


def _boot_order(devices, boot_options) -> list:
    """Disks first to last as the VM boots them: the disk named in the boot order, then by
    bus (SCSI, SATA, NVMe, IDE), controller number and unit number."""
    from pyVmomi import vim
    controllers = {}
    for d in devices:
        for name, rank in _BUS_RANK:
            if isinstance(d, getattr(vim.vm.device, name)):
                controllers[d.key] = (rank, d.busNumber)
    boot_key = None
    for item in (getattr(boot_options, "bootOrder", None) or []):
        if isinstance(item, vim.vm.BootOptions.BootableDiskDevice):
            boot_key = item.deviceKey
            break
    disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
    return sorted(disks, key=lambda d: (d.key != boot_key,
                                        controllers.get(d.controllerKey, (9, 0)),
                                        d.unitNumber if d.unitNumber is not None else 99, d.key))


def _split_ds_path(name: str) -> tuple[str, str]:
    m = re.match(r"^\[([^\]]+)\]\s*(.*)$", name or "")
    if not m:
        raise VSphereError(f"disk file name {name!r} is not a datastore path '[ds] path'")
    return m.group(1), m.group(2)


class VSphereRun:
    """One snapshot of one VM: enter to snapshot and open disks, exit to remove it.

    After entering, ``disks`` holds one :class:`~smsblock.source.SourceDisk` per virtual
    disk, ``warnings`` what the operator should know, and :meth:`record` the facts to keep
    with the run (snapshot, change ids, whether changed block tracking was used).
    """

    #: how long to wait for vCenter tasks; removal of big deltas can take long
    task_timeout = 3600.0
    poll_interval = 0.2

    def __init__(self, source: VSphereSource, vm, *, previous=None, previous_disks=None,
                 cancel=None, run_id=None):
        self.source = source
        self.vm_record = vm.to_dict() if isinstance(vm, VmRecord) else dict(vm)
        self.previous = previous or {}
        self.previous_disks = previous_disks or {}
        self.cancel = cancel
        self.run_id = run_id or uuidlib.uuid4().hex[:8]
        self.vm = None
        self.snapshot = None
        self.disks: list[SourceDisk] = []
        self.warnings: list[str] = []
        self.removed = False
        #: the VM's catalog record (a dict) when it was found at a new place, else None
        self.moved_to: dict | None = None

    # -- context ------------------------------------------------------------------------
    def __enter__(self) -> "VSphereRun":
        try:
            self._start()
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)   # cleanup never hides the cause
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except VSphereError as cleanup:
            if exc is None:
                raise
            # keep the run's own failure as the error; say the snapshot is still there
            log.error("%s", cleanup)
            exc.add_note(f"also: {cleanup}")
            self.warnings.append(str(cleanup))

    def close(self) -> None:
        """Close the disks and remove the snapshot (idempotent; never skipped on cancel)."""
        for d in self.disks:
            try:
                d.disk.close()
            except Exception:
                pass
        if self.snapshot is not None and not self.removed:
            self._remove_snapshot(self.snapshot)
            self.removed = True

    # -- steps ----------------------------------------------------------------------------
    def _start(self) -> None:
        src = self.source
        self.vm, notes = src.find_vm(self.vm_record)
        self.warnings += notes
        if self.vm._moId != self.vm_record.get("vmId"):
            self.moved_to = src.describe_vm(self.vm).to_dict()
        check_cancel(self.cancel)
        self._remove_leftover_snapshots()
        datastores = src.call("read VM datastores", lambda: list(self.vm.datastore))
        missing = src.missing_privileges(self.vm, datastores)
        if missing:
            raise VSphereError(f"vCenter {src.settings.display}: the account "
                               f"{src.settings.username!r} lacks the privilege "
                               f"{', '.join(missing)}")
        self.warnings += _device_warnings(src.call(
            "read VM devices", lambda: self.vm.config.hardware.device))
        check_cancel(self.cancel)
        self.snapshot = self._create_snapshot()
        check_cancel(self.cancel)
        cbt = src.call("read VM config", lambda: bool(self.vm.config.changeTrackingEnabled))
        for backing in self._snapshot_disks():
            check_cancel(self.cancel)
            self.disks.append(self._open_disk(backing, cbt))

    def _wait(self, task, what: str):
        """Wait for a task whose TaskInfo pyVmomi can read (not snapshot removal)."""
        deadline = time.monotonic() + self.task_timeout
        while True:
            info = self.source.call(what, lambda: task.info)
            if info.state == "success":
                return info.result
            if info.state == "error":
                raise _translate(info.error, self.source.settings, what)
            if time.monotonic() > deadline:
                raise VSphereError(f"vCenter {self.source.settings.display}: {what} did not "
                                   f"finish in {self.task_timeout:.0f} s")
            time.sleep(self.poll_interval)

    def _create_snapshot(self):
        name = f"{SNAPSHOT_PREFIX}{self.run_id}"
        task = self.source.call(
            "create snapshot (needs VirtualMachine.State.CreateSnapshot)",
            self.vm.CreateSnapshot_Task, name=name,
            description="Taken by smsblock for a replication run; removed when the run ends.",
            memory=False, quiesce=False)
        snap = self._wait(task, "create snapshot")
        log.info("snapshot %s (%s) of %s taken", name, snap._moId, self.vm._moId)
        return snap

    def _snapshot_tree(self) -> Iterator[Any]:
        info = self.source.call("read snapshots",
                                 self.source.get, self.vm, "snapshot").get("snapshot")
        stack = list(info.rootSnapshotList) if info is not None else []
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.childSnapshotList or [])

    def _remove_leftover_snapshots(self) -> None:
        """Snapshots of an earlier run that died before it could remove them."""
        for node in list(self._snapshot_tree()):
            if node.name.startswith(SNAPSHOT_PREFIX):
                self.warnings.append(f"removed snapshot {node.name!r} left by an earlier run")
                self._remove_snapshot(node.snapshot)

    def _remove_snapshot(self, snap) -> None:
        """RemoveSnapshot_Task, then poll the VM's snapshot tree until it is gone (the
        task's info is not read: see the module docstring)."""
        moid = snap._moId
        try:
            self.source.with_login(snap.RemoveSnapshot_Task, removeChildren=False,
                                   consolidate=True)
        except (VSphereError, Cancelled):
            raise
        except Exception as e:
            if not _is_gone(e):     # already removed (by a person, or a retried cleanup): fine
                raise _translate(e, self.source.settings,
                                 "remove snapshot (needs VirtualMachine.State.RemoveSnapshot)") \
                    from None
        deadline = time.monotonic() + self.task_timeout
        while any(n.snapshot._moId == moid for n in self._snapshot_tree()):
            if time.monotonic() > deadline:
                raise VSphereError(f"vCenter {self.source.settings.display}: snapshot {moid} of "
                                   f"VM {self.vm._moId} is still there {self.task_timeout:.0f} s "
                                   "after RemoveSnapshot_Task; remove it in vSphere")
            time.sleep(self.poll_interval)
        log.info("snapshot %s of %s removed", moid, self.vm._moId)

    def _snapshot_disks(self) -> list[_DiskBacking]:
        config = self.source.call("read snapshot disks", lambda: self.snapshot.config)
        devices = list(config.hardware.device)
        out = []
        for d in _boot_order(devices, config.bootOptions):
            b = d.backing
            if not hasattr(b, "fileName"):
                raise VSphereError(f"VM {self.vm._moId}: disk {d.key} has a "
                                   f"{type(b).__name__} backing, which is not a datastore file "
                                   "(raw device mappings in physical mode cannot be snapshotted)")
            chain, p = [b.fileName], getattr(b, "parent", None)
            while p is not None and len(chain) < 256:
                chain.append(p.fileName)
                p = getattr(p, "parent", None)
            capacity = d.capacityInBytes or (d.capacityInKB or 0) * 1024
            out.append(_DiskBacking(
                key=d.key, label=d.deviceInfo.label if d.deviceInfo else f"disk {d.key}",
                file_name=b.fileName, datastore=b.datastore, capacity=capacity,
                change_id=getattr(b, "changeId", None) or None, chain=chain))
        if not out:
            raise VSphereError(f"VM {self.vm._moId}: the snapshot has no virtual disks")
        return out

    def _datacenter_path(self, ds) -> str:
        """The inventory path of the datastore's datacenter, relative to the root folder."""
        from pyVmomi import vim
        parts, obj = [], ds
        while obj is not None and not isinstance(obj, vim.Datacenter):
            obj = self.source.call("read inventory", lambda o=obj: o.parent)
        if obj is None:
            raise VSphereError(f"datastore {ds._moId} is not in a datacenter")
        root = self.source.content.rootFolder._moId
        while obj is not None and obj._moId != root:
            parts.append(self.source.call("read inventory", lambda o=obj: o.name))
            obj = self.source.call("read inventory", lambda o=obj: o.parent)
        return "/".join(reversed(parts))

    def _open_disk(self, b: _DiskBacking, cbt: bool) -> SourceDisk:
        src = self.source
        ds_name, path = _split_ds_path(b.file_name)
        ds = b.datastore
        if ds is None:
            raise VSphereError(f"{b.file_name}: the disk backing names no datastore")
        endpoint = src.datastore_endpoint(self._datacenter_path(ds), ds_name)

        def open_file(p: str) -> DatastoreFile:
            return DatastoreFile(endpoint, p, verify_tls=src.tls_error, relogin=src.relogin)
        disk = open_datastore_disk(open_file, path)
        sd = SourceDisk(key=str(b.key), label=b.label, location=b.file_name, disk=disk,
                        change_id=b.change_id)
        if len(b.chain) > 1:
            self.warnings.append(f"{b.label}: read through a delta chain of {len(b.chain)} "
                                 "files")
        self._apply_cbt(sd, b, cbt)
        return sd

    def _apply_cbt(self, sd: SourceDisk, b: _DiskBacking, cbt: bool) -> None:
        """Hand the engine the areas CBT reports changed since the previous run
        (``sd.changed_extents``), narrow a first read to the allocated areas, or say why
        the hashing diff is used."""
        if not cbt:
            sd.change_reason = "changed block tracking is off for this VM"
            return
        prev = {d.get("key"): d for d in (self.previous.get("disks") or [])}.get(sd.key) or {}
        prev_id = prev.get("changeId")
        # the previous run's copy in the store: the engine carries unchanged blocks over
        # from there, so without it (pruned, no previous run) there is no change list
        base = self.previous_disks.get(sd.key)
        resized = base is not None and base.size != sd.disk.size
        # without the previous changeId and disk (or with a disk grown since), ask for the
        # allocated areas ("*")
        since = prev_id if (prev_id and base is not None and b.change_id and not resized) \
            else "*"
        try:
            areas = self._changed_areas(b.key, since, sd.disk.size)
        except VSphereError as e:
            if _is_unsupported_text(str(e)):
                sd.change_reason = "the server does not offer QueryChangedDiskAreas"
                return
            # a reset CBT (after a restore, a storage vMotion) makes old change ids invalid
            sd.change_reason = f"QueryChangedDiskAreas failed ({e}); reading the whole disk"
            return
        sd.change_method = "cbt"
        if since != "*":
            try:    # checked whole here, before the snapshot is read, to name its origin
                check_changed_extents(areas, sd.disk.size, 512)
            except UsageError as e:
                raise VSphereError(f"{sd.location}: QueryChangedDiskAreas since changeId "
                                   f"{since!r} gave an unusable change list: {e}") from None
            sd.changed_extents = areas
            sd.change_reason = f"changed areas since changeId {since}"
            return
        # no change list: everything outside the allocated areas reads as zeros
        sd.disk = AreaOverlayDisk(sd.disk, areas)
        sd.change_reason = "allocated areas (changeId *)" + (
            f"; the disk's size changed from {base.size} to {sd.disk.size} "
            "bytes since the previous run" if resized else "")

    def _changed_areas(self, device_key: int, since: str, size: int) -> list[tuple[int, int]]:
        areas, offset = [], 0
        while offset < size:
            check_cancel(self.cancel)
            info = self.source.call("QueryChangedDiskAreas", self.vm.QueryChangedDiskAreas,
                                     snapshot=self.snapshot, deviceKey=device_key,
                                     startOffset=offset, changeId=since)
            areas += [(a.start, a.length) for a in (info.changedArea or [])]
            nxt = info.startOffset + info.length
            if nxt <= offset:
                break
            offset = nxt
        return areas

    # -- record --------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        methods = {d.change_method for d in self.disks}
        return {"source": "vsphere", "vmId": self.vm._moId if self.vm is not None else None,
                "snapshot": self.snapshot._moId if self.snapshot is not None else None,
                "snapshotName": f"{SNAPSHOT_PREFIX}{self.run_id}",
                "changeTracking": "cbt" if methods == {"cbt"} else
                                  ("hash" if methods <= {"hash"} else "mixed"),
                "movedTo": self.moved_to,
                "disks": [d.record() for d in self.disks], "warnings": list(self.warnings)}


def _is_unsupported_text(text: str) -> bool:
    return any(s in text for s in ("NotSupported", "NotImplemented", "MethodNotFound",
                                   "not implemented", "not supported"))


__all__ = ["VCenterSettings", "VSphereSource", "VSphereRun", "parse_address", "PASSWORD_ENV",
           "settings_from_args"]
