"""`flower-supernode`, with a 10 s heartbeat (privet.patches.flower, patch 6).

`privet deploy supernode` runs this in place of Flower's `flower-supernode` command; the
arguments are Flower's own. With PRIVET_STOCK_LIBRARIES=1 it is Flower's command unchanged
(a node restarted after a crash then waits up to 60 s to be let back in).
"""

from __future__ import annotations

import sys


def main() -> None:
    from privet import patches

    if not patches.stock():
        from privet.patches.flower import shorter_node_heartbeat

        shorter_node_heartbeat()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
