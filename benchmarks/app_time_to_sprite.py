"""Time to first sprite in the web demo, measured from the page in Debian's chromium; prints JSON.

    python benchmarks/app_time_to_sprite.py --model outputs/tiny/pipeline
    python benchmarks/app_time_to_sprite.py --model PATH --num 1 --steps 25 --screenshot app.png

Starts ``python -m pokediff.app --model PATH`` on 127.0.0.1 (a free port), opens the page, types a prompt, sets
the number of sprites and steps (the page's defaults unless given), clicks Generate and waits for the gallery.
Reports the server's startup (process start -> page answers; includes the startup timing of one sprite), the
time from the click to the first sprite on screen, the seconds per sprite the page states, and any request that
left 127.0.0.1 (there should be none).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from pokediff.app import HEADLESS_CHROMIUM_ARGS, free_port

REPO = Path(__file__).resolve().parent.parent


def wait_for(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: the app exited with code {server.returncode} before serving")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"error: the app did not answer at {url} within {timeout:.0f} s")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default="a small green grass type creature with a bulb on its back")
    p.add_argument("--num", type=int, default=None, help="sprites per request (default: the page's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the page's)")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--screenshot", default=None, help="save a PNG of the page after the sprites appear")
    p.add_argument(
        "--timing-steps",
        type=int,
        default=None,
        help="passed to the app: steps of the sprite it times at startup (default: the app's)",
    )
    p.add_argument("--startup-timeout", type=float, default=1800)
    args = p.parse_args(argv)

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    log = tempfile.NamedTemporaryFile("w+", prefix="pokediff-app-", suffix=".log")  # a pipe could fill and block
    command = [sys.executable, "-m", "pokediff.app", "--model", args.model, "--port", str(port)]
    if args.timing_steps is not None:
        command += ["--timing-steps", str(args.timing_steps)]
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(url, server, args.startup_timeout)
        startup_s = time.perf_counter() - started
        from playwright.sync_api import sync_playwright

        requests = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=HEADLESS_CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="networkidle")
            page.locator("#prompt textarea").fill(args.prompt)
            for elem_id, value in (("num_sprites", args.num), ("steps", args.steps)):
                if value is not None:
                    page.locator(f"#{elem_id} input[type=number]").fill(str(value))
                    page.locator(f"#{elem_id} input[type=number]").press("Enter")
            click = time.perf_counter()
            page.locator("#generate").click()
            page.locator("#gallery img").first.wait_for(state="visible", timeout=1_800_000)
            first_sprite_s = time.perf_counter() - click
            status = page.locator("#status").inner_text()
            intro = page.locator("#intro").inner_text()
            if args.screenshot:
                page.screenshot(path=args.screenshot, full_page=True)
            browser.close()
    except BaseException:
        log.seek(0)
        print(log.read()[-4000:], file=sys.stderr)
        raise
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    outside = sorted(
        {
            u
            for u in requests
            if urlparse(u).hostname not in ("127.0.0.1", None) and not u.startswith(("data:", "blob:"))
        }
    )
    result = {
        "model": args.model,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_1min": round(os.getloadavg()[0], 1),
        "server_startup_s": round(startup_s, 1),
        "time_to_first_sprite_s": round(first_sprite_s, 2),
        "page_intro": intro,
        "page_status": status,
        "requests": len(requests),
        "requests_outside_127.0.0.1": outside,
    }
    print(json.dumps(result, indent=1, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
