"""Validation rules: the supported list as data, version ranges, Windows editions and
bitness, --allow-unsupported, license types, and replacing the list with another file."""

from __future__ import annotations

import json

import pytest

from image_builders import DISTROS
from smsblock.errors import UsageError
from smsblock.image.findings import Finding
from smsblock.image.inspect import InspectionReport, PartitionReport
from smsblock.image.osdetect import OsInfo
from smsblock.image.rules import DEFAULT_RULES, REFUSED, SUPPORTED, UNSUPPORTED, in_range, load_rules
from smsblock.image.validate import validate

RULES = load_rules()


@pytest.mark.parametrize("version,lo,hi,ok", [
    ("7.2.1511", "7.0", "7.2", True), ("7.3.1611", "7.0", "7.2", False), ("7", "7.0", "7.2", True),
    ("7.8", "7.0.0", "7.8.0", True), ("7.9", "7.0.0", "7.8.0", False), ("6.0.10", "6.0.0", "6.0.8", False),
    ("16.04", "12.04", "16.10", True), ("16.10", "12.04", "16.10", True), ("17.04", "12.04", "16.10", False),
    ("12.04", "12.04", "16.10", True), ("11.10", "12.04", "16.10", False), ("", "1", "2", False),
    ("5.11", "5.1", "5.11", True), ("5.2", "5.1", "5.11", True),
])
def test_version_ranges(version, lo, hi, ok):
    assert in_range(version, lo, hi) is ok


@pytest.mark.parametrize("distro", sorted(DISTROS))
def test_every_test_distribution_against_the_list(distro):
    dist, version, _ = DISTROS[distro]["expect"]
    verdict = RULES.check_linux(dist, version, "x86_64")
    want = REFUSED if DISTROS[distro].get("refused") else \
        SUPPORTED if DISTROS[distro]["supported"] else UNSUPPORTED
    assert verdict.status == want, verdict.reason


@pytest.mark.parametrize("dist,version,status", [
    ("rhel", "6.0", REFUSED), ("centos", "6.0", REFUSED), ("rhel", "7.2", UNSUPPORTED),
    ("centos", "7.2", SUPPORTED), ("suse", "11", UNSUPPORTED), ("suse", "11.1", SUPPORTED),
    ("suse", "12.2", UNSUPPORTED), ("oracle", "7.1", SUPPORTED), ("oracle", "7.2", UNSUPPORTED),
    ("fedora", "19", SUPPORTED), ("fedora", "22", UNSUPPORTED), ("debian", "8.1", UNSUPPORTED),
    ("alpine", "3.4", UNSUPPORTED), ("ubuntu", None, UNSUPPORTED),
])
def test_linux_list_edges(dist, version, status):
    assert RULES.check_linux(dist, version, "x86_64").status == status


# every range of the guide's list, from its text in issue 5: each bound, and the nearest
# version outside it on either side
GUIDE_BOUNDARIES = [
    ("ubuntu", "11.10", UNSUPPORTED), ("ubuntu", "12.04", SUPPORTED), ("ubuntu", "12.04.5", SUPPORTED),
    ("ubuntu", "16.10", SUPPORTED), ("ubuntu", "17.04", UNSUPPORTED),
    *[(d, v, s) for d in ("rhel", "centos") for v, s in (
        ("5.0", UNSUPPORTED), ("5.1", SUPPORTED), ("5.11", SUPPORTED), ("5.12", UNSUPPORTED),
        ("6.0", REFUSED), ("6.1", SUPPORTED), ("6.6", SUPPORTED), ("6.7", UNSUPPORTED),
        ("7.0", SUPPORTED), ("7.1", SUPPORTED), ("4.9", UNSUPPORTED), ("8.0", UNSUPPORTED))],
    ("rhel", "7.2", UNSUPPORTED), ("centos", "7.2", SUPPORTED), ("centos", "7.2.1511", SUPPORTED),
    ("centos", "7.3.1611", UNSUPPORTED),
    ("suse", "10.4", UNSUPPORTED), ("suse", "11", UNSUPPORTED), ("suse", "11.1", SUPPORTED),
    ("suse", "11.4", SUPPORTED), ("suse", "11.5", UNSUPPORTED), ("suse", "12", UNSUPPORTED),
    ("suse", "12.1", SUPPORTED), ("suse", "12.2", UNSUPPORTED),
    ("debian", "5.0.10", UNSUPPORTED), ("debian", "6.0.0", SUPPORTED), ("debian", "6.0", SUPPORTED),
    ("debian", "6.0.8", SUPPORTED), ("debian", "6.0.9", UNSUPPORTED), ("debian", "6.0.10", UNSUPPORTED),
    ("debian", "7.0.0", SUPPORTED), ("debian", "7.0", SUPPORTED), ("debian", "7.8.0", SUPPORTED),
    ("debian", "7.8", SUPPORTED), ("debian", "7.9", UNSUPPORTED), ("debian", "7.11", UNSUPPORTED),
    ("debian", "8.0.0", SUPPORTED), ("debian", "8.0", SUPPORTED), ("debian", "8.1", UNSUPPORTED),
    ("oracle", "6.0", UNSUPPORTED), ("oracle", "6.1", SUPPORTED), ("oracle", "6.6", SUPPORTED),
    ("oracle", "6.7", UNSUPPORTED), ("oracle", "7.0", SUPPORTED), ("oracle", "7.1", SUPPORTED),
    ("oracle", "7.2", UNSUPPORTED),
    ("fedora", "18", UNSUPPORTED), ("fedora", "19", SUPPORTED), ("fedora", "21", SUPPORTED),
    ("fedora", "22", UNSUPPORTED),
]


