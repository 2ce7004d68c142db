"""Dependency discovery: which tensors and attributes are coupled to the units of a root."""

from pruneplan.graph.explicit import explicit_groups
from pruneplan.graph.spec import DropoutSpec, EditSpec, Group, SliceSpec

__all__ = ["DropoutSpec", "EditSpec", "Group", "SliceSpec", "explicit_groups"]
