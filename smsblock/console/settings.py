"""Connector settings the console edits: a vCenter connector's CA bundle and its
"ignore certificate mismatch" switch (the guide's troubleshooting for certificate errors).

They live in the connector's stored source config, so the next catalog import or run
(which reopen the source) uses them.  The new settings are checked the way
``smsblock connector register`` checks them (the CA bundle must be a readable PEM file).
"""

from __future__ import annotations

import json
import os

from ..errors import ServiceError, UsageError


MAX_CA_BUNDLE = 4 << 20      # a bundle of every public root CA is about 200 KB

def update_vcenter_settings(service, connector_id: str, ca_bundle: str | None,
                            insecure: bool) -> dict:
    """Set ``caBundle`` and ``insecure`` of vCenter connector ``connector_id``; returns
    the new stored config (never a password: only where it comes from)."""
    import ssl
    if ca_bundle is not None:
        if len(ca_bundle) > 4096 or not os.path.isabs(ca_bundle):
            raise UsageError(f"CA bundle {ca_bundle[:80]!r}: give an absolute path (at most 4096 characters)")
        if not os.path.isfile(ca_bundle):
            raise UsageError(f"CA bundle {ca_bundle}: no such file")
        if os.path.getsize(ca_bundle) > MAX_CA_BUNDLE:     # parsed under the console's lock
            raise UsageError(f"CA bundle {ca_bundle}: larger than {MAX_CA_BUNDLE} bytes")
        try:
            ssl.create_default_context(cafile=ca_bundle)
        except (ssl.SSLError, OSError) as e:
            raise UsageError(f"CA bundle {ca_bundle}: not a readable PEM certificate file "
                             f"({getattr(e, 'reason', None) or e})") from None
    with service.state.transaction() as db:
        row = db.execute("SELECT source_kind, source_config FROM connectors WHERE "
                         "connector_id = ? AND disassociated_on IS NULL",
                         (connector_id,)).fetchone()
        if row is None:
            raise ServiceError(f"connector {connector_id} is not associated",
                               "InvalidParameterException")
        if row["source_kind"] != "vsphere":
            raise ServiceError(f"connector {connector_id} reads a datastore folder; it has no "
                               "vCenter certificate settings", "InvalidParameterException")
        config = json.loads(row["source_config"])
        config["caBundle"] = ca_bundle
        config["insecure"] = bool(insecure)
        db.execute("UPDATE connectors SET source_config = ? WHERE connector_id = ?",
                   (json.dumps(config), connector_id))
    return config
