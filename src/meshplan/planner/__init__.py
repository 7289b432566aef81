"""The planner: what a layout costs in memory and communication per rank, and which layout to run.

Public names::

    meshplan.estimate(model, layout, *, world_size, ...) -> meshplan.Estimate
    meshplan.plan_layout(model, *, devices_per_node, nodes=1, device_memory, ...) -> meshplan.LayoutChoice
    meshplan.planner.memory_per_process(processes_per_node)   # what one process may use here

The formulas and their sources are in docs/planning.md.
"""

from meshplan._lazy import lazy_names

# Loaded on first use: estimating imports transformers' models, which `meshplan --help` and the
# Accelerate front end (that only names LayoutChoice) have no use for.
_PUBLIC_NAMES = {
    "candidate_plans": "meshplan.planner.choose", "plan_layout": "meshplan.planner.choose",
    "step_seconds": "meshplan.planner.choose", "estimate": "meshplan.planner.costs",
    "layout_name": "meshplan.planner.costs", "layout_plan": "meshplan.planner.costs",
    "Links": "meshplan.planner.hardware", "format_bytes": "meshplan.planner.hardware",
    "host_memory": "meshplan.planner.hardware", "memory_per_process": "meshplan.planner.hardware",
    "parse_memory": "meshplan.planner.hardware", "ModelFacts": "meshplan.planner.model",
    "model_facts": "meshplan.planner.model", "COMPONENTS": "meshplan.planner.types",
    "Candidate": "meshplan.planner.types", "Estimate": "meshplan.planner.types", "LayoutChoice": "meshplan.planner.types",
}
__getattr__, __dir__ = lazy_names(__name__, _PUBLIC_NAMES)

__all__ = sorted(_PUBLIC_NAMES)
