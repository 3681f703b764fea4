"""Set in a worker child when it is asked to stop (SIGTERM): the job checkpoints and is requeued."""

import threading

PREEMPTED = threading.Event()
