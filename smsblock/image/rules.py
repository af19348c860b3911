"""The image rules as data: which OSes, filesystems and bootloaders can be imported.

The rules live in ``supported_os.json`` beside this module (the SMS user guide's list).
A newer list replaces it without code changes: pass ``path=`` to :func:`load_rules`, or
set ``SMSBLOCK_SUPPORTED_OS`` to a JSON file of the same shape.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

DEFAULT_RULES = Path(__file__).with_name("supported_os.json")

SUPPORTED = "supported"
UNSUPPORTED = "unsupported"
REFUSED = "refused"


def version_tuple(text: str) -> tuple[int, ...]:
    """"7.2.1511" -> (7, 2, 1511); non-numeric parts end the version."""
    out = []
    for part in str(text).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group(0)))
        if m.group(0) != part:
            break
    return tuple(out)


def _fit(version: tuple[int, ...], bound: tuple[int, ...]) -> tuple[int, ...]:
    """``version`` cut or zero-padded to the bound's precision: a list that says "7.2"
    means every 7.2.x, and "7.8.0" is met by a "7.8"."""
    return (version + (0,) * len(bound))[:len(bound)]


def in_range(version: str, lo: str, hi: str) -> bool:
    v = version_tuple(version)
    if not v:
        return False
    lo_t, hi_t = version_tuple(lo), version_tuple(hi)
    return lo_t <= _fit(v, lo_t) and _fit(v, hi_t) <= hi_t


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether an OS is on the list: ``status`` supported/unsupported/refused, and why."""

    status: str
    reason: str
    name: str | None = None      # the list's name for the product, when matched
    unchecked: str | None = None  # a rule that could not be checked (why), for a warning


class Rules:
    """A loaded supported-OS list (see ``supported_os.json`` for the shape)."""

    def __init__(self, data: dict, source: str = "<memory>"):
        try:
            self.source = source
            self.description = data.get("source", source)
            linux, windows = data["linux"], data["windows"]
            self.linux_architectures = list(linux["architectures"])
            self.linux_root_filesystems = list(linux["root_filesystems"])
            self.linux_bootloaders = list(linux["bootloaders"])
            self.distributions = {d["id"]: d for d in linux["distributions"]}
            self.windows_filesystems = list(windows["filesystems"])
            self.windows_bootloaders = list(windows["bootloaders"])
            self.windows_products = list(windows["products"])
            for p in self.windows_products:
                re.compile(p["match"])
            self.license_types = dict(data.get("license_types") or {"Auto": {}, "AWS": {}, "BYOL": {}})
        except (KeyError, TypeError, AttributeError, re.error) as e:
            raise UsageError(f"{source}: not a valid supported-OS list ({type(e).__name__}: {e})") from None

    # --- Linux -----------------------------------------------------------------
    def check_linux(self, distribution: str | None, version: str | None,
                    architecture: str | None) -> Verdict:
        entry = self.distributions.get(distribution or "")
        label = f"{distribution or 'an unknown distribution'} {version or ''}".strip()
        if entry is None:
            return Verdict(UNSUPPORTED, f"{label} is not a distribution on the supported list "
                                        f"({', '.join(d['name'] for d in self.distributions.values())}).")
        name = f"{entry['name']} {version or ''}".strip()
        if not version:
            return Verdict(UNSUPPORTED, f"The version of {entry['name']} could not be determined, "
                                        "so it cannot be checked against the supported list.", entry["name"])
        for r in entry.get("refused", []):
            if in_range(version, r["from"], r["to"]):
                return Verdict(REFUSED, f"{name} is refused: {r['reason']}.", entry["name"])
        ranges = entry["versions"]
        if not any(in_range(version, r["from"], r["to"]) for r in ranges):
            allowed = ", ".join(r["from"] if r["from"] == r["to"] else f"{r['from']}-{r['to']}"
                                for r in ranges)
            return Verdict(UNSUPPORTED, f"{name} is not on the supported list (supported "
                                        f"{entry['name']} versions: {allowed}).", entry["name"])
        if architecture and architecture not in self.linux_architectures:
            return Verdict(UNSUPPORTED, f"{name} on {architecture} is not supported (supported "
                                        f"architectures: {', '.join(self.linux_architectures)}).",
                           entry["name"])
        return Verdict(SUPPORTED, f"{name} is on the supported list.", entry["name"])

    # --- Windows ---------------------------------------------------------------
    def check_windows(self, product: str | None, edition: str | None, service_pack: str | None,
                      architecture: str | None) -> Verdict:
        if not product:
            return Verdict(UNSUPPORTED, "The Windows product name could not be read.")
        entry, match = next(((p, m) for p in self.windows_products
                             if (m := re.search(p["match"], product))), (None, None))
        if entry is None:
            return Verdict(UNSUPPORTED, f"{product} is not on the supported list of Windows versions.")
        # Windows Server 2003 records no EditionID and names no edition in ProductName
        edition_known = bool(edition or product[match.end():].strip())
        why_not = ((edition_known and _edition_problem(entry, product, edition))
                   or _service_pack_problem(entry, service_pack)
                   or _bitness_problem(entry, architecture))
        if why_not:
            return Verdict(UNSUPPORTED, why_not, entry["name"])
        if entry.get("editions") and not edition_known:
            return Verdict(SUPPORTED, f"{product} is on the supported list.", entry["name"],
                           unchecked=f"The edition of {product} is not recorded in its SOFTWARE "
                                     f"hive, so it could not be checked (supported editions: "
                                     f"{', '.join(entry['editions'])}).")
        return Verdict(SUPPORTED, f"{product} is on the supported list.", entry["name"])

    # --- licences --------------------------------------------------------------
    def resolve_license(self, license_type: str, family: str | None) -> str:
        """"Auto" becomes BYOL for Linux and AWS for Windows; AWS and BYOL stay."""
        if license_type not in self.license_types:
            raise UsageError(f"unknown license type {license_type!r} (expected "
                             f"{', '.join(self.license_types)})")
        mapping = self.license_types[license_type]
        if not mapping:
            return license_type
        return mapping.get(family or "linux", "BYOL")


