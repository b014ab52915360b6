"""Discrete-event simulator that runs swarm.scheduler over a modelled network."""