@pytest.mark.parametrize("dist,version,status", GUIDE_BOUNDARIES)
def test_guide_list_boundaries(dist, version, status):
    verdict = RULES.check_linux(dist, version, "x86_64")
    assert verdict.status == status, verdict.reason
    assert RULES.check_linux(dist, version, "i386").status == status


def test_refusal_says_why():
    assert "lacks the drivers" in RULES.check_linux("rhel", "6.0", "x86_64").reason
    assert "5.1-5.11, 6.1-6.6, 7.0-7.1" in RULES.check_linux("rhel", "7.3", "x86_64").reason
    assert RULES.check_linux("ubuntu", "14.04", "aarch64").status == UNSUPPORTED


@pytest.mark.parametrize("product,edition,sp,arch,status", [
    ("Windows Server 2003 R2 Enterprise Edition", "ServerEnterprise", "Service Pack 2", "i386", SUPPORTED),
    ("Microsoft Windows Server 2003", "ServerStandard", None, "i386", UNSUPPORTED),   # no SP1
    ("Microsoft Windows Server 2003", "ServerStandard", "Service Pack 1", "x86_64", SUPPORTED),
    ("Windows Server (R) 2008 Standard", "ServerStandard", "Service Pack 2", "i386", SUPPORTED),
    ("Windows Server 2008 R2 Datacenter", "ServerDatacenter", "Service Pack 1", "x86_64", SUPPORTED),
    ("Windows Server 2008 R2 Standard", "ServerStandard", None, "i386", UNSUPPORTED),
    ("Windows Server 2012 Datacenter", "ServerDatacenter", None, "x86_64", SUPPORTED),
    ("Windows Server 2012 R2 Essentials", "ServerSolution", None, "x86_64", UNSUPPORTED),
    ("Windows Server 2016 Standard", "ServerStandard", None, "x86_64", SUPPORTED),
    ("Windows Server 2019 Standard", "ServerStandard", None, "x86_64", UNSUPPORTED),
    ("Windows 7 Professional", "Professional", "Service Pack 1", "i386", SUPPORTED),
    ("Windows 7 Starter", "Starter", None, "i386", UNSUPPORTED),
    ("Windows 8", "Core", None, "i386", SUPPORTED),
    ("Windows 8.1 Pro", "Professional", None, "x86_64", SUPPORTED),
    ("Windows 8.1 Pro", "Professional", None, "i386", UNSUPPORTED),
    ("Windows 10 Education", "Education", None, "x86_64", SUPPORTED),
    ("Windows 10 Home", "Core", None, "i386", UNSUPPORTED),
    ("Windows Vista Business", "Business", None, "i386", UNSUPPORTED),
])
def test_windows_list(product, edition, sp, arch, status):
    assert RULES.check_windows(product, edition, sp, arch).status == status


