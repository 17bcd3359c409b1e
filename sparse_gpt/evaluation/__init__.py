"""Evaluation: sampling and zero-shot multiple-choice scoring.
"""
