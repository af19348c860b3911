"""The operating system on a disk, from files in its root filesystem.

Linux: etc/os-release, etc/redhat-release (and its centos/oracle/fedora siblings),
etc/lsb-release, etc/SuSE-release and etc/debian_version, read from ext2/3/4 (libfsext),
XFS (libfsxfs) or Btrfs (:mod:`.btrfs`); the most precise consistent version wins
(redhat-release's 7.2.1511 over os-release's 7).  The architecture comes from the ELF
header of /bin/sh.  Windows: ProductName, version, build, edition and service pack from
the SOFTWARE registry hive (libregf) on NTFS (libfsntfs); 64-bit when SysWOW64 exists.

The files are read through :mod:`.fsreaders` (the libyal bindings over a
:class:`~.region.Region`), so only the blocks a lookup needs are read, from any disk.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from .findings import INFO, WARNING, Finding
from .fsreaders import EntryFile, PathReader, ntfs_entry

LINUX_READABLE = ("ext2", "ext3", "ext4", "xfs", "btrfs")


@dataclass(slots=True)
class OsInfo:
    """What runs on the disk; ``family`` is "linux" or "windows"."""

    family: str
    distribution: str | None
    version: str | None
    architecture: str | None
    name: str | None = None             # PRETTY_NAME / ProductName, for people
    edition: str | None = None          # Windows EditionID
    service_pack: str | None = None     # Windows CSDVersion
    root_partition: int | None = None
    root_filesystem: str | None = None
    sources: list[str] = field(default_factory=list)   # files the answer came from

    def to_dict(self) -> dict:
        return {"family": self.family, "distribution": self.distribution,
                "version": self.version, "architecture": self.architecture,
                "name": self.name, "edition": self.edition, "service_pack": self.service_pack,
                "root_partition": self.root_partition, "root_filesystem": self.root_filesystem,
                "sources": list(self.sources)}


# --- Linux ------------------------------------------------------------------------

_VERSION = re.compile(r"\d+(?:\.\d+)*")
_OS_RELEASE_IDS = {"rhel": "rhel", "centos": "centos", "ol": "oracle", "oracle": "oracle",
                   "sles": "suse", "sled": "suse", "sles_sap": "suse", "ubuntu": "ubuntu",
                   "debian": "debian", "fedora": "fedora"}
_LINUX_FILES = ("etc/os-release", "usr/lib/os-release", "etc/lsb-release", "etc/redhat-release",
                "etc/centos-release", "etc/oracle-release", "etc/fedora-release",
                "etc/SuSE-release", "etc/debian_version", "etc/system-release")
_ELF_MACHINES = {3: "i386", 62: "x86_64", 183: "aarch64", 40: "arm", 20: "ppc", 21: "ppc64",
                 22: "s390x", 243: "riscv64", 8: "mips"}
_ARCH_FILES = ("bin/sh", "usr/bin/sh", "bin/bash", "sbin/init", "usr/bin/env", "bin/ls")


def _kv(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
            v = v[1:-1]
        out[k.strip()] = v
    return out


def _version(text: str | None) -> str | None:
    m = _VERSION.search(text or "")
    return m.group(0) if m else None


def _redhat_distribution(line: str) -> str | None:
    low = line.lower()
    for needle, dist in (("centos", "centos"), ("oracle", "oracle"), ("fedora", "fedora"),
                         ("red hat enterprise", "rhel"), ("scientific", "scientific"),
                         ("amazon", "amzn"), ("enterprise linux", "oracle")):
        if needle in low:
            return dist
    return None


Claim = tuple[str, "str | None", str]      # (distribution, version or None, file)


def linux_release(files: dict[str, str]) -> tuple[str | None, str | None, str | None, list[str], list[Finding]]:
    """(distribution, version, pretty name, files used, findings) from release file texts.

    ``files`` maps paths like "etc/os-release" to their text.  The distribution is taken
    from the most specific file; the version is the most precise one among the files
    that agree on the distribution (more numeric components, same leading ones).
    """
    claims: list[Claim] = []
    prettys: list[str | None] = []
    for read in (_redhat_claims, _os_release_claims, _suse_claims, _lsb_claims):
        more, pretty = read(files)
        claims += more
        prettys.append(pretty)
    claims += _debian_claims(files, have_others=bool(claims))
    if not claims:
        return None, None, None, [], []
    # prettiest name: os-release's, else the first release file that gave one
    pretty = next((p for p in [prettys[1], prettys[0], *prettys[2:]] if p), None)

    # the distribution: oracle-release beats the RHEL-compatible redhat-release it ships,
    # otherwise the first claim in the order above (specific files, then os-release)
    distribution = claims[0][0]
    findings: list[Finding] = []
    others = {c[0] for c in claims} - {distribution}
    if others - {"debian"} and not (distribution == "oracle" and others <= {"rhel"}):
        findings.append(Finding(INFO, "os-release-disagree",
                                f"Release files name different distributions ({distribution}, "
                                f"{', '.join(sorted(others))}); {claims[0][2]} was believed."))
    agreeing = [c for c in claims if c[0] == distribution]
    version = _most_precise([(v, f) for _d, v, f in agreeing if v], findings)
    return distribution, version, pretty, [f for _d, _v, f in agreeing], findings


def _most_precise(versions: list[tuple[str, str]], findings: list[Finding]) -> str | None:
    """The version that extends all the others ("7.2.1511" over "7"); on a conflict the
    first is kept and the disagreement is a finding."""
    if not versions:
        return None
    best_v, best_f = versions[0]
    for v, f in versions[1:]:
        a, b = best_v.split("."), v.split(".")
        if b[:len(a)] == a and len(b) > len(a):
            best_v, best_f = v, f
        elif a[:len(b)] != b:
            findings.append(Finding(INFO, "os-version-disagree",
                                    f"{best_f} says version {best_v} but {f} says {v}; "
                                    f"{best_v} was believed."))
    return best_v


def _redhat_claims(files) -> tuple[list[Claim], str | None]:
    """etc/redhat-release and its siblings: "CentOS Linux release 7.2.1511 (Core)"."""
    claims, pretty = [], None
    for path in ("etc/oracle-release", "etc/centos-release", "etc/fedora-release",
                 "etc/redhat-release", "etc/system-release"):
        text = files.get(path)
        if not (text and text.strip()):
            continue
        line = text.strip().splitlines()[0]
        dist = _redhat_distribution(line)
        if dist:
            m = re.search(r"release\s+(\d+(?:\.\d+)*)", line)
            claims.append((dist, m.group(1) if m else None, path))
            pretty = pretty or line
    return claims, pretty


def _os_release_claims(files) -> tuple[list[Claim], str | None]:
    text = files.get("etc/os-release") or files.get("usr/lib/os-release")
    path = "etc/os-release" if "etc/os-release" in files else "usr/lib/os-release"
    osr = _kv(text) if text else {}
    pretty = (osr.get("PRETTY_NAME") or osr.get("NAME")) if osr else None
    if not osr.get("ID"):
        return [], pretty
    osr_id = osr["ID"].lower()
    return [(_OS_RELEASE_IDS.get(osr_id, osr_id), _version(osr.get("VERSION_ID")), path)], pretty


def _suse_claims(files) -> tuple[list[Claim], str | None]:
    """etc/SuSE-release: the version is VERSION.PATCHLEVEL (11.4 is 11 SP4)."""
    suse = files.get("etc/SuSE-release")
    if not (suse and suse.strip()):
        return [], None
    first = suse.strip().splitlines()[0]
    kv = {k.strip().upper(): v.strip() for k, v in
          (ln.split("=", 1) for ln in suse.splitlines() if "=" in ln)}
    dist = "opensuse" if "opensuse" in first.lower() and "enterprise" not in first.lower() else "suse"
    ver = _version(kv.get("VERSION")) or _version(first)
    if ver and kv.get("PATCHLEVEL", "").isdigit() and "." not in ver:
        ver = f"{ver}.{kv['PATCHLEVEL']}"
    return [(dist, ver, "etc/SuSE-release")], first


def _lsb_claims(files) -> tuple[list[Claim], str | None]:
    lsb = _kv(files.get("etc/lsb-release") or "")
    if not lsb.get("DISTRIB_ID"):
        return [], None
    lsb_id = lsb["DISTRIB_ID"].lower()
    return ([(_OS_RELEASE_IDS.get(lsb_id, lsb_id), _version(lsb.get("DISTRIB_RELEASE")),
              "etc/lsb-release")], lsb.get("DISTRIB_DESCRIPTION"))


def _debian_claims(files, have_others: bool) -> list[Claim]:
    """etc/debian_version: "7.8" is a version; "stretch/sid" (Ubuntu's) only counts alone."""
    deb = (files.get("etc/debian_version") or "").strip()
    if deb and re.fullmatch(r"\d+(\.\d+)*", deb):
        return [("debian", deb, "etc/debian_version")]
    if deb and not have_others:
        return [("debian", None, "etc/debian_version")]
    return []


def elf_architecture(header: bytes) -> str | None:
    """The CPU architecture an ELF header names (None when it is not ELF)."""
    if len(header) < 20 or header[:4] != b"\x7fELF":
        return None
    fmt = "<H" if header[5] == 1 else ">H"
    machine = struct.unpack_from(fmt, header, 18)[0]
    if machine == 62 and header[4] == 1:
        return "x86_64"       # x32 ABI
    return _ELF_MACHINES.get(machine, f"elf-machine-{machine}")


def detect_linux(reader: PathReader) -> tuple[OsInfo | None, list[Finding]]:
    """The Linux distribution on one filesystem (None when it holds no release files)."""
    texts = {}
    for path in _LINUX_FILES:
        data = reader.read_file(path)
        if data is not None:
            texts[path] = data.decode("utf-8", "replace")
    dist, version, pretty, used, findings = linux_release(texts)
    if dist is None:
        return None, findings
    arch = None
    for path in _ARCH_FILES:
        data = reader.read_file(path, 64)
        arch = elf_architecture(data or b"")
        if arch:
            break
    if arch is None:
        m = re.search(r"\((x86_64|i[3-6]86|aarch64|s390x|ppc64le?)\)", texts.get("etc/SuSE-release", ""))
        arch = m.group(1) if m else None
        if arch and re.fullmatch(r"i[3-6]86", arch):
            arch = "i386"
    return OsInfo("linux", dist, version, arch, name=pretty, sources=used), findings


# --- Windows ----------------------------------------------------------------------

SOFTWARE_HIVE = "\\Windows\\System32\\config\\SOFTWARE"
CURRENT_VERSION_KEY = "Microsoft\\Windows NT\\CurrentVersion"


def _reg_value(key, name):
    value = key.get_value_by_name(name)
    if value is None:
        return None
    if value.type in (1, 2):       # REG_SZ, REG_EXPAND_SZ
        return (value.get_data_as_string() or "").strip() or None
    if value.type == 4:            # REG_DWORD
        return value.get_data_as_integer()
    return None


def windows_version(values: dict) -> tuple[str | None, str | None, str | None, str | None]:
    """(product name, version, edition, service pack) from CurrentVersion's values."""
    major, minor = values.get("CurrentMajorVersionNumber"), values.get("CurrentMinorVersionNumber")
    version = f"{major}.{minor}" if isinstance(major, int) and isinstance(minor, int) \
        else values.get("CurrentVersion")
    build = values.get("CurrentBuildNumber") or values.get("CurrentBuild")
    if version and build and str(build).isdigit():
        version = f"{version}.{build}"
    return values.get("ProductName"), version, values.get("EditionID"), values.get("CSDVersion")


def detect_windows(volume) -> tuple[OsInfo | None, list[Finding]]:
    """Windows from the SOFTWARE hive on an NTFS volume (None when there is none)."""
    entry = ntfs_entry(volume, SOFTWARE_HIVE)
    if entry is None:
        return None, []
    try:
        import pyregf
    except ImportError:
        return None, [Finding(WARNING, "fs-reader-missing", "A Windows SOFTWARE hive is present but "
                              "the pyregf library is not installed (pip install smsblock[image]).")]
    try:
        hive = pyregf.file()
        hive.open_file_object(EntryFile(entry))
        key = hive.get_key_by_path(CURRENT_VERSION_KEY)
        if key is None:
            return None, [Finding(WARNING, "windows-hive-incomplete",
                                  f"The SOFTWARE hive has no {CURRENT_VERSION_KEY} key.")]
        values = {n: _reg_value(key, n) for n in (
            "ProductName", "CurrentVersion", "CurrentBuildNumber", "CurrentBuild", "EditionID",
            "CSDVersion", "CurrentMajorVersionNumber", "CurrentMinorVersionNumber")}
    except Exception as e:
        return None, [Finding(WARNING, "windows-hive-unreadable",
                              f"The SOFTWARE registry hive could not be read ({e}).")]
    product, version, edition, sp = windows_version(values)
    if ntfs_entry(volume, "\\Windows\\SysWOW64") is not None:
        arch = "x86_64"
    elif ntfs_entry(volume, "\\Windows\\System32") is not None:
        arch = "i386"
    else:
        arch = None
    return OsInfo("windows", product, version, arch, name=product, edition=edition,
                  service_pack=sp, sources=["Windows/System32/config/SOFTWARE"]), []
