"""Data-plane transports: base (the interface), paths (which path a pair uses), auto (several at once),
tcp (host memory), ipc (CUDA IPC on one host), nccl (GPU to GPU; nccl_binding, nccl_engine), gpu_checksum."""
