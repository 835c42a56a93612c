"""Dagster wiring for lineup: assets, resources, partitions, checks, sensors, schedules."""
