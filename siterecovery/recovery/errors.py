"""Errors of recovery (failover, restore, drills): re-exported from the replication layer.

Recovery and replication form one layer (DESIGN §5 acts on what §3 ships), so they share one
exception tree rooted at :class:`siterecovery.errors.ReplicationError`.
"""

from __future__ import annotations

from siterecovery.replication.errors import DrillCheckFailed, FailoverError, VerificationFailed

__all__ = ["DrillCheckFailed", "FailoverError", "VerificationFailed"]
