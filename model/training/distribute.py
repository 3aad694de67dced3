"""Where training runs: one device; every device of a host, data-parallel; several processes (one
per host), data-parallel over all their devices.

The network and the training loop are Keras 3 only and the same on every backend. This is the one
module of model/ with backend-specific code, because what it sets up is each backend's own
distribution engine:
  - JAX: `keras.distribution.DataParallel` over a `DeviceMesh` of the devices (one "batch" axis):
    every device holds the weights, each gets its slice of the global batch, and the gradients are
    summed across them by XLA. Several processes join with `keras.distribution.initialize()`
    (jax.distributed underneath: a coordinator address, the number of processes, this process's id).
  - TensorFlow: `tf.distribute.MirroredStrategy` over the devices of one host. Several processes
    (TensorFlow's MultiWorkerMirroredStrategy) are not supported: they need --backend jax.
On a machine without accelerators `--devices N` splits the CPU into N virtual devices (XLA's
--xla_force_host_platform_device_count on JAX, logical devices on TensorFlow), which is how the
tests run data-parallel training on a CPU; it is not faster than one device.

The global batch (--batch-size) is the same whatever the number of devices, and every process makes
the same batches from the same token file and feeds its own rows of them, so a run on N devices
follows the run on one (tests/test_distributed.py). Process 0 alone writes the run directory;
`agree()` gives every process process 0's decisions (stop now, the validation loss), so that all of
them take the same number of steps.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np


class PlacementError(ValueError):
    """Devices or processes that cannot be used as asked; the message says what to change."""


MAX_DEVICES = 1024  # a process's devices (a GPU host has up to 16; above that, --devices N virtual CPUs)


@dataclass(frozen=True)
class Cluster:
    """How this process takes part in a run: settings of a launch, not of the run (a resumed run may
    use other devices, since the result does not depend on them)."""

    devices: int | None = None  # per process; None: every accelerator visible, else one CPU
    coordinator: str | None = None  # HOST:PORT where process 0 listens for the others
    num_processes: int = 1
    process_id: int = 0

    def check(self) -> None:
        if self.devices is not None and (isinstance(self.devices, bool) or not 1 <= self.devices <= MAX_DEVICES):
            raise PlacementError(f"--devices must be a whole number from 1 to {MAX_DEVICES}, got {self.devices!r}")
        if self.num_processes < 1:
            raise PlacementError(f"--num-processes must be >= 1, got {self.num_processes}")
        if self.num_processes == 1 and self.process_id:
            raise PlacementError(f"--process-id {self.process_id} without --num-processes")
        if self.num_processes == 1 and self.coordinator:
            raise PlacementError(f"--coordinator {self.coordinator} (or its variable CHARGEN_COORDINATOR or "
                                 "KERAS_DISTRIBUTION_JOB_ADDRESSES) without --num-processes: one process has no one "
                                 "to coordinate (give --num-processes N, or leave the coordinator out)")
        if not 0 <= self.process_id < self.num_processes:
            raise PlacementError(f"--process-id must be in 0..{self.num_processes - 1} "
                                 f"(--num-processes {self.num_processes}), got {self.process_id}")
        if self.num_processes > 1:
            if not self.coordinator:
                raise PlacementError(f"--num-processes {self.num_processes} needs --coordinator HOST:PORT: "
                                     "the address where process 0 waits for the others")
            host, _, port = self.coordinator.split(",")[0].rpartition(":")  # Keras' variable lists every job
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise PlacementError(f"--coordinator {self.coordinator}: expected HOST:PORT, e.g. 10.0.0.1:1234")


def before_keras(cluster: Cluster) -> None:
    """What must be set before Keras starts its backend: N virtual CPU devices for --devices N. The
    flag changes XLA's CPU platform only, so it is harmless where there are GPUs."""
    if cluster.devices and cluster.devices > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cluster.devices}".strip()


