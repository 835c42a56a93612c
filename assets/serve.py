"""`make ui`: the Dagster UI and daemon on the home of the last run, with that run's settings, and the
pictures and dataset viewer pages served beside the UI.

- The home: --home, else $LINEUP_HOME, else the one `make run` / `make demo` wrote to data/.last_home.
- The settings: the LINEUP_* variables that run saved in <home>/run_settings.json (input, social log,
  smoke training, ...) unless the shell sets them, so sensors and launches see what the run saw.
- The port: --port, else $LINEUP_UI_PORT, else 3000.
- What it starts: the daemon (`python -m dagster._daemon run`, as `dagster dev` does; schedules,
  sensors, automation) in a subprocess, and the webserver in this process, with two extra routes
  under /lineup/: pictures/ ($LINEUP_HOME/pictures) and datasets/ (published versions, each with
  its viewer.html), plus /lineup/ itself, an index of the viewer pages.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

DEFAULT_PORT = 3000


def resolve_home(arg: str | None) -> Path:
    from pipeline.config import REPO_ROOT

    if arg:
        return Path(arg).expanduser().resolve()
    if os.environ.get("LINEUP_HOME"):
        return Path(os.environ["LINEUP_HOME"]).expanduser().resolve()
    last = REPO_ROOT / "data" / ".last_home"
    return Path(last.read_text().strip()) if last.exists() else REPO_ROOT / "data"


def resolve_port(arg: int | None) -> int:
    value = arg if arg is not None else os.environ.get("LINEUP_UI_PORT") or DEFAULT_PORT
    try:
        port = int(value)
    except ValueError:
        raise SystemExit(f"error: LINEUP_UI_PORT={value!r} is not a port number") from None
    if not 0 < port < 65536:
        raise SystemExit(f"error: port {port} is out of range")
    return port


def lineup_routes(home: Path, datasets_root: Path):
    """Starlette routes for /lineup/: pictures, dataset folders (viewer pages) and the index."""
    from starlette.responses import HTMLResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from pipeline.pictures import pictures_dir
    from pipeline.viewer import index_page

    async def index(request):
        return HTMLResponse(index_page(datasets_root))

    return Mount("/lineup", routes=[
        Route("/", index),
        Mount("/pictures", app=StaticFiles(directory=str(pictures_dir(home)), check_dir=False)),
        Mount("/datasets", app=StaticFiles(directory=str(datasets_root), check_dir=False)),
    ])


def serve_webserver(home: Path, host: str, port: int, workspace: Path) -> None:
    import dagster_webserver
    import uvicorn
    from dagster import DagsterInstance
    from dagster._core.workspace.context import WorkspaceProcessContext
    from dagster._core.workspace.load_target import WorkspaceFileTarget
    from dagster_webserver.app import create_app_from_workspace_process_context

    from assets.ui import UI_PREFIX
    from pipeline.config import Layout, default_store

    store = default_store(home)
    datasets_root = Layout(home, None if store == home else store).datasets
    with DagsterInstance.get() as instance, WorkspaceProcessContext(
        instance, version=dagster_webserver.__version__,
        workspace_load_target=WorkspaceFileTarget([str(workspace)]),
    ) as context:
        app = create_app_from_workspace_process_context(context)
        # before the UI's catch-all route
        app.router.routes.insert(0, lineup_routes(home, Path(str(datasets_root))))
        print(f"lineup: Dagster UI on http://{host}:{port}/  dataset viewer pages on http://{host}:{port}{UI_PREFIX}/",
              flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m assets.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", help="data root (default: $LINEUP_HOME, else the last run's)")
    ap.add_argument("--port", type=int, help=f"UI port (default: $LINEUP_UI_PORT, else {DEFAULT_PORT})")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--no-daemon", action="store_true", help="the UI only: no schedules, sensors or automation")
    args = ap.parse_args(argv)

    from assets.instance import ensure_dagster_home
    from pipeline.config import REPO_ROOT
    from pipeline.run_settings import apply_run_settings, settings_file

    home = resolve_home(args.home)
    port = resolve_port(args.port)
    os.environ["LINEUP_HOME"] = str(home)
    os.environ.pop("DAGSTER_HOME", None)  # the instance of this home, never another one's
    try:
        applied = apply_run_settings(home)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dagster_home = ensure_dagster_home(home)
    print(f"lineup: home {home}, instance {dagster_home}")
    if applied:
        print(f"lineup: settings of the last run ({settings_file(home)}): "
              + ", ".join(f"{k}={v}" for k, v in applied.items()))
    elif not settings_file(home).exists():
        print(f"lineup: no {settings_file(home).name} in {home} (no `make run` there yet): the environment's settings only")
    workspace = REPO_ROOT / "workspace.yaml"

    def stop(signum, frame):  # uvicorn re-raises SIGTERM after its shutdown: end through `finally`
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    daemon = None
    if not args.no_daemon:
        daemon = subprocess.Popen([sys.executable, "-m", "dagster._daemon", "run", "-w", str(workspace)], cwd=REPO_ROOT)
    try:
        serve_webserver(home, args.host, port, workspace)
    except KeyboardInterrupt:
        pass
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
