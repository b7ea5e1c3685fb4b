"""The dispatcher's side of a distributed trace: the trace spec (what each host
runs) and the control packages cut from it for the agents."""

from .spec import (PACKAGE_VERSION, Collector, HostSpec, Spec, SpecError, control_package_to_filter, load,
                   loads)

__all__ = ["PACKAGE_VERSION", "Collector", "HostSpec", "Spec", "SpecError", "control_package_to_filter", "load",
           "loads"]
