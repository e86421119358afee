"""train.py that dies before its Nth step, on the first attempt only: the worker failures a long run
meets. Used by test_train.py.

    MASKSIAM_TEST_DIE_BEFORE_STEP=N    die when step N is about to start (steps 1..N-1 are done)
    MASKSIAM_TEST_DIE_RANK=R           the rank that dies (default 1; a single process is rank 0)
    MASKSIAM_TEST_DIE_HOW=exit|sigkill os._exit(3), like an OOM kill of a worker, or SIGKILL (kill -9)
"""
import os
import signal
import sys

import train

DIE_BEFORE_STEP = int(os.environ["MASKSIAM_TEST_DIE_BEFORE_STEP"])
DIE_RANK = os.environ.get("MASKSIAM_TEST_DIE_RANK", "1")
HOW = os.environ.get("MASKSIAM_TEST_DIE_HOW", "exit")
_set_lr, calls = train.set_lr, [0]


def set_lr(optimizer, lr):                       # called once per step, before the forward
    calls[0] += 1
    if (calls[0] == DIE_BEFORE_STEP and os.environ.get("RANK", "0") == DIE_RANK
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        if HOW == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    _set_lr(optimizer, lr)


train.set_lr = set_lr
train.main(sys.argv[1:])
