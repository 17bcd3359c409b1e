"""Training: state, optimizer, the train and eval steps, the loop, checkpoints, metrics.
"""
