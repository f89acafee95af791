"""The Train tab: pick a training config (the families' `TrainingScript` entries say which script runs it), start it
in the background, watch the loss plot, the latest validation grid and the console, and add the finished adapter to
the models folder."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .engine import Engine
from .handlers import toast_errors
from .training_runner import TrainingRunner


class TrainTab:
    """Builds the Train tab (inside a `gr.Blocks`) and holds its handlers."""

    def __init__(self, engine: Engine, runner: TrainingRunner):
        self.engine = engine
        self.runner = runner

    def data_label(self, config: str | None) -> str:
        if not config:
            return "Data folder"
        key = self.runner.data_key(config)
        return f"Data folder (passed as --{key})" if key else "Data folder (this config's script takes none)"

    def start(self, config: str, data_dir: str, output_dir: str, max_steps: float | None, extra: str) -> str:
        run = self.runner.start(config, data_dir or "", output_dir or "", int(max_steps) if max_steps else None,
                                extra or "")
        return status_markdown({**self.runner.status(), "output_dir": str(run.output_dir)})

    def add_to_models(self) -> str:
        name = self.runner.add_to_models(self.engine.models_dir)
        return f"Added to the models folder as `{name}` — pick it in a unit's weights (↻)"

    def refresh(self) -> list[Any]:
        import pandas as pd

        rows = self.runner.losses()
        df = pd.DataFrame({"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows]})
        if len(df):
            df["series"] = "loss"
            ema = df["loss"].ewm(alpha=0.1).mean()
            df = pd.concat([df, pd.DataFrame({"step": df["step"], "loss": ema, "series": "smoothed"})])
        val = self.runner.latest_validation()
        return [status_markdown(self.runner.status()), df if len(df) else None, str(val) if val else None,
                self.runner.log_tail()]

    def build(self) -> None:
        configs = self.runner.configs()
        first = configs[0] if configs else None
        gr.Markdown("Start one training config as a background process (`accelerate launch`); the plot reads "
                    "`output_dir/logs/loss.jsonl`, the image is the latest validation grid.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                config = gr.Dropdown(configs, value=first, label="Training config")
                config_view = gr.Code(self.runner.config_text(first) if first else "", language="yaml",
                                      label="Config", lines=8, interactive=False)
                data_dir = gr.Textbox(label=self.data_label(first), placeholder="a folder (blank = the config's)")
                with gr.Row(elem_classes=["tight-row"]):
                    output_dir = gr.Textbox(label="Output folder", placeholder="runs/<config>-<time> (default)")
                    max_steps = gr.Number(label="Max steps (0 = the config's)", value=0, precision=0, minimum=0)
                extra = gr.Textbox(label="Extra arguments", placeholder="--learning_rate 1e-4 --validation_steps 10")
                with gr.Row(elem_classes=["tight-row"]):
                    start_btn = gr.Button("Start training", variant="primary")
                    stop_btn = gr.Button("Stop", variant="stop")
                    add_btn = gr.Button("Add to models")
                status = gr.Markdown(status_markdown(self.runner.status()))
            with gr.Column(scale=5):
                plot = gr.LinePlot(x="step", y="loss", color="series", title="Training loss", height=300,
                                   x_title="step", y_title="loss")
                val_img = gr.Image(label="Latest validation grid", interactive=False, height=280)
                log_box = gr.Textbox(label="Console (tail)", lines=8, max_lines=8, autoscroll=True,
                                     interactive=False)
        timer = gr.Timer(2.0)
        config.change(lambda c: [self.runner.config_text(c) if c else "", gr.update(label=self.data_label(c))],
                      config, [config_view, data_dir], queue=False, api_visibility="private")
        start_btn.click(toast_errors(self.start), [config, data_dir, output_dir, max_steps, extra], status,
                        api_visibility="private")
        stop_btn.click(toast_errors(lambda: status_markdown({**self.runner.status(), "note": self.runner.stop()})),
                       None, status, api_visibility="private")
        add_btn.click(toast_errors(self.add_to_models), None, status, api_visibility="private")
        timer.tick(self.refresh, None, [status, plot, val_img, log_box], queue=False, show_progress="hidden",
                   api_visibility="private")


def status_markdown(st: dict[str, Any]) -> str:
    """A run's status (`TrainingRunner.status`) as the tab shows it."""
    if st.get("state") == "idle":
        return "**No run.** Pick a config and a data folder, then Start."
    parts = [f"**{st['state'].capitalize()}** · `{st.get('config')}`",
             f"step {st.get('step', 0)}" + (f" / {st['max_steps']}" if st.get("max_steps") else "")]
    if st.get("loss") is not None:
        parts.append(f"loss {st['loss']:.4f}")
    parts.append(f"{st.get('elapsed_s', 0):.0f} s")
    text = " · ".join(parts) + f"\n\nOutput: `{st.get('output_dir')}`"
    if st.get("final"):
        text += f" · final adapter: `{st['final']}`"
    if st.get("returncode") not in (None, 0) and st.get("state") == "failed":
        text += f"\n\nThe process exited with code {st['returncode']}; see the console below."
    if st.get("note"):
        text += f"\n\n{st['note']}"
    return text
