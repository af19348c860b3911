"""Findings: what inspection and validation say about a disk, one plain sentence each."""

from __future__ import annotations

from dataclasses import dataclass

ERROR = "error"
WARNING = "warning"
INFO = "info"
SEVERITIES = (ERROR, WARNING, INFO)


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing worth telling: ``severity`` (error, warning, info), a stable ``code``
    scripts can match on, and a plain-language ``message`` for people."""

    severity: str
    code: str
    message: str

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")

    def to_dict(self) -> dict:
        return {"severity": self.severity, "code": self.code, "message": self.message}


def has_errors(findings) -> bool:
    return any(f.severity == ERROR for f in findings)
