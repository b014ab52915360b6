"""Data-plane transports: base (interface), tcp (host memory), nccl (GPU)."""
