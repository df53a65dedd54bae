"""Audio DiT PTQ Lab: listen to what post-training quantization does to an audio diffusion transformer.

One server: the listening test at `/` (a plain page over a JSON API: a study link, `/?study=ID`, shows raters
that study and nothing else) and the experimenter's Gradio console at `/admin`, behind a password (Compare,
Studies, Results).
Layouts live in `lab/ui/`, the work in `lab/`; this file wires them together.

    ptq-lab [--model REPO | --model-config JSON --ckpt-path CKPT] [--quantized FILE] [--calibration-stats FILE]
            [--host H] [--port N] [--forwarded-allow-ips PROXY]
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
from pathlib import Path

from lab.settings import Settings  # reads no torch: --help answers at once

log = logging.getLogger("ptq-lab")
ADMIN_PATH = "/admin"
ADMIN_USER = "admin"


def parse_args(argv=None, settings: Settings | None = None) -> argparse.Namespace:
    settings = settings or Settings.from_env()
    parser = argparse.ArgumentParser(prog="ptq-lab", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=settings.model,
                        help="Hugging Face model repo, e.g. stabilityai/stable-audio-open-1.0 (needs HF_TOKEN); "
                             "default: the embedded demo model")
    parser.add_argument("--model-config", default=settings.model_config, help="local model_config.json")
    parser.add_argument("--ckpt-path", default=settings.ckpt_path, help="local .safetensors or .ckpt")
    parser.add_argument("--quantized", action="append", default=list(settings.quantized_files), metavar="FILE",
                        help="a quantized model file (ptq-quantize quantize) to serve under its recipe name, no "
                             "calibration (repeatable)")
    parser.add_argument("--calibration-stats", type=Path, default=settings.calibration_stats, metavar="FILE",
                        help="calibration statistics (ptq-quantize calibrate) to quantize with instead of calibrating")
    parser.add_argument("--studies-dir", type=Path, default=settings.studies_dir, help="built studies and ratings")
    parser.add_argument("--admin-password", default=settings.admin_password,
                        help=f"password of the experimenter console at {ADMIN_PATH} (user '{ADMIN_USER}'); "
                             "default: $LAB_ADMIN_PASSWORD, else a random one printed at start")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (0.0.0.0 for every interface; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--forwarded-allow-ips", default=settings.forwarded_allow_ips, metavar="PROXY",
                        help="address(es) of the reverse proxy in front of the app, comma-separated: only their "
                             "X-Forwarded-For names the client (registration limits, login throttle); default: "
                             "$LAB_FORWARDED_ALLOW_IPS, else none (the connection's own address counts)")
    return parser.parse_args(argv)


def uvicorn_options(args: argparse.Namespace) -> dict:
    """How `main` runs uvicorn. X-Forwarded-For is ignored unless a proxy is named: uvicorn would otherwise trust
    it from 127.0.0.1, and any program on the same host could pick the address the per-address limits count."""
    proxies = args.forwarded_allow_ips
    return {"host": args.host, "port": args.port, "log_level": "warning", "proxy_headers": bool(proxies),
            "forwarded_allow_ips": proxies or None}


def gpu_wrapper():
    """Hugging Face ZeroGPU: borrow a GPU for the duration of a generation; a no-op everywhere else."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    return spaces.GPU(duration=120)


def build_server(lab, studies, *, admin_password: str, concurrency_limit: int = 1):
    """FastAPI app with the console mounted at /admin (login required, failed logins throttled per client)
    and the listening test at /.

    The console is given no `allowed_paths`: Gradio serves only the files its own events returned. The
    rater's page serves audio through its own per-rater routes (lab.ui.rater), never a path."""
    import gradio as gr
    from fastapi import FastAPI

    from lab.ui.console import build_console
    from lab.ui.login import throttle_login
    from lab.ui.rater import mount_rater

    server = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    mount_rater(server, studies)
    console = build_console(lab, studies, concurrency_limit=concurrency_limit, on_gpu=gpu_wrapper())
    console.queue(max_size=64)
    gr.mount_gradio_app(server, console, path=ADMIN_PATH, auth=(ADMIN_USER, admin_password), footer_links=[])
    throttle_login(server, f"{ADMIN_PATH}/login")
    return server


def main(argv=None) -> None:
    settings = Settings.from_env()
    args = parse_args(argv, settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvicorn

    from lab.comparison import build_lab
    from lab.study.registry import Studies

    try:
        lab = build_lab(settings, model=args.model, model_config=args.model_config, ckpt_path=args.ckpt_path,
                        quantized_files=args.quantized, calibration_stats=args.calibration_stats)
    except ValueError as err:  # ModelLoadError included: a message, not a traceback
        raise SystemExit(f"ptq-lab: error: {err}") from None
    studies = Studies(args.studies_dir, dataset_repo=settings.ratings_dataset,
                      push_minutes=settings.ratings_push_minutes)
    password = args.admin_password
    if not password:
        password = secrets.token_urlsafe(9)
        log.warning("experimenter console password (set LAB_ADMIN_PASSWORD to choose one): %s", password)
    server = build_server(lab, studies, admin_password=password, concurrency_limit=settings.concurrency_limit)
    log.info("listening test: http://%s:%d/?study=ID · experimenter console: http://%s:%d%s (user %s)",
             args.host, args.port, args.host, args.port, ADMIN_PATH, ADMIN_USER)
    uvicorn.run(server, **uvicorn_options(args))


if __name__ == "__main__":
    main()
