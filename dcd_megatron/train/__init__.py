"""The training job: distil teacher traces into a student on megatron-core."""
