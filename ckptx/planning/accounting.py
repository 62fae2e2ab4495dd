"""The plan's accounting invariant: nothing lost, nothing read twice by accident."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from ckptx.dtypes import TensorMeta
from ckptx.errors import PlannerBug
from ckptx.planning.entry import PlanEntry
from ckptx.rules.kinds import STEP_KINDS
from ckptx.rules.steps import Step


def check_accounting(
    tensors: Mapping[str, TensorMeta], entries: Sequence[PlanEntry], dropped: Mapping[str, str], steps: Sequence[Step]
) -> None:
    """The plan's invariant: every source tensor is read by an output entry or was dropped by a named step, and
    one source feeds several outputs only through a step that fans out (copy, split). PlannerBug otherwise."""
    readers: dict[str, list[PlanEntry]] = defaultdict(list)
    for entry in entries:
        for key in entry.sources:
            readers[key].append(entry)
    lost = [key for key in tensors if key not in readers and key not in dropped]
    if lost:
        raise PlannerBug(
            f"planner bug: source tensor '{lost[0]}' ({len(lost)} in all) is in no output and no step "
            f"dropped it; nothing was written; please report this with the recipe"
        )
    fanning = {s.where for s in steps if STEP_KINDS[s.op].fans_out}
    for key, group in readers.items():
        if len(group) > 1 and not any(fanning.intersection(e.steps) for e in group):
            outputs = ", ".join(f"'{e.key}'" for e in group[:3])
            raise PlannerBug(
                f"planner bug: source tensor '{key}' feeds {outputs} although no step copies or "
                f"splits it; nothing was written; please report this with the recipe"
            )