@dataclass
class Placement:
    backend: str
    devices: list[str]  # every device of the run, all processes together
    process_id: int = 0
    num_processes: int = 1
    engine: object = field(default=None, repr=False)  # a keras DataParallel, a tf MirroredStrategy, or None

    @property
    def writer(self) -> bool:
        """Process 0 writes the run directory; the others only train."""
        return self.process_id == 0

    @property
    def parallel(self) -> bool:
        return len(self.devices) > 1

    def scope(self):
        """Where the model is built, loaded and fitted, so that its variables and batches are distributed."""
        return self.engine.scope() if self.engine is not None else contextlib.nullcontext()

    def rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch."""
        per = batch_size // self.num_processes
        return slice(self.process_id * per, (self.process_id + 1) * per)

    def agree(self, values: list[float]) -> list[float]:
        """Process 0's `values`, on every process (in float32: flags and losses, not sums)."""
        if self.num_processes == 1:
            return list(values)
        from jax.experimental import multihost_utils

        return [float(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(values, np.float32)))]

    def agreed(self, flag: bool) -> bool:
        return bool(self.agree([float(flag)])[0])

    def describe(self) -> str:
        kind = "data-parallel over " if self.parallel else "on "
        where = f"{len(self.devices)} devices ({', '.join(self.devices[:8])}{', ...' if len(self.devices) > 8 else ''})" \
            if self.parallel else self.devices[0]
        procs = f", process {self.process_id} of {self.num_processes}" if self.num_processes > 1 else ""
        return f"{kind}{where}{procs}"


def place(cluster: Cluster, batch_size: int) -> Placement:
    """The devices this run trains on, after Keras has loaded (before_keras first): joins the other
    processes, finds the devices, checks that the batch splits evenly over them."""
    import keras

    backend = keras.backend.backend()
    if cluster.num_processes > 1:
        if backend != "jax":
            raise PlacementError(f"training in several processes (--num-processes {cluster.num_processes}) runs on the "
                                 "JAX backend only: add --backend jax (chargen --backend jax train ...)")
        keras.distribution.initialize(job_addresses=cluster.coordinator, num_processes=cluster.num_processes,
                                      process_id=cluster.process_id)
    if backend == "tensorflow" and cluster.devices and cluster.devices > 1:
        _split_cpu(cluster.devices)

    visible = keras.distribution.list_devices()  # accelerators when there are any, else CPUs; all processes
    kind = visible[0].split(":")[0]
    per_process = len(visible) // cluster.num_processes
    wanted = cluster.devices or (per_process if kind != "cpu" else 1)
    if cluster.num_processes > 1:
        if wanted != per_process:
            raise PlacementError(f"--devices {wanted}: each process of a multi-process run uses all of its "
                                 f"{per_process} devices; choose them with CUDA_VISIBLE_DEVICES instead")
        devices = visible
    else:
        if wanted > len(visible):
            raise PlacementError(
                f"--devices {wanted}: only {len(visible)} {kind} device{'s' * (len(visible) != 1)} visible "
                f"({', '.join(visible)}); without accelerators, --devices N makes N virtual CPU devices only "
                "when it is given before the backend starts (a fresh process)")
        devices = visible[:wanted]
    if batch_size % len(devices):
        raise PlacementError(f"--batch-size {batch_size} does not split evenly over {len(devices)} devices; "
                             f"use a multiple of {len(devices)}")

    placement = Placement(backend, devices, cluster.process_id, cluster.num_processes)
    if len(devices) > 1:
        if backend == "jax":
            mesh = keras.distribution.DeviceMesh(shape=(len(devices),), axis_names=["batch"], devices=devices)
            # each process feeds its own rows (Placement.rows), so Keras must not shard the batches again
            placement.engine = keras.distribution.DataParallel(device_mesh=mesh, auto_shard_dataset=False)
        elif backend == "tensorflow":
            import tensorflow as tf

            placement.engine = tf.distribute.MirroredStrategy([f"/{d}" for d in devices])  # "/gpu:0", ...
        else:
            raise PlacementError(f"data-parallel training is not supported on the {backend} backend; use --backend jax")
    return placement


def _split_cpu(n: int) -> None:
    """TensorFlow: without GPUs, N logical CPU devices (they must be made before TensorFlow starts)."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:  # already started in this process (and maybe split already)
        if len(tf.config.list_logical_devices("CPU")) < n:
            raise PlacementError(f"--devices {n}: TensorFlow has already started in this process with one CPU "
                                 "device; run the training in a fresh process") from None
