"""The shapes world (`shapes`: generator, `shapes_scoring`: its VQA scorer) and data converters.

Installed with vlkit (the same wheel): the demo and `vlkit eval --scorer data_tools.shapes_scoring:scorer_for`
import it from any directory.
"""
