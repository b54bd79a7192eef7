"""A module the zygote's tests run (tests/test_zygote.py): prints what a child sees, sleeps, fails or exits."""
import json
import os
import sys

import torch

if __name__ == "__main__":
    what = sys.argv[1]
    if what == "sleep":
        print("up", os.getpid(), flush=True)
        import time

        time.sleep(60)
    elif what == "fail":
        raise ValueError("boom")
    elif what == "exit":
        sys.exit(int(sys.argv[2]))
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "env": os.environ.get("PROBE"),
                      "threads": torch.get_num_threads(), "name": __name__, "ppid": os.getppid()}))
    print("to stderr", file=sys.stderr)