# the Windows products of the guide, each with a supported edition and bitness, and its
# neighbours: the product before and after, an edition or bitness off the list
WINDOWS_BOUNDARIES = [
    ("Microsoft Windows 2000", "", "Service Pack 4", "i386", UNSUPPORTED),
    ("Microsoft Windows Server 2003", "ServerEnterprise", None, "x86_64", UNSUPPORTED),
    ("Microsoft Windows Server 2003", "ServerEnterprise", "Service Pack 1", "x86_64", SUPPORTED),
    ("Microsoft Windows Server 2003", "ServerDatacenter", "Service Pack 2", "i386", SUPPORTED),
    ("Microsoft Windows Server 2003", "ServerWeb", "Service Pack 2", "i386", UNSUPPORTED),
    ("Windows Server 2008 Enterprise", "ServerEnterprise", "Service Pack 2", "x86_64", SUPPORTED),
    ("Windows Server 2008 Datacenter", "ServerDatacenter", None, "i386", SUPPORTED),
    ("Windows Server 2008 R2 Enterprise", "ServerEnterprise", None, "x86_64", SUPPORTED),
    ("Windows Server 2012 Standard", "ServerStandard", None, "x86_64", SUPPORTED),
    ("Windows Server 2012 Foundation", "ServerFoundation", None, "x86_64", UNSUPPORTED),
    ("Windows Server 2012 R2 Datacenter", "ServerDatacenter", None, "x86_64", SUPPORTED),
    ("Windows Server 2016 Datacenter", "ServerDatacenter", None, "x86_64", SUPPORTED),
    ("Windows Server 2016 Essentials", "ServerSolution", None, "x86_64", UNSUPPORTED),
    ("Windows Vista Ultimate", "Ultimate", "Service Pack 2", "x86_64", UNSUPPORTED),
    ("Windows 7 Enterprise", "Enterprise", None, "x86_64", SUPPORTED),
    ("Windows 7 Home Premium", "HomePremium", "Service Pack 1", "x86_64", SUPPORTED),
    ("Windows 8 Enterprise", "Enterprise", None, "x86_64", SUPPORTED),
    ("Windows 8 Pro", "Professional", None, "i386", SUPPORTED),
    ("Windows 8.1 Enterprise", "Enterprise", None, "x86_64", SUPPORTED),
    ("Windows 8.1", "Core", None, "x86_64", UNSUPPORTED),
    ("Windows 10 Enterprise", "Enterprise", None, "x86_64", SUPPORTED),
    ("Windows 10 Home", "Core", None, "x86_64", SUPPORTED),
    ("Windows 10 Pro", "Professional", None, "i386", UNSUPPORTED),
    ("Windows 11 Pro", "Professional", None, "x86_64", UNSUPPORTED),
    # Windows Server 2003's hive has no EditionID and its ProductName names no edition
    ("Microsoft Windows Server 2003", None, "Service Pack 2", "i386", SUPPORTED),
    ("Microsoft Windows Server 2003 R2", None, "Service Pack 2", "x86_64", SUPPORTED),
    ("Microsoft Windows Server 2003", None, None, "i386", UNSUPPORTED),
    ("Windows 7 Starter", None, "Service Pack 1", "i386", UNSUPPORTED),
]


@pytest.mark.parametrize("product,edition,sp,arch,status", WINDOWS_BOUNDARIES)
def test_windows_guide_boundaries(product, edition, sp, arch, status):
    verdict = RULES.check_windows(product, edition, sp, arch)
    assert verdict.status == status, verdict.reason


def test_license_auto():
    assert RULES.resolve_license("Auto", "linux") == "BYOL"
    assert RULES.resolve_license("Auto", "windows") == "AWS"
    assert RULES.resolve_license("AWS", "linux") == "AWS"
    assert RULES.resolve_license("BYOL", "windows") == "BYOL"
    with pytest.raises(UsageError):
        RULES.resolve_license("Free", "linux")


def _report(os_info, *, table="mbr", boot="grub2", fs="ext4", bootable=True):
    parts = [PartitionReport(1, 1 << 20, 8 << 20, "0x83", bootable, fs)]
    return InspectionReport(9 << 20, table, parts, boot, None, os_info, [])


def _codes(findings):
    return [(f.severity, f.code) for f in findings]


def test_linux_rules():
    centos = OsInfo("linux", "centos", "7.2.1511", "x86_64", root_partition=1, root_filesystem="ext4")
    assert _codes(validate(_report(centos))) == [("info", "mbr"), ("info", "os-supported")]
    assert _codes(validate(_report(centos, table="gpt", boot="windows"))) == [
        ("error", "gpt-not-supported"), ("error", "bootloader-unsupported"), ("info", "os-supported")]
    vfat_root = OsInfo("linux", "centos", "7.1", "x86_64", root_partition=1, root_filesystem="vfat")
    assert ("error", "linux-root-filesystem") in _codes(validate(_report(vfat_root)))
    legacy = validate(_report(centos, boot="grub-legacy"))
    assert _codes(legacy) == [("info", "mbr"), ("info", "os-supported")]
    no_arch = OsInfo("linux", "debian", "7.8", None, root_partition=1, root_filesystem="ext4")
    assert ("warning", "architecture-unknown") in _codes(validate(_report(no_arch)))


