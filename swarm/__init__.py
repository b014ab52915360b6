"""vllm-swarm: BitTorrent-style weight distribution between inference instances."""
