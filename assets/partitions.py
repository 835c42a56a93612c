import dagster as dg

# One partition per input shard (a tar, a Parquet manifest, or a batch of loose files),
# registered by the new_inputs sensor or by `make run`.
input_partitions = dg.DynamicPartitionsDefinition(name="input_partitions")
