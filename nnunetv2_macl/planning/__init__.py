"""Additional nnU-Net configurations planned with nnU-Net's own planner (see :mod:`.cpu_configuration`)."""
from nnunetv2_macl.planning.cpu_configuration import (CpuPlanError, add_cpu_configuration, describe_configuration,
                                                      plan_cpu_configuration)

__all__ = ["CpuPlanError", "add_cpu_configuration", "describe_configuration", "plan_cpu_configuration"]
