"""Open a loop's results in MLflow: start ``mlflow ui`` on 127.0.0.1 and print the link to the loop's iterations.

    python drivers/ui.py                          # the default store (sqlite:///mlflow.db here), its latest loop
    python drivers/ui.py --run-dir runs/obstacle  # that loop's store and iterations
    python drivers/ui.py --open                   # also open the link in a browser

The link opens MLflow's model-training view of the loop's iterations (the shared view the loop
printed), not MLflow's GenAI home. A tracking server (--tracking-uri http://...) is its own UI:
the link is printed and nothing is started. Stop the UI with Ctrl-C.
"""

from __future__ import annotations

import argparse

import _common


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="a loop's run folder: its store, experiment and iterations (default: the latest loop in the store)")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: the run folder's, else the config's tracking.uri, sqlite:///mlflow.db)")
    parser.add_argument("--experiment", help="the experiment (default: the run folder's, else bss-search)")
    parser.add_argument("--port", type=int, default=5000, help="port of mlflow ui on 127.0.0.1 (default: 5000, or the next free one)")
    parser.add_argument("--open", action="store_true", help="open the link in a web browser")
    args = parser.parse_args()

    from bss.search.loop import ui_target
    from bss.tracking.ui import start_ui

    target = ui_target(args.run_dir, args.tracking_uri, args.experiment)
    print(f"MLflow store {target.uri}, experiment {target.experiment}" + (f", loop run {target.loop_run_id}" if target.loop_run_id else ""), flush=True)
    url, proc = start_ui(target, args.port)
    print(f"the loop's iterations: {url}", flush=True)
    if args.open:
        import webbrowser

        webbrowser.open(url)
    if proc is None:
        return 0
    print("mlflow ui is running; stop it with Ctrl-C", flush=True)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    _common.run(main)
