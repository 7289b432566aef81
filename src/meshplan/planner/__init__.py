"""The planner: what a layout costs in memory and communication per rank, and which layout to run.

Public names::

    meshplan.estimate(model, layout, *, world_size, ...) -> meshplan.Estimate
    meshplan.plan_layout(model, *, devices_per_node, nodes=1, device_memory, ...) -> meshplan.LayoutChoice
    meshplan.planner.memory_per_process(processes_per_node)   # what one process may use here

The formulas and their sources are in docs/planning.md.
"""

from meshplan.planner.choose import candidate_plans, plan_layout, step_seconds
from meshplan.planner.estimate import estimate, layout_name, layout_plan
from meshplan.planner.hardware import Links, format_bytes, host_memory, memory_per_process, parse_memory
from meshplan.planner.model import ModelFacts, model_facts
from meshplan.planner.types import COMPONENTS, Candidate, Estimate, LayoutChoice

__all__ = [
    "COMPONENTS", "Candidate", "Estimate", "LayoutChoice", "Links", "ModelFacts", "candidate_plans", "estimate",
    "format_bytes", "host_memory", "layout_name", "layout_plan", "memory_per_process", "model_facts", "parse_memory",
    "plan_layout", "step_seconds",
]
