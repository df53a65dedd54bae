"""Plotly figures of one comparison: spectrograms, per-step error, per-timestep activation outliers.

Pure functions from arrays to `plotly.graph_objects.Figure`, so they are testable without a browser and
`gr.Plot` shows them as they are.
"""
from __future__ import annotations

import librosa
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lab.audio import log_mel_db
from lab.generation import LOG_ABS_EDGES, LayerTrace

FLOOR_DB = -100.0  # log-mel floor, so digital silence does not stretch the colour scale
DIFFERENCE_DB = 20.0  # the difference plot's fixed colour range (±): comparable from one comparison to the next
N_MELS = 64


def spectrogram_figure(full_precision: np.ndarray, quantized: np.ndarray, sample_rate: int) -> go.Figure:
    """Log-mel spectrograms of both clips (shared colour scale) and their difference (quantized - FP)."""
    fp_db = np.maximum(log_mel_db(full_precision, sample_rate, N_MELS), FLOOR_DB)
    q_db = np.maximum(log_mel_db(quantized, sample_rate, N_MELS), FLOOR_DB)
    hz = librosa.mel_frequencies(n_mels=N_MELS + 2, fmax=sample_rate / 2)[1:-1]  # band centres
    frames = min(fp_db.shape[1], q_db.shape[1])
    fp_db, q_db = fp_db[:, :frames], q_db[:, :frames]
    seconds = np.arange(frames) * (len(full_precision[0]) / sample_rate) / max(1, frames)
    low, high = min(fp_db.min(), q_db.min()), max(fp_db.max(), q_db.max())
    diff = q_db - fp_db
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.09,
                        subplot_titles=("Full precision", "Quantized", "Difference (quantized − FP)"))
    for col, (z, kwargs) in enumerate((
            (fp_db, dict(colorscale="Magma", zmin=low, zmax=high, showscale=False)),
            (q_db, dict(colorscale="Magma", zmin=low, zmax=high,
                        colorbar=dict(title="dB", x=0.645, thickness=12))),
            (diff, dict(colorscale="RdBu_r", zmid=0, zmin=-DIFFERENCE_DB, zmax=DIFFERENCE_DB,
                        colorbar=dict(title="ΔdB", thickness=12)))),
            start=1):
        fig.add_trace(go.Heatmap(z=z, x=seconds, y=hz, **kwargs), row=1, col=col)
        fig.update_xaxes(title_text="time (s)", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
    fig.update_yaxes(title_text="frequency (Hz, mel bands)", row=1, col=1)
    fig.update_layout(height=320, margin=dict(l=50, r=20, t=40, b=40))
    return fig


def step_metrics_figure(snr_db: np.ndarray, logmel_steps: np.ndarray, logmel_db: np.ndarray) -> go.Figure:
    """Per denoising step: SNR of the quantized denoised estimate vs FP, and the log-mel distance of the decoded
    estimates at the steps that were decoded (none: the SNR alone, and the title says how to get the rest)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=np.arange(1, len(snr_db) + 1), y=snr_db, mode="lines+markers",
                             name="SNR of the denoised estimate, model space (dB, higher = closer)"),
                  secondary_y=False)
    if len(logmel_steps):
        fig.add_trace(go.Scatter(x=np.asarray(logmel_steps) + 1, y=logmel_db, mode="lines+markers",
                                 name="log-mel distance of the decoded estimates (dB, lower = closer)"),
                      secondary_y=True)
        fig.update_yaxes(title_text="log-mel distance (dB)", secondary_y=True)
    else:
        fig.update_layout(title=dict(text="per-step log-mel distance: tick “decode per-step estimates”",
                                     font=dict(size=12)))
    fig.update_xaxes(title_text="denoising step")
    fig.update_yaxes(title_text="SNR (dB)", secondary_y=False)
    fig.update_layout(height=340, margin=dict(l=50, r=50, t=70, b=40),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return fig


def activation_heatmap_figure(full_precision: LayerTrace, quantized: LayerTrace) -> go.Figure:
    """Step x log10|x| heat maps of the layer's input: FP activations vs what the quantized matmul sees."""
    centres = (LOG_ABS_EDGES[:-1] + LOG_ABS_EDGES[1:]) / 2
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=("Full-precision input", "Quantized input (as the matmul sees it)"))
    for col, trace in enumerate((full_precision, quantized), start=1):
        share = np.array(trace.log_abs_hist)  # (calls, bins)
        fig.add_trace(go.Heatmap(
            z=np.log10(share + 1e-6), x=centres, y=np.arange(1, len(share) + 1), colorscale="Viridis",
            zmin=-6, zmax=0, showscale=col == 2, colorbar=dict(title="log10 share"),
            customdata=np.repeat(np.array(trace.timesteps)[:, None], len(centres), axis=1),
            hovertemplate="step %{y} (t=%{customdata:.3f})<br>log10|x| %{x:.1f}<br>log10 share %{z:.2f}"
                          "<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="log10 |x|  (first bin: ≤1e-6, incl. 0)", row=1, col=col)
    fig.update_yaxes(title_text="denoising step (DiT call)", autorange="reversed", row=1, col=1)
    fig.update_layout(height=360, margin=dict(l=60, r=20, t=40, b=50), title=full_precision.layer)
    return fig


def activation_step_figure(full_precision: LayerTrace, quantized: LayerTrace) -> go.Figure:
    """The same histograms one step at a time, with a slider over the steps."""
    centres = (LOG_ABS_EDGES[:-1] + LOG_ABS_EDGES[1:]) / 2
    fig = go.Figure()
    calls = len(full_precision.log_abs_hist)
    for i in range(calls):
        for name, trace in (("full precision", full_precision), ("quantized", quantized)):
            fig.add_trace(go.Bar(x=centres, y=trace.log_abs_hist[i], name=name, visible=i == 0, opacity=0.6))
    slider_steps = []
    for i in range(calls):
        visible = [False] * (2 * calls)
        visible[2 * i] = visible[2 * i + 1] = True
        slider_steps.append(dict(method="update", label=str(i + 1), args=[
            {"visible": visible}, {"title": f"step {i + 1}, t = {full_precision.timesteps[i]:.3f}"}]))
    fig.update_layout(barmode="overlay", height=340, sliders=[dict(active=0, steps=slider_steps,
                                                                    currentvalue=dict(prefix="step "))],
                      title=f"step 1, t = {full_precision.timesteps[0]:.3f}" if calls else "",
                      xaxis_title="log10 |x|", yaxis_title="share of values", margin=dict(l=50, r=20, t=40))
    return fig


def channel_outlier_figure(full_precision: LayerTrace, smoothing: list[np.ndarray | None] | None = None
                           ) -> go.Figure:
    """Per input channel, max |x| over the whole generation: before and (if the recipe smooths) after.

    `smoothing[i]` is the per-channel divisor in force at the trace's i-th call (QuantLinear.smoothing_for(t)).
    A few channels far above the rest set a per-tensor scale and crush everything else; dividing them down
    (and multiplying the weights' matching columns up) is what SmoothQuant and SQD do.
    """
    before = np.max(np.array(full_precision.channel_max), axis=0)  # (in_features,)
    channels = np.arange(len(before))
    fig = go.Figure(go.Scatter(x=channels, y=before, mode="lines", name="before smoothing"))
    if smoothing and any(s is not None for s in smoothing):
        after = np.max([m / s for m, s in zip(full_precision.channel_max, smoothing) if s is not None], axis=0)
        fig.add_trace(go.Scatter(x=channels, y=after, mode="lines", name="after smoothing"))
        ratio = (before.max() / max(np.median(before), 1e-12), after.max() / max(np.median(after), 1e-12))
        title = f"max/median channel: {ratio[0]:.1f} before, {ratio[1]:.1f} after smoothing"
    else:
        title = (f"max/median channel: {before.max() / max(np.median(before), 1e-12):.1f} "
                 f"(this recipe does not smooth)")
    fig.update_layout(height=300, title=title, xaxis_title="input channel", yaxis_title="max |x|",
                      yaxis_type="log", margin=dict(l=50, r=20, t=40, b=40))
    return fig
