"""A Kubernetes API on loopback (KMock plus API-server behaviours), a test kubelet that runs the
operator's children as local processes, and helpers to run the operator as a real process."""

from .cluster import ApiError, Cluster, resource_path
from .kubelet import Kubelet, Outcome

__all__ = ["ApiError", "Cluster", "Kubelet", "Outcome", "resource_path"]
