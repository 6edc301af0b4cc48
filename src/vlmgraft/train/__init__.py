"""Staged training (`vlmgraft train`): configuration, stages, the trainer, its callbacks and the speed switches."""
