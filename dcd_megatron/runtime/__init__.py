"""Runtime: process groups, parallel state and the CPU compatibility layer for megatron-core."""
