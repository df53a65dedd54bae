"""Engine of the listening lab: model loading, paired generation, audio, figures, ratings, benchmark.

Everything the Gradio app needs lives here so that it can be tested without a browser; `quant/` stays a
torch-only library this package builds on.
"""
