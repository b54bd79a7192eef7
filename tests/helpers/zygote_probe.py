"""A module the zygote's tests run (tests/test_zygote.py): prints what a child sees, sleeps, fails or exits.

Only `show` imports torch (the thread count it reports): an exec'd child of the other modes starts in ~0.1 s of CPU,
not the ~1.8 s of torch's import, where a test only counts how the child was started or reads its environment."""
import json
import os
import sys

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
    elif what == "moelink":  # where this child's moelink comes from, and whether the zygote's serving modules are in
        import moelink

        print(json.dumps({"moelink": moelink.__file__, "served": "moelink.engine.rank.worker" in sys.modules,
                          "ppid": os.getppid()}))
        sys.exit(0)
    elif what == "env":
        print(json.dumps({"env": os.environ.get("PROBE"), "ppid": os.getppid()}))
        sys.exit(0)
    import torch

    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "env": os.environ.get("PROBE"),
                      "threads": torch.get_num_threads(), "name": __name__, "ppid": os.getppid()}))
    print("to stderr", file=sys.stderr)
