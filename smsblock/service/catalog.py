"""The server catalog: import from the connectors' sources, delete, and list.

Import runs in two transactions around the (possibly slow) listing of the sources:
first the catalog goes IMPORTING, then - with every source listed - the servers are
written and the catalog goes AVAILABLE in one step.  A VM already known (same
vmManagerId and vmId, or a new vmId with the instance UUID of a known VM that is not
listed any more: a VM moved by vMotion) keeps its serverId; a new one gets a new id; one
that is gone from its source leaves the catalog (its row, and so its id and replication window, is
kept in case it comes back).  If listing fails, the catalog returns to its previous
status and the caller gets NoConnectorsAvailableException with the source's reason.
"""

from __future__ import annotations

import json
import logging
import sqlite3

from ..errors import ServiceError, SmsBlockError
from .jobs import _LIVE, _in
from .models import ServerCatalogStatus, new_server_id
from ..source import VmRecord
from .sources import open_source
from .state import State

log = logging.getLogger(__name__)


def associated_connectors(db: sqlite3.Connection) -> list[sqlite3.Row]:
    return db.execute("SELECT * FROM connectors WHERE disassociated_on IS NULL "
                      "ORDER BY associated_on").fetchall()


def import_catalog(state: State, now: float) -> int:
    """ImportServerCatalog; returns the number of servers now in the catalog."""
    with state.transaction() as db:
        connectors = associated_connectors(db)
        if not connectors:
            raise ServiceError("no connector is associated; register one with "
                               "`smsblock connector register`", "NoConnectorsAvailableException")
        previous = db.execute("SELECT status, last_modified_on FROM catalog WHERE id = 1").fetchone()
        db.execute("UPDATE catalog SET status = ?, last_modified_on = ? WHERE id = 1",
                   (ServerCatalogStatus.IMPORTING.value, now))
    listed: list[tuple[sqlite3.Row, list[VmRecord]]] = []
    try:
        for c in connectors:
            source = open_source(c["source_kind"], json.loads(c["source_config"]))
            try:
                listed.append((c, source.list_vms()))
            finally:
                source.close()
    except (SmsBlockError, OSError) as e:
        status = previous["status"]
        with state.transaction() as db:
            if status == ServerCatalogStatus.IMPORTING.value:   # an import killed before this one
                known = db.execute("SELECT 1 FROM servers WHERE in_catalog = 1 LIMIT 1").fetchone()
                status = (ServerCatalogStatus.AVAILABLE if known
                          else ServerCatalogStatus.NOT_IMPORTED).value
            db.execute("UPDATE catalog SET status = ?, last_modified_on = ? WHERE id = 1",
                       (status, previous["last_modified_on"]))
        log.warning("importing the server catalog failed: %s", e)
        # SMS's name for "the connector cannot serve this": its source is unreachable
        raise ServiceError(f"importing the server catalog failed: {e}",
                           "NoConnectorsAvailableException") from None
    with state.transaction() as db:
        moved = _moved_servers(db, [vm for _, vms in listed for vm in vms])
        seen = {_upsert_server(db, connector, vm, moved, now)
                for connector, vms in listed for vm in vms}
        for row in db.execute("SELECT server_id FROM servers WHERE in_catalog = 1").fetchall():
            if row["server_id"] not in seen:
                db.execute("UPDATE servers SET in_catalog = 0 WHERE server_id = ?", (row["server_id"],))
        db.execute("UPDATE catalog SET status = ?, last_modified_on = ? WHERE id = 1",
                   (ServerCatalogStatus.AVAILABLE.value, now))
    return len(seen)


def _upsert_server(db: sqlite3.Connection, connector, vm: VmRecord,
                   moved: dict[tuple[str, str], str], now: float) -> str:
    """Write one listed VM into the catalog; returns its serverId (kept when known)."""
    for w in vm.warnings:
        log.warning("%s (%s): %s", vm.vmName, vm.vmPath, w)
    row = db.execute("SELECT server_id FROM servers WHERE vm_manager_id = ? AND vm_id = ?",
                     (vm.vmManagerId, vm.vmId)).fetchone()
    server_id = row["server_id"] if row is not None else moved.get((vm.vmManagerId, vm.vmId))
    values = (connector["connector_id"], vm.vmName, vm.vmManagerName,
              vm.vmManagerType, vm.vmPath, json.dumps(vm.to_dict()), now)
    if server_id is None:
        server_id = new_server_id()
        db.execute(
            "INSERT INTO servers (server_id, vm_manager_id, vm_id, connector_id, "
            "vm_name, vm_manager_name, vm_manager_type, vm_path, vm_record, "
            "imported_on, in_catalog) VALUES (?,?,?,?,?,?,?,?,?,?,1)",
            (server_id, vm.vmManagerId, vm.vmId, *values))
        return server_id
    if row is None:
        log.info("%s: VM %s moved from its known place to %s (%s)",
                 server_id, vm.vmName, vm.vmId, vm.vmPath)
    db.execute(
        "UPDATE servers SET vm_id = ?, connector_id = ?, vm_name = ?, vm_manager_name = ?, "
        "vm_manager_type = ?, vm_path = ?, vm_record = ?, imported_on = ?, "
        "in_catalog = 1 WHERE server_id = ?",
        (vm.vmId, *values, server_id))
    return server_id


def _moved_servers(db: sqlite3.Connection, vms: list[VmRecord]) -> dict[tuple[str, str], str]:
    """{(vmManagerId, new vmId): serverId} for known servers whose VM is listed under a
    new id (vMotion, re-registration), recognised by its instance UUID.  Only servers
    whose old id is not listed any more move, so a clone keeps its own server."""
    listed_ids = {(vm.vmManagerId, vm.vmId) for vm in vms}
    by_uuid = {}
    for row in db.execute("SELECT server_id, vm_manager_id, vm_id, vm_record FROM servers"):
        uuid = (json.loads(row["vm_record"] or "{}").get("identity") or {}).get("instanceUuid")
        if uuid and (row["vm_manager_id"], row["vm_id"]) not in listed_ids:
            by_uuid[row["vm_manager_id"], uuid] = row["server_id"]
    out = {}
    for vm in vms:
        server_id = by_uuid.pop((vm.vmManagerId, vm.identity.get("instanceUuid")), None)
        if server_id is not None:      # popped: one listed VM per known server
            out[vm.vmManagerId, vm.vmId] = server_id
    return out


def delete_catalog(state: State, now: float) -> None:
    """DeleteServerCatalog; refused while a live replication job needs a server."""
    with state.transaction() as db:
        live = db.execute(f"SELECT job_id FROM jobs WHERE state IN {_in(_LIVE)} LIMIT 1",
                          _LIVE).fetchone()
        if live is not None:
            raise ServiceError(f"replication job {live['job_id']} still uses the catalog; "
                               "delete it first", "OperationNotPermittedException")
        db.execute("UPDATE servers SET in_catalog = 0")
        db.execute("UPDATE catalog SET status = ?, last_modified_on = ? WHERE id = 1",
                   (ServerCatalogStatus.DELETED.value, now))
