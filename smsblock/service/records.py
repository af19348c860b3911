"""Rows of the state database turned into the SMS records of :mod:`.models`."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone

from .models import (Connector, ConnectorCapability, ConnectorStatus, LicenseType,
                     ReplicationJob, ReplicationJobState, ReplicationRun,
                     ReplicationRunStageDetails, ReplicationRunState, ReplicationRunType,
                     Server, ServerType, VmManagerType, VmServer, VmServerAddress, TERMINATED_JOB_STATES)


def ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


def connector_from_row(row: sqlite3.Row, now: float, heartbeat_timeout: float) -> Connector:
    healthy = now - row["last_heartbeat"] <= heartbeat_timeout
    return Connector(
        connectorId=row["connector_id"], version=row["version"],
        status=ConnectorStatus.HEALTHY if healthy else ConnectorStatus.UNHEALTHY,
        capabilityList=[ConnectorCapability(c) for c in json.loads(row["capabilities"])],
        vmManagerName=row["vm_manager_name"], vmManagerType=VmManagerType(row["vm_manager_type"]),
        vmManagerId=row["vm_manager_id"], ipAddress=row["ip_address"],
        macAddress=row["mac_address"], associatedOn=ts(row["associated_on"]))


def vm_server_from_row(row: sqlite3.Row) -> VmServer:
    return VmServer(
        vmServerAddress=VmServerAddress(vmManagerId=row["vm_manager_id"], vmId=row["vm_id"]),
        vmName=row["vm_name"], vmManagerName=row["vm_manager_name"],
        vmManagerType=VmManagerType(row["vm_manager_type"]), vmPath=row["vm_path"])


def server_from_row(row: sqlite3.Row, job: sqlite3.Row | None) -> Server:
    return Server(
        serverId=row["server_id"], serverType=ServerType.VIRTUAL_MACHINE,
        vmServer=vm_server_from_row(row),
        replicationJobId=job["job_id"] if job is not None else None,
        replicationJobTerminated=(ReplicationJobState(job["state"]) in TERMINATED_JOB_STATES)
        if job is not None else None)


def run_from_row(row: sqlite3.Row) -> ReplicationRun:
    details = None
    if row["stage"] is not None:
        details = ReplicationRunStageDetails(stage=row["stage"], stageProgress=row["stage_progress"])
    return ReplicationRun(
        replicationRunId=row["run_id"], state=ReplicationRunState(row["state"]),
        type=ReplicationRunType(row["type"]), stageDetails=details,
        statusMessage=row["status_message"], amiId=row["ami_id"],
        scheduledStartTime=ts(row["scheduled_start"]), completedTime=ts(row["completed"]),
        description=row["description"], encrypted=bool(row["encrypted"]),
        kmsKeyId=row["kms_key_id"])


def job_from_row(row: sqlite3.Row, server: sqlite3.Row | None,
                 runs: list[sqlite3.Row]) -> ReplicationJob:
    return ReplicationJob(
        replicationJobId=row["job_id"], serverId=row["server_id"],
        serverType=ServerType.VIRTUAL_MACHINE,
        vmServer=vm_server_from_row(server) if server is not None else None,
        seedReplicationTime=ts(row["seed_time"]), frequency=row["frequency"],
        runOnce=bool(row["run_once"]), nextReplicationRunStartTime=ts(row["next_run_time"]),
        licenseType=LicenseType(row["license_type"]), roleName=row["role_name"],
        latestAmiId=row["latest_ami_id"], state=ReplicationJobState(row["state"]),
        statusMessage=row["status_message"], description=row["description"],
        numberOfRecentAmisToKeep=row["amis_to_keep"], encrypted=bool(row["encrypted"]),
        kmsKeyId=row["kms_key_id"], replicationRunList=[run_from_row(r) for r in runs])
