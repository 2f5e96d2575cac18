"""The supervisor: owns the privileged sockets and keeps the data-plane workers running.

It opens every socket the data path needs (filtered AF_PACKET receive
sockets, group memberships, output sockets bound to their devices) and hands
them to workers, which it spawns as fresh interpreters, never forks. Split by
what each part owns:

- `core`: the reconcile passes (`Supervisor`);
- `ports`: input ports and lanes, with the pure port planner;
- `outputs`: the output socket pool;
- `workers`: worker handles, spawning, restarts and the exit contract;
- `kernel`: the kernel offload path's state;
- `views`: what the control socket shows;
- `seams`: the network, processes, clock and kernel tables, as parameters.
"""

from mcrd.supervisor.core import Supervisor
from mcrd.supervisor.seams import Seams

__all__ = ["Seams", "Supervisor"]
