"""Gradio pages of the app: the rater's listening test (`rater`) and the experimenter's console (`console`)."""
