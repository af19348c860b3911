"""The ec2 image target: an EBS snapshot of the disk, then RegisterImage.

The snapshot is written with the EBS direct APIs (StartSnapshot, PutSnapshotBlock,
CompleteSnapshot): every 512 KiB block that holds data is sent with its SHA-256; zero
and unallocated blocks are never read or sent (a new snapshot reads them as zeros).
The image is registered with root device /dev/sda1, legacy BIOS boot and the
architecture inspection found.  The endpoint is configurable (``endpoint_url``), so any
EC2/EBS-compatible service, or moto's server in the tests, can stand in for AWS.

This makes a full snapshot of one run.  Incremental snapshots (a run as a child of the
previous run's snapshot, ParentSnapshotId) belong to the EBS publisher.  Both send blocks
through the one EBS uploader (:class:`smsblock.publish.ebs.EbsUploader`): one retry
policy, one bandwidth cap, one checksum code; its settings are the ``[ebs]`` ones
(docs/cloud.md).
"""

from __future__ import annotations

import uuid

from ..errors import ImageError, StoreError
from ..progress import with_phase
from ..publish.ebs import EBS_BLOCK, GIB, EbsUploader
ARCHITECTURES = {"x86_64": "x86_64", "i386": "i386", "aarch64": "arm64"}


def _data_blocks(disk):
    """Indices of the 512 KiB blocks that overlap a DATA extent, in order, once each."""
    last = -1
    for extent in disk.extents():
        if not extent.is_data:
            continue
        first = max(extent.offset // EBS_BLOCK, last + 1)
        end = (extent.end + EBS_BLOCK - 1) // EBS_BLOCK
        for i in range(first, end):
            yield i
        last = max(last, end - 1)


def _settings(endpoint_url, region):
    try:
        import boto3
    except ImportError:
        raise ImageError("--target ec2 needs boto3 (pip install smsblock[cloud])") from None
    from ..backend.s3config import CloudSettings
    region = region or boto3.session.Session().region_name or "us-east-1"
    return CloudSettings.load(section="ebs", endpoint_url=endpoint_url, region=region)


def _clients(endpoint_url, region):
    settings = _settings(endpoint_url, region)
    return settings.client("ebs", max_pool=settings.parallel), settings.client("ec2")


def _uploader(endpoint_url, region) -> EbsUploader:
    """The one EBS/EC2 client with the one retry policy, for the EC2 calls of a launch."""
    ebs, ec2 = _clients(endpoint_url, region)
    return EbsUploader(_settings(endpoint_url, region), ebs=ebs, ec2=ec2)


def register_ec2(disk, *, name: str, description: str, architecture: str,
                 endpoint_url: str | None = None, region: str | None = None,
                 tags: dict | None = None, progress=None, cancel=None) -> dict:
    """Snapshot ``disk`` to EBS and register it; returns image and snapshot ids."""
    progress = with_phase(progress, "uploading")
    from botocore.exceptions import BotoCoreError, ClientError

    arch = ARCHITECTURES.get(architecture)
    if arch is None:
        raise ImageError(f"EC2 images cannot have architecture {architecture!r}")
    up = _uploader(endpoint_url, region)
    ec2 = up.ec2
    size_gib = max(1, -(-disk.size // GIB))
    snapshot_id = None

    def read(index: int) -> bytes:
        buf = bytearray(EBS_BLOCK)
        n = disk.readinto(index * EBS_BLOCK, buf)
        if n < EBS_BLOCK:
            buf[n:] = bytes(EBS_BLOCK - n)
        return bytes(buf)

    def done(index: int) -> None:
        if progress is not None:
            progress(min((index + 1) * EBS_BLOCK, disk.size), disk.size)
    try:
        snapshot_id = up.start(volume_gib=size_gib, description=description, tags=tags or {})
        # a generator of indexes: memory stays flat on huge disks; all-zero blocks read as
        # zeros without being sent
        sent = up.put_blocks(snapshot_id, _data_blocks(disk), read, skip_zero=True,
                             cancel=cancel, on_block=done)
        if progress is not None:
            progress(disk.size, disk.size)
        up.complete(snapshot_id, sent.count, sent.checksum)
        up.wait_completed(snapshot_id, cancel)
        image = up.call(f"register image {name}", lambda: ec2.register_image(
            Name=name, Description=description[:255], Architecture=arch,
            RootDeviceName="/dev/sda1", VirtualizationType="hvm", BootMode="legacy-bios",
            BlockDeviceMappings=[{"DeviceName": "/dev/sda1",
                                  "Ebs": {"SnapshotId": snapshot_id, "DeleteOnTermination": True}}]))
    except BaseException as e:       # cancelled, disk error or AWS error: drop the snapshot
        if snapshot_id is not None:
            try:
                up.delete_snapshot(snapshot_id)
            except (ClientError, BotoCoreError, StoreError):
                pass
        if isinstance(e, (ClientError, BotoCoreError, StoreError)):
            raise ImageError(f"EC2 registration failed at {endpoint_url or 'the default endpoint'}: "
                             f"{e}") from None
        raise
    return {"ec2_image_id": image["ImageId"], "snapshot_id": snapshot_id, "blocks_sent": sent.count,
            "volume_size_gib": size_gib, "endpoint_url": endpoint_url}


def _ec2_failure(what, endpoint_url, e) -> ImageError:
    return ImageError(f"{what} failed at {endpoint_url or 'the default endpoint'}: {e}")


def run_instance(image_id: str, *, instance_type: str = "t3.micro",
                 endpoint_url: str | None = None, region: str | None = None) -> dict:
    """RunInstances with one registered AMI; returns the instance id, state and region."""
    from botocore.exceptions import BotoCoreError, ClientError

    up = _uploader(endpoint_url, region)
    ec2 = up.ec2
    # one client token for every attempt: a retried RunInstances launches one instance
    token = uuid.uuid4().hex
    try:
        reply = up.call(f"RunInstances of {image_id}", lambda: ec2.run_instances(
            ImageId=image_id, InstanceType=instance_type, MinCount=1, MaxCount=1,
            ClientToken=token,
            TagSpecifications=[{"ResourceType": "instance",
                                "Tags": [{"Key": "smsblock:image", "Value": image_id}]}]))
    except (ClientError, BotoCoreError, StoreError) as e:
        raise _ec2_failure(f"RunInstances of {image_id}", endpoint_url, e) from None
    instance = reply["Instances"][0]
    return {"instance_id": instance["InstanceId"],
            "state": instance.get("State", {}).get("Name", "pending"),
            "region": ec2.meta.region_name}


def terminate_ec2_instance(instance_id: str, *, endpoint_url: str | None = None,
                           region: str | None = None) -> str:
    """TerminateInstances; returns the instance's new state (``shutting-down``...)."""
    from botocore.exceptions import BotoCoreError, ClientError

    up = _uploader(endpoint_url, region)
    try:
        # terminating twice is harmless: retried under the one policy
        reply = up.call(f"TerminateInstances of {instance_id}",
                        lambda: up.ec2.terminate_instances(InstanceIds=[instance_id]))
    except (ClientError, BotoCoreError, StoreError) as e:
        raise _ec2_failure(f"TerminateInstances of {instance_id}", endpoint_url, e) from None
    changes = reply.get("TerminatingInstances") or [{}]
    return changes[0].get("CurrentState", {}).get("Name", "shutting-down")
