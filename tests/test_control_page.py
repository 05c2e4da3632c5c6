"""The live status page in a real browser: Debian's chromium (/usr/bin/chromium) driven by
playwright's Python package (never a browser download). Two workers serve live traffic; an
operator logs in on the page, changes r 0.3 -> 0.5 through its form; the chart's target line
steps and the block share follows within 30 s; the audit entry (Redis and the Kafka topic) names
the token's owner; a viewer sees no form and a write from its session gets 403. A screenshot is
saved as a test artefact (``$RTA_TEST_ARTIFACTS``, default ./test-artifacts/control-page.png)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from control_support import control_plane
from test_control import _audit_topic
from worker_support import feeding, make_spread_bundle, request_values, running, wait_for

from stream.policy import Targets
from stream.window import RedisStore

CHROMIUM = os.environ.get("RTA_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("RTA_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
RATE = 800  # requests/s over both workers: a per-second share is then within ~2 pp of the window's

_MISSING = not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists()
pytestmark = [
    pytest.mark.slow,
    # on CI (`make test` installs it as root) a missing browser is a failure, not a silent skip
    pytest.mark.skipif(_MISSING and os.environ.get("CI") != "true",
                       reason=f"{CHROMIUM} missing: `make test` installs Debian's chromium (as root)"),
]


def _launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])


def _chart(page, name: str) -> list[list]:
    return page.evaluate(f"window.rta.charts.{name} ? window.rta.charts.{name}.data : null")


@pytest.mark.timeout(400)
def test_operator_changes_r_on_the_page_and_the_fleet_follows(settings, tmp_path):
    from playwright.sync_api import sync_playwright

    make_spread_bundle(settings.model_dir, "v1")
    store = RedisStore.from_url(settings.redis_url, settings.redis_prefix)
    store.set_targets(Targets(0.3, 0.05, 0.02), "setup", "start")
    ids, values = request_values(RATE * 110, prefix="p", seed=7)
    with control_plane(settings, tmp_path) as cp, \
            running(settings, group_id="page", seed=1), running(settings, group_id="page", seed=2), \
            feeding(settings, values, ids, rate=RATE), sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(cp.url + "/")
            page.fill("#token", cp.operator)
            page.click("#login-btn")
            page.wait_for_selector("#targets-form", state="visible", timeout=10_000)
            assert page.inner_text("#who") == "alice (operator)"
            # both workers in the table, serving v1, the fleet holding r = 0.3
            wait_for(lambda: page.locator("#workers tbody tr").count() == 2, 40, "two workers on the page")
            assert "v1" in page.inner_text("#model")

            def recent_block(since: float, n: int = 3) -> float | None:
                # one evaluate: the chart and the series it was drawn from, from the same tick
                t, block, tot = page.evaluate("[window.rta.charts.block.data[0], window.rta.charts.block.data[1],"
                                              " window.rta.series.series.total]")
                rows = [(b, k) for s, b, k in zip(t, block, tot, strict=True)
                        if s >= since and b is not None and k and k >= RATE // 4 and s < time.time() - 1]
                return sum(b for b, _ in rows[-n:]) / n if len(rows) >= n else None

            wait_for(lambda: (b := recent_block(time.time() - 8)) is not None and abs(b - 0.3) < 0.04, 60,
                     "the block share at 0.3 on the page")
            # the change, through the page's form (expected_version from what the page shows)
            page.fill("#f-r", "0.5")
            page.fill("#f-reason", "browser test: more interception")
            changed = time.time()
            page.click("#f-submit")
            page.wait_for_selector("#f-msg.ok", timeout=10_000)
            wait_for(lambda: page.inner_text("#t-r") == "0.50", 5, "the targets line at 0.50")
            # the chart's target line steps 0.3 -> 0.5 ...
            wait_for(lambda: [v for v in _chart(page, "block")[2] if v is not None][-1] == 0.5, 10,
                     "the target line at 0.5")
            r_line = [v for v in _chart(page, "block")[2] if v is not None]
            assert 0.3 in r_line and r_line[-1] == 0.5
            # ... and the block share follows within 30 s
            wait_for(lambda: (b := recent_block(changed + 1)) is not None and abs(b - 0.5) < 0.04, 30,
                     "the block share at 0.5 within 30 s of the change")
            followed = time.time() - changed
            page.wait_for_timeout(2500)  # one more tick for the picture
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "control-page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            print(f"block share followed r=0.5 within {followed:.1f} s; screenshot {shot}")
            # the audit entry names the token's owner, in Redis and on the Kafka topic
            entry = store.history(1)[0]
            assert entry["who"] == "alice" and entry["new"]["r"] == 0.5 and entry["old"]["r"] == 0.3
            assert any(e["who"] == "alice" and e["new"]["r"] == 0.5 for e in _audit_topic(settings))
            assert "alice" in page.inner_text("#audit")

            # a viewer: no form, and a write from its session is refused (403), nothing changed
            viewer = browser.new_context().new_page()
            viewer.goto(cp.url + "/")
            viewer.fill("#token", cp.viewer)
            viewer.click("#login-btn")
            viewer.wait_for_selector("#main", state="visible", timeout=10_000)
            assert viewer.is_hidden("#targets-form")
            status = viewer.evaluate("""async () => (await fetch('/api/v1/targets', {method: 'POST',
                headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({r: 0.4, reason: 'viewer', expected_version: 2})})).status""")
            assert status == 403
            assert store.get_targets()[0].r == 0.5 and len(store.history(10)) == 2
        finally:
            browser.close()
