"""Evaluation of the pipeline's stages against public benchmarks."""
