"""Parallelism: the device mesh, logical-axis sharding rules and the pipeline.
"""
