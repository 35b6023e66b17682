"""loadtest/locustfile.py's start-up, in a subprocess: importing Locust monkey-patches the whole process with gevent,
which must not happen to the test runner."""

import subprocess
import sys
import textwrap

from tests.support.server import REPO_ROOT

# A worker joined its master before the init event fires; its heartbeats (one a second, dropped as missing after
# three) are greenlets, so reading the images must leave the event loop turning. The stand-in reader holds the CPU
# (as decoding the digits does) for 1.5 s while a greenlet counts 0.1 s ticks.
_WORKER_START = textwrap.dedent(
    """
    import time
    from types import SimpleNamespace

    import gevent
    import locust
    from locust.env import Environment

    import loadtest.locustfile as locustfile

    def slow_images(image_dir):
        deadline = time.perf_counter() + 1.5
        while time.perf_counter() < deadline:
            pass
        return [b"png"]

    locustfile.images = slow_images
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.1)) for _ in range(100)])
    options = SimpleNamespace(image_dir="")
    # The events the locustfile's hooks joined, as `locust -f` passes them; no runner: a worker would have one.
    environment = Environment(user_classes=[locustfile.ClassifyUser], events=locust.events, parsed_options=options)
    environment.events.init.fire(environment=environment, runner=None, web_ui=None)
    ticker.kill()
    print(len(ticks), locustfile.CLASSIFY_IMAGES)
    """
)


def test_reading_the_images_leaves_the_event_loop_turning():
    completed = subprocess.run(
        [sys.executable, "-c", _WORKER_START], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    ticks, images = completed.stdout.split(maxsplit=1)
    assert images.strip() == "[b'png']"
    assert int(ticks) >= 5, f"the event loop ticked {ticks} times in 1.5 s of reading images"
