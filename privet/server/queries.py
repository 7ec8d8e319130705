"""Questions the server puts to every connected client before round 1 (federated
preprocessing, data descriptions): all must answer, or the run cannot start."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

TIMEOUT_SECONDS = 600


class QueryFailed(RuntimeError):
    """Not every client answered a question put before round 1 (a node refused it, e.g. by
    its policy, or failed): the run cannot start; str() is one line naming the errors."""


def ask_every_client(grid: Grid, config: ConfigRecord, message_type: str, what: str
                     ) -> list[Message]:
    messages = [Message(RecordDict({"config": config}), dst_node_id=node,
                        message_type=message_type) for node in sorted(grid.get_node_ids())]
    replies = list(grid.send_and_receive(messages, timeout=TIMEOUT_SECONDS))
    failed = [r.error.reason for r in replies if r.has_error()]
    if failed or len(replies) < len(messages):
        reasons = "; ".join(dict.fromkeys(failed[:3])) or "no reply in time"
        raise QueryFailed(f"{what}: {len(replies) - len(failed)} of {len(messages)} clients "
                          f"answered; {reasons}: nothing was trained")
    return replies
