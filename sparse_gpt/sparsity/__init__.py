"""Sparsity: mask trees, pure prune / regrow functions, schedules, SAT and the methods.
"""
