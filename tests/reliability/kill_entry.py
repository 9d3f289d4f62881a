"""`safeprune` in a child process that SIGKILLs itself at a chosen moment (tests/reliability/test_kill.py).

KILL_ON = "module:attr:needle:nth[:after]": the nth call of module.attr whose arguments mention `needle`
kills the process, before that call (e.g. half-way through a checkpoint's files) or, with `after`, right after
it (e.g. after the first result file moved in). Empty: run normally (the test kills at a random moment).
"""

import importlib
import os
import signal
import sys

import torch

torch.set_num_threads(1)
spec = os.environ.get("KILL_ON", "")
if spec:
    module, attr, needle, nth, *when = spec.split(":")
    target = importlib.import_module(module)
    real = getattr(target, attr)
    calls = [0]

    def wrapped(*args, **kwargs):
        hit = needle in " ".join(map(str, args))
        calls[0] += hit
        if hit and calls[0] == int(nth):
            if when == ["after"]:
                real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(target, attr, wrapped)

from safeprune.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
