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
    try:
        flower_supernode()
    except SystemExit as stop:
        if stop.code == CONNECTION_ERROR:  # Flower said why just above; say what it may mean
            print("privet: this SuperNode could not connect (Flower's reason above). Restarted "
                  "right after a crash? The SuperLink holds a node online for up to 20 s "
                  "after its last heartbeat and refuses it meanwhile (\"Failed to activate "
                  "SuperNode\"): wait until `privet flwr supernode list` shows it offline, then "
                  "start it again (README: Operations)", file=sys.stderr, flush=True)
        raise


CONNECTION_ERROR = 305  # Flower 1.41's ExitCode.SUPERNODE_CONNECTION_ERROR


if __name__ == "__main__":
    main()
