"""What to do about the damage ``store verify`` found: the repair plan.

Objects differ in how they can be repaired:

* a **chunk** is named by its content. A resync that writes a new base with
  ``ReplicaStore.begin_base(..., repair=True)`` checks every existing chunk it would reuse
  and replaces a damaged one, so if one of the disks that refer to it still holds that
  block, **every** recovery point sharing the chunk is whole again. A missing chunk is
  rewritten by any base writer that meets the same content.
* an **index** or a **segment** is unique to the chains that name it (its digest is in the
  manifests): it cannot be rewritten. A resync of the VM makes a new, good recovery point;
  the damaged points stay unrestorable until retention drops them or they are pruned.
* a damaged **manifest** is one damaged point; a resync gives the VM a good point again.

:func:`repair_plan` turns a :class:`~siterecovery.store.verify.VerifyReport` into one
:class:`RepairAction` per damaged object; :func:`damaged_vms` gives the VMs to mark
*resync required* with a reason the vault shows.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from siterecovery.store.verify import VerifyReport

__all__ = ["RepairAction", "damaged_vms", "repair_plan"]


@dataclass(frozen=True)
class RepairAction:
    """How to repair one damaged object.

    ``resync`` lists the disks (``vm/disk``) whose resync acts on it; ``in_place`` says a
    repairing resync of one of them rewrites the object itself (chunks), which makes every
    point of ``points`` restorable again when the disk still holds that content; otherwise
    the resync only gives the VMs a new good point and ``points`` stay damaged.
    """

    key: str
    kind: str
    problem: str
    resync: tuple[str, ...]
    points: tuple[str, ...]
    in_place: bool

    @property
    def vms(self) -> tuple[str, ...]:
        """The VMs to resynchronize, from ``resync`` and ``points``."""
        names = {d.split("/", 1)[0] for d in self.resync}
        names.update(p.split("/", 1)[0] for p in self.points)
        return tuple(sorted(names))

    @property
    def advice(self) -> str:
        """One sentence for an operator."""
        vms = ", ".join(self.vms) or "(no VM refers to it)"
        if self.in_place:
            return (
                f"full resync of {vms} rewrites this chunk if a disk still holds its content; "
                f"then all {len(self.points)} point(s) using it restore again"
            )
        return (
            f"resync {vms} for a new good recovery point; the {len(self.points)} point(s) "
            "using this object stay damaged until pruned"
        )


def _kind(key: str) -> str:
    return {"chunks": "chunk", "indexes": "index", "segments": "segment", "points": "manifest"}.get(
        key.split("/", 1)[0], "object"
    )


def repair_plan(report: VerifyReport) -> list[RepairAction]:
    """One action per damaged object and per damaged manifest, in report order."""
    actions = [
        RepairAction(
            key=obj.key,
            kind=_kind(obj.key),
            problem=obj.problem,
            resync=obj.disks,
            points=obj.points,
            in_place=_kind(obj.key) == "chunk",
        )
        for obj in report.damaged_objects
    ]
    actions += [
        RepairAction(
            key=d.key,
            kind="manifest",
            problem=d.problem,
            resync=(),
            points=(f"{d.vm}/{d.point_id}",),
            in_place=False,
        )
        for d in report.damaged_points
    ]
    return actions


#: How :func:`damaged_vms` reasons begin; a resync for such a reason copies disks whole and
#: repairs damaged chunks (checksums of damaged replica data cannot be trusted).
DAMAGE_REASON = "store verify found damaged replica data"


def damaged_vms(report: VerifyReport) -> dict[str, str]:
    """Every VM with a damaged recovery point or a damaged object its disks refer to,
    mapped to a reason to record with *resync required* (the first damaged object and how
    many there are)."""
    found: dict[str, list[RepairAction]] = defaultdict(list)
    for action in repair_plan(report):
        for vm in action.vms:
            found[vm].append(action)
    reasons = {}
    for vm, actions in sorted(found.items()):
        first = actions[0]
        more = f" and {len(actions) - 1} more" if len(actions) > 1 else ""
        reasons[vm] = (
            f"{DAMAGE_REASON}: {first.kind} {first.key} "
            f"({first.problem}){more}"
        )
    return reasons
