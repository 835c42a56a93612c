import warnings

import dagster as dg

# Checks of partitioned assets are partitioned too, so the UI shows which partition each result is for.
# Dagster marks partitions_def on AssetCheckSpec as preview and warns at every import; this is the one place
# we use it (check_partitions below).
warnings.filterwarnings("ignore", message=r"Specifying a partitions_def on an AssetCheckSpec", category=dg.PreviewWarning)

# One partition per input shard (a tar, a Parquet manifest, or a batch of loose files),
# registered by the new_inputs sensor or by `make run`.
input_partitions = dg.DynamicPartitionsDefinition(name="input_partitions")


def check_partitions() -> dict:
    """Keyword arguments for an AssetCheckSpec of a per-partition asset."""
    return {"partitions_def": input_partitions}
