"""A rank: ``Worker`` plus a device mixin, the model, KV cache and sampler."""


def worker_class(device: str):
    """The rank class for a device (imported lazily: GPU/TPU code stays optional)."""
    if device == "cpu":
        from workers.cpu_worker import CPUWorker

        return CPUWorker
    if device == "cuda":
        from workers.gpu_worker import GPUWorker

        return GPUWorker
    if device == "spyre":
        from workers.spyre_worker import SpyreWorker

        return SpyreWorker
    if device in ("tpu", "tpu-emulated"):
        from workers.tpu_worker import TPUWorker

        return TPUWorker
    raise ValueError(f"device: no worker for {device!r}; available: cpu, cuda, spyre, tpu, tpu-emulated")
