"""`irmiddleware serve --workers N`: a supervisor and N worker processes on one shared-memory table.

The supervisor binds the listening socket, creates the native table in `/dev/shm` (a name of its
own per run, unlinked at exit), runs the one health prober and load-signal scraper and the admin
listener, and starts N workers; each inherits the socket, attaches to the table under its own
owner index and only routes. The supervisor alone changes the fleet (the admin API, SIGHUP,
discovery) and publishes it; the workers follow (`_board`). A worker that dies has what it held
reclaimed and is replaced on the same index. doc/workers.md describes the model.

`irmiddleware serve` (`irmiddleware.proxy._serve`) hands over to `run_supervisor` when the
configuration asks for more than one worker; with one, it serves from its own process as ever.
"""

from irmiddleware.serve._supervisor import Supervisor, listen_socket, run_supervisor
from irmiddleware.serve._worker import worker_command, worker_config, worker_main

__all__ = [
    "Supervisor",
    "listen_socket",
    "run_supervisor",
    "worker_command",
    "worker_config",
    "worker_main",
]
