"""`python -m mlx_clip.ui [--runs runs/] [--port 7860] [--index FOLDER ...] [--host H]`

A local web app over a runs folder: every run live (status, step, loss, lr, img/s, ETA, eval
metrics, curves, config diffs), sweeps and their trials, and a model to try (zero-shot, folder
search, nearest captions). The same server answers the JSON API (mlx_clip/ui/api.py). It binds
127.0.0.1 unless --host is given, has no login, and loads nothing from the network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlx_clip.ui", description=__doc__.split("\n\n")[1])
    p.add_argument("--runs", default="runs", help="folder of run directories (default: runs/)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)"
    )
    p.add_argument(
        "--index",
        nargs="+",
        default=[],
        metavar="FOLDER",
        help="image folders to search (cached as predict --index)",
    )
    p.add_argument(
        "--checkpoint", nargs="+", default=[], metavar="DIR", help="checkpoints to offer besides the runs'"
    )
    p.add_argument("--max-upload-mb", type=float, default=16.0, help="largest request body (default 16 MB)")
    p.add_argument("--max-concurrent", type=int, default=16, help="requests handled at once (default 16)")
    p.add_argument("--max-batch", type=int, default=32, help="images or texts per forward pass (default 32)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for folder in args.index:
        if not Path(folder).is_dir():
            p.error(f"--index {folder}: not a folder")
    for ckpt in args.checkpoint:
        if not Path(ckpt).exists():
            p.error(f"--checkpoint {ckpt}: not found")
    if not Path(args.runs).is_dir():
        p.error(f"--runs {args.runs}: not a folder")
    return args


def unique_names(paths: list[str]) -> dict[str, Path]:
    """Folder or checkpoint paths -> {short name: path}, the name being the last path part
    (with -2, -3, ... where two share it)."""
    out: dict[str, Path] = {}
    for path in paths:
        base = Path(path).resolve().name or "root"
        name, n = base, 1
        while name in out:
            n += 1
            name = f"{base}-{n}"
        out[name] = Path(path).resolve()
    return out


def build(args: argparse.Namespace):
    """The bound server for parsed arguments (tests call this and serve it in a thread)."""
    from .model_service import ModelService
    from .runs import RunsFolder
    from .server import App, make_server

    runs = RunsFolder(args.runs)
    service = ModelService(
        runs, unique_names(args.index), unique_names(args.checkpoint), max_batch=args.max_batch
    )
    local_only = args.host in LOOPBACK  # elsewhere the user chose to be reached by other names
    app = App(runs, service, int(args.max_upload_mb * 2**20), args.max_concurrent, local_only=local_only)
    return make_server(args.host, args.port, app)


def host_warning(host: str) -> str | None:
    """What to tell the user before serving on an address other machines may reach."""
    if host in LOOPBACK:
        return None
    return (
        f"warning: serving on {host}: anyone who can reach this address can use the app and its API "
        "(there is no login) and read the runs and indexed folders it serves"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    server = build(args)
    host, port = server.server_address[:2]
    shown = "localhost" if args.host == "127.0.0.1" else host
    print(f"mlx_clip ui: http://{shown}:{port}/  (runs: {args.runs})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