def load_rules(path: str | os.PathLike | None = None) -> Rules:
    """The rules from ``path``, ``$SMSBLOCK_SUPPORTED_OS`` or the bundled list."""
    path = Path(path or os.environ.get("SMSBLOCK_SUPPORTED_OS") or DEFAULT_RULES)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UsageError(f"{path}: cannot read the supported-OS list: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: the supported-OS list is not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the supported-OS list must be a JSON object")
    return Rules(data, str(path))


# --- the Windows product rules, each a reason why not (or None) ----------------------

def _edition_problem(entry: dict, product: str, edition: str | None) -> str | None:
    editions = entry.get("editions") or []
    words = f"{product} {edition or ''}".lower()
    if edition and edition.lower().startswith("core"):
        words += " home"         # EditionID "Core" is the Home edition of Windows 8/10
    if editions and not any(e.lower() in words for e in editions):
        return (f"{product} ({edition or 'unknown edition'}) is not a supported edition of "
                f"{entry['name']} ({', '.join(editions)}).")
    return None


def _service_pack_problem(entry: dict, service_pack: str | None) -> str | None:
    need_sp = entry.get("min_service_pack")
    if not need_sp:
        return None
    m = re.search(r"(\d+)", service_pack or "")
    if (int(m.group(1)) if m else 0) < need_sp:
        return (f"{entry['name']} needs Service Pack {need_sp} or later; this one has "
                f"{service_pack or 'none'}.")
    return None


def _bitness_problem(entry: dict, architecture: str | None) -> str | None:
    archs = entry.get("architectures") or []
    if architecture and archs and architecture not in archs:
        bits = {"i386": "32-bit", "x86_64": "64-bit"}
        return (f"{entry['name']} is supported only as "
                f"{' or '.join(bits.get(a, a) for a in archs)}; this one is "
                f"{bits.get(architecture, architecture)}.")
    return None