def test_allow_unsupported_turns_os_list_errors_into_warnings():
    new = OsInfo("linux", "ubuntu", "18.04", "x86_64", root_partition=1, root_filesystem="ext4")
    strict = validate(_report(new))
    assert ("error", "os-unsupported") in _codes(strict)
    relaxed = validate(_report(new), allow_unsupported=True)
    assert ("warning", "os-unsupported") in _codes(relaxed)
    assert "--allow-unsupported" in [f for f in relaxed if f.code == "os-unsupported"][0].message
    # layout errors stay errors
    relaxed_gpt = validate(_report(new, table="gpt"), allow_unsupported=True)
    assert ("error", "gpt-not-supported") in _codes(relaxed_gpt)
    refused = OsInfo("linux", "rhel", "6.0", "x86_64", root_partition=1, root_filesystem="ext4")
    assert ("warning", "os-refused") in _codes(validate(_report(refused), allow_unsupported=True))
    assert ("warning", "os-not-found") in _codes(validate(_report(None), allow_unsupported=True))


def test_windows_rules():
    win = OsInfo("windows", "Windows Server 2012 R2 Standard", "6.3.9600", "x86_64",
                 edition="ServerStandard", root_partition=1, root_filesystem="ntfs")
    assert _codes(validate(_report(win, boot="windows", fs="ntfs"))) == [
        ("info", "mbr"), ("info", "os-supported")]
    assert _codes(validate(_report(win, boot="windows", fs="ntfs", bootable=False))) == [
        ("info", "mbr"), ("error", "no-active-partition"), ("info", "os-supported")]
    assert ("error", "windows-not-ntfs") in _codes(validate(_report(None, boot="windows", fs="vfat")))


def test_windows_edition_not_recorded_is_a_warning():
    w2003 = OsInfo("windows", "Microsoft Windows Server 2003", "5.2.3790", "i386",
                   service_pack="Service Pack 2", root_partition=1, root_filesystem="ntfs")
    found = validate(_report(w2003, boot="windows", fs="ntfs"))
    assert _codes(found) == [("info", "mbr"), ("info", "os-supported"), ("warning", "os-edition-unknown")]
    assert "Standard, Enterprise, Datacenter" in found[2].message
    win = OsInfo("windows", "Windows 7 Ultimate", "6.1.7601", "x86_64", edition="Ultimate",
                 root_partition=1, root_filesystem="ntfs")
    assert "os-edition-unknown" not in [f.code for f in validate(_report(win, boot="windows", fs="ntfs"))]


def test_rules_are_replaceable(tmp_path, monkeypatch):
    data = json.loads(DEFAULT_RULES.read_text())
    for d in data["linux"]["distributions"]:
        if d["id"] == "ubuntu":
            d["versions"].append({"from": "18.04", "to": "18.04"})
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(data))
    assert load_rules(newer).check_linux("ubuntu", "18.04", "x86_64").status == SUPPORTED
    monkeypatch.setenv("SMSBLOCK_SUPPORTED_OS", str(newer))
    assert load_rules().check_linux("ubuntu", "18.04", "x86_64").status == SUPPORTED
    bad = tmp_path / "bad.json"
    bad.write_text('{"linux": {}}')
    with pytest.raises(UsageError, match="not a valid supported-OS list"):
        load_rules(bad)
    bad.write_text("{nope")
    with pytest.raises(UsageError, match="not JSON"):
        load_rules(bad)


def test_finding_severity_is_checked():
    with pytest.raises(ValueError):
        Finding("fatal", "x", "y")


@pytest.mark.parametrize("boot_code, want_error", [("grub2", False), ("syslinux", True)])
def test_unreadable_jfs_root_is_a_warning_not_a_refusal(boot_code, want_error):
    """The guide allows a Linux root on JFS, which OS detection cannot read: no OS found is
    then a warning (OS list not checked), and the GRUB rule still applies."""
    part = PartitionReport(1, 1 << 20, 64 << 20, "0x83", True, "jfs", None, None, "primary")
    report = InspectionReport(65 << 20, "mbr", [part], boot_code=boot_code)
    findings = validate(report)
    codes = {f.code: f.severity for f in findings}
    assert codes.get("os-not-read") == "warning" and "os-not-found" not in codes
    assert ("bootloader-unsupported" in codes) is want_error
    # a disk with nothing an OS could live on is still refused
    bare = InspectionReport(65 << 20, "mbr", [PartitionReport(1, 1 << 20, 64 << 20, "0x82", False, "swap",
                                                              None, None, "primary")], boot_code="grub2")
    assert {f.code: f.severity for f in validate(bare)}.get("os-not-found") == "error"
