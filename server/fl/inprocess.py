"""The same ServerApp strategy and ClientApp, driven in one process (no SuperLink).

Fleet-size runs use Flower's simulation runtime (:mod:`edgefleet.server.fl.simulation`,
Ray). This small :class:`InProcessGrid` stays for what needs no Ray: unit tests, the
privacy audit (it reads a device's reply in process) and benchmarks that run many
configurations side by side. It starts in well under a second, where Ray takes 25-35 s
and six to seven times the memory (docs/bench/fl-simulation.md). The messages, mods,
strategy and accounting are the real ones; only transport, parallelism and process
isolation are missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

__all__ = ["InProcessGrid"]


class InProcessGrid(Grid):  # type: ignore[misc]
    """A Grid whose nodes are ``node_config(i)`` contexts served by ``client_app``."""

    def __init__(self, client_app: Callable[[Message, Context], Message], n_nodes: int,
                 node_config: Callable[[int], dict[str, Any]], run_id: int = 1) -> None:
        self.client_app = client_app
        self.contexts = {1000 + i: Context(run_id=run_id, node_id=1000 + i,
                                           node_config=node_config(i), state=RecordDict(),
                                           run_config={}) for i in range(n_nodes)}
        self._run: Any = None
        from flwr.supercore.task_identity import TaskIdentity

        # Flower stamps messages with the process's task identity (set by SuperExec).
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 0

    def set_run(self, run: Any) -> None:
        """Unused: there is one implicit run."""
        self._run = run

    @property
    def run(self) -> Any:
        """The implicit run."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """A message to one node."""
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        """Every virtual node."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not used: :meth:`send_and_receive` calls the ClientApp directly."""
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not used."""
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Run the ClientApp on each message's destination node, in turn."""
        replies = []
        for msg in messages:
            ctx = self.contexts[msg.metadata.dst_node_id]
            reply = self.client_app(msg, ctx)
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            replies.append(reply)
        return replies
