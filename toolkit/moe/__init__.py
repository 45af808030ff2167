"""Mixture-of-Experts offloading: presets, the offloaded experts module, costs, memory, generation, traces."""
