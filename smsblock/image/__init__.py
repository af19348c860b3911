"""The image step: look inside a disk, say whether and why it can (not) boot in the cloud,
and register it as a machine image.

* :func:`inspect_disk` / :func:`inspect_and_validate`: partition table (MBR/GPT),
  filesystems, MBR boot code and operating system of any :class:`~smsblock.disk.Disk`
  (a raw file, a VMDK, a stored run), as an :class:`InspectionReport`;
* :func:`validate` against :func:`load_rules` (the supported-OS list as data);
* :func:`create_image` (local catalog: streamOptimized VMDK + JSON record, or EC2) and
  :class:`Catalog` (list, show, delete);
* :func:`launch_image`, :func:`list_launches`, :func:`terminate_instance` (QEMU here or
  EC2) and :func:`boot_test` (how far an image boots under QEMU).
"""

from .boottest import BootTestResult, boot_test
from .catalog import Catalog
from .findings import ERROR, INFO, WARNING, Finding
from .inspect import InspectionReport, PartitionReport, inspect_disk
from .launch import launch_image, list_launches, terminate_instance
from .osdetect import OsInfo
from .register import create_image
from .rules import Rules, load_rules
from .validate import inspect_and_validate, validate

__all__ = ["inspect_disk", "inspect_and_validate", "validate", "load_rules", "Rules",
           "create_image", "Catalog", "InspectionReport", "PartitionReport", "OsInfo", "Finding",
           "ERROR", "WARNING", "INFO", "launch_image", "list_launches", "terminate_instance",
           "boot_test", "BootTestResult"]
