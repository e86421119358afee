"""train.py whose rank 1 dies (os._exit, like an OOM kill) before its Nth step on the first attempt
only: the worker failure that torchrun's --max-restarts recovers from. Used by test_train.py."""
import os
import sys

import train

DIE_BEFORE_STEP = int(os.environ["MASKSIAM_TEST_DIE_BEFORE_STEP"])
_set_lr, calls = train.set_lr, [0]


def set_lr(optimizer, lr):                       # called once per step, before the forward
    calls[0] += 1
    if (calls[0] == DIE_BEFORE_STEP and os.environ.get("RANK") == "1"
            and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"):
        os._exit(3)
    _set_lr(optimizer, lr)


train.set_lr = set_lr
train.main(sys.argv[1:])
