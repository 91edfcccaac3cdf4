"""The control plane: one ``step(bytes) -> bytes`` interface over the rank actors.

``CompiledGraphTransport`` (Ray compiled graph, the product), ``RayCallTransport``
(plain actor calls, for comparison) and ``InProcTransport`` (tp=1, no Ray).
Imports only ray and serialization.
"""

from dag.errors import RankFailure, TransportClosed
from dag.transport import Transport, make_transport

__all__ = ["RankFailure", "Transport", "TransportClosed", "make_transport"]
